#include "stream.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "checksum.hpp"
#include "deadline.hpp"
#include "errors.hpp"

namespace ww {
namespace {

// Copy and checksum alternate in pieces this small, so the checksum reads bytes still in cache.
constexpr std::size_t kPiece = std::size_t{256} << 10;
// One recv() at most this much, so its checksum also runs on bytes still in cache.
constexpr std::size_t kMaxRecv = std::size_t{1} << 20;
// Below this per thread, starting a thread costs more than it saves.
constexpr std::uint64_t kMinBytesPerThread = std::uint64_t{8} << 20;

std::string chunk_text(const Chunk& c) {
    return "leaf " + std::to_string(c.leaf) + " bytes " + std::to_string(c.leaf_offset) + ".." +
           std::to_string(c.leaf_offset + c.length);
}

// Runs fn(i) for every i in [first, last), spread over up to `threads` threads; fn must not throw.
template <typename Fn>
void parallel_for(std::size_t first, std::size_t last, std::uint64_t bytes, unsigned threads, Fn fn) {
    const std::uint64_t by_size = std::max<std::uint64_t>(1, bytes / kMinBytesPerThread);
    const auto workers = static_cast<std::size_t>(std::min<std::uint64_t>(
        {std::uint64_t{threads == 0 ? 1u : threads}, by_size, std::uint64_t{last - first}}));
    const auto run = [&, workers](std::size_t worker) {
        for (std::size_t i = first + worker; i < last; i += workers) fn(i);
    };
    if (workers <= 1) return run(0);
    std::vector<std::thread> pool;
    std::vector<std::size_t> inline_workers{0};  // the calling thread's share, plus any thread we could not start
    for (std::size_t w = 1; w < workers; ++w) {
        try {
            pool.emplace_back(run, w);
        } catch (const std::system_error&) {
            inline_workers.push_back(w);
        }
    }
    for (std::size_t w : inline_workers) run(w);
    for (auto& t : pool) t.join();
}

std::uint32_t copy_with_crc(char* dst, const char* src, std::size_t n) {
    std::uint32_t crc = 0;
    for (std::size_t at = 0; at < n; at += kPiece) {
        const std::size_t len = std::min(kPiece, n - at);
        std::memcpy(dst + at, src + at, len);
        crc = crc32c(dst + at, len, crc);
    }
    return crc;
}

// Sends every byte of `iov` (which it consumes), or throws OsError.
void send_all(int fd, std::vector<iovec>& iov, const Deadline& deadline, const InterruptCheck& interrupt,
              const std::string& what) {
    std::size_t first = 0;
    while (first < iov.size()) {
        msghdr msg{};
        msg.msg_iov = iov.data() + first;
        msg.msg_iovlen = iov.size() - first;
        // MSG_NOSIGNAL: a peer that went away is an EPIPE error here, not a SIGPIPE for the process.
        const ssize_t sent = ::sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) throw_os_error(errno, what);
            if (!wait_ready(fd, POLLOUT, deadline, interrupt)) throw OsError(ETIMEDOUT, what + ": timed out");
            continue;
        }
        auto left = static_cast<std::size_t>(sent);
        while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
        if (first < iov.size()) {
            iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
            iov[first].iov_len -= left;
        }
    }
}

// Drops the bytes of `iov` past `limit` bytes.
void truncate(std::vector<iovec>& iov, std::size_t limit) {
    for (auto& v : iov) {
        v.iov_len = std::min(v.iov_len, limit);
        limit -= v.iov_len;
    }
}

// Reads exactly n bytes into dst, handing each piece to on_data as it arrives.
template <typename OnData>
void recv_exact(int fd, char* dst, std::size_t n, const Deadline& deadline, const InterruptCheck& interrupt,
                const std::string& what, OnData on_data) {
    std::size_t got = 0;
    while (got < n) {
        const ssize_t r = ::recv(fd, dst + got, std::min(n - got, kMaxRecv), MSG_DONTWAIT);
        if (r > 0) {
            on_data(dst + got, static_cast<std::size_t>(r));
            got += static_cast<std::size_t>(r);
            continue;
        }
        if (r == 0) {
            throw OsError(ECONNRESET, what + ": the sender closed the connection after " + std::to_string(got) +
                                          " of " + std::to_string(n) + " bytes");
        }
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) throw_os_error(errno, what);
        if (!wait_ready(fd, POLLIN, deadline, interrupt)) throw OsError(ETIMEDOUT, what + ": timed out");
    }
}

std::pair<std::size_t, std::size_t> leaf_chunks(const ChunkPlan& plan, std::uint32_t leaf) {
    const auto& chunks = plan.chunks();
    const auto range = std::equal_range(chunks.begin(), chunks.end(), Chunk{leaf, 0, 0, 0, 0},
                                        [](const Chunk& a, const Chunk& b) { return a.leaf < b.leaf; });
    return {static_cast<std::size_t>(range.first - chunks.begin()),
            static_cast<std::size_t>(range.second - chunks.begin())};
}

void check_stream(unsigned stream, unsigned streams) {
    if (streams == 0 || stream >= streams) {
        throw std::invalid_argument("stream " + std::to_string(stream) + " of " + std::to_string(streams) +
                                    " does not exist");
    }
}

}  // namespace

