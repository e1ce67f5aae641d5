/* Scenarios for the libcuda stand-in (tests/cuda_standin.rs). Each prints
 * "ok <name>" and exits 0, or prints what went wrong and exits 1.
 * Usage: scenarios oom|multidev|deinit|capture|unknown_error|ctx_restore|fork|one_device|adopt|
 *        capture_other|capture_release|capture_legacy|exit_first_call */
#define _POSIX_C_SOURCE 200809L /* unsetenv */
#include "cudalloc.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MiB ((size_t)1 << 20)
#define FAIL(...)                                                                   \
    do {                                                                            \
        fprintf(stderr, __VA_ARGS__);                                               \
        fprintf(stderr, " (last error %d: %s)\n", cudalloc_last_error(),           \
                cudalloc_last_error_message());                                     \
        return 1;                                                                   \
    } while (0)

static void marker(const char *what) {
    const char *path = getenv("FAKE_CUDA_LOG");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) {
        fprintf(f, "%s\n", what);
        fclose(f);
    }
}

/* The 2nd cuMemAlloc fails (FAKE_CUDA_OOM_AT=2): the ladder releases the idle
 * small segment and the retry succeeds. */
static int oom(void) {
    cudalloc_stats st;
    void *p = cudalloc_malloc(MiB, 0, (void *)0x10);
    if (!p) FAIL("first allocation failed");
    cudalloc_free(p, MiB, 0, (void *)0x10);
    void *q = cudalloc_malloc(100 * MiB, 0, (void *)0x20);
    if (!q) FAIL("no retry after the injected OOM");
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK) FAIL("stats");
    if (st.num_alloc_retries != 1 || st.num_ooms != 0 || st.num_driver_frees != 1)
        FAIL("retries %llu ooms %llu driver frees %llu", (unsigned long long)st.num_alloc_retries,
             (unsigned long long)st.num_ooms, (unsigned long long)st.num_driver_frees);
    cudalloc_free(q, 0, 0, NULL);
    return 0;
}

/* Device 1's segments are allocated and freed under device 1's context even
 * when device 0's context is current. */
static int multidev(void) {
    void *a = cudalloc_malloc(MiB, 0, NULL);
    void *b = cudalloc_malloc(30 * MiB, 1, NULL);
    void *c = cudalloc_malloc(30 * MiB, 0, NULL); /* device 0's context is current now */
    if (!a || !b || !c) FAIL("allocation failed");
    cudalloc_free(b, 0, 1, NULL);
    cudalloc_free(a, 0, 0, NULL);
    cudalloc_free(c, 0, 0, NULL);
    cudalloc_empty_cache();
    cudalloc_stats st;
    for (int d = 0; d < 2; d++)
        if (cudalloc_get_stats(d, &st) != CUDALLOC_OK || st.reserved_bytes != 0) FAIL("device %d not emptied", d);
    return 0;
}

/* The driver deinitialises mid-run (FAKE_CUDA_DEINIT_FILE): frees, empty_cache
 * and later calls are quiet, nothing crashes, and exit makes no driver call. */
static int deinit(void) {
    void *p[4];
    for (int i = 0; i < 4; i++)
        if (!(p[i] = cudalloc_malloc((size_t)(i + 1) * 8 * MiB, 0, NULL))) FAIL("allocation %d", i);
    FILE *f = fopen(getenv("FAKE_CUDA_DEINIT_FILE"), "w");
    if (!f) FAIL("cannot create the deinit file");
    fclose(f);
    for (int i = 0; i < 3; i++) cudalloc_free(p[i], 0, 0, NULL); /* p[3] stays live until exit */
    cudalloc_empty_cache();
    void *q = cudalloc_malloc(512 * MiB, 0, NULL);
    if (q) FAIL("allocation after deinit succeeded");
    int code = cudalloc_last_error();
    if (code != CUDALLOC_ERR_SHUTTING_DOWN && code != CUDALLOC_ERR_OUT_OF_MEMORY)
        FAIL("unexpected code %d after deinit", code);
    marker("EXIT");
    return 0;
}

