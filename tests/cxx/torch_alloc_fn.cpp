// PyTorch's view of cudalloc_malloc_torch (tests/cxx_alloc_fn.rs): torch keeps
// the allocator in a std::function and lets exceptions from it reach Python
// as RuntimeError. Here, as there, a failed allocation must arrive as a
// std::exception carrying "CUDA out of memory." and cudalloc's diagnosis, and
// the allocator must serve normally afterwards.
//
// Built twice: as a program linked to the library (libstdc++ in the global
// scope), and as a shared library, not linked to cudalloc, that
// tests/cxx/load_local.c dlopen()s with RTLD_LOCAL and hands cudalloc's
// functions, taken from a separate RTLD_LOCAL dlopen of libcudalloc.so. That
// is PyTorch's situation under Python: libstdc++ is loaded, but neither in
// the global scope nor in cudalloc's own. Returns 0 when every check passed.
#include "cudalloc.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>

static_assert(sizeof(std::runtime_error) <= 64,
              "src/ffi/cxx_throw.rs allocates 64 bytes for the exception object");

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            std::fprintf(stderr, "FAILED %s:%d: ", __FILE__, __LINE__);         \
            std::fprintf(stderr, __VA_ARGS__);                                  \
            std::fprintf(stderr, "\n");                                         \
            return 1;                                                           \
        }                                                                       \
    } while (0)

struct Api {
    void* (*alloc)(size_t, int, void*);
    void (*free)(void*, size_t, int, void*);
    int (*get_stats)(int, cudalloc_stats*);
    int (*check_invariants)(void);
    const char* (*last_error_message)(void);
    uintptr_t begin_allocate_to_pool;  // raw addresses, as torch gets them from Python
    uintptr_t end_allocate_to_pool;
    uintptr_t release_pool;
    void (*empty_cache)(void);
};

// torch's c10::cuda::MempoolId_t, and the hook as CUDAPluggableAllocator
// holds it after set_begin_allocate_to_pool(address).
using MempoolId = std::pair<unsigned long long, unsigned long long>;
using BeginFn = void (*)(int, MempoolId, std::function<bool(void*)>);
using EndFn = void (*)(int, MempoolId);

// src/ffi/cxx_function.rs reads libstdc++'s std::function as 32 bytes: the
// functor's storage, the manager, the invoker.
static_assert(sizeof(std::function<bool(void*)>) == 32, "std::function layout");

static int pool_checks(const Api& api) {
    std::function<void(int, MempoolId, std::function<bool(void*)>)> begin_fn =
        reinterpret_cast<BeginFn>(api.begin_allocate_to_pool);
    bool filter_called = false;
    std::string what;
    try {
        begin_fn(0, MempoolId{7, 3}, [&](void*) {
            filter_called = true;
            return true;
        });
        CHECK(false, "begin_allocate_to_pool did not refuse");
    } catch (const std::runtime_error& e) {
        what = e.what();
    }
    // The id arrives intact: std::pair by value is two registers, as the struct.
    CHECK(what.find("private memory pools") != std::string::npos &&
              what.find("device 0, pool (7, 3)") != std::string::npos,
          "refusal message: %s", what.c_str());
    CHECK(!filter_called, "the filter was called");
    CHECK(std::strstr(api.last_error_message(), "pool (7, 3)") != nullptr, "last error: %s",
          api.last_error_message());
    return 0;
}

// A filter that counts its live copies and holds a std::string (so that
// std::function keeps it on the heap): cudalloc must copy it once and
// destroy its copy at the end of the routing.
struct Counted {
    static int live;
    std::string pad;
    void* want;
    explicit Counted(void* w) : pad(64, 'x'), want(w) { ++live; }
    Counted(const Counted& o) : pad(o.pad), want(o.want) { ++live; }
    ~Counted() { --live; }
    bool operator()(void* stream) const { return stream == want && pad.size() == 64; }
};
int Counted::live = 0;

