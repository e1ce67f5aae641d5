// What PyTorch's Python bindings see of a failed cudalloc_malloc_torch
// (tests/python/test_real_torch_oom.py): built against the real torch
// headers and libc10.so, loaded with ctypes (RTLD_LOCAL) into a Python that
// has, or has not, imported torch (which loads its libraries RTLD_LOCAL).
// It opens libcudalloc.so RTLD_LOCAL, as CUDAPluggableAllocator does, calls
// cudalloc_malloc_torch through a std::function, as torch holds it, and
// says which C++ type arrived, with the message torch would show.
#include <c10/util/Exception.h>

#include <dlfcn.h>

#include <cstddef>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>

// src/ffi/cxx_throw.rs allocates C10_OBJECT_BYTES for the exception object.
static_assert(sizeof(c10::OutOfMemoryError) <= 1024, "c10::OutOfMemoryError grew");
static_assert(sizeof(c10::OutOfMemoryError) == sizeof(c10::Error),
              "OutOfMemoryError adds no member to c10::Error");
// ... and passes c10::SourceLocation by value as this struct.
static_assert(offsetof(c10::SourceLocation, function) == 0 &&
                  offsetof(c10::SourceLocation, file) == sizeof(void*) &&
                  offsetof(c10::SourceLocation, line) == 2 * sizeof(void*) &&
                  sizeof(c10::SourceLocation) == 3 * sizeof(void*),
              "c10::SourceLocation is {const char*, const char*, uint32_t}");

static void copy(const std::string& s, char* out, size_t len) {
    std::snprintf(out, len, "%s", s.c_str());
}

// 1: c10::OutOfMemoryError, 2: another c10::Error, 3: std::runtime_error,
// 4: something else, 0: no exception, -1: libcudalloc.so would not load.
extern "C" int try_torch_alloc(const char* library, size_t size, char* out, size_t len) {
    void* h = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        copy(dlerror(), out, len);
        return -1;
    }
    auto raw = reinterpret_cast<void* (*)(size_t, int, void*)>(dlsym(h, "cudalloc_malloc_torch"));
    std::function<void*(size_t, int, void*)> alloc = raw;
    try {
        void* p = alloc(size, 0, nullptr);
        copy(p ? "served" : "NULL", out, len);
        return 0;
    } catch (const c10::OutOfMemoryError& e) {
        copy(e.what_without_backtrace(), out, len);
        return 1;
    } catch (const c10::Error& e) {
        copy(e.what_without_backtrace(), out, len);
        return 2;
    } catch (const std::runtime_error& e) {
        copy(e.what(), out, len);
        return 3;
    } catch (...) {
        copy("?", out, len);
        return 4;
    }
}