/* A capturing stream (FAKE_CUDA_CAPTURING=0x7777): the driver allocation runs
 * in relaxed mode, and a block freed during capture is not reused. */
static int capture(void) {
    void *s = (void *)0x7777;
    void *p = cudalloc_malloc(4 * MiB, 0, s);
    if (!p) FAIL("allocation on a capturing stream failed");
    cudalloc_free(p, 0, 0, s);
    void *q = cudalloc_malloc(4 * MiB, 0, s);
    if (!q) FAIL("second allocation failed");
    if (q == p) FAIL("a block freed during capture was reused");
    cudalloc_stats st;
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.pending_free_bytes != 4 * MiB)
        FAIL("quarantined bytes %llu", (unsigned long long)st.pending_free_bytes);
    cudalloc_free(q, 0, 0, s);
    /* empty_cache during the capture releases nothing: cuMemFree would
     * invalidate it, and the graph may use the quarantined blocks. */
    cudalloc_empty_cache();
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.pending_free_bytes != 8 * MiB)
        FAIL("empty_cache during the capture released %llu quarantined bytes",
             8 * MiB - (unsigned long long)st.pending_free_bytes);
    unsetenv("FAKE_CUDA_CAPTURING"); /* the capture ends */
    cudalloc_empty_cache();
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.pending_free_bytes != 0 || st.reserved_bytes != 0)
        FAIL("empty_cache did not end the quarantine");
    return 0;
}

/* A C/C++ capture on 0x7777 (FAKE_CUDA_CAPTURING set after 0x10's segment
 * went idle) grows past that too-small idle segment, then asks for more than
 * the device holds. cuMemFree and cuStreamSynchronize during the capture
 * would invalidate it (the stand-in logs CAPTURE_VIOLATION): nothing goes
 * back to the driver until the capture ends, and the OOM is a plain NULL.
 * After the capture, the OOM ladder releases the idle memory again. */
static int capture_release(void) {
    void *c = (void *)0x7777;
    void *p = cudalloc_malloc(30 * MiB, 0, (void *)0x10);
    if (!p) FAIL("allocation on 0x10 failed");
    cudalloc_free(p, 0, 0, (void *)0x10);
    setenv("FAKE_CUDA_CAPTURING", "0x7777", 1);
    void *q = cudalloc_malloc(100 * MiB, 0, c);
    if (!q) FAIL("growth during the capture failed");
    void *big = cudalloc_malloc(1000 * MiB, 0, c);
    if (big) FAIL("1000 MiB during the capture fit in 1 GiB beside 130 MiB");
    if (cudalloc_last_error() != CUDALLOC_ERR_OUT_OF_MEMORY) FAIL("code %d", cudalloc_last_error());
    cudalloc_stats st;
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.reserved_bytes != 130 * MiB)
        FAIL("reserved %llu during the capture", (unsigned long long)st.reserved_bytes);
    unsetenv("FAKE_CUDA_CAPTURING");
    cudalloc_free(q, 0, 0, c);
    big = cudalloc_malloc(1000 * MiB, 0, c);
    if (!big) FAIL("1000 MiB after the capture: the idle segments were not released");
    cudalloc_free(big, 0, 0, c);
    if (cudalloc_check_invariants() != 0) FAIL("invariants");
    cudalloc_empty_cache();
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.reserved_bytes != 0) FAIL("not emptied");
    return 0;
}

/* Adoption on a GPU: an event recorded a moment ago is not complete yet
 * (FAKE_CUDA_EVENT_LAG=1). Stream 0x20 asks for the 40 MiB stream 0x10 holds
 * idle, then stream 0x1000 asks for it again. Prints the adoption count after
 * each try and the driver allocations: with an idle stream (cuStreamQuery)
 * the first try adopts; with a busy one (FAKE_CUDA_STREAM_BUSY) only the
 * second can, through the event recorded by the first. */
