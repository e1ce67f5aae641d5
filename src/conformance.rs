//! The shared behaviour suite: one list of cases every configuration and
//! every backend must pass (after rmm's `mr_ref_test`).
//!
//! Each case gets a fresh [`Allocator`] from a fixture, drives it, and checks
//! [`Allocator::check_invariants`] after every step. The cases scale their
//! sizes to the device, so the same suite runs on a 256 MiB simulated device
//! and on an 80 GiB GPU. `tests/behaviour.rs` runs it over several sim
//! fixtures; `cudalloc selftest` runs it against the configured backend (the
//! GPU check, with no Rust toolchain on the GPU machine).
//!
//! Cases report failures as `Err(String)` instead of panicking, so a
//! selftest prints every failure rather than stopping at the first.

use crate::driver::Stream;
use crate::error::ErrorCode;
use crate::Allocator;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::sync::Arc;

/// A case: a name and a check.
pub struct Case {
    pub name: &'static str,
    pub run: fn(&Allocator, &[Stream]) -> Result<(), String>,
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("{}: {}", stringify!($cond), format!($($fmt)+)));
        }
    };
}

fn inv(a: &Allocator) -> Result<(), String> {
    a.check_invariants()
}

/// What device 0 lets the allocator reserve (total memory or the limit),
/// capped for the suite's own sizing.
fn capacity(a: &Allocator) -> u64 {
    let total = a.driver().mem_info(0).map(|(_, t)| t).unwrap_or(1 << 30);
    let limit = a.stats(0).map(|s| s.limit_bytes).unwrap_or(0);
    let cap = if limit == 0 { total } else { total.min(limit) };
    cap.min(64 << 30)
}

fn zero_bytes(a: &Allocator, _s: &[Stream]) -> Result<(), String> {
    let before = a.stats(0).map_err(|e| e.to_string())?;
    ensure!(a.malloc(0, 0, 0) == Ok(0), "malloc(0) must be Ok(NULL)");
    ensure!(a.free(0, Some(0), 0).is_ok(), "free(NULL) must be a no-op");
    let after = a.stats(0).map_err(|e| e.to_string())?;
    ensure!(before == after, "zero-byte calls changed the stats");
    inv(a)
}

fn impossible_then_recovery(a: &Allocator, _s: &[Stream]) -> Result<(), String> {
    let keep = a.malloc(1 << 20, 0, 0).map_err(|e| e.to_string())?;
    let e = a.malloc(1 << 50, 0, 0).err().ok_or("1 PiB must fail")?;
    ensure!(
        e.code == ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY,
        "wrong code {:?}",
        e.code
    );
    ensure!(
        e.message.contains("out of memory"),
        "no diagnosis: {}",
        e.message
    );
    ensure!(a.stats(0).unwrap().num_ooms == 1, "OOM not counted");
    inv(a)?;
    let p = a
        .malloc(1 << 20, 0, 0)
        .map_err(|e| format!("no recovery: {e}"))?;
    ensure!(
        a.size_of(keep) == Some(1 << 20),
        "a live allocation was lost"
    );
    a.free(p, Some(0), 0).map_err(|e| e.to_string())?;
    a.free(keep, Some(0), 0).map_err(|e| e.to_string())?;
    inv(a)
}

