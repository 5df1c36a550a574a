#include "net.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "deadline.hpp"
#include "errors.hpp"

namespace ww {
namespace {

// Long waits are cut into slices this long so Ctrl-C and close() are noticed promptly.
constexpr int kSliceMs = 100;

struct SockAddr {
    sockaddr_storage storage{};
    socklen_t len = 0;
    int family() const { return storage.ss_family; }
    sockaddr* ptr() { return reinterpret_cast<sockaddr*>(&storage); }
};

void check_port(int port) {
    if (port < 0 || port > 65535) {
        throw std::invalid_argument("port must be in 0..65535, got " + std::to_string(port));
    }
}

// Numeric hosts only: name resolution is the Python layer's explicit job, so a hostname can never
// turn into a wildcard bind here.
SockAddr numeric_sockaddr(const std::string& host, int port) {
    check_port(port);
    if (host.empty() || host.find('\0') != std::string::npos) {
        throw std::invalid_argument("not a numeric IP address: '" + host + "'");
    }
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    if (getaddrinfo(host.c_str(), service.c_str(), &hints, &res) != 0 || res == nullptr) {
        throw std::invalid_argument("not a numeric IP address: '" + host + "'");
    }
    SockAddr out;
    std::memcpy(&out.storage, res->ai_addr, res->ai_addrlen);
    out.len = res->ai_addrlen;
    freeaddrinfo(res);
    return out;
}

Endpoint endpoint_of(const sockaddr* sa, socklen_t len) {
    char host[NI_MAXHOST];
    char serv[NI_MAXSERV];
    const int rc = getnameinfo(sa, len, host, sizeof host, serv, sizeof serv,
                               NI_NUMERICHOST | NI_NUMERICSERV);
    if (rc != 0) throw std::runtime_error(std::string("getnameinfo: ") + gai_strerror(rc));
    return Endpoint{sa->sa_family, host, std::atoi(serv)};
}

Endpoint local_endpoint(int fd, const std::string& context) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
        throw_os_error(errno, context + ": getsockname");
    }
    return endpoint_of(reinterpret_cast<sockaddr*>(&ss), len);
}

std::string seconds_text(double s) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g s", s);
    return buf;
}

}  // namespace

bool wait_ready(int fd, short events, const Deadline& deadline, const InterruptCheck& interrupt) {
    for (;;) {
        const int budget = std::min(deadline.remaining_ms(), kSliceMs);
        pollfd p{fd, events, 0};
        const int rc = ::poll(&p, 1, budget);
        if (rc > 0) return true;
        if (rc < 0 && errno != EINTR) throw_os_error(errno, "poll");
        if (interrupt) interrupt();
        if (deadline.expired()) return false;
    }
}

std::string format_endpoint(const std::string& host, int port) {
    if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
    return host + ":" + std::to_string(port);
}

UniqueFd::~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
}

Listener::Listener(const std::string& host, int port, int backlog) {
    if (backlog < 1) throw std::invalid_argument("backlog must be >= 1, got " + std::to_string(backlog));
    SockAddr addr = numeric_sockaddr(host, port);
    const std::string where = "bind " + format_endpoint(host, port);
    // Non-blocking so an accept() that loses a race for a connection returns EAGAIN instead of
    // blocking without a deadline.
    UniqueFd fd(::socket(addr.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (fd.get() < 0) throw_os_error(errno, where + ": socket");
    const int one = 1;
    // SO_REUSEADDR only lets a restarted server take a port still in TIME_WAIT; Linux still
    // refuses a second listener on a live port with EADDRINUSE.
    if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) {
        throw_os_error(errno, where + ": setsockopt(SO_REUSEADDR)");
    }
    // "::" accepts IPv4 too, whatever the host's bindv6only default: advertise() relies on it.
    const int zero = 0;
    if (addr.family() == AF_INET6 &&
        ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero) != 0) {
        throw_os_error(errno, where + ": setsockopt(IPV6_V6ONLY)");
    }
    if (::bind(fd.get(), addr.ptr(), addr.len) != 0) throw_os_error(errno, where);
    if (::listen(fd.get(), backlog) != 0) throw_os_error(errno, where + ": listen");
    local_ = local_endpoint(fd.get(), where);
    fd_ = fd.release();
}

Listener::~Listener() { close(); }

int Listener::fd() const {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_ ? -1 : fd_;
}

bool Listener::closed() const {
    std::lock_guard<std::mutex> lock(mu_);
    return closed_;
}

void Listener::close() {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    if (in_flight_ > 0) {
        // A waiter still polls this fd: wake it instead of closing a number it may then reuse;
        // the last waiter to leave closes the fd.
        ::shutdown(fd_, SHUT_RDWR);
    } else {
        ::close(fd_);
        fd_ = -1;
    }
}

