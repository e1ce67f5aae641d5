/* PyTorch's situation under Python, for tests/cxx_alloc_fn.rs: libcudalloc.so
 * and a C++ library (the checks of torch_alloc_fn.cpp, standing in for
 * libtorch) are each dlopen()ed with RTLD_LOCAL, and the C++ side gets
 * cudalloc's functions as raw addresses, as CUDAPluggableAllocator does.
 * libstdc++ is then loaded, but neither in the global scope nor in
 * cudalloc's. Usage: load_local LIBCUDALLOC LIBCHECKS; prints "ok". */
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    void *cudalloc = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!cudalloc) {
        fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
        return 4;
    }
    const char *names[] = {"cudalloc_malloc_torch", "cudalloc_free", "cudalloc_get_stats",
                           "cudalloc_check_invariants", "cudalloc_last_error_message",
                           "cudalloc_begin_allocate_to_pool", "cudalloc_end_allocate_to_pool",
                           "cudalloc_release_pool", "cudalloc_empty_cache"};
    void *fns[9];
    for (int i = 0; i < 9; i++)
        if (!(fns[i] = dlsym(cudalloc, names[i]))) {
            fprintf(stderr, "dlsym %s\n", names[i]);
            return 5;
        }
    void *cxx = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
    if (!cxx) {
        fprintf(stderr, "dlopen %s: %s\n", argv[2], dlerror());
        return 6;
    }
    if (dlsym(RTLD_DEFAULT, "__cxa_throw")) {
        fprintf(stderr, "libstdc++ is in the global scope: the test would prove nothing\n");
        return 3;
    }
    int (*checks)(void *const *) = (int (*)(void *const *))dlsym(cxx, "cudalloc_cxx_checks");
    if (!checks) return 7;
    int r = checks(fns);
    if (r == 0) printf("ok\n");
    return r;
}