/// Random allocate/free over a log-uniform size mix, invariants after every step.
fn random_mix(a: &Allocator, s: &[Stream]) -> Result<(), String> {
    let cap = capacity(a);
    let max = (cap / 32).max(1 << 20);
    let mut rng = SmallRng::seed_from_u64(7);
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut total = 0u64;
    for step in 0..1500 {
        if live.is_empty() || (rng.random_bool(0.6) && total < cap / 2) {
            let bits = rng.random_range(0..=(63 - max.leading_zeros()));
            let size = rng.random_range(1..=(1u64 << bits).min(max));
            let stream = s[rng.random_range(0..3usize)];
            let p = a
                .malloc(size, 0, stream)
                .map_err(|e| format!("step {step}: {e}"))?;
            ensure!(p % 512 == 0, "unaligned {p:#x}");
            live.push((p, size));
            total += size;
        } else {
            let i = rng.random_range(0..live.len());
            let (p, size) = live.swap_remove(i);
            total -= size;
            // Hints deliberately wrong half the time.
            let hint = if rng.random_bool(0.5) { s[0] } else { 0x99 };
            a.free(p, Some(0), hint)
                .map_err(|e| format!("step {step}: {e}"))?;
        }
        inv(a).map_err(|e| format!("step {step}: {e}"))?;
    }
    let st = a.stats(0).unwrap();
    ensure!(
        st.active_allocations == live.len() as u64,
        "live count {} vs {}",
        st.active_allocations,
        live.len()
    );
    ensure!(
        st.requested_bytes == total,
        "requested {} vs {total}",
        st.requested_bytes
    );
    for (p, _) in live {
        a.free(p, None, 0).map_err(|e| e.to_string())?;
    }
    ensure!(
        a.stats(0).unwrap().allocated_bytes == 0,
        "bytes left allocated"
    );
    inv(a)
}

/// Memory freed on one stream serves another once the free completed.
fn several_streams(a: &Allocator, s: &[Stream]) -> Result<(), String> {
    let big = (capacity(a) / 8).next_multiple_of(2 << 20);
    for (i, &st) in s[..4].iter().enumerate() {
        let p = a
            .malloc(big, 0, st)
            .map_err(|e| format!("stream {i}: {e}"))?;
        a.free(p, Some(0), st).map_err(|e| e.to_string())?;
        inv(a)?;
    }
    let _ = a.driver().stream_synchronize(0, s[1]);
    // Fill from the fourth stream beyond what it cached itself: it must adopt or flush.
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(
            a.malloc(big, 0, s[3])
                .map_err(|e| format!("cross-stream fill: {e}"))?,
        );
    }
    inv(a)?;
    for p in got {
        a.free(p, Some(0), s[3]).map_err(|e| e.to_string())?;
    }
    inv(a)
}

