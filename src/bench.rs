//! The `cudalloc bench` workloads: the main job on a fresh machine.
//!
//! Each workload builds its own [`Allocator`] from the configuration (the sim
//! device when there is no GPU) and prints figures; nothing here asserts.
//! - **hot path**: alloc+free pairs that hit the cache, on 1 thread and on 2
//!   threads with a stream each, plus the same loop through the C ABI, the
//!   raw driver pair, and a floor (a per-size-class `Vec` push/pop, no lock).
//! - **tracking cost**: the 1-thread hot path again with call-site
//!   backtraces on (`backtrace:16`), sampled one in 100 and on every
//!   allocation, against the same loop with them off, in the same run.
//! - **mixed**: a window of live blocks over 16 sizes up to 1 MiB.
//! - **random_allocations** (RMM's benchmark): 73% allocate / 27% free,
//!   uniform sizes up to a maximum, at 1k, 10k and 100k operations.

use crate::config::{format_size, Config};
use crate::driver::Stream;
use crate::engine::Allocator;
use crate::global;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::hint::black_box;
use std::time::Instant;

/// Options of one bench run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Pairs per thread in the hot-path loops.
    pub pairs: u64,
    /// Operation counts of the random_allocations runs.
    pub random_ops: Vec<u64>,
    /// Largest request of random_allocations.
    pub random_max: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            pairs: 5_000_000,
            random_ops: vec![1_000, 10_000, 100_000],
            random_max: 4 << 20,
        }
    }
}

/// One printed row.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub ns_per_op: f64,
    pub ops_per_s: f64,
    pub note: String,
}

fn row(name: impl Into<String>, ops: u64, secs: f64, note: String) -> Row {
    Row {
        name: name.into(),
        ns_per_op: secs * 1e9 / ops as f64,
        ops_per_s: ops as f64 / secs,
        note,
    }
}

fn make(config: &Config) -> crate::Result<BenchAllocator> {
    Ok(BenchAllocator(Allocator::new(
        config.clone(),
        global::make_driver(config)?,
    )))
}

/// A workload's allocator, which gives its cached memory back to the driver
/// when the workload ends: on a GPU the workloads run one after another in
/// one process, and each would otherwise keep what it reserved.
struct BenchAllocator(Allocator);

impl std::ops::Deref for BenchAllocator {
    type Target = Allocator;
    fn deref(&self) -> &Allocator {
        &self.0
    }
}

impl Drop for BenchAllocator {
    fn drop(&mut self) {
        self.0.empty_cache();
    }
}

fn hit_rate(a: &Allocator) -> f64 {
    let s = a.stats(0).unwrap_or_default();
    if s.num_allocs == 0 {
        0.0
    } else {
        s.num_cache_hits as f64 / s.num_allocs as f64
    }
}

/// The timed alloc+free loop (after a warm-up), inlined into its two entry
/// points below. They are separate so that callgrind's
/// `--toggle-collect='cudalloc::bench::pairs_loop*'` (docs/BENCHMARKS.md)
/// counts the hot-path loops and not the tracking rows.
#[inline(always)]
fn timed_pairs(a: &Allocator, stream: Stream, pairs: u64, size: u64) -> f64 {
    for _ in 0..1000 {
        let p = a.malloc(size, 0, stream).expect("warm-up allocation");
        a.free(p, Some(0), stream).expect("warm-up free");
    }
    let t = Instant::now();
    for _ in 0..pairs {
        let p = a
            .malloc(black_box(size), 0, stream)
            .expect("hot-path allocation");
        a.free(black_box(p), Some(0), stream)
            .expect("hot-path free");
    }
    t.elapsed().as_secs_f64()
}

#[inline(never)]
fn pairs_loop(a: &Allocator, stream: Stream, pairs: u64, size: u64) -> f64 {
    timed_pairs(a, stream, pairs, size)
}

#[inline(never)]
fn tracking_loop(a: &Allocator, stream: Stream, pairs: u64, size: u64) -> f64 {
    timed_pairs(a, stream, pairs, size)
}

