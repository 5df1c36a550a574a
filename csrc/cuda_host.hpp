// Registration of host memory with the CUDA runtime for DMA, found at run time with dlopen so the
// build never depends on CUDA and a machine without it simply registers nothing.
#pragma once

#include <cstddef>
#include <string>

namespace ww {

// Loads the CUDA runtime once: first any libcudart already in the process (JAX may have loaded
// it), then $WEIGHTWIRE_CUDART, then the usual sonames. Returns the library's path, or "" if none
// could be loaded.
std::string cuda_runtime_path();

// cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable). False when no runtime is loaded or the
// runtime refuses (no device, say); never throws.
bool cuda_host_register(void* ptr, std::size_t nbytes);
void cuda_host_unregister(void* ptr);

}  // namespace ww
