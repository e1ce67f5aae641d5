//! Stress: N threads x M streams x 2 devices doing random mallocs, frees
//! (their own pointers and other threads'), record_stream, stats, peak
//! resets and empty_cache, while a GPU thread completes streams at random
//! (manual sim events). What it models: a multi-stream training process
//! whose data-loader and main threads free each other's tensors.
//!
//! Checked during the run: no address is handed out while live (a shared
//! tracker sees every allocation the moment it returns) and no block is
//! handed to another stream before its free is proven complete (the spy
//! driver and the stream-safety ledger in `support`, as in the model). At the end: `check_invariants()`, counters that add
//! up exactly, and an empty device after draining. Deterministic seeds; the
//! interleaving is up to the OS. `CUDALLOC_STRESS_OPS` scales the run.

#[allow(dead_code)] // this binary uses part of the shared tree (tests/support/mod.rs)
mod support;

use cudalloc::error::ErrorCode;
use cudalloc::{Allocator, Config};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use support::ledger::Ledger;
use support::ops::{Mix, STREAMS};
use support::spy::Spy;

const THREADS: u64 = 6;

struct Tracker {
    /// ptr -> (device, stream, size, recorded streams)
    live: BTreeMap<u64, (usize, u64, u64, Vec<u64>)>,
    ledger: Ledger,
    violations: Vec<String>,
}

struct World {
    alloc: Allocator,
    spy: Arc<Spy>,
    tracker: Mutex<Tracker>,
    mallocs: AtomicU64,
    frees: AtomicU64,
    invalid: AtomicU64,
    ooms: AtomicU64,
}

impl World {
    fn malloc(&self, size: u64, dev: usize, stream: u64) {
        let p = match self.alloc.malloc(size, dev, stream) {
            Ok(p) => p,
            Err(e) => {
                assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY, "{e}");
                self.ooms.fetch_add(1, Relaxed);
                return;
            }
        };
        self.mallocs.fetch_add(1, Relaxed);
        let size = self.alloc.size_of(p).expect("live right after malloc");
        let mut t = self.tracker.lock();
        if let Some((&q, l)) = t.live.range(..p + size).next_back() {
            assert!(q + l.2 <= p, "{p:#x}+{size} overlaps live {q:#x}+{}", l.2);
        }
        // Stream safety, as in the model: overlapped freed ranges must be
        // proven complete on every other stream they wait for.
        let unproven = t.ledger.hand_out(&self.spy, dev, stream, p, size);
        t.violations
            .extend(unproven.iter().map(ToString::to_string));
        t.live.insert(p, (dev, stream, size, Vec::new()));
    }

    /// Free the live allocation nearest `key`. The tracker lock is held across
    /// the engine's free so no allocation can be checked between the two.
    fn free_near(&self, key: u64) {
        let mut t = self.tracker.lock();
        let Some((&p, _)) = t.live.range(key..).next().or_else(|| t.live.iter().next()) else {
            return;
        };
        let (dev, stream, size, mut streams) = t.live.remove(&p).unwrap();
        let tick = self.spy.stamp();
        self.alloc
            .free(p, Some(dev), stream)
            .expect("free of a live pointer");
        self.frees.fetch_add(1, Relaxed);
        streams.push(stream);
        t.ledger.freed(dev, p, size, streams, tick);
    }

    fn record_near(&self, key: u64, s: u64) {
        let mut t = self.tracker.lock();
        if let Some((&p, l)) = t.live.range_mut(key..).next() {
            self.alloc
                .record_stream(p, s)
                .expect("record_stream of live");
            if s != l.1 && !l.3.contains(&s) {
                l.3.push(s);
            }
        }
    }
}