static int adopt(void) {
    cudalloc_stats st;
    unsigned long long first;
    void *p = cudalloc_malloc(40 * MiB, 0, (void *)0x10);
    if (!p) FAIL("allocation on 0x10 failed");
    cudalloc_free(p, 0, 0, (void *)0x10);
    void *q = cudalloc_malloc(40 * MiB, 0, (void *)0x20);
    if (!q) FAIL("allocation on 0x20 failed");
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK) FAIL("stats");
    first = (unsigned long long)st.num_segments_adopted;
    cudalloc_free(q, 0, 0, (void *)0x20);
    void *r = cudalloc_malloc(40 * MiB, 0, (void *)0x1000);
    if (!r) FAIL("allocation on 0x1000 failed");
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK) FAIL("stats");
    printf("adopted %llu %llu driver_allocs %llu\n", first, (unsigned long long)st.num_segments_adopted,
           (unsigned long long)st.num_driver_allocs);
    cudalloc_free(r, 0, 0, (void *)0x1000);
    if (cudalloc_check_invariants() != 0) FAIL("invariants");
    cudalloc_empty_cache();
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.reserved_bytes != 0) FAIL("not emptied");
    return 0;
}

/* Stream 0x2000's segment goes idle, then 0x2000 starts capturing a graph
 * (FAKE_CUDA_CAPTURING set now). Stream 0x10 asks for the same size: the
 * idle segment cannot be proven free (no cuStreamQuery on a capturing
 * stream, which a GPU would take as invalidating the capture; no event
 * recorded into the capture, which proves nothing), so 0x10 grows. */
static int capture_other(void) {
    void *p = cudalloc_malloc(40 * MiB, 0, (void *)0x2000);
    if (!p) FAIL("allocation on 0x2000 failed");
    cudalloc_free(p, 0, 0, (void *)0x2000);
    setenv("FAKE_CUDA_CAPTURING", "0x2000", 1);
    void *q = cudalloc_malloc(40 * MiB, 0, (void *)0x10);
    if (!q) FAIL("allocation on 0x10 during 0x2000's capture failed");
    if (q == p) FAIL("a capturing stream's idle segment was adopted");
    unsetenv("FAKE_CUDA_CAPTURING");
    cudalloc_free(q, 0, 0, (void *)0x10);
    /* The capture is over: now the segment is proven, and adopted. */
    void *r = cudalloc_malloc(40 * MiB, 0, (void *)0x1000);
    if (r != p && r != q) FAIL("no idle segment adopted after the capture");
    cudalloc_free(r, 0, 0, (void *)0x1000);
    if (cudalloc_check_invariants() != 0) FAIL("invariants");
    return 0;
}

/* The legacy stream (NULL) holds an idle segment when a capture begins on
 * 0x7777, a stream cudalloc never served (another thread's, say). Asked about
 * the legacy stream then, the driver answers CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
 * cudalloc takes that as capturing, so empty_cache neither synchronises the
 * legacy stream nor frees (either would invalidate the capture). */
static int capture_legacy(void) {
    void *p = cudalloc_malloc(4 * MiB, 0, NULL);
    if (!p) FAIL("allocation on the legacy stream failed");
    cudalloc_free(p, 0, 0, NULL);
    cudalloc_stats before, st;
    if (cudalloc_get_stats(0, &before) != CUDALLOC_OK || before.reserved_bytes == 0) FAIL("stats");
    setenv("FAKE_CUDA_CAPTURING", "0x7777", 1);
    cudalloc_empty_cache();
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.reserved_bytes != before.reserved_bytes)
        FAIL("empty_cache during the capture released %llu bytes",
             (unsigned long long)(before.reserved_bytes - st.reserved_bytes));
    unsetenv("FAKE_CUDA_CAPTURING");
    cudalloc_empty_cache();
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.reserved_bytes != 0) FAIL("not emptied");
    return 0;
}

/* FAKE_CUDA_ALLOC_ERROR holds a CUresult no CUDA release defines: the
 * allocation fails with a driver error naming the number, and once the
 * driver stops failing, service resumes. */
