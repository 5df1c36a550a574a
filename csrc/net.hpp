// TCP listeners that stay bound, connects with deadlines, and local-address discovery.
#pragma once

#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace ww {

// A numeric address as the kernel reports it.
struct Endpoint {
    int family = 0;    // AF_INET or AF_INET6
    std::string host;  // numeric, e.g. "127.0.0.1" or "::1" (no brackets)
    int port = 0;
};

struct InterfaceAddress {
    std::string name;
    int family = 0;
    std::string address;  // numeric; IPv6 link-local addresses carry their "%scope"
    bool is_loopback = false;
    bool is_up = false;
};

// Called between bounded slices of a long wait, with no lock held; may throw to abort the wait
// (the Python binding uses it to deliver Ctrl-C).
using InterruptCheck = std::function<void()>;

// Polls `fd` for `events` in short slices until it is ready or `deadline` passes (false then).
// `interrupt` runs after every idle slice, so Ctrl-C and close() are noticed promptly.
class Deadline;
bool wait_ready(int fd, short events, const Deadline& deadline, const InterruptCheck& interrupt);

// "host:port", with brackets around IPv6 hosts; used in every message that names an address.
std::string format_endpoint(const std::string& host, int port);

// An fd that is closed when this goes out of scope unless released.
class UniqueFd {
public:
    explicit UniqueFd(int fd = -1) : fd_(fd) {}
    ~UniqueFd();
    UniqueFd(const UniqueFd&) = delete;
    UniqueFd& operator=(const UniqueFd&) = delete;
    int get() const { return fd_; }
    int release() {
        const int fd = fd_;
        fd_ = -1;
        return fd;
    }

private:
    int fd_;
};

struct Accepted {
    int fd;  // owned by the caller; blocking, close-on-exec
    Endpoint peer;
};

// A listening TCP socket, bound once for its whole life: the port it reports is the port peers
// reach, with no window in which another process could take it.
class Listener {
public:
    // `host` must be a numeric IPv4/IPv6 address; port 0 lets the kernel choose.
    Listener(const std::string& host, int port, int backlog);
    ~Listener();
    Listener(const Listener&) = delete;
    Listener& operator=(const Listener&) = delete;

    const Endpoint& local() const { return local_; }
    int fd() const;  // -1 once closed
    bool closed() const;

    // Waits up to timeout_s for one connection. Safe to call from several threads, and to close()
    // from another thread while a call waits: the waiter then fails with EBADF.
    Accepted accept(double timeout_s, const InterruptCheck& interrupt);
    void close();

private:
    void finish_accept();
    mutable std::mutex mu_;
    int fd_ = -1;
    bool closed_ = false;
    int in_flight_ = 0;  // accept() calls using fd_; the fd is closed when the last one leaves
    Endpoint local_;
};

// Connects to a numeric host:port within timeout_s; returns a blocking, close-on-exec fd.
int connect_tcp(const std::string& host, int port, double timeout_s, const InterruptCheck& interrupt);

// The source address the kernel would use to reach `host` (a UDP connect: no packet is sent).
std::string route_source(const std::string& host);

std::vector<InterfaceAddress> list_interfaces();

}  // namespace ww
