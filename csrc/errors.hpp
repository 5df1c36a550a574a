// Error types the core throws; module.cpp maps them onto Python exceptions.
#pragma once

#include <stdexcept>
#include <string>

namespace ww {

// A failed system call. Surfaces in Python as OSError(errno, message), which Python turns into
// the matching subclass (ConnectionRefusedError, TimeoutError for ETIMEDOUT, ...).
class OsError : public std::runtime_error {
public:
    OsError(int err, const std::string& message) : std::runtime_error(message), errno_(err) {}
    int error_number() const noexcept { return errno_; }

private:
    int errno_;
};

// Throws OsError for `err` with "<context>: <strerror(err)>" as the message.
[[noreturn]] void throw_os_error(int err, const std::string& context);

}  // namespace ww

namespace ww {

// An allocation the machine cannot satisfy; surfaces as MemoryError.
class OutOfMemory : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// An operation refused because Python views of a buffer are still alive; surfaces as BufferError.
class BufferInUse : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

}  // namespace ww

namespace ww {

// Received bytes that are not what was published: a bad frame header or a checksum mismatch.
// Surfaces as weightwire.errors.IntegrityError; such bytes are never returned as weights.
class IntegrityFailure : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

}  // namespace ww
