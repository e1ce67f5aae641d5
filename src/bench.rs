//! The `cudalloc bench` workloads: the main job on a fresh machine.
//!
//! Each workload builds its own [`Allocator`] from the configuration (the sim
//! device when there is no GPU) and prints figures; nothing here asserts.
//! Every workload runs once a round, for several rounds one after another
//! (interleaved, so a burst of other load hits all alike); each row gives
//! the least and the median time per operation, and the table ends with the
//! machine's load average, and whether the machine was busy.
//! - **hot path**: alloc+free pairs that hit the cache, on 1 thread and on 2
//!   threads with a stream each, plus the same loop through the C ABI, the
//!   raw driver pair (the simulated driver's, without a GPU), and a floor (a
//!   per-size-class `Vec` push/pop, no lock).
//! - **tracking cost**: the 1-thread hot path again with call-site
//!   backtraces on (`backtrace:16`), sampled one in 100 and on every
//!   allocation, against the same loop with them off, in the same run.
//! - **mixed**: a window of live blocks over 16 sizes up to 1 MiB.
//! - **random_allocations** (RMM's benchmark): 73% allocate / 27% free,
//!   uniform sizes up to a maximum, at 1k, 10k and 100k operations, and the
//!   largest again with `expandable_segments:on` (its slow path: placement
//!   over the virtual range, pages mapped and moved).

use crate::config::{format_size, Config};
use crate::driver::Stream;
use crate::global;
use crate::Allocator;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::hint::black_box;
use std::time::Instant;

/// Options of one bench run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Pairs per thread in the hot-path loops, each round.
    pub pairs: u64,
    /// Rounds: every workload runs once a round, the rounds one after
    /// another, so that a burst of other load hits all workloads alike.
    pub rounds: u32,
    /// Operation counts of the random_allocations runs.
    pub random_ops: Vec<u64>,
    /// Largest request of random_allocations.
    pub random_max: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            pairs: 1_000_000,
            rounds: 5,
            random_ops: vec![1_000, 10_000, 100_000],
            random_max: 4 << 20,
        }
    }
}

/// One printed row: a workload's figures over the rounds.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    /// Nanoseconds per operation: the least and the median over the rounds.
    pub min_ns: f64,
    pub median_ns: f64,
    pub max_ns: f64,
    pub note: String,
}

impl Row {
    /// Operations per second at the median.
    pub fn ops_per_s(&self) -> f64 {
        1e9 / self.median_ns
    }
}

/// One run of one workload: seconds for `ops` operations, and a note.
struct Sample {
    ops: u64,
    secs: f64,
    note: String,
}

fn sample(ops: u64, secs: f64, note: String) -> Sample {
    Sample { ops, secs, note }
}

/// The row of a workload's samples (at least one).
fn summarise(name: &str, samples: &[Sample]) -> Row {
    let mut ns: Vec<f64> = samples
        .iter()
        .map(|s| s.secs * 1e9 / s.ops as f64)
        .collect();
    ns.sort_by(f64::total_cmp);
    let median = if ns.len() % 2 == 1 {
        ns[ns.len() / 2]
    } else {
        (ns[ns.len() / 2 - 1] + ns[ns.len() / 2]) / 2.0
    };
    Row {
        name: name.to_string(),
        min_ns: ns[0],
        median_ns: median,
        max_ns: ns[ns.len() - 1],
        note: samples.last().map(|s| s.note.clone()).unwrap_or_default(),
    }
}