/// Threads allocate on their own streams and free each other's blocks.
fn threads(a: &Allocator, s: &[Stream]) -> Result<(), String> {
    let cap = capacity(a);
    std::thread::scope(|scope| -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let rx = Arc::new(parking_lot::Mutex::new(rx));
        let mut handles = Vec::new();
        for t in 0..4u64 {
            let stream = s[4 + t as usize];
            let tx = tx.clone();
            let rx = rx.clone();
            handles.push(scope.spawn(move || -> Result<(), String> {
                let mut rng = SmallRng::seed_from_u64(100 + t);
                let mut mine = Vec::new();
                for _ in 0..3000 {
                    let size = rng.random_range(1..=(cap / 256).clamp(4096, 4 << 20));
                    let p = a.malloc(size, 0, stream).map_err(|e| e.to_string())?;
                    if rng.random_bool(0.3) {
                        let _ = tx.send(p);
                    } else {
                        mine.push(p);
                    }
                    if mine.len() > 16 {
                        let q = mine.swap_remove(rng.random_range(0..mine.len()));
                        a.free(q, Some(0), stream).map_err(|e| e.to_string())?;
                    }
                    let theirs = rx.lock().try_recv();
                    if let Ok(q) = theirs {
                        a.free(q, Some(0), stream)
                            .map_err(|e| format!("cross-thread free: {e}"))?;
                    }
                }
                for q in mine {
                    a.free(q, Some(0), stream).map_err(|e| e.to_string())?;
                }
                Ok(())
            }));
        }
        drop(tx);
        for h in handles {
            h.join().map_err(|_| "thread panicked".to_string())??;
        }
        while let Ok(q) = rx.lock().try_recv() {
            a.free(q, None, 0).map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    let st = a.stats(0).unwrap();
    ensure!(
        st.allocated_bytes == 0 && st.active_allocations == 0,
        "leaked {} bytes",
        st.allocated_bytes
    );
    ensure!(
        st.num_allocs == st.num_frees && st.num_allocs == 12000,
        "allocs {} frees {}",
        st.num_allocs,
        st.num_frees
    );
    inv(a)
}

fn bad_frees(a: &Allocator, _s: &[Stream]) -> Result<(), String> {
    let p = a.malloc(10_000, 0, 0).map_err(|e| e.to_string())?;
    let before = a.stats(0).unwrap();
    for bad in [p + 512, p - 512, 0xdead_beef, u64::MAX, 1] {
        let e = a
            .free(bad, Some(0), 0)
            .err()
            .ok_or(format!("free of {bad:#x} accepted"))?;
        ensure!(
            e.code == ErrorCode::CUDALLOC_ERR_INVALID_FREE,
            "code {:?}",
            e.code
        );
    }
    let after = a.stats(0).unwrap();
    ensure!(
        after.num_invalid_frees == before.num_invalid_frees + 5,
        "invalid frees not counted"
    );
    ensure!(
        after.allocated_bytes == before.allocated_bytes && after.num_frees == before.num_frees,
        "state changed"
    );
    ensure!(a.size_of(p) == Some(10_240), "the live block was disturbed");
    a.free(p, Some(7), 0x999)
        .map_err(|e| format!("free with wrong device/stream hints must still work: {e}"))?;
    ensure!(a.free(p, Some(0), 0).is_err(), "double free accepted");
    ensure!(
        a.record_stream(p, 5).is_err(),
        "record_stream of a freed pointer accepted"
    );
    inv(a)
}

fn limits(a: &Allocator, _s: &[Stream]) -> Result<(), String> {
    a.empty_cache();
    let total = a.driver().mem_info(0).map_err(|e| e.to_string())?.1;
    let before = a.stats(0).unwrap().limit_bytes;
    a.set_memory_fraction(0.25, 0).map_err(|e| e.to_string())?;
    let quarter = a.stats(0).unwrap().limit_bytes;
    let expect = if before == 0 {
        total / 4
    } else {
        before.min(total / 4)
    };
    ensure!(
        quarter.abs_diff(expect) < 4096,
        "limit {quarter} after fraction 0.25 of {total}, expected {expect}"
    );
    let e = a
        .malloc(quarter + (4 << 20), 0, 0)
        .err()
        .ok_or("allocation over the fraction succeeded")?;
    ensure!(
        e.code == ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY,
        "code {:?}",
        e.code
    );
    let p = a
        .malloc(quarter / 2, 0, 0)
        .map_err(|e| format!("under the limit: {e}"))?;
    ensure!(
        a.stats(0).unwrap().reserved_bytes <= quarter,
        "reserved over the limit"
    );
    a.free(p, Some(0), 0).map_err(|e| e.to_string())?;
    ensure!(
        a.set_memory_fraction(1.5, 0).is_err() && a.set_memory_fraction(f64::NAN, 0).is_err(),
        "bad fraction accepted"
    );
    a.set_memory_fraction(1.0, 0).map_err(|e| e.to_string())?;
    inv(a)
}

fn empty_cache(a: &Allocator, s: &[Stream]) -> Result<(), String> {
    let keep = a.malloc(4096, 0, 0).map_err(|e| e.to_string())?;
    let mut ps = Vec::new();
    for i in 0..50u64 {
        ps.push(
            a.malloc((i + 1) * 100_000, 0, s[i as usize % 3])
                .map_err(|e| e.to_string())?,
        );
    }
    for p in ps {
        a.free(p, None, 0).map_err(|e| e.to_string())?;
    }
    let released = a.empty_cache();
    let st = a.stats(0).unwrap();
    ensure!(released > 0, "nothing released");
    let c = a.config();
    let policy = crate::size_class::Policy::from_config(c);
    let seg = policy
        .segment_size(crate::size_class::round_size(4096).expect("small"))
        .expect("small");
    // With virtual segments, what stays is the live block's mapped page(s).
    let kept = if st.virtual_bytes > 0 {
        st.mapped_bytes
    } else {
        seg
    };
    ensure!(
        st.reserved_bytes == kept && kept >= 4096 && kept <= seg.max(4 << 20) && st.segments == 1,
        "only the live block's segment stays: {st:?}"
    );
    ensure!(a.size_of(keep) == Some(4096), "live block lost");
    let p = a
        .malloc(1 << 20, 0, 0)
        .map_err(|e| format!("after empty_cache: {e}"))?;
    a.free(p, None, 0).map_err(|e| e.to_string())?;
    a.free(keep, None, 0).map_err(|e| e.to_string())?;
    a.empty_cache();
    ensure!(
        a.stats(0).unwrap().reserved_bytes == 0,
        "not everything released"
    );
    inv(a)
}

fn record_stream(a: &Allocator, s: &[Stream]) -> Result<(), String> {
    let p = a.malloc(1 << 16, 0, s[1]).map_err(|e| e.to_string())?;
    a.record_stream(p, s[2]).map_err(|e| e.to_string())?;
    a.record_stream(p, s[2]).map_err(|e| e.to_string())?;
    a.free(p, Some(0), s[1]).map_err(|e| e.to_string())?;
    inv(a)?;
    let _ = a.driver().stream_synchronize(0, s[2]);
    let mut seen = false;
    for _ in 0..4 {
        let q = a.malloc(1 << 16, 0, s[1]).map_err(|e| e.to_string())?;
        seen |= q == p;
        a.free(q, Some(0), s[1]).map_err(|e| e.to_string())?;
    }
    ensure!(seen, "block never reused after stream 2 completed");
    ensure!(a.stats(0).unwrap().pending_free_bytes == 0, "still pending");
    inv(a)
}

fn peaks(a: &Allocator, _s: &[Stream]) -> Result<(), String> {
    let p = a.malloc(3 << 20, 0, 0).map_err(|e| e.to_string())?;
    a.free(p, None, 0).map_err(|e| e.to_string())?;
    let st = a.stats(0).unwrap();
    ensure!(
        st.allocated_bytes_peak >= 3 << 20 && st.allocated_bytes == 0,
        "peak {st:?}"
    );
    a.reset_peak(0).map_err(|e| e.to_string())?;
    let st = a.stats(0).unwrap();
    ensure!(
        st.allocated_bytes_peak == 0 && st.reserved_bytes_peak == st.reserved_bytes,
        "reset {st:?}"
    );
    ensure!(
        a.stats(a.device_count()).is_err(),
        "stats of a bad device accepted"
    );
    ensure!(
        a.malloc(1, a.device_count(), 0).is_err(),
        "malloc on a bad device accepted"
    );
    inv(a)
}

/// Every case of the suite.
pub const CASES: &[Case] = &[
    Case {
        name: "zero_bytes",
        run: zero_bytes,
    },
    Case {
        name: "impossible_then_recovery",
        run: impossible_then_recovery,
    },
    Case {
        name: "random_mix",
        run: random_mix,
    },
    Case {
        name: "several_streams",
        run: several_streams,
    },
    Case {
        name: "threads",
        run: threads,
    },
    Case {
        name: "bad_frees",
        run: bad_frees,
    },
    Case {
        name: "limits",
        run: limits,
    },
    Case {
        name: "empty_cache",
        run: empty_cache,
    },
    Case {
        name: "record_stream",
        run: record_stream,
    },
    Case {
        name: "peaks",
        run: peaks,
    },
];

/// How many stream handles the suite needs.
pub const STREAMS: usize = 8;

/// Run every case on a fresh allocator from `make`, with `streams` (at least
/// [`STREAMS`] distinct, valid stream handles; the first should be 0, the
/// default stream); returns each case's outcome.
pub fn run_all(
    make: &dyn Fn() -> Allocator,
    streams: &[Stream],
) -> Vec<(&'static str, Result<(), String>)> {
    assert!(
        streams.len() >= STREAMS,
        "the suite needs {STREAMS} streams"
    );
    CASES
        .iter()
        .map(|c| {
            // Cases provoke out-of-memory errors and bad frees on purpose:
            // what they log is shown only when one fails.
            let (r, log) = crate::global::capture_logs(|| {
                let a = make();
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (c.run)(&a, streams)))
                        .unwrap_or_else(|_| Err("panicked".into()));
                r.and_then(|()| {
                    a.empty_cache();
                    a.check_invariants()
                })
            });
            let r = r.map_err(|e| {
                if log.is_empty() {
                    e
                } else {
                    format!("{e}\n    what it logged:\n{log}")
                }
            });
            (c.name, r)
        })
        .collect()
}