/// Hot path rows: 1 thread, 2 threads, C ABI, raw driver, floor.
pub fn hot_path(config: &Config, o: &BenchOptions) -> crate::Result<Vec<Row>> {
    const SIZE: u64 = 4096;
    let mut rows = Vec::new();
    let a = make(config)?;
    let secs1 = pairs_loop(&a, 0, o.pairs, SIZE);
    let one = row(
        "hot path, 1 thread (alloc+free pair)",
        o.pairs,
        secs1,
        format!("hit rate {:.4}", hit_rate(&a)),
    );
    let one_rate = one.ops_per_s;
    rows.push(one);

    let a = make(config)?;
    // Real streams: a made-up handle is a wild pointer to a real driver (the
    // first cache miss asks cuStreamIsCapturing about it).
    let streams = [
        a.driver().stream_create(0)?,
        a.driver().stream_create(0)?,
        a.driver().stream_create(0)?,
    ];
    let t = Instant::now();
    std::thread::scope(|s| {
        for &stream in &streams[..2] {
            let a = &a;
            s.spawn(move || pairs_loop(a, stream, o.pairs, SIZE));
        }
    });
    let secs2 = t.elapsed().as_secs_f64();
    let mut two = row(
        "hot path, 2 threads, own streams (aggregate)",
        2 * o.pairs,
        secs2,
        String::new(),
    );
    two.note = format!(
        "scaling {:.2}x of 1 thread; hit rate {:.4}",
        two.ops_per_s / one_rate,
        hit_rate(&a)
    );
    rows.push(two);

    // The same loop through the exported C functions (panic boundary, last error).
    if global::init_config(config.clone()).is_ok() {
        use crate::ffi::{cudalloc_free, cudalloc_malloc};
        let stream = streams[2] as usize as *mut libc::c_void;
        let t = Instant::now();
        for _ in 0..o.pairs {
            let p = cudalloc_malloc(black_box(SIZE as usize), 0, stream);
            cudalloc_free(black_box(p), SIZE as usize, 0, stream);
        }
        rows.push(row(
            "hot path via the C ABI, 1 thread",
            o.pairs,
            t.elapsed().as_secs_f64(),
            String::new(),
        ));
    }

    // The raw driver: what every call would cost without the cache.
    let d = a.driver().clone();
    let n = if d.name() == "sim" { 200_000 } else { 2_000 };
    let t = Instant::now();
    for _ in 0..n {
        if let Ok(p) = d.mem_alloc(0, SIZE) {
            let _ = d.mem_free(0, p, SIZE);
        }
    }
    let raw = row(
        format!("raw driver mem_alloc+mem_free ({})", d.name()),
        n,
        t.elapsed().as_secs_f64(),
        String::new(),
    );
    // The 2-thread allocator lets its streams go; the C ABI's process-wide
    // allocator keeps a reference to its stream, which therefore stays.
    a.empty_cache();
    for stream in &streams[..2] {
        let _ = a.driver().stream_destroy(0, *stream);
    }
    let speedup = raw.ns_per_op / rows[0].ns_per_op;
    let mut raw = raw;
    raw.note = format!("cache hit is {speedup:.1}x faster");
    rows.push(raw);

    // The floor: a per-size-class free list with no lock, no table, no stats.
    let mut classes: Vec<Vec<u64>> = vec![(0..64).map(|i| i * 512).collect(); 8];
    let t = Instant::now();
    for i in 0..o.pairs {
        let c = &mut classes[(black_box(i) & 7) as usize];
        let p = c.pop().unwrap_or(0);
        c.push(black_box(p));
    }
    let floor = row(
        "floor: per-class Vec pop+push, no lock",
        o.pairs,
        t.elapsed().as_secs_f64(),
        String::new(),
    );
    let ratio = rows[0].ns_per_op / floor.ns_per_op;
    let mut floor = floor;
    floor.note = format!("hot path is {ratio:.1}x the floor");
    rows.push(floor);
    Ok(rows)
}

/// The cost of call-site tracking: the 1-thread hot path with backtraces off
/// (the configuration as given), with `backtrace:16,backtrace_sample:100`, and
/// with `backtrace:16` on every allocation (fewer pairs: a capture costs
/// microseconds). Each row's note gives its ratio to the first row.
pub fn tracking(config: &Config, o: &BenchOptions) -> crate::Result<Vec<Row>> {
    const SIZE: u64 = 4096;
    let with = |frames: u32, every: u32| {
        let mut c = config.clone();
        c.backtrace = frames;
        c.backtrace_sample = every;
        c
    };
    let runs = [
        ("tracking: backtraces off", with(0, 1), o.pairs),
        (
            "tracking: backtrace:16, sample 1 in 100",
            with(16, 100),
            o.pairs,
        ),
        (
            "tracking: backtrace:16, every allocation",
            with(16, 1),
            (o.pairs / 100).max(1000),
        ),
    ];
    let mut rows: Vec<Row> = Vec::new();
    for (name, c, pairs) in runs {
        let a = make(&c)?;
        let secs = tracking_loop(&a, 0, pairs, SIZE);
        let mut r = row(name, pairs, secs, String::new());
        r.note = match rows.first() {
            Some(off) => format!("{:.2}x of backtraces off", r.ns_per_op / off.ns_per_op),
            None => "live table, stats and alarms only".into(),
        };
        rows.push(r);
    }
    Ok(rows)
}

/// A window of 8 live blocks over 16 sizes up to 1 MiB, on one stream.
pub fn mixed(config: &Config, o: &BenchOptions) -> crate::Result<Row> {
    let a = make(config)?;
    let sizes: Vec<u64> = (0..16).map(|i| 1000 + i * 65_000).collect();
    let mut window = [0u64; 8];
    for (i, w) in window.iter_mut().enumerate() {
        *w = a.malloc(sizes[i], 0, 0)?;
    }
    let t = Instant::now();
    for i in 0..o.pairs {
        let slot = (i % 8) as usize;
        a.free(window[slot], Some(0), 0)?;
        window[slot] = a.malloc(sizes[(i % 16) as usize], 0, 0)?;
    }
    let secs = t.elapsed().as_secs_f64();
    let st = a.stats(0)?;
    for p in window {
        a.free(p, Some(0), 0)?;
    }
    Ok(row(
        "mixed sizes, 8 live of 16 sizes <= 1 MiB (free+alloc)",
        o.pairs,
        secs,
        format!(
            "hit rate {:.4}; reserved {}",
            hit_rate(&a),
            format_size(st.reserved_bytes)
        ),
    ))
}