#[test]
fn threads_by_streams_random_ops() {
    let ops: u64 = std::env::var("CUDALLOC_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    let c = Config::parse("sim_devices:2,sim_memory:512MiB").unwrap();
    let spy = Arc::new(Spy::new(2, 512 << 20));
    spy.sim.set_manual_events(true);
    let w = Arc::new(World {
        alloc: Allocator::new(c, spy.clone()),
        spy,
        tracker: Mutex::new(Tracker {
            live: BTreeMap::new(),
            ledger: Ledger::new(2),
            violations: Vec::new(),
        }),
        mallocs: AtomicU64::new(0),
        frees: AtomicU64::new(0),
        invalid: AtomicU64::new(0),
        ooms: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let gpu = {
        let (w, stop) = (w.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Mix(1000);
            while !stop.load(Relaxed) {
                let r = rng.next();
                w.spy
                    .complete_stream((r % 2) as usize, STREAMS[(r >> 8) as usize % 4]);
                std::thread::yield_now();
            }
        })
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || {
                let mut rng = Mix(t);
                for _ in 0..ops / THREADS {
                    let r = rng.next();
                    let dev = (r % 2) as usize;
                    let stream = STREAMS[(r >> 4) as usize % 4];
                    let arg = rng.next();
                    match (r >> 16) % 100 {
                        0..=44 => {
                            let size = match arg % 10 {
                                0..=5 => [512, 1000, 4096, 65_536][(arg >> 8) as usize % 4],
                                6..=8 => 1 + (arg >> 8) % (1 << 20),
                                _ => (1 << 20) + (arg >> 8) % (24 << 20),
                            };
                            w.malloc(size, dev, stream);
                        }
                        45..=89 => w.free_near(arg),
                        90..=93 => w.record_near(arg, STREAMS[(arg >> 62) as usize]),
                        94..=95 => {
                            let e = w.alloc.free(arg | 1, Some(dev), stream).unwrap_err();
                            assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_INVALID_FREE);
                            w.invalid.fetch_add(1, Relaxed);
                        }
                        96 => {
                            let s = w.alloc.stats(dev).unwrap();
                            assert!(s.reserved_bytes_peak >= s.reserved_bytes);
                            assert!(s.allocated_bytes_peak >= s.allocated_bytes);
                        }
                        97 => w.alloc.reset_peak(dev).unwrap(),
                        _ => {
                            w.alloc.empty_cache();
                        }
                    }
                }
            })
        })
        .collect();
    for t in workers {
        t.join().expect("worker panicked");
    }
    stop.store(true, Relaxed);
    gpu.join().unwrap();

    let t = w.tracker.lock();
    assert!(
        t.violations.is_empty(),
        "{:?}",
        &t.violations[..t.violations.len().min(5)]
    );
    w.alloc.check_invariants().unwrap();
    let sum = |f: fn(&cudalloc::stats::cudalloc_stats) -> u64| -> u64 {
        (0..2).map(|d| f(&w.alloc.stats(d).unwrap())).sum()
    };
    assert_eq!(sum(|s| s.num_allocs), w.mallocs.load(Relaxed));
    assert_eq!(sum(|s| s.num_frees), w.frees.load(Relaxed));
    assert_eq!(sum(|s| s.num_invalid_frees), w.invalid.load(Relaxed));
    assert_eq!(sum(|s| s.num_ooms), w.ooms.load(Relaxed));
    assert_eq!(sum(|s| s.active_allocations), t.live.len() as u64);
    assert_eq!(
        sum(|s| s.allocated_bytes),
        t.live.values().map(|l| l.2).sum::<u64>()
    );
    for (&p, l) in &t.live {
        assert_eq!(w.alloc.size_of(p), Some(l.2), "{p:#x} lost or resized");
    }
    let live: Vec<(u64, usize)> = t.live.iter().map(|(&p, l)| (p, l.0)).collect();
    drop(t);
    assert!(w.mallocs.load(Relaxed) > ops / 4, "the run did little");
    for (p, d) in live {
        w.alloc.free(p, Some(d), 0).unwrap();
    }
    w.spy.complete_all();
    w.alloc.empty_cache();
    w.alloc.check_invariants().unwrap();
    for d in 0..2 {
        let s = w.alloc.stats(d).unwrap();
        assert_eq!((s.allocated_bytes, s.reserved_bytes), (0, 0), "device {d}");
        assert_eq!(w.spy.sim.used(d), 0);
    }
}

/// Regression: adoption used to attach another stream's idle segment to the
/// arena, drop the lock, and relock to carve the block, so a second thread on
/// the same stream could take the segment's free block in the gap and the
/// same memory was handed out twice (found by `threads_by_streams_random_ops`
/// in CI). Many threads on one stream adopt segments left idle by another,
/// round after round; every returned range must be disjoint from all live ones.
#[test]
fn adoption_hands_each_segment_out_once() {
    use cudalloc::driver::sim::SimDriver;
    let c = Config::parse("sim_memory:8GiB").unwrap();
    let d = Arc::new(SimDriver::new(1, c.sim_memory));
    let a = Allocator::new(c, d);
    let live: Mutex<BTreeMap<u64, u64>> = Mutex::new(BTreeMap::new());
    let (x, y) = (0x10u64, 0x20u64);
    for round in 0..100u64 {
        // Stream `from` leaves idle segments; the threads on `to` adopt them.
        let (from, to) = if round % 2 == 0 { (x, y) } else { (y, x) };
        let ps: Vec<u64> = (0..64)
            .map(|_| a.malloc(3 << 20, 0, from).unwrap())
            .collect();
        for p in ps {
            a.free(p, Some(0), from).unwrap();
        }
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (a, live) = (&a, &live);
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for _ in 0..16 {
                        let p = a.malloc(3 << 20, 0, to).unwrap();
                        let end = p + a.size_of(p).unwrap();
                        let mut m = live.lock();
                        if let Some((&q, &e)) = m.range(..end).next_back() {
                            assert!(
                                e <= p,
                                "[{p:#x},{end:#x}) handed out while [{q:#x},{e:#x}) is live"
                            );
                        }
                        m.insert(p, end);
                        mine.push(p);
                    }
                    for p in mine {
                        assert!(live.lock().remove(&p).is_some());
                        a.free(p, Some(0), to).unwrap();
                    }
                });
            }
        });
    }
    a.check_invariants().unwrap();
    assert!(
        a.stats(0).unwrap().num_segments_adopted > 0,
        "the test must exercise adoption"
    );
}