void send_stripe(int fd, const char* base, const ChunkPlan& plan, unsigned stream, unsigned streams,
                 const FrameTag& tag, double timeout_s, const SendFaults& faults, const InterruptCheck& interrupt) {
    check_stream(stream, streams);
    const Deadline deadline(timeout_s);
    const auto& chunks = plan.chunks();
    std::uint64_t sent = 0;
    for (std::size_t i = stream; i < chunks.size(); i += streams) {
        const Chunk& chunk = chunks[i];
        unsigned char header[kFrameHeaderSize];
        encode_frame_header(tag, chunk, header);
        const char* payload = base + chunk.buffer_offset;
        std::vector<char> corrupted;
        if (static_cast<long long>(i) == faults.corrupt_chunk && chunk.length > 0) {
            corrupted.assign(payload, payload + chunk.length);
            corrupted[chunk.length / 2] ^= 0x01;
            payload = corrupted.data();
        }
        std::vector<iovec> iov{{header, kFrameHeaderSize}, {const_cast<char*>(payload), chunk.length}};
        const std::uint64_t frame = kFrameHeaderSize + chunk.length;
        const bool cut = faults.cut_after_bytes >= 0 && sent + frame > static_cast<std::uint64_t>(faults.cut_after_bytes);
        const bool stall =
            faults.stall_after_bytes >= 0 && sent + frame > static_cast<std::uint64_t>(faults.stall_after_bytes);
        if (cut || stall) {
            const auto limit = static_cast<std::uint64_t>(cut ? faults.cut_after_bytes : faults.stall_after_bytes);
            truncate(iov, static_cast<std::size_t>(limit - sent));
        }
        const std::string what = "sending " + chunk_text(chunk);
        send_all(fd, iov, deadline, interrupt, what);
        if (cut) {
            ::shutdown(fd, SHUT_RDWR);
            throw OsError(ECONNABORTED, what + ": connection cut by a test hook");
        }
        if (stall) {
            // Readable here means the peer closed or the socket was shut down.
            if (wait_ready(fd, POLLIN | POLLRDHUP, deadline, interrupt)) {
                throw OsError(ECONNABORTED, what + ": stalled by a test hook, then closed");
            }
            throw OsError(ETIMEDOUT, what + ": stalled by a test hook until the deadline");
        }
        sent += frame;
    }
}

void recv_stripe(int fd, char* base, const ChunkPlan& plan, unsigned stream, unsigned streams, const FrameTag& tag,
                 double timeout_s, const InterruptCheck& interrupt) {
    check_stream(stream, streams);
    const Deadline deadline(timeout_s);
    const auto& chunks = plan.chunks();
    for (std::size_t i = stream; i < chunks.size(); i += streams) {
        const Chunk& chunk = chunks[i];
        const std::string what = "receiving " + chunk_text(chunk);
        unsigned char header[kFrameHeaderSize];
        recv_exact(fd, reinterpret_cast<char*>(header), kFrameHeaderSize, deadline, interrupt, what,
                   [](const char*, std::size_t) {});
        check_frame_header(header, kFrameHeaderSize, tag, chunk);
        // The destination comes from our own plan, never from the header: a hostile sender can
        // only fail the checks, not steer a write.
        std::uint32_t crc = 0;
        recv_exact(fd, base + chunk.buffer_offset, chunk.length, deadline, interrupt, what,
                   [&crc](const char* data, std::size_t n) { crc = crc32c(data, n, crc); });
        if (crc != chunk.crc) {
            throw IntegrityFailure("checksum mismatch in " + chunk_text(chunk) + ": received CRC32C " +
                                   std::to_string(crc) + ", published " + std::to_string(chunk.crc));
        }
    }
}

void stage_leaf(char* base, const char* src, ChunkPlan& plan, std::uint32_t leaf, unsigned threads) {
    if (leaf >= plan.leaf_offsets().size()) {
        throw std::invalid_argument("leaf " + std::to_string(leaf) + " does not exist");
    }
    const auto [first, last] = leaf_chunks(plan, leaf);
    auto& chunks = plan.chunks();
    std::uint64_t bytes = 0;
    for (std::size_t i = first; i < last; ++i) bytes += chunks[i].length;
    parallel_for(first, last, bytes, threads, [&](std::size_t i) {
        Chunk& c = chunks[i];
        c.crc = copy_with_crc(base + c.buffer_offset, src + c.leaf_offset, c.length);
    });
}

void read_verified(int fd, char* dst, const ChunkPlan& plan, unsigned threads) {
    const auto& chunks = plan.chunks();
    std::vector<std::uint32_t> got(chunks.size());
    std::vector<int> errors(chunks.size(), 0);  // errno per chunk; -1: the segment ended early
    parallel_for(0, chunks.size(), plan.total_bytes(), threads, [&](std::size_t i) {
        const Chunk& c = chunks[i];
        std::uint32_t crc = 0;
        for (std::uint64_t at = 0; at < c.length;) {
            const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(kPiece, c.length - at));
            char* out = dst + c.buffer_offset + at;
            const ssize_t n = ::pread(fd, out, want, static_cast<off_t>(c.buffer_offset + at));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                errors[i] = n < 0 ? errno : -1;
                return;
            }
            crc = crc32c(out, static_cast<std::size_t>(n), crc);  // while the bytes are still in cache
            at += static_cast<std::uint64_t>(n);
        }
        got[i] = crc;
    });
    for (std::size_t i = 0; i < chunks.size(); ++i) {
        if (errors[i] > 0) throw_os_error(errors[i], "reading " + chunk_text(chunks[i]) + " from shared memory");
        if (errors[i] < 0) throw IntegrityFailure("the shared segment ends inside " + chunk_text(chunks[i]));
        if (got[i] != chunks[i].crc) {
            throw IntegrityFailure("checksum mismatch in " + chunk_text(chunks[i]) + ": read CRC32C " +
                                   std::to_string(got[i]) + ", published " + std::to_string(chunks[i].crc));
        }
    }
}

}  // namespace ww