/// RMM's random_allocations: each op allocates with probability 0.73 (unless
/// that would pass `max_usage`, half the device) a uniform size in
/// `1..=max`, else frees a random live block. Returns the row.
pub fn random_allocations(config: &Config, ops: u64, max: u64, seed: u64) -> crate::Result<Row> {
    let a = make(config)?;
    let total = a.driver().mem_info(0).map(|(_, t)| t).unwrap_or(16 << 30);
    let max_usage = total / 2;
    let mut rng = SmallRng::seed_from_u64(seed);
    // Pre-draw the random numbers so the timed loop measures the allocator.
    let draws: Vec<(f64, u64, u64)> = (0..ops)
        .map(|_| {
            (
                rng.random::<f64>(),
                rng.random_range(1..=max),
                rng.random::<u64>(),
            )
        })
        .collect();
    let mut live: Vec<(u64, u64)> = Vec::with_capacity(ops as usize);
    let (mut usage, mut failures) = (0u64, 0u64);
    let t = Instant::now();
    for &(coin, size, pick) in &draws {
        if live.is_empty() || (coin < 0.73 && usage + size <= max_usage) {
            match a.malloc(size, 0, 0) {
                Ok(p) => {
                    live.push((p, size));
                    usage += size;
                }
                Err(_) => failures += 1,
            }
        } else {
            let (p, size) = live.swap_remove((pick % live.len() as u64) as usize);
            usage -= size;
            a.free(p, Some(0), 0)?;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let st = a.stats(0)?;
    for (p, _) in live {
        a.free(p, Some(0), 0)?;
    }
    Ok(row(
        format!("random_allocations {ops} ops, sizes 1..={}", format_size(max)),
        ops,
        secs,
        format!(
            "hit rate {:.3}; driver calls {}; peak reserved {} / peak live {} = {:.3}; failures {failures}",
            hit_rate(&a),
            st.num_driver_allocs + st.num_driver_frees,
            format_size(st.reserved_bytes_peak),
            format_size(st.allocated_bytes_peak),
            st.reserved_bytes_peak as f64 / st.allocated_bytes_peak.max(1) as f64,
        ),
    ))
}

/// Run every workload and print the table.
pub fn run(config: &Config, o: &BenchOptions) -> crate::Result<()> {
    // Each workload builds its own allocator, and each would truncate the
    // trace log and rewrite the stats file: the bench writes neither.
    let mut config = config.clone();
    for (key, path) in [
        ("log_file", &mut config.log_file),
        ("stats_file", &mut config.stats_file),
    ] {
        if !path.is_empty() {
            eprintln!(
                "cudalloc bench: {key}:{path} is ignored (each workload builds its own allocator)"
            );
            path.clear();
        }
    }
    let config = &config;
    let driver = global::make_driver(config)?;
    println!(
        "cudalloc bench: backend {} ({} device(s)); {} pairs per hot-path thread",
        driver.name(),
        driver.device_count(),
        o.pairs
    );
    drop(driver);
    let mut rows = hot_path(config, o)?;
    rows.extend(tracking(config, o)?);
    rows.push(mixed(config, o)?);
    for &n in &o.random_ops {
        rows.push(random_allocations(config, n, o.random_max, 42)?);
    }
    println!("{:<52} {:>10} {:>14}  notes", "workload", "ns/op", "ops/s");
    for r in rows {
        println!(
            "{:<52} {:>10.1} {:>14.0}  {}",
            r.name, r.ns_per_op, r.ops_per_s, r.note
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tracking rows run on the configuration as given, even one whose
    /// sizes have no short spelling (found in review: a composed config
    /// string rounded `small_max` to a size that no longer parsed).
    #[test]
    fn tracking_rows_keep_the_configuration() {
        let c = Config::parse("backend:sim,sim_memory:1GiB,small_max:1058816").unwrap();
        let o = BenchOptions {
            pairs: 1000,
            ..Default::default()
        };
        let rows = tracking(&c, &o).unwrap();
        assert_eq!(rows.len(), 3);
        assert!(
            rows[1].note.contains("x of backtraces off"),
            "{}",
            rows[1].note
        );
    }

    #[test]
    fn random_allocations_runs_clean() {
        let c = Config::parse("backend:sim,sim_memory:1GiB").unwrap();
        let r = random_allocations(&c, 2000, 1 << 20, 1).unwrap();
        assert!(r.note.contains("failures 0"), "{}", r.note);
    }
}
