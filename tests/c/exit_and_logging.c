/* C callers at the edges: run by tests/c_edges.rs, one scenario a run.
 *
 *   oom-callback  an OOM callback that allocates: its allocation fails
 *                 instead of re-entering the callback (it used to recurse
 *                 until the stack overflowed), and service resumes.
 *   exit-paths    calls from an atexit handler and from thread-exit
 *                 (pthread key) destructors: counted, logged to log_file,
 *                 and leaving no per-thread state behind (run under
 *                 LeakSanitizer too).
 *   log-stdout    many calls with log_file:/dev/stdout, whose reader goes
 *                 away early (as `| head` does): the program carries on and
 *                 exits 0, never killed by SIGPIPE.
 *
 * Configuration comes from CUDALLOC_CONF (backend:sim).
 */
#include "cudalloc.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond)                                                         \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__,   \
                    #cond, cudalloc_last_error_message());                  \
            failures++;                                                     \
        }                                                                   \
    } while (0)

/* ---- oom-callback ------------------------------------------------------- */

static int callback_runs = 0;
static void *callback_got = (void *)1;

static void allocating_callback(int device, size_t requested, void *user) {
    (void)user;
    callback_runs++;
    callback_got = cudalloc_malloc(requested, device, NULL);
    if (callback_got)
        cudalloc_free(callback_got, 0, device, NULL);
}

static int oom_callback(void) {
    CHECK(cudalloc_register_oom_callback(allocating_callback, NULL) == CUDALLOC_OK);
    void *held[9];
    for (int i = 0; i < 9; i++) {
        held[i] = cudalloc_malloc((size_t)100 << 20, 0, NULL);
        CHECK(held[i] != NULL);
    }
    void *p = cudalloc_malloc((size_t)300 << 20, 0, NULL);
    CHECK(p == NULL);
    CHECK(cudalloc_last_error() == CUDALLOC_ERR_OUT_OF_MEMORY);
    CHECK(callback_runs == 1);
    CHECK(callback_got == NULL);
    for (int i = 0; i < 9; i++)
        cudalloc_free(held[i], 0, 0, NULL);
    p = cudalloc_malloc((size_t)300 << 20, 0, NULL);
    CHECK(p != NULL); /* service resumes */
    cudalloc_free(p, 0, 0, NULL);
    return 0;
}

/* ---- exit-paths --------------------------------------------------------- */

#define THREADS 16
#define AT_EXIT_SIZE 111
#define KEY_DTOR_SIZE 222
#define THREAD_SIZE 333

static pthread_key_t key;

static void pair(size_t size) {
    void *p = cudalloc_malloc(size, 0, NULL);
    if (!p) {
        fprintf(stderr, "FAIL: malloc(%zu) during exit: %s\n", size,
                cudalloc_last_error_message());
        exit(3);
    }
    cudalloc_free(p, size, 0, NULL);
}

/* Runs after the thread's thread-locals are torn down. */
static void key_destructor(void *value) {
    (void)value;
    pair(KEY_DTOR_SIZE);
    /* A failing call sets the thread's last error message: storage that,
     * made now, no thread-exit destructor would ever free. */
    cudalloc_free((void *)0xdead000, 0, 0, NULL);
    if (cudalloc_last_error() != CUDALLOC_ERR_INVALID_FREE ||
        !strstr(cudalloc_last_error_message(), "not a live")) {
        fprintf(stderr, "FAIL: last error during thread exit: %d %s\n",
                cudalloc_last_error(), cudalloc_last_error_message());
        exit(5);
    }
}

static void *thread_main(void *arg) {
    (void)arg;
    pair(THREAD_SIZE);
    pthread_setspecific(key, (void *)1);
    return NULL;
}

/* Registered after cudalloc started, so it runs before cudalloc's own
 * exit hook: the allocator still serves, and the log still takes lines. */
static void at_exit_handler(void) {
    pair(AT_EXIT_SIZE);
    cudalloc_stats st;
    if (cudalloc_get_stats(0, &st) != CUDALLOC_OK || st.num_allocs != 2 * THREADS + 2) {
        fprintf(stderr, "FAIL: at exit, %llu allocations counted\n",
                (unsigned long long)st.num_allocs);
        _Exit(4);
    }
}

static int exit_paths(void) {
    pair(1); /* cudalloc starts (and registers its exit hook) */
    atexit(at_exit_handler);
    CHECK(pthread_key_create(&key, key_destructor) == 0);
    for (int i = 0; i < THREADS; i++) {
        pthread_t t;
        CHECK(pthread_create(&t, NULL, thread_main, NULL) == 0);
        CHECK(pthread_join(t, NULL) == 0);
    }
    return 0;
}

/* ---- log-stdout --------------------------------------------------------- */

static int log_stdout(void) {
    for (int i = 0; i < 400000; i++) {
        void *p = cudalloc_malloc(512 + (size_t)(i % 64) * 512, 0, NULL);
        CHECK(p != NULL);
        cudalloc_free(p, 0, 0, NULL);
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    int rc;
    if (!strcmp(what, "oom-callback"))
        rc = oom_callback();
    else if (!strcmp(what, "exit-paths"))
        rc = exit_paths();
    else if (!strcmp(what, "log-stdout"))
        rc = log_stdout();
    else {
        fprintf(stderr, "usage: %s oom-callback|exit-paths|log-stdout\n", argv[0]);
        return 2;
    }
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    fprintf(stderr, "%s: ok\n", what);
    return rc;
}