static int unknown_error(void) {
    const char *code = getenv("FAKE_CUDA_ALLOC_ERROR");
    if (!code) FAIL("set FAKE_CUDA_ALLOC_ERROR");
    void *p = cudalloc_malloc(4 * MiB, 0, NULL);
    if (p) FAIL("allocation succeeded despite the driver error");
    if (cudalloc_last_error() != CUDALLOC_ERR_DRIVER) FAIL("wrong error code");
    if (!strstr(cudalloc_last_error_message(), code)) FAIL("the message does not name the code");
    unsetenv("FAKE_CUDA_ALLOC_ERROR");
    p = cudalloc_malloc(4 * MiB, 0, NULL);
    if (!p) FAIL("no recovery after the driver error");
    cudalloc_free(p, 0, 0, NULL);
    if (cudalloc_check_invariants() != 0) FAIL("invariants");
    return 0;
}

/* The caller's current context survives every cudalloc call: device 1's
 * segment is allocated and freed under device 1's context while device 0's
 * (then none) is the caller's, and the caller's is current afterwards. The
 * stand-in is the libcuda.so cudalloc loaded, opened again here. */
typedef int (*retain_fn)(void **, int);
typedef int (*set_fn)(void *);
typedef int (*get_fn)(void **);
static int ctx_restore(void) {
    void *lib = dlopen("libcuda.so", RTLD_NOW);
    if (!lib) FAIL("dlopen libcuda.so: %s", dlerror());
    retain_fn retain = (retain_fn)dlsym(lib, "cuDevicePrimaryCtxRetain");
    set_fn set = (set_fn)dlsym(lib, "cuCtxSetCurrent");
    get_fn get = (get_fn)dlsym(lib, "cuCtxGetCurrent");
    if (!retain || !set || !get) FAIL("dlsym");
    void *ctx0 = NULL, *now = NULL;
    if (retain(&ctx0, 0) || set(ctx0)) FAIL("cannot make device 0's context current");

    void *p = cudalloc_malloc(30 * MiB, 1, NULL); /* a driver allocation on device 1 */
    if (!p) FAIL("allocation on device 1 failed");
    if (get(&now) || now != ctx0) FAIL("malloc on device 1 left context %p current, not %p", now, ctx0);
    cudalloc_free(p, 0, 0, NULL); /* the hints name the wrong device, as torch's may */
    cudalloc_empty_cache();       /* the driver free, on device 1 */
    if (get(&now) || now != ctx0) FAIL("free/empty_cache left context %p current, not %p", now, ctx0);

    if (set(NULL)) FAIL("cannot unbind the context");
    p = cudalloc_malloc(30 * MiB, 0, NULL);
    if (!p) FAIL("allocation on device 0 failed");
    if (get(&now) || now != NULL) FAIL("malloc with no current context left %p current", now);
    cudalloc_stats st;
    if (cudalloc_get_stats(1, &st) != CUDALLOC_OK) FAIL("stats");
    cudalloc_free(p, 0, 0, NULL);
    cudalloc_empty_cache();
    if (get(&now) || now != NULL) FAIL("empty_cache with no current context left %p current", now);
    if (st.num_driver_frees != 1) FAIL("device 1: %llu driver frees", (unsigned long long)st.num_driver_frees);
    return 0;
}

/* A child forked after cudalloc started gets a clear error from every call
 * that needs the allocator, makes no driver call (the log between the
 * markers stays empty), takes no lock, and writes no exit report; the
 * parent carries on. Run with leak_report:exit: the parent's one live
 * allocation at exit must be reported once, by the parent. */
