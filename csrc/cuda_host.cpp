#include "cuda_host.hpp"

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <mutex>

namespace ww {
namespace {

using RegisterFn = int (*)(void*, std::size_t, unsigned int);
using UnregisterFn = int (*)(void*);
using GetLastErrorFn = int (*)();

constexpr unsigned int kCudaHostRegisterPortable = 1;

struct CudaRuntime {
    void* handle = nullptr;
    std::string path;
    RegisterFn host_register = nullptr;
    UnregisterFn host_unregister = nullptr;
    GetLastErrorFn get_last_error = nullptr;
};

std::string path_of(void* handle, const char* fallback) {
    link_map* map = nullptr;
    if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr &&
        map->l_name[0] != '\0') {
        return map->l_name;
    }
    return fallback;
}

CudaRuntime load() {
    static const char* const kSonames[] = {"libcudart.so", "libcudart.so.13", "libcudart.so.12",
                                           "libcudart.so.11.0"};
    void* handle = nullptr;
    const char* chosen = nullptr;
    for (const char* name : kSonames) {
        if ((handle = dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD)) != nullptr) {
            chosen = name;
            break;
        }
    }
    if (handle == nullptr) {
        if (const char* env = std::getenv("WEIGHTWIRE_CUDART"); env != nullptr && env[0] != '\0') {
            handle = dlopen(env, RTLD_NOW | RTLD_LOCAL);
            chosen = env;
        }
    }
    for (const char* name : kSonames) {
        if (handle != nullptr) break;
        handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
        chosen = name;
    }
    CudaRuntime rt;
    if (handle == nullptr) return rt;
    rt.host_register = reinterpret_cast<RegisterFn>(dlsym(handle, "cudaHostRegister"));
    rt.host_unregister = reinterpret_cast<UnregisterFn>(dlsym(handle, "cudaHostUnregister"));
    rt.get_last_error = reinterpret_cast<GetLastErrorFn>(dlsym(handle, "cudaGetLastError"));
    if (rt.host_register == nullptr || rt.host_unregister == nullptr) {
        dlclose(handle);
        return CudaRuntime{};
    }
    rt.handle = handle;
    rt.path = path_of(handle, chosen);
    return rt;
}

const CudaRuntime& runtime() {
    // Loaded once and never unloaded: registered buffers may outlive any other owner.
    static std::once_flag once;
    static CudaRuntime rt;
    std::call_once(once, [] { rt = load(); });
    return rt;
}

}  // namespace

std::string cuda_runtime_path() { return runtime().path; }

bool cuda_host_register(void* ptr, std::size_t nbytes) {
    const CudaRuntime& rt = runtime();
    if (rt.host_register == nullptr) return false;
    if (rt.host_register(ptr, nbytes, kCudaHostRegisterPortable) == 0) return true;
    // Clear the sticky per-thread error so later CUDA calls in this process are not blamed for it.
    if (rt.get_last_error != nullptr) rt.get_last_error();
    return false;
}

void cuda_host_unregister(void* ptr) {
    const CudaRuntime& rt = runtime();
    if (rt.host_unregister != nullptr && rt.host_unregister(ptr) != 0 && rt.get_last_error != nullptr) {
        rt.get_last_error();
    }
}

}  // namespace ww