void Listener::finish_accept() {
    std::lock_guard<std::mutex> lock(mu_);
    --in_flight_;
    if (closed_ && in_flight_ == 0 && fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
}

Accepted Listener::accept(double timeout_s, const InterruptCheck& interrupt) {
    const Deadline deadline(timeout_s);
    const std::string where = "accept on " + format_endpoint(local_.host, local_.port);
    int fd;
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (closed_) throw OsError(EBADF, where + ": listener is closed");
        ++in_flight_;
        fd = fd_;
    }
    struct Leave {
        Listener* self;
        ~Leave() { self->finish_accept(); }
    } leave{this};

    for (;;) {
        if (!wait_ready(fd, POLLIN, deadline, [&] {
                if (closed()) throw OsError(EBADF, where + ": listener closed while waiting");
                if (interrupt) interrupt();
            })) {
            throw OsError(ETIMEDOUT, where + ": timed out after " + seconds_text(timeout_s));
        }
        if (closed()) throw OsError(EBADF, where + ": listener closed while waiting");
        sockaddr_storage ss{};
        socklen_t len = sizeof ss;
        UniqueFd conn(::accept4(fd, reinterpret_cast<sockaddr*>(&ss), &len, SOCK_CLOEXEC));
        if (conn.get() >= 0) {
            Endpoint peer = endpoint_of(reinterpret_cast<sockaddr*>(&ss), len);
            return Accepted{conn.release(), std::move(peer)};
        }
        // close() may have shut the socket down after the check above (accept4 then says EINVAL).
        if (closed()) throw OsError(EBADF, where + ": listener closed while waiting");
        // Another thread took the connection, or the peer gave up before we got to it: wait on.
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) {
            if (deadline.expired()) {
                throw OsError(ETIMEDOUT, where + ": timed out after " + seconds_text(timeout_s));
            }
            continue;
        }
        throw_os_error(errno, where);
    }
}

int connect_tcp(const std::string& host, int port, double timeout_s, const InterruptCheck& interrupt) {
    const Deadline deadline(timeout_s);
    SockAddr addr = numeric_sockaddr(host, port);
    const std::string where = "connect to " + format_endpoint(host, port);
    UniqueFd fd(::socket(addr.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (fd.get() < 0) throw_os_error(errno, where + ": socket");
    if (::connect(fd.get(), addr.ptr(), addr.len) != 0) {
        if (errno != EINPROGRESS) throw_os_error(errno, where);
        if (!wait_ready(fd.get(), POLLOUT, deadline, interrupt)) {
            throw OsError(ETIMEDOUT, where + ": timed out after " + seconds_text(timeout_s));
        }
        int err = 0;
        socklen_t len = sizeof err;
        if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
        if (err != 0) throw_os_error(err, where);
    }
    const int flags = ::fcntl(fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
        throw_os_error(errno, where + ": fcntl");
    }
    return fd.release();
}

std::string route_source(const std::string& host) {
    // Port 9 (discard) is arbitrary: a UDP connect only asks the routing table, sending nothing.
    SockAddr addr = numeric_sockaddr(host, 9);
    const std::string where = "route to " + host;
    UniqueFd fd(::socket(addr.family(), SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (fd.get() < 0) throw_os_error(errno, where + ": socket");
    if (::connect(fd.get(), addr.ptr(), addr.len) != 0) throw_os_error(errno, where);
    return local_endpoint(fd.get(), where).host;
}

std::vector<InterfaceAddress> list_interfaces() {
    ifaddrs* raw = nullptr;
    if (::getifaddrs(&raw) != 0) throw_os_error(errno, "getifaddrs");
    const std::unique_ptr<ifaddrs, decltype(&::freeifaddrs)> head(raw, &::freeifaddrs);
    std::vector<InterfaceAddress> out;
    for (ifaddrs* it = head.get(); it != nullptr; it = it->ifa_next) {
        if (it->ifa_addr == nullptr) continue;
        const int family = it->ifa_addr->sa_family;
        if (family != AF_INET && family != AF_INET6) continue;
        const socklen_t len = family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
        InterfaceAddress entry;
        entry.name = it->ifa_name;
        entry.family = family;
        entry.address = endpoint_of(it->ifa_addr, len).host;
        entry.is_loopback = (it->ifa_flags & IFF_LOOPBACK) != 0;
        entry.is_up = (it->ifa_flags & IFF_UP) != 0;
        out.push_back(std::move(entry));
    }
    return out;
}

}  // namespace ww
