// Page-aligned, pre-faulted, best-effort pinned host buffers, and a multi-threaded copy into them.
#pragma once

#include <atomic>
#include <cstddef>

namespace ww {

std::size_t page_size();

class HostBuffer {
public:
    // nbytes >= 1; alignment a power of two (buffers are always at least page-aligned).
    // lock: try mlock; register_cuda: try cudaHostRegister when a CUDA runtime can be loaded.
    // Neither failing is an error: locked()/cuda_registered() report what happened.
    // shared: back the memory with a memfd (fd()), which another process can map; page alignment
    // only. The memory lives until this buffer and every mapping of the fd are gone, so nothing
    // can leak into /dev/shm.
    HostBuffer(std::size_t nbytes, std::size_t alignment, bool lock, bool register_cuda, bool shared = false);
    ~HostBuffer();
    HostBuffer(const HostBuffer&) = delete;
    HostBuffer& operator=(const HostBuffer&) = delete;

    void* data() const { return data_; }
    std::size_t size() const { return size_; }
    std::size_t alignment() const { return alignment_; }
    bool locked() const { return locked_; }
    bool cuda_registered() const { return cuda_registered_; }
    bool closed() const { return data_ == nullptr; }
    int fd() const { return fd_; }  // the memfd of a shared buffer; -1 otherwise or once closed

    // Live views (buffer-protocol exports). While any exists the memory cannot be freed.
    int exports() const { return exports_.load(); }
    void add_export();  // throws std::invalid_argument once closed
    void remove_export() { exports_.fetch_sub(1); }

    // Frees the memory now. Throws BufferInUse while views exist; a no-op when already closed.
    void close();

private:
    void release_memory();
    void* data_ = nullptr;
    void* mapping_ = nullptr;  // what mmap returned; data_ is aligned inside it
    std::size_t mapping_size_ = 0;
    int fd_ = -1;
    std::size_t size_ = 0;
    std::size_t alignment_ = 0;
    bool locked_ = false;
    bool cuda_registered_ = false;
    std::atomic<int> exports_{0};
};

// Copies n bytes using up to `threads` threads (1 = the calling thread only). Small copies stay on
// the calling thread, where starting threads would cost more than it saves.
void parallel_copy(void* dst, const void* src, std::size_t n, unsigned threads);

// The thread count parallel_copy uses by default on this machine.
unsigned default_copy_threads();

}  // namespace ww
