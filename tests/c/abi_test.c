/* An independent C client of libcudalloc.so, using only include/cudalloc.h.
 * Run with CUDALLOC_CONF=backend:sim,sim_devices:2,sim_memory:1GiB (tests/c_abi.rs does).
 * Exits non-zero on the first failed check; prints "N passed, 0 failed" at the end. */
#include "cudalloc.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int passed = 0;

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);     \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, " (last error %d: %s)\n", cudalloc_last_error(),     \
                    cudalloc_last_error_message());                             \
            exit(1);                                                            \
        }                                                                       \
        passed++;                                                               \
    } while (0)

#define MiB ((size_t)1 << 20)
#define STREAM_A ((void *)0x1000)
#define STREAM_B ((void *)0x2000)

typedef struct {
    uintptr_t p;
    size_t n;
} range;

static int cmp_range(const void *a, const void *b) {
    const range *x = a, *y = b;
    return (x->p > y->p) - (x->p < y->p);
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void invariants(void) {
    CHECK(cudalloc_check_invariants() == CUDALLOC_OK, "invariants hold");
}

/* Allocate `chunk`-byte blocks on `stream` until NULL; free them all; return how many fitted. */
static size_t fill_and_free(int device, void *stream, size_t chunk) {
    void *ptrs[4096];
    size_t n = 0;
    while (n < 4096) {
        void *p = cudalloc_malloc(chunk, device, stream);
        if (!p) break;
        ptrs[n++] = p;
    }
    CHECK(n < 4096, "the device filled up");
    CHECK(cudalloc_last_error() == CUDALLOC_ERR_OUT_OF_MEMORY, "filling ends in OOM");
    for (size_t i = 0; i < n; i++) cudalloc_free(ptrs[i], chunk, device, stream);
    return n;
}

/* A call during process exit (from an atexit handler: glibc has torn down the
 * main thread's thread-locals by then, and cudalloc's exit hook has run) fails
 * cleanly, and the last error says why. */
static void at_exit_call(void) {
    void *p = cudalloc_malloc(1000, 0, NULL);
    int code = cudalloc_last_error();
    const char *m = cudalloc_last_error_message();
    if (p != NULL || code == CUDALLOC_OK || m == NULL || m[0] == '\0') {
        fprintf(stderr, "FAIL: malloc during exit gave %p, last error %d \"%s\"\n", p, code,
                m ? m : "(null)");
        _exit(1);
    }
    /* Initialising again with the configuration in force still agrees. */
    if (cudalloc_init(NULL) != CUDALLOC_OK) {
        fprintf(stderr, "FAIL: cudalloc_init(NULL) during exit: %d\n", cudalloc_last_error());
        _exit(1);
    }
}

int main(void) {
    cudalloc_stats st;

    atexit(at_exit_call); /* before the first call: runs after cudalloc's exit hook */

    /* A bad configuration is refused, names the key, and changes nothing. */
    CHECK(cudalloc_init("bogus_key:1") == CUDALLOC_ERR_CONFIG, "bad key refused");
    CHECK(strstr(cudalloc_last_error_message(), "bogus_key") != NULL, "message names the key: %s",
          cudalloc_last_error_message());
    CHECK(cudalloc_init("sim_memory:lots") == CUDALLOC_ERR_CONFIG, "bad value refused");
    CHECK(strstr(cudalloc_last_error_message(), "sim_memory") != NULL, "message names the key");
    CHECK(cudalloc_device_count() == 2, "two simulated devices from CUDALLOC_CONF");
    CHECK(cudalloc_init("max_memory:1GiB") == CUDALLOC_ERR_ALREADY_INITIALIZED, "no silent reconfiguration");

    /* Zero bytes and NULL frees. */
    CHECK(cudalloc_malloc(0, 0, NULL) == NULL && cudalloc_last_error() == CUDALLOC_OK, "malloc(0) is NULL, not an error");
    cudalloc_free(NULL, 0, 0, NULL);
    CHECK(cudalloc_last_error() == CUDALLOC_OK, "free(NULL) is a no-op");

    /* 512-aligned, non-overlapping pointers over a random size mix on two streams. */
    enum { N = 400 };
    range r[N];
    for (int i = 0; i < N; i++) {
        size_t n = 1 + (size_t)(next_rand() % (3 * MiB));
        if (i % 50 == 0) n = 12 * MiB + (size_t)(next_rand() % MiB);
        void *p = cudalloc_malloc(n, 0, (i & 1) ? STREAM_A : STREAM_B);
        CHECK(p != NULL, "allocation %d of %zu bytes", i, n);
        CHECK(((uintptr_t)p % 512) == 0, "512-byte aligned");
        r[i].p = (uintptr_t)p;
        r[i].n = n;
    }
    qsort(r, N, sizeof r[0], cmp_range);
    for (int i = 1; i < N; i++) CHECK(r[i - 1].p + r[i - 1].n <= r[i].p, "no overlap at %d", i);
    CHECK(cudalloc_get_stats(0, &st) == CUDALLOC_OK, "stats");
    CHECK(st.active_allocations == N && st.num_allocs == N, "counts %llu", (unsigned long long)st.num_allocs);
    CHECK(st.allocated_bytes <= st.reserved_bytes, "allocated <= reserved");
    invariants();
    /* Free with wrong size/stream hints: the table decides. */
    for (int i = 0; i < N; i++) cudalloc_free((void *)r[i].p, 1, 0, NULL);
    CHECK(cudalloc_get_stats(0, &st) == CUDALLOC_OK && st.allocated_bytes == 0 && st.num_frees == N, "all freed");
    invariants();

    /* An impossible size gives NULL, then normal service. */
    CHECK(cudalloc_malloc((size_t)1 << 50, 0, STREAM_A) == NULL, "1 PiB is refused");
    CHECK(cudalloc_last_error() == CUDALLOC_ERR_OUT_OF_MEMORY, "as out-of-memory");
    CHECK(cudalloc_malloc(SIZE_MAX, 0, STREAM_A) == NULL && cudalloc_last_error() == CUDALLOC_ERR_OUT_OF_MEMORY, "SIZE_MAX refused");
    void *p = cudalloc_malloc(4096, 0, STREAM_A);
    CHECK(p != NULL && cudalloc_last_error() == CUDALLOC_OK, "service continues");
    CHECK(cudalloc_get_stats(0, &st) == CUDALLOC_OK && st.num_ooms == 2, "OOMs counted: %llu", (unsigned long long)st.num_ooms);
    /* PyTorch's variant serves like malloc. (On failure it throws a C++
     * exception wherever libstdc++ is loaded, as under ASan, so a C program
     * must not call it for a size that may fail: tests/cxx_alloc_fn.rs.) */
    void *q = cudalloc_malloc_torch(4096, 0, STREAM_A);
    CHECK(q != NULL, "cudalloc_malloc_torch serves");
    cudalloc_free(q, 0, 0, STREAM_A);

    /* Double and unknown frees are counted, change nothing, and do not crash. */
    cudalloc_free(p, 4096, 0, STREAM_A);
    CHECK(cudalloc_last_error() == CUDALLOC_OK, "first free ok");
    cudalloc_free(p, 4096, 0, STREAM_A);
    CHECK(cudalloc_last_error() == CUDALLOC_ERR_INVALID_FREE, "double free reported");
    cudalloc_free((void *)0x1234, 8, 0, NULL);
    CHECK(cudalloc_last_error() == CUDALLOC_ERR_INVALID_FREE, "unknown pointer reported");
    CHECK(cudalloc_get_stats(0, &st) == CUDALLOC_OK && st.num_invalid_frees == 2 && st.allocated_bytes == 0,
          "invalid frees counted");
    cudalloc_record_stream((void *)0x1234, STREAM_B);
    CHECK(cudalloc_last_error() == CUDALLOC_ERR_UNKNOWN_POINTER, "record_stream of unknown pointer");
    invariants();

    /* Fill device 1 on stream A, free everything, and get the same total on stream B. */
    size_t a = fill_and_free(1, STREAM_A, 64 * MiB);
    CHECK(a == 16, "16 x 64 MiB fit in 1 GiB, got %zu", a);
    size_t b = fill_and_free(1, STREAM_B, 64 * MiB);
    CHECK(b == a, "stream B gets the same total: %zu vs %zu", b, a);
    /* And after stream A fragmented the device into 20 MiB large-pool segments. */
    size_t small = fill_and_free(1, STREAM_A, 3 * MiB);
    CHECK(small >= 300, "3 MiB chunks fill most of 1 GiB: %zu", small);
    b = fill_and_free(1, STREAM_B, 64 * MiB);
    CHECK(b == a, "whole free segments flushed for stream B: %zu vs %zu", b, a);
    /* Whole segments change streams; with expandable segments, pages do. */
    CHECK(cudalloc_get_stats(1, &st) == CUDALLOC_OK &&
              (st.virtual_bytes ? st.num_vmm_unmaps > 0 : st.num_segments_adopted > 0),
          "adopted %llu, pages unmapped %llu", (unsigned long long)st.num_segments_adopted,
          (unsigned long long)st.num_vmm_unmaps);
    CHECK(st.virtual_bytes || st.num_alloc_retries > 0, "retries %llu", (unsigned long long)st.num_alloc_retries);
    invariants();

    /* Capacity queries on device 1, whose 1 GiB is all idle cache or free. */
    CHECK(cudalloc_can_allocate(512 * MiB, 1, STREAM_B) == 1, "512 MiB fits");
    CHECK(cudalloc_can_allocate((size_t)2 << 30, 1, STREAM_B) == 0 && cudalloc_last_error() == CUDALLOC_OK,
          "2 GiB does not, and that is no error");
    CHECK(cudalloc_can_allocate(0, 1, NULL) == 1, "size 0 is served (as NULL)");
    CHECK(cudalloc_is_low_memory(1) == 1, "cudalloc's own idle cache counts as in use");
    cudalloc_empty_cache();
    CHECK(cudalloc_is_low_memory(1) == 0, "an emptied device is not low");
    void *big = cudalloc_malloc(900 * MiB, 1, STREAM_A);
    CHECK(big != NULL, "900 MiB");
    CHECK(cudalloc_is_low_memory(1) == 1, "88%% in use is HIGH");
    CHECK(cudalloc_get_stats(1, &st) == CUDALLOC_OK, "stats");
    uint64_t ooms = st.num_ooms, driver_allocs = st.num_driver_allocs;
    CHECK(cudalloc_can_allocate(200 * MiB, 1, STREAM_B) == 0, "200 MiB more does not fit");
    CHECK(cudalloc_get_stats(1, &st) == CUDALLOC_OK && st.num_ooms == ooms &&
              st.num_driver_allocs == driver_allocs && st.reserved_bytes == 900 * MiB,
          "asking changed nothing");
    cudalloc_free(big, 0, 1, STREAM_A);
    CHECK(cudalloc_can_allocate(200 * MiB, 1, STREAM_B) == 1, "the idle segment would serve it");
    CHECK(cudalloc_can_allocate(MiB, 5, NULL) == -1 && cudalloc_last_error() == CUDALLOC_ERR_INVALID_DEVICE,
          "can_allocate on device 5 refused");
    CHECK(cudalloc_is_low_memory(-1) == -1 && cudalloc_last_error() == CUDALLOC_ERR_INVALID_DEVICE,
          "is_low_memory on device -1 refused");

    /* Bad devices are refused with a code. */
    CHECK(cudalloc_malloc(512, 5, NULL) == NULL && cudalloc_last_error() == CUDALLOC_ERR_INVALID_DEVICE, "device 5 refused");
    CHECK(cudalloc_malloc(512, -1, NULL) == NULL && cudalloc_last_error() == CUDALLOC_ERR_INVALID_DEVICE, "device -1 refused");
    CHECK(cudalloc_get_stats(5, &st) == CUDALLOC_ERR_INVALID_DEVICE, "stats of device 5 refused");
    CHECK(cudalloc_get_stats(0, NULL) == CUDALLOC_ERR_INVALID_ARGUMENT, "NULL out refused");
    cudalloc_reset_peak_stats(7);
    CHECK(cudalloc_last_error() == CUDALLOC_ERR_INVALID_DEVICE, "reset_peak of device 7 refused");

    /* empty_cache gives everything back; peaks reset to current. */
    cudalloc_empty_cache();
    CHECK(cudalloc_get_stats(0, &st) == CUDALLOC_OK && st.reserved_bytes == 0 && st.segments == 0, "device 0 emptied");
    CHECK(cudalloc_get_stats(1, &st) == CUDALLOC_OK && st.reserved_bytes == 0, "device 1 emptied");
    CHECK(st.reserved_bytes_peak == 1024 * MiB, "peak reserved was the whole device: %llu",
          (unsigned long long)st.reserved_bytes_peak);
    cudalloc_reset_peak_stats(1);
    CHECK(cudalloc_get_stats(1, &st) == CUDALLOC_OK && st.reserved_bytes_peak == 0, "peak reset");
    p = cudalloc_malloc(MiB, 1, NULL);
    CHECK(p != NULL, "service after empty_cache");
    cudalloc_free(p, 0, 1, NULL);
    invariants();

    for (int c = 0; c < 50000; c += 1000) CHECK(cudalloc_error_string(c) != NULL, "error strings never NULL");
    CHECK(strcmp(cudalloc_error_string(CUDALLOC_OK), "ok") == 0, "ok string");

    printf("%d passed, 0 failed\n", passed);
    return 0;
}