/// A workload's allocator. Dropped when the workload ends, it gives its
/// cached memory back to the driver (on a GPU the workloads run one after
/// another in one process).
fn make(config: &Config) -> crate::Result<Allocator> {
    Ok(Allocator::new(config.clone(), global::make_driver(config)?))
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

/// The hot path's request: 4 KiB, a cache hit after the first.
const SIZE: u64 = 4096;

/// The 1-thread hot path.
fn one_thread(config: &Config, o: &BenchOptions) -> crate::Result<Sample> {
    let a = make(config)?;
    let secs = pairs_loop(&a, 0, o.pairs, SIZE);
    Ok(sample(
        o.pairs,
        secs,
        format!("hit rate {:.4}", hit_rate(&a)),
    ))
}

/// Two threads, each on a stream of its own (aggregate time per pair).
/// The streams are real ones (a made-up handle is a wild pointer to a real
/// driver: the first cache miss asks cuStreamIsCapturing about it), made
/// once for the whole run.
fn two_threads(config: &Config, o: &BenchOptions, streams: [Stream; 2]) -> crate::Result<Sample> {
    let a = make(config)?;
    let t = Instant::now();
    std::thread::scope(|s| {
        for &stream in &streams {
            let a = &a;
            s.spawn(move || pairs_loop(a, stream, o.pairs, SIZE));
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let note = format!("hit rate {:.4}", hit_rate(&a));
    Ok(sample(2 * o.pairs, secs, note))
}

/// The same loop through the exported C functions (panic boundary, last
/// error), on the process-wide allocator and a stream it keeps.
fn c_abi(stream: Stream, o: &BenchOptions) -> Sample {
    use crate::ffi::{cudalloc_free, cudalloc_malloc};
    let stream = stream as usize as *mut libc::c_void;
    let t = Instant::now();
    for _ in 0..o.pairs {
        let p = cudalloc_malloc(black_box(SIZE as usize), 0, stream);
        cudalloc_free(black_box(p), SIZE as usize, 0, stream);
    }
    sample(o.pairs, t.elapsed().as_secs_f64(), String::new())
}

/// The driver's own pair: what every call would cost without the cache.
fn raw_driver(config: &Config) -> crate::Result<Sample> {
    let d = global::make_driver(config)?;
    let n = if d.name() == "sim" { 200_000 } else { 2_000 };
    let t = Instant::now();
    for _ in 0..n {
        if let Ok(p) = d.mem_alloc(0, SIZE) {
            let _ = d.mem_free(0, p, SIZE);
        }
    }
    Ok(sample(n, t.elapsed().as_secs_f64(), String::new()))
}

/// The floor: a per-size-class free list with no lock, no table, no stats.
fn floor(o: &BenchOptions) -> Sample {
    let mut classes: Vec<Vec<u64>> = vec![(0..64).map(|i| i * 512).collect(); 8];
    let t = Instant::now();
    for i in 0..o.pairs {
        let c = &mut classes[(black_box(i) & 7) as usize];
        let p = c.pop().unwrap_or(0);
        c.push(black_box(p));
    }
    sample(o.pairs, t.elapsed().as_secs_f64(), String::new())
}

/// The configurations of the tracking rows: the 1-thread hot path with
/// backtraces off (the configuration as given), with
/// `backtrace:16,backtrace_sample:100`, and with `backtrace:16` on every
/// allocation (fewer pairs: a capture costs microseconds).
fn tracking_runs(config: &Config, o: &BenchOptions) -> [(&'static str, Config, u64); 3] {
    let with = |frames: u32, every: u32| {
        let mut c = config.clone();
        c.backtrace = frames;
        c.backtrace_sample = every;
        c
    };
    [
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
    ]
}

fn tracking_one(c: &Config, pairs: u64) -> crate::Result<Sample> {
    let a = make(c)?;
    let secs = tracking_loop(&a, 0, pairs, SIZE);
    Ok(sample(pairs, secs, String::new()))
}

/// The cost of call-site tracking: one round of the three tracking rows
/// (see `tracking_runs`); each row's note gives its ratio to the first.
pub fn tracking(config: &Config, o: &BenchOptions) -> crate::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (name, c, pairs) in tracking_runs(config, o) {
        rows.push(summarise(name, &[tracking_one(&c, pairs)?]));
    }
    tracking_notes(&mut rows);
    Ok(rows)
}

fn tracking_notes(rows: &mut [Row]) {
    let off = rows[0].median_ns;
    rows[0].note = "live table, stats and alarms only".into();
    for r in &mut rows[1..] {
        r.note = format!("{:.2}x of backtraces off", r.median_ns / off);
    }
}

/// A window of 8 live blocks over 16 sizes up to 1 MiB, on one stream.
fn mixed(config: &Config, o: &BenchOptions) -> crate::Result<Sample> {
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
    Ok(sample(
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
/// `1..=max`, else frees a random live block. One run, as a row.
pub fn random_allocations(config: &Config, ops: u64, max: u64, seed: u64) -> crate::Result<Row> {
    let s = random_run(config, ops, max, seed)?;
    Ok(summarise(&random_name(ops, max), &[s]))
}

fn random_name(ops: u64, max: u64) -> String {
    format!(
        "random_allocations {ops} ops, sizes 1..={}",
        format_size(max)
    )
}

fn random_run(config: &Config, ops: u64, max: u64, seed: u64) -> crate::Result<Sample> {
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
    Ok(sample(
        ops,
        secs,
        format!(
            "hit rate {:.3}; driver calls {}; peak reserved {} / peak live {} = {:.3}; failures {failures}",
            hit_rate(&a),
            st.num_driver_allocs
                + st.num_driver_frees
                + st.num_vmm_creates
                + st.num_vmm_releases
                + st.num_vmm_maps
                + st.num_vmm_unmaps
                + st.num_vmm_set_access,
            format_size(st.reserved_bytes_peak),
            format_size(st.allocated_bytes_peak),
            st.reserved_bytes_peak as f64 / st.allocated_bytes_peak.max(1) as f64,
        ),
    ))
}

/// The 1-minute load average and the number of CPUs, as Linux reports them.
fn load() -> Option<(f64, usize)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let one: f64 = text.split_whitespace().next()?.parse().ok()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((one, cpus))
}

/// Whether other work competed for the CPUs: a load average (over the
/// last minute, so mostly before the bench) of more than half the CPUs.
fn busy(l: Option<(f64, usize)>) -> Option<bool> {
    l.map(|(avg, cpus)| avg > cpus as f64 / 2.0)
}

/// Run every workload `o.rounds` times, interleaved, and print min and
/// median per workload, with the machine's load.
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
    let sim = driver.name() == "sim";
    println!(
        "cudalloc bench: backend {} ({} device(s)); {} pairs per hot-path thread; {} rounds, interleaved",
        driver.name(),
        driver.device_count(),
        o.pairs,
        o.rounds
    );
    let before = load();
    // The C ABI's loop runs on the process-wide allocator, on a stream it keeps.
    let c_stream = if global::init_config(config.clone()).is_ok() {
        Some(driver.stream_create(0)?)
    } else {
        None
    };
    let two_streams = [driver.stream_create(0)?, driver.stream_create(0)?];
    let driver_row = if sim {
        "raw simulated driver alloc+free (a hash map, not a GPU)".to_string()
    } else {
        format!("raw driver alloc+free ({})", driver.name())
    };
    let tracking_cfg = tracking_runs(config, o);
    let mut names: Vec<String> = vec![
        "hot path, 1 thread (alloc+free pair)".into(),
        "hot path, 2 threads, own streams (aggregate)".into(),
        "hot path via the C ABI, 1 thread".into(),
        driver_row,
        "floor: per-class Vec pop+push, no lock".into(),
    ];
    names.extend(tracking_cfg.iter().map(|t| t.0.to_string()));
    names.push("mixed sizes, 8 live of 16 sizes <= 1 MiB (free+alloc)".into());
    names.extend(o.random_ops.iter().map(|&n| random_name(n, o.random_max)));
    // The largest random run again with expandable segments (a driver
    // without virtual memory serves it with classic segments).
    let expandable = o.random_ops.last().map(|&n| {
        let mut c = config.clone();
        c.expandable_segments = true;
        (n, c)
    });
    if let Some((n, _)) = &expandable {
        names.push(format!(
            "{}, expandable segments",
            random_name(*n, o.random_max)
        ));
    }
    let mut samples: Vec<Vec<Sample>> = (0..names.len()).map(|_| Vec::new()).collect();
    for _ in 0..o.rounds.max(1) {
        let mut k = 0;
        let mut put = |s: Sample| {
            samples[k].push(s);
            k += 1;
        };
        put(one_thread(config, o)?);
        put(two_threads(config, o, two_streams)?);
        put(match c_stream {
            Some(s) => c_abi(s, o),
            None => sample(
                1,
                f64::NAN,
                "the process-wide allocator did not start".into(),
            ),
        });
        put(raw_driver(config)?);
        put(floor(o));
        for (_, c, pairs) in &tracking_cfg {
            put(tracking_one(c, *pairs)?);
        }
        put(mixed(config, o)?);
        for &n in &o.random_ops {
            put(random_run(config, n, o.random_max, 42)?);
        }
        if let Some((n, c)) = &expandable {
            put(random_run(c, *n, o.random_max, 42)?);
        }
    }
    let after = load();
    // The 2-thread allocators are gone, their caches emptied: the streams
    // may go. (The C ABI's process-wide allocator keeps its stream.)
    for stream in two_streams {
        let _ = driver.stream_destroy(0, stream);
    }
    drop(driver);
    let mut rows: Vec<Row> = names
        .iter()
        .zip(&samples)
        .map(|(n, s)| summarise(n, s))
        .collect();
    // Ratios, from the medians.
    let one = rows[0].median_ns;
    rows[1].note = format!(
        "scaling {:.2}x of 1 thread; {}",
        one / rows[1].median_ns,
        rows[1].note
    );
    rows[3].note = format!("a cache hit is {:.1}x faster", rows[3].median_ns / one);
    rows[4].note = format!("hot path is {:.1}x the floor", one / rows[4].median_ns);
    tracking_notes(&mut rows[5..8]);
    println!(
        "{:<56} {:>9} {:>9} {:>13}  notes",
        "workload", "min ns", "median ns", "ops/s (med)"
    );
    for r in &rows {
        let spread = if r.min_ns > 0.0 && r.max_ns > 1.5 * r.min_ns {
            format!("; spread to {:.1} ns: noisy", r.max_ns)
        } else {
            String::new()
        };
        println!(
            "{:<56} {:>9.1} {:>9.1} {:>13.0}  {}{spread}",
            r.name,
            r.min_ns,
            r.median_ns,
            r.ops_per_s(),
            r.note
        );
    }
    let fmt = |l: Option<(f64, usize)>| {
        l.map_or("unknown".to_string(), |(a, c)| {
            format!("{a:.2} on {c} CPUs")
        })
    };
    let verdict = match (busy(before), busy(after)) {
        (Some(false), Some(false)) => "quiet",
        (None, None) => "unknown",
        _ => "BUSY: other work shared the CPUs; compare figures only within this run",
    };
    println!(
        "machine: load average {} before, {} after: {verdict}",
        fmt(before),
        fmt(after)
    );
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
        assert!(rows
            .iter()
            .all(|r| r.min_ns > 0.0 && r.min_ns <= r.median_ns));
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

    #[test]
    fn rows_give_the_least_and_the_median_of_the_rounds() {
        let s = |secs| sample(1000, secs, String::new());
        let r = summarise("x", &[s(3e-6), s(1e-6), s(2e-6), s(9e-6)]);
        assert_eq!((r.min_ns, r.median_ns, r.max_ns), (1.0, 2.5, 9.0));
        let r = summarise("x", &[s(3e-6), s(1e-6), s(2e-6)]);
        assert_eq!((r.min_ns, r.median_ns), (1.0, 2.0));
        assert_eq!(busy(Some((0.9, 2))), Some(false));
        assert_eq!(busy(Some((1.5, 2))), Some(true));
    }
}