// With graph_pools:on: PyTorch's capture flow through the three hooks.
static int pool_serving_checks(const Api& api) {
    std::function<void(int, MempoolId, std::function<bool(void*)>)> begin_fn =
        reinterpret_cast<BeginFn>(api.begin_allocate_to_pool);
    std::function<void(int, MempoolId)> end_fn = reinterpret_cast<EndFn>(api.end_allocate_to_pool);
    std::function<void(int, MempoolId)> release_fn = reinterpret_cast<EndFn>(api.release_pool);
    std::function<void*(size_t, int, void*)> alloc_fn = api.alloc;
    std::function<void(void*, size_t, int, void*)> free_fn = api.free;
    void* const cap = reinterpret_cast<void*>(0x70);  // the capturing stream
    void* const other = reinterpret_cast<void*>(0x80);
    const MempoolId pool{9, 1};
    {
        std::function<bool(void*)> filter = Counted(cap);
        CHECK(Counted::live == 1, "live copies %d", Counted::live);
        begin_fn(0, pool, filter);
        CHECK(Counted::live == 2, "cudalloc keeps one copy of the filter: %d live", Counted::live);
    }
    CHECK(Counted::live == 1, "live copies %d", Counted::live);
    void* g = alloc_fn(1 << 20, 0, cap);  // the filter accepts: the pool
    void* h = alloc_fn(1 << 20, 0, other);  // it refuses: the stream's own arena
    CHECK(g && h && g != h, "allocations %p %p", g, h);
    free_fn(g, 0, 0, cap);
    CHECK(alloc_fn(1 << 20, 0, cap) == g, "the pool reuses its own block");
    end_fn(0, pool);
    CHECK(Counted::live == 0, "the end of the routing destroys cudalloc's copy: %d live", Counted::live);
    free_fn(g, 0, 0, cap);
    free_fn(h, 0, 0, other);
    void* e = alloc_fn(1 << 20, 0, cap);  // no routing now: cap's own arena
    CHECK(e && e != g, "the pool's block went to an eager allocation (%p)", e);
    // 2 MiB segments: the pool keeps its own; e's is the only other one.
    cudalloc_stats st;
    api.empty_cache();
    CHECK(api.get_stats(0, &st) == CUDALLOC_OK && st.reserved_bytes == 4u << 20,
          "reserved %llu with the live pool", (unsigned long long)st.reserved_bytes);
    release_fn(0, pool);
    api.empty_cache();
    CHECK(api.get_stats(0, &st) == CUDALLOC_OK && st.reserved_bytes == 2u << 20,
          "the released pool kept memory: %llu reserved", (unsigned long long)st.reserved_bytes);

    // A filter's exception reaches the allocation's caller, as PyTorch's would.
    begin_fn(0, MempoolId{9, 2}, [](void*) -> bool { throw std::runtime_error("filter failed"); });
    std::string what;
    try {
        void* p = alloc_fn(4096, 0, cap);
        CHECK(false, "the filter's exception was lost (%p)", p);
    } catch (const std::runtime_error& ex) {
        what = ex.what();
    }
    CHECK(what == "filter failed", "caught: %s", what.c_str());
    end_fn(0, MempoolId{9, 2});
    release_fn(0, MempoolId{9, 2});

    // An empty filter is an error, before anything changes.
    what.clear();
    try {
        begin_fn(0, MempoolId{9, 3}, std::function<bool(void*)>());
        CHECK(false, "an empty filter was accepted");
    } catch (const std::runtime_error& ex) {
        what = ex.what();
    }
    CHECK(what.find("no filter") != std::string::npos, "message: %s", what.c_str());

    free_fn(e, 0, 0, cap);
    CHECK(api.get_stats(0, &st) == CUDALLOC_OK && st.allocated_bytes == 0, "allocated %llu",
          (unsigned long long)st.allocated_bytes);
    CHECK(api.check_invariants() == 0, "invariants: %s", api.last_error_message());
    return 0;
}

