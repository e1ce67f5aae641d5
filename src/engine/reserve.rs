//! The warm-up reservation (`reserve:SIZE`, like RMM's `initial_pool_size`):
//! at a device's first use, memory is taken from the driver in one go and
//! kept cached, so that the requests that follow are served without a
//! driver call each (no first-iteration storm of `cuMemAlloc`s), and a
//! process on a shared GPU holds what it will need.
//!
//! - **When.** On the first slow path of the device (its first allocation
//!   is always one), before the request is served, under the device's
//!   `slow` lock. Once: a warm-up that fails (the driver has no room) is
//!   logged and not tried again. Not during a graph capture, nor for a
//!   private pool's allocation: the next other slow path takes it.
//! - **Shape.** One large-pool segment of the whole reservation (rounded up
//!   to `huge_round`), which carves any large request up to its size. Under
//!   `huge_split:off`, where a segment of its own is handed out whole,
//!   segments of `large_segment` each instead (the reservation rounded up
//!   to a multiple of it). Small requests (up to
//!   `small_max`) still take `small_segment`s from the driver as needed.
//! - **Which stream.** The segment is attached to the arena of the stream
//!   whose request triggered the warm-up, marked *fresh* (`Segment::fresh`):
//!   until something is carved from it, no stream ever used it, so any
//!   other stream may adopt it at once, with no proof of a free. Once used,
//!   it is a cached segment like any other.
//! - **The floor.** Trim (`trim_threshold`), and the release of useless idle
//!   segments before a growth, never take the device's reserved bytes
//!   below the reservation. `empty_cache` releases it (and ends the floor).
//!   The OOM ladder's first step (idle segments proven free) keeps to the
//!   floor; its second step, which synchronises and releases every idle
//!   segment, does not: a request that would fail otherwise comes first,
//!   and the retry takes back what it needs. The floor stays after that.
//! - **Limits.** The reservation counts against `max_memory` (a reservation
//!   above it is a configuration error) and `memory_fraction` (a warm-up
//!   under a lower limit takes what the limit allows, with a warning).

use super::arena::{Arena, Detached};
use super::device::Device;
use super::Engine;
use crate::config::format_size;
use crate::driver::DriverError;
use crate::size_class::Pool;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One device's warm-up reservation.
#[derive(Debug, Default)]
pub(super) struct Reserve {
    /// Bytes the configuration asks for (0: none).
    wanted: u64,
    /// Whether the warm-up ran (or there is none to run).
    done: AtomicBool,
    /// Reserved bytes that trim never goes below: what the warm-up took,
    /// until `empty_cache`.
    floor: AtomicU64,
}

impl Reserve {
    pub(super) fn new(wanted: u64) -> Self {
        Reserve {
            wanted,
            done: AtomicBool::new(wanted == 0),
            floor: AtomicU64::new(0),
        }
    }

    /// The reserved bytes trim keeps (0: none).
    pub(super) fn floor(&self) -> u64 {
        self.floor.load(Ordering::Relaxed)
    }

    /// `empty_cache` released everything: the floor ends.
    pub(super) fn released(&self) {
        self.floor.store(0, Ordering::Relaxed);
    }
}

/// How many bytes a release that keeps to the floor may still give back,
/// spent segment by segment (see [`Device::floor_budget`]).
pub(super) struct FloorBudget(u64);

impl FloorBudget {
    /// Whether a segment of `size` bytes may go.
    pub(super) fn fits(&self, size: u64) -> bool {
        size <= self.0
    }

    /// Whether a segment of `size` bytes may go; if so, it is spent (a
    /// candidate that then stays, its free unproven, keeps its share: the
    /// release may keep a little more than the floor, never less).
    pub(super) fn spend(&mut self, size: u64) -> bool {
        let fits = self.fits(size);
        if fits {
            self.0 -= size;
        }
        fits
    }
}

impl Device {
    /// The bytes a release that keeps to the reservation's floor may give
    /// back: reserved bytes above the floor (all of them without a floor).
    /// Call with `slow` held.
    pub(super) fn floor_budget(&self) -> FloorBudget {
        let floor = self.reserve.floor();
        FloorBudget(if floor == 0 {
            u64::MAX
        } else {
            self.core.counters.reserved.current().saturating_sub(floor)
        })
    }
}

