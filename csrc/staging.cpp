#include "staging.hpp"

#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "cuda_host.hpp"
#include "errors.hpp"

namespace ww {
namespace {

constexpr std::size_t kMaxAlignment = std::size_t{1} << 30;
// Below this a copy runs on one thread: starting a thread costs tens of microseconds.
constexpr std::size_t kMinBytesPerThread = std::size_t{8} << 20;
constexpr unsigned kMaxCopyThreads = 8;

std::size_t physical_memory() {
    const long pages = ::sysconf(_SC_PHYS_PAGES);
    return pages > 0 ? static_cast<std::size_t>(pages) * page_size() : SIZE_MAX;
}

}  // namespace

std::size_t page_size() {
    static const std::size_t size = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    return size;
}

HostBuffer::HostBuffer(std::size_t nbytes, std::size_t alignment, bool lock, bool register_cuda, bool shared) {
    if (nbytes == 0) throw std::invalid_argument("nbytes must be >= 1, got 0");
    if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > kMaxAlignment) {
        throw std::invalid_argument("alignment must be a power of two <= 1 GiB, got " +
                                    std::to_string(alignment));
    }
    // Pre-faulting a buffer larger than RAM would get the process OOM-killed instead of raising.
    if (nbytes > physical_memory()) {
        throw OutOfMemory("HostBuffer of " + std::to_string(nbytes) +
                          " bytes exceeds this machine's physical memory (" +
                          std::to_string(physical_memory()) + " bytes)");
    }
    const std::size_t page = page_size();
    alignment_ = std::max(alignment, page);
    size_ = nbytes;
    const std::size_t rounded = (nbytes + page - 1) / page * page;
    mapping_size_ = rounded + (alignment_ - page);
    int flags = MAP_PRIVATE | MAP_ANONYMOUS;
    if (shared) {
        if (alignment_ != page) {
            throw std::invalid_argument("a shared HostBuffer is page-aligned only, got alignment " +
                                        std::to_string(alignment));
        }
        fd_ = ::memfd_create("weightwire-staging", MFD_CLOEXEC);
        if (fd_ < 0) throw_os_error(errno, "memfd_create");
        if (::ftruncate(fd_, static_cast<off_t>(mapping_size_)) != 0) {
            const int err = errno;
            release_memory();
            throw OutOfMemory("shared HostBuffer of " + std::to_string(nbytes) + " bytes: ftruncate failed: " +
                              std::strerror(err));
        }
        flags = MAP_SHARED;
    }
    // MAP_POPULATE pre-faults every page so the first transfer does not pay for page faults.
    void* map = ::mmap(nullptr, mapping_size_, PROT_READ | PROT_WRITE, flags | MAP_POPULATE, fd_, 0);
    if (map == MAP_FAILED) {
        const int err = errno;
        release_memory();
        throw OutOfMemory("HostBuffer of " + std::to_string(nbytes) + " bytes: mmap failed: " + std::strerror(err));
    }
    mapping_ = map;
    const auto base = reinterpret_cast<std::uintptr_t>(map);
    data_ = reinterpret_cast<void*>((base + alignment_ - 1) / alignment_ * alignment_);
    // mlock can be refused (RLIMIT_MEMLOCK in containers): that only means "not pinned".
    locked_ = lock && ::mlock(data_, rounded) == 0;
    cuda_registered_ = register_cuda && cuda_host_register(data_, rounded);
}

HostBuffer::~HostBuffer() { release_memory(); }

void HostBuffer::add_export() {
    if (closed()) throw std::invalid_argument("HostBuffer is closed");
    exports_.fetch_add(1);
}

void HostBuffer::close() {
    if (closed()) return;
    const int views = exports_.load();
    if (views > 0) {
        throw BufferInUse("cannot close a HostBuffer while " + std::to_string(views) +
                          " view(s) of it are alive (release memoryviews/arrays first)");
    }
    release_memory();
}

void HostBuffer::release_memory() {
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
    if (data_ == nullptr) return;
    if (cuda_registered_) cuda_host_unregister(data_);
    // munmap also drops the mlock.
    ::munmap(mapping_, mapping_size_);
    data_ = nullptr;
    mapping_ = nullptr;
    cuda_registered_ = false;
    locked_ = false;
}

unsigned default_copy_threads() {
    const unsigned hw = std::thread::hardware_concurrency();
    return std::clamp(hw, 1u, kMaxCopyThreads);
}

void parallel_copy(void* dst, const void* src, std::size_t n, unsigned threads) {
    const std::size_t by_size = std::max<std::size_t>(1, n / kMinBytesPerThread);
    const std::size_t workers = std::min<std::size_t>({threads == 0 ? 1 : threads, by_size, kMaxCopyThreads});
    if (workers <= 1) {
        std::memcpy(dst, src, n);
        return;
    }
    // Page-aligned chunk boundaries keep each thread on its own pages.
    const std::size_t page = page_size();
    const std::size_t chunk = (n / workers + page - 1) / page * page;
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    std::vector<std::thread> pool;
    pool.reserve(workers - 1);
    std::size_t offset = chunk;  // the calling thread copies the first chunk itself
    for (; offset < n; offset += chunk) {
        const std::size_t len = std::min(chunk, n - offset);
        try {
            pool.emplace_back([=] { std::memcpy(d + offset, s + offset, len); });
        } catch (const std::system_error&) {
            std::memcpy(d + offset, s + offset, len);  // no thread to be had: copy it here
        }
    }
    std::memcpy(d, s, std::min(chunk, n));
    for (auto& t : pool) t.join();
}

}  // namespace ww