static int fork_child(void) {
    void *p = cudalloc_malloc(MiB, 0, NULL);
    if (!p) FAIL("allocation failed");
    cudalloc_free(p, 0, 0, NULL); /* cached */
    void *q = cudalloc_malloc(MiB, 0, NULL);
    if (!q) FAIL("allocation failed");
    marker("CHILD START");
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) FAIL("fork failed");
    if (pid == 0) {
        int bad = 0;
        void *r = cudalloc_malloc(MiB, 0, NULL);
        if (r || cudalloc_last_error() != CUDALLOC_ERR_SHUTTING_DOWN ||
            !strstr(cudalloc_last_error_message(), "forked"))
            bad |= 1;
        cudalloc_free(q, 0, 0, NULL);
        if (cudalloc_last_error() != CUDALLOC_ERR_SHUTTING_DOWN) bad |= 2;
        cudalloc_stats st;
        if (cudalloc_get_stats(0, &st) != CUDALLOC_ERR_SHUTTING_DOWN) bad |= 4;
        cudalloc_empty_cache();
        cudalloc_record_stream(q, (void *)0x10);
        if (cudalloc_init(NULL) != CUDALLOC_ERR_SHUTTING_DOWN) bad |= 8;
        if (bad) fprintf(stderr, "child: bad %d (last error %d: %s)\n", bad, cudalloc_last_error(),
                         cudalloc_last_error_message());
        marker("CHILD END");
        exit(bad ? 1 : 0); /* runs the atexit hooks: they must do nothing here */
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) FAIL("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) FAIL("child failed (status %d)", status);
    /* The parent is untouched: q is still live and its free still counts. */
    cudalloc_free(q, 0, 0, NULL);
    if (cudalloc_last_error() != CUDALLOC_OK) FAIL("free in the parent after the fork");
    void *keep = cudalloc_malloc(3 * MiB, 0, NULL); /* live at exit: reported once */
    if (!keep) FAIL("allocation in the parent after the fork");
    if (cudalloc_check_invariants() != 0) FAIL("invariants");
    return 0;
}

/* Work on device 0 only for about 60 ms, long enough for the periodic
 * pressure samples (run with pressure_interval:1ms): device 1's context must
 * never be retained. */
static int one_device(void) {
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do {
        void *p = cudalloc_malloc(MiB, 0, NULL);
        if (!p) FAIL("allocation failed");
        cudalloc_free(p, 0, 0, NULL);
        clock_gettime(CLOCK_MONOTONIC, &t);
    } while ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 < 60);
    cudalloc_stats st;
    if (cudalloc_get_stats(1, &st) != CUDALLOC_OK) FAIL("stats of device 1");
    return 0;
}

/* A first call from a destructor that runs after main returned (a C or C++
 * library's, or the program's .fini_array): refused as a call during exit,
 * and the driver is never started (the Rust test checks the log). */
static int call_in_destructor = 0;

__attribute__((destructor)) static void late_first_call(void) {
    if (!call_in_destructor) return;
    void *p = cudalloc_malloc(4096, 0, NULL);
    int code = cudalloc_last_error();
    fprintf(stderr, "destructor: malloc %p, code %d\n", p, code);
    if (p || code != CUDALLOC_ERR_SHUTTING_DOWN) _exit(1);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    int r = 2;
    if (!strcmp(argv[1], "oom")) r = oom();
    else if (!strcmp(argv[1], "multidev")) r = multidev();
    else if (!strcmp(argv[1], "deinit")) r = deinit();
    else if (!strcmp(argv[1], "capture")) r = capture();
    else if (!strcmp(argv[1], "unknown_error")) r = unknown_error();
    else if (!strcmp(argv[1], "ctx_restore")) r = ctx_restore();
    else if (!strcmp(argv[1], "fork")) r = fork_child();
    else if (!strcmp(argv[1], "one_device")) r = one_device();
    else if (!strcmp(argv[1], "adopt")) r = adopt();
    else if (!strcmp(argv[1], "capture_other")) r = capture_other();
    else if (!strcmp(argv[1], "capture_release")) r = capture_release();
    else if (!strcmp(argv[1], "capture_legacy")) r = capture_legacy();
    else if (!strcmp(argv[1], "exit_first_call")) r = (call_in_destructor = 1, 0);
    if (r == 0) printf("ok %s\n", argv[1]);
    return r;
}