impl Engine {
    /// Take `dev`'s warm-up reservation, once, into `arena` (the stream
    /// asking), unless a capture is under way or `arena` is a private
    /// pool's (a later slow path takes it then). Call with `slow` held.
    #[cold]
    pub(super) fn warm_up(&self, dev: &Device, arena: &Arena, capture_underway: bool) {
        let r = &dev.reserve;
        if r.done.load(Ordering::Relaxed) || capture_underway || arena.pooled {
            return;
        }
        r.done.store(true, Ordering::Relaxed);
        let p = &self.policy;
        let Some(mut size) = r.wanted.checked_next_multiple_of(p.huge_round) else {
            return;
        };
        let index = dev.core.index;
        let room = dev
            .limit()
            .saturating_sub(dev.core.counters.reserved.current());
        if size > room {
            let capped = room / p.huge_round * p.huge_round;
            tracing::warn!(
                device = index,
                "reserve: {} is above what the limit (max_memory, memory_fraction) leaves; reserving {}",
                format_size(size),
                format_size(capped)
            );
            size = capped;
        }
        if let Some(vmm) = dev.vmm() {
            // Virtual segments: physical memory cached unmapped, for any
            // stream and both pools.
            let taken = match dev.vmm_reserve(vmm, size) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(
                        device = index,
                        "reserve: taking {} from the driver failed ({e}); no reservation",
                        format_size(size)
                    );
                    0
                }
            };
            r.floor.store(taken, Ordering::Relaxed);
            return;
        }
        let pieces: Vec<u64> = if p.huge_split {
            vec![size]
        } else {
            let n = size.div_ceil(p.large_segment);
            if n.saturating_mul(p.large_segment) > room {
                vec![p.large_segment; (room / p.large_segment) as usize]
            } else {
                vec![p.large_segment; n as usize]
            }
        };
        let mut taken = 0;
        for piece in pieces.into_iter().filter(|&n| n > 0) {
            match self.driver.mem_alloc(index, piece) {
                Ok(base) => {
                    dev.core.counters.reserved.add(piece);
                    dev.core.counters.driver_allocs.inc();
                    arena.inner.lock().attach_fresh(Detached {
                        base,
                        size: piece,
                        pool: Pool::Large,
                    });
                    taken += piece;
                }
                Err(e) => {
                    let why = match e {
                        DriverError::OutOfMemory => "the device has no room".to_string(),
                        e => e.to_string(),
                    };
                    tracing::warn!(
                        device = index,
                        "reserve: taking {} from the driver failed ({why}); reserved {} of {}",
                        format_size(piece),
                        format_size(taken),
                        format_size(r.wanted)
                    );
                    break;
                }
            }
        }
        r.floor.store(taken, Ordering::Relaxed);
        if taken > 0 {
            tracing::debug!(
                device = index,
                bytes = taken,
                "reserve: warm-up reservation taken"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::*;

    const M: u64 = 1 << 20;

    /// After the warm-up, requests within the reservation (of any large
    /// size, on the stream that took it) make no driver call.
    #[test]
    fn requests_within_the_reservation_make_no_driver_call() {
        let (a, d) = sim("sim_memory:4GiB,reserve:1GiB");
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 0, "taken at first use");
        let first = a.malloc(100 * M, 0, 0x10).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!((st.num_driver_allocs, st.reserved_bytes), (1, 1 << 30));
        let mut ps = vec![first];
        for size in [30 * M, 2 * M, 200 * M, 15 * M, 300 * M] {
            ps.push(a.malloc(size, 0, 0x10).unwrap());
        }
        let st = a.stats(0).unwrap();
        assert_eq!(st.num_driver_allocs, 1, "all served from the reservation");
        assert_eq!(d.counters().mem_allocs, 1);
        free_all(&a, 0x10, &ps);
        a.check_invariants().unwrap();
    }

    /// Until something is carved from it, the reservation is fresh: another
    /// stream adopts it with no proof of a free, even while the stream that
    /// took it is busy (manual events: nothing completes).
    #[test]
    fn another_stream_adopts_the_fresh_reservation_at_once() {
        let (a, d) = sim("sim_memory:4GiB,reserve:512MiB");
        d.set_manual_events(true);
        // A small request warms up on 0x10; the reservation serves the
        // large pool only, so it stays idle and fresh.
        let small = a.malloc(512, 0, 0x10).unwrap();
        assert_eq!(a.stats(0).unwrap().num_driver_allocs, 2);
        let before = d.counters();
        let big = a.malloc(400 * M, 0, 0x20).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(st.num_segments_adopted, 1);
        assert_eq!(st.num_driver_allocs, 2, "no driver call for 0x20");
        let after = d.counters();
        assert_eq!(
            after.event_records, before.event_records,
            "nothing to prove"
        );
        assert_eq!(after.stream_queries, before.stream_queries);
        // Used once, it is an ordinary segment: freed on a busy stream, a
        // third stream cannot take it unproven and grows instead.
        a.free(big, Some(0), 0x20).unwrap();
        let other = a.malloc(400 * M, 0, 0x30).unwrap();
        assert_ne!(other, big);
        assert_eq!(a.stats(0).unwrap().num_driver_allocs, 3);
        a.free(other, Some(0), 0x30).unwrap();
        a.free(small, Some(0), 0x10).unwrap();
        d.complete_all();
        a.check_invariants().unwrap();
    }

    /// Trim and the release of useless segments before a growth keep the
    /// reservation; `empty_cache` releases it and ends the floor.
    #[test]
    fn trim_keeps_the_reservation_and_empty_cache_releases_it() {
        let (a, _) = sim("sim_memory:4GiB,reserve:200MiB");
        let p = a.malloc(150 * M, 0, 0x10).unwrap();
        a.free(p, Some(0), 0x10).unwrap();
        // 300 MiB does not fit the idle 200 MiB segment: before growing,
        // useless idle segments go back, but not below the floor.
        let q = a.malloc(300 * M, 0, 0x10).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!((st.reserved_bytes, st.num_driver_frees), (500 * M, 0));
        a.free(q, Some(0), 0x10).unwrap();
        // The floor is on bytes: the oldest idle segment (the reservation's
        // own) goes, the 300 MiB one stays, and nothing more may go.
        assert_eq!(a.trim(0, u64::MAX), 200 * M, "down to the reservation");
        assert_eq!(a.trim(0, u64::MAX), 0);
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 300 * M);
        let r = a.malloc(280 * M, 0, 0x20).unwrap();
        assert_eq!(a.stats(0).unwrap().num_driver_allocs, 2, "served from it");
        a.free(r, Some(0), 0x20).unwrap();
        assert_eq!(a.empty_cache(), 300 * M);
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
        // No floor any more, and no second warm-up.
        let s = a.malloc(50 * M, 0, 0x10).unwrap();
        a.free(s, Some(0), 0x10).unwrap();
        assert_eq!(a.trim(0, u64::MAX), 50 * M);
        a.check_invariants().unwrap();
    }

    /// The OOM ladder's first step keeps the reservation; its second, the
    /// last resort, releases it when the request fits no other way.
    #[test]
    fn the_oom_ladder_releases_the_reservation_as_a_last_resort() {
        let (a, d) = sim("sim_memory:4GiB,max_memory:1GiB,reserve:800MiB");
        let p = a.malloc(900 * M, 0, 0x10).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!((st.reserved_bytes, st.num_driver_frees), (900 * M, 1));
        assert_eq!(d.counters().mem_allocs, 2);
        a.free(p, Some(0), 0x10).unwrap();
        // The floor stays: trim may take only 100 MiB, and a segment goes
        // whole, so the 900 MiB one stays.
        assert_eq!(a.trim(0, u64::MAX), 0);
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 900 * M);
        a.check_invariants().unwrap();
    }

    /// The reservation is per device; a limit caps it; a driver that has no
    /// room leaves none (logged), and requests are served as without.
    #[test]
    fn per_device_lists_limits_and_a_driver_without_room() {
        let (a, _) = sim("sim_devices:3,sim_memory:1GiB,reserve:64MiB|0|32MiB");
        for dev in 0..3 {
            let p = a.malloc(4 * M, dev, 0).unwrap();
            a.free(p, Some(dev), 0).unwrap();
        }
        let reserved: Vec<u64> = (0..3).map(|d| a.stats(d).unwrap().reserved_bytes).collect();
        assert_eq!(reserved, [64 * M, 20 * M, 32 * M]);

        let (a, _) = sim("sim_memory:1GiB,memory_fraction:0.5,reserve:1GiB");
        let (_, logs) = crate::global::capture_logs(|| {
            let p = a.malloc(100 * M, 0, 0).unwrap();
            a.free(p, Some(0), 0).unwrap();
        });
        assert!(logs.contains("reserving 512MiB"), "{logs}");
        let st = a.stats(0).unwrap();
        assert_eq!((st.reserved_bytes, st.num_driver_allocs), (512 * M, 1));

        let (a, _) = sim("sim_memory:1GiB,reserve:2GiB");
        let (_, logs) = crate::global::capture_logs(|| {
            let p = a.malloc(100 * M, 0, 0).unwrap();
            a.free(p, Some(0), 0).unwrap();
        });
        assert!(logs.contains("the device has no room"), "{logs}");
        let st = a.stats(0).unwrap();
        assert_eq!((st.reserved_bytes, st.num_driver_allocs), (100 * M, 1));
        assert_eq!(a.trim(0, u64::MAX), 100 * M, "no floor");
        a.check_invariants().unwrap();
    }

    /// Under `huge_split:off` the reservation comes in `large_segment`s,
    /// which split; a request of one is served from it.
    #[test]
    fn huge_split_off_takes_large_segments() {
        let (a, d) = sim("sim_memory:1GiB,huge_split:off,reserve:50MiB");
        let p = a.malloc(5 * M, 0, 0).unwrap();
        let q = a.malloc(5 * M, 0, 0).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!((st.reserved_bytes, st.num_driver_allocs), (60 * M, 3));
        assert_eq!(d.counters().mem_allocs, 3);
        free_all(&a, 0, &[p, q]);
        a.check_invariants().unwrap();
    }
}
