//! Criterion benchmarks on the simulated device (cudalloc's own CPU cost):
//! the hot path (alloc+free pair on a cache hit) on 1 thread, on 2 threads
//! with their own streams (aggregate time per pair), and through the C ABI;
//! the floor reference (per-size-class `Vec` pop+push, no lock) in the same
//! run; the mixed-size workload; RMM's `random_allocations` at 1k/10k/100k
//! ops. The same workloads as `cudalloc bench` (src/bench.rs).
//!
//! `cargo bench --bench hot_path` (figures in docs/BENCHMARKS.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudalloc::driver::sim::SimDriver;
use cudalloc::{Allocator, Config};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 4096;

fn allocator() -> Allocator {
    let c = Config::parse("backend:sim,sim_memory:16GiB").unwrap();
    let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
    Allocator::new(c, d)
}

fn pairs(a: &Allocator, stream: u64, n: u64) {
    for _ in 0..n {
        let p = a.malloc(black_box(SIZE), 0, stream).unwrap();
        a.free(black_box(p), Some(0), stream).unwrap();
    }
}

fn hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));
    let a = allocator();
    pairs(&a, 0x100, 1000);
    g.bench_function("pair_1_thread", |b| {
        b.iter(|| {
            let p = a.malloc(black_box(SIZE), 0, 0x100).unwrap();
            a.free(black_box(p), Some(0), 0x100).unwrap();
        })
    });
    // Each thread runs `iters` pairs on its own stream; the wall time is
    // halved, so the figure is the aggregate time per pair.
    let a2 = allocator();
    g.bench_function("pair_2_threads_aggregate", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for i in 0..2u64 {
                    let a = &a2;
                    s.spawn(move || pairs(a, 0x200 + i, iters));
                }
            });
            t.elapsed() / 2
        })
    });
    let conf = c"backend:sim,sim_memory:16GiB";
    // SAFETY: a NUL-terminated string.
    assert_eq!(unsafe { cudalloc::ffi::cudalloc_init(conf.as_ptr()) }, 0);
    let stream = 0x300 as *mut libc::c_void;
    // The same pairs, timed around a plain loop (`pairs`) instead of
    // criterion's per-iteration closure: the two differ by code layout only,
    // and docs/BENCHMARKS.md reports both.
    g.bench_function("pair_1_thread_loop", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            pairs(&a, 0x100, iters);
            t.elapsed()
        })
    });
    g.bench_function("pair_c_abi", |b| {
        b.iter(|| {
            let p = cudalloc::ffi::cudalloc_malloc(black_box(SIZE as usize), 0, stream);
            cudalloc::ffi::cudalloc_free(black_box(p), SIZE as usize, 0, stream);
        })
    });
    let mut classes: Vec<Vec<u64>> = vec![(0..64).map(|i| i * 512).collect(); 8];
    let mut i = 0u64;
    g.bench_function("floor_vec_pop_push", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let c = &mut classes[(black_box(i) & 7) as usize];
            let p = c.pop().unwrap_or(0);
            c.push(black_box(p));
        })
    });
    g.finish();
}

fn mixed(c: &mut Criterion) {
    let a = allocator();
    let sizes: Vec<u64> = (0..16).map(|i| 1000 + i * 65_000).collect();
    let mut window: Vec<u64> = (0..8).map(|i| a.malloc(sizes[i], 0, 0).unwrap()).collect();
    let mut i = 0usize;
    c.bench_function("mixed_8_live_of_16_sizes", |b| {
        b.iter(|| {
            i += 1;
            let slot = i % 8;
            a.free(window[slot], Some(0), 0).unwrap();
            window[slot] = a.malloc(sizes[i % 16], 0, 0).unwrap();
        })
    });
}

/// RMM's random_allocations: 73% allocate (unless usage would pass half the
/// device), uniform sizes 1 B..4 MiB, one stream, seed 42. Each iteration is
/// a whole run on a fresh allocator; the draws are made outside the timing.
fn random_allocations(c: &mut Criterion) {
    let mut g = c.benchmark_group("random_allocations");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for ops in [1_000u64, 10_000, 100_000] {
        let mut rng = Mix(42);
        let draws: Vec<(u64, u64, u64)> = (0..ops)
            .map(|_| (rng.next() % 100, 1 + rng.next() % (4 << 20), rng.next()))
            .collect();
        g.throughput(Throughput::Elements(ops));
        g.bench_with_input(BenchmarkId::from_parameter(ops), &draws, |b, draws| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let a = allocator();
                    let max_usage = 8u64 << 30;
                    let mut live: Vec<(u64, u64)> = Vec::with_capacity(draws.len());
                    let mut usage = 0;
                    let t = Instant::now();
                    for &(coin, size, pick) in draws {
                        if live.is_empty() || (coin < 73 && usage + size <= max_usage) {
                            if let Ok(p) = a.malloc(size, 0, 0) {
                                live.push((p, size));
                                usage += size;
                            }
                        } else {
                            let (p, size) = live.swap_remove((pick % live.len() as u64) as usize);
                            usage -= size;
                            a.free(p, Some(0), 0).unwrap();
                        }
                    }
                    total += t.elapsed();
                    black_box(&live);
                }
                total
            })
        });
    }
    g.finish();
}

/// splitmix64, for deterministic draws.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = hot_path, mixed, random_allocations
}
criterion_main!(benches);
