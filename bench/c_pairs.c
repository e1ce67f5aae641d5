/* The hot path as a C program sees it: alloc+free pairs through
 * libcudalloc.so's exported functions, timed here (min and median of
 * rounds) and countable with callgrind by the function `pairs`:
 *
 *   cargo build --release
 *   cc -O2 bench/c_pairs.c -Iinclude -Ltarget/release -lcudalloc \
 *      -Wl,-rpath,$PWD/target/release -o target/c_pairs
 *   CUDALLOC_CONF=backend:sim target/c_pairs 1000000 5
 *   CUDALLOC_CONF=backend:sim valgrind --tool=callgrind \
 *      --toggle-collect=pairs target/c_pairs 100000 1
 *
 * (Inside cudalloc's own binary, link-time optimisation inlines
 * cudalloc_malloc into the caller, so that loop is no measure of a call
 * through the library.) */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "cudalloc.h"

__attribute__((noinline)) void pairs(long n) {
    for (long i = 0; i < n; i++) {
        void *p = cudalloc_malloc(4096, 0, NULL);
        cudalloc_free(p, 4096, 0, NULL);
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    int rounds = argc > 2 ? atoi(argv[2]) : 5;
    if (n < 1 || rounds < 1 || rounds > 1000) {
        fprintf(stderr, "usage: %s [pairs] [rounds]\n", argv[0]);
        return 2;
    }
    void *p = cudalloc_malloc(4096, 0, NULL); /* start cudalloc; warm the cache */
    if (!p) {
        fprintf(stderr, "cudalloc: %s\n", cudalloc_last_error_message());
        return 1;
    }
    cudalloc_free(p, 4096, 0, NULL);
    double ns[1000];
    for (int r = 0; r < rounds; r++) {
        double t = now();
        pairs(n);
        ns[r] = (now() - t) * 1e9 / n;
    }
    qsort(ns, rounds, sizeof ns[0], cmp);
    double med = rounds % 2 ? ns[rounds / 2] : (ns[rounds / 2 - 1] + ns[rounds / 2]) / 2;
    printf("C ABI alloc+free pair, %ld pairs x %d rounds: min %.1f ns, median %.1f ns\n", n,
           rounds, ns[0], med);
    return 0;
}
