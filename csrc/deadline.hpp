// A wall-clock deadline for blocking calls: every wait in the core takes one.
#pragma once

#include <chrono>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

namespace ww {

class Deadline {
public:
    // `timeout_s` must be finite and >= 0: an unbounded wait is never allowed.
    explicit Deadline(double timeout_s) {
        if (!std::isfinite(timeout_s) || timeout_s < 0.0) {
            std::ostringstream text;
            text << "timeout must be a finite number of seconds >= 0, got " << timeout_s;
            throw std::invalid_argument(text.str());
        }
        // Capped at one year so the conversion below cannot overflow.
        const double capped = timeout_s < kMaxSeconds ? timeout_s : kMaxSeconds;
        end_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(capped));
    }

    // Milliseconds left for poll(), rounded up so a short wait never becomes a busy loop; 0 once
    // the deadline has passed.
    int remaining_ms() const {
        const auto left = end_ - Clock::now();
        if (left <= Clock::duration::zero()) return 0;
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count() + 1;
        return ms > kMaxPollMs ? kMaxPollMs : static_cast<int>(ms);
    }

    bool expired() const { return Clock::now() >= end_; }

private:
    using Clock = std::chrono::steady_clock;
    static constexpr double kMaxSeconds = 365.0 * 24 * 3600;
    static constexpr long long kMaxPollMs = 1 << 30;  // poll() takes an int; loop for longer waits
    Clock::time_point end_;
};

}  // namespace ww