static int checks(const Api& api) {
    // As torch holds it: std::function<void*(size_t, int, cudaStream_t)>.
    std::function<void*(size_t, int, void*)> alloc_fn = api.alloc;
    std::function<void(void*, size_t, int, void*)> free_fn = api.free;

    void* keep = alloc_fn(1 << 20, 0, nullptr);
    CHECK(keep != nullptr, "a small allocation failed: %s", api.last_error_message());

    std::string what;
    try {
        void* p = alloc_fn(size_t(1) << 50, 0, nullptr);
        CHECK(false, "1 PiB did not throw (returned %p)", p);
    } catch (const std::exception& e) {
        what = e.what();
    }
    CHECK(what.rfind("CUDA out of memory.", 0) == 0, "message: %s", what.c_str());
    CHECK(what.find("cudalloc: out of memory on device 0") != std::string::npos,
          "no diagnosis in: %s", what.c_str());

    // A bad device is an error too, not a NULL tensor.
    what.clear();
    try {
        alloc_fn(4096, 7, nullptr);
    } catch (const std::runtime_error& e) {
        what = e.what();
    }
    CHECK(what.find("device 7") != std::string::npos, "bad device message: %s", what.c_str());

    // Size 0 is NULL without an exception, as for cudalloc_malloc.
    CHECK(alloc_fn(0, 0, nullptr) == nullptr, "size 0");

    // Service goes on.
    void* again = alloc_fn(1 << 20, 0, nullptr);
    CHECK(again != nullptr, "no service after the exception");
    free_fn(again, 0, 0, nullptr);
    free_fn(keep, 0, 0, nullptr);
    cudalloc_stats st;
    CHECK(api.get_stats(0, &st) == CUDALLOC_OK, "stats");
    CHECK(st.num_ooms == 1 && st.allocated_bytes == 0, "ooms %llu allocated %llu",
          (unsigned long long)st.num_ooms, (unsigned long long)st.allocated_bytes);
    CHECK(api.check_invariants() == 0, "invariants");
    const char* conf = std::getenv("CUDALLOC_CONF");
    if (conf && std::strstr(conf, "graph_pools:on")) return pool_serving_checks(api);
    return pool_checks(api);
}

#ifdef CUDALLOC_CXX_LIBRARY
// fns: cudalloc_malloc_torch, cudalloc_free, cudalloc_get_stats,
// cudalloc_check_invariants, cudalloc_last_error_message,
// cudalloc_begin_allocate_to_pool, cudalloc_end_allocate_to_pool,
// cudalloc_release_pool, cudalloc_empty_cache, as raw addresses.
extern "C" int cudalloc_cxx_checks(void* const* fns) {
    Api api{};
    std::memcpy(&api.alloc, &fns[0], sizeof(void*));
    std::memcpy(&api.free, &fns[1], sizeof(void*));
    std::memcpy(&api.get_stats, &fns[2], sizeof(void*));
    std::memcpy(&api.check_invariants, &fns[3], sizeof(void*));
    std::memcpy(&api.last_error_message, &fns[4], sizeof(void*));
    std::memcpy(&api.begin_allocate_to_pool, &fns[5], sizeof(void*));
    std::memcpy(&api.end_allocate_to_pool, &fns[6], sizeof(void*));
    std::memcpy(&api.release_pool, &fns[7], sizeof(void*));
    std::memcpy(&api.empty_cache, &fns[8], sizeof(void*));
    return checks(api);
}
#else
int main() {
    int r = checks(Api{cudalloc_malloc_torch, cudalloc_free, cudalloc_get_stats,
                       cudalloc_check_invariants, cudalloc_last_error_message,
                       reinterpret_cast<uintptr_t>(&cudalloc_begin_allocate_to_pool),
                       reinterpret_cast<uintptr_t>(&cudalloc_end_allocate_to_pool),
                       reinterpret_cast<uintptr_t>(&cudalloc_release_pool), cudalloc_empty_cache});
    if (r == 0) std::printf("ok\n");
    return r;
}
#endif
