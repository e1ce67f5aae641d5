//! Reclamation: idle segments proven free go back to the driver (the OOM
//! ladder, `empty_cache`, growth's release of useless segments, trim) or
//! to another stream's arena (adoption).

use super::arena::{Arena, ArenaInner, Detached, PoolTag, ProofPass};
use super::core::DeviceCore;
use super::device::Device;
use super::pool_state::Pools;
use super::snapshot::TraceAction;
use super::Engine;
use crate::driver::{DriverError, Stream};
use crate::size_class::{Policy, Pool};
use std::sync::Arc;

/// How the OOM ladder and `empty_cache` release idle segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// Only segments whose event has already completed (never blocks).
    Completed,
    /// Every idle segment, synchronising streams as needed.
    All,
    /// Idle segments of `pool` that cannot serve a request of `rounded`
    /// bytes (smaller, or under `huge_split:off` a whole-handed segment far
    /// bigger) whose event has completed: before growing, drop cached memory
    /// that cannot serve the request anyway (never blocks).
    Useless {
        pool: Pool,
        rounded: u64,
        policy: Policy,
    },
}

/// Whether an idle segment (`seg_pool`, `seg_size` bytes) cannot serve a
/// request of `rounded` bytes from `pool`.
pub(super) fn useless(
    seg_pool: Pool,
    seg_size: u64,
    pool: Pool,
    rounded: u64,
    policy: &Policy,
) -> bool {
    seg_pool == pool && (seg_size < rounded || !policy.may_serve(pool, seg_size, seg_size, rounded))
}

/// Detach from `inner` (the locked arena of `stream`), in the order given,
/// the candidate idle segments whose free is proven complete (see
/// `ArenaInner::idle_free_complete`; every candidate when `all_proven`: the
/// stream was synchronised), stopping after `most` of them. The one place
/// where idle segments leave an arena: release, adoption and trim all
/// choose their candidates and come here.
fn take_proven(
    inner: &mut ArenaInner,
    stream: Stream,
    dev: &DeviceCore,
    candidates: impl IntoIterator<Item = u32>,
    all_proven: bool,
    most: usize,
) -> Vec<Detached> {
    let mut out = Vec::new();
    let mut pass = ProofPass::default();
    for s in candidates {
        if out.len() == most {
            break;
        }
        if all_proven || inner.idle_free_complete(s, stream, dev, &mut pass) {
            out.push(inner.detach(s, dev));
        }
    }
    out
}

impl Device {
    /// Give segments detached from `arena` back to the driver; returns the
    /// bytes that went (one the driver refuses stays cached: `driver_free`).
    fn give_back(&self, arena: &Arena, detached: Vec<Detached>) -> u64 {
        detached
            .into_iter()
            .map(|d| {
                let size = d.size;
                if self.driver_free(arena, d) {
                    size
                } else {
                    0
                }
            })
            .sum()
    }

    /// `empty_cache` for this device: end the quarantine and release every
    /// idle segment. Nothing while a capture is under way (pools.rs; a
    /// C/C++ capture on one of the device's streams too): that would
    /// invalidate it. Call with `slow` held.
    pub(super) fn empty_cache(&self) -> u64 {
        if self.capture_underway() {
            tracing::debug!(
                device = self.core.index,
                "empty_cache during a graph capture: nothing released"
            );
            return 0;
        }
        self.release_quarantine();
        // The captures are over: a stream they named may be destroyed now.
        self.core.capture.forget_watched();
        self.reserve.released();
        self.release_idle(Release::All)
    }

    /// Hand the arenas of released pools that hold no segment to the spares.
    /// Call with `slow` held.
    pub(super) fn retire_drained_pools(&self) {
        let mut pools = self.pools.lock();
        let Pools { map, spare, .. } = &mut *pools;
        map.retain(|_, st| {
            if st.refs > 0 || st.routing > 0 {
                return true;
            }
            let drained = st
                .arenas
                .iter()
                .all(|a| a.inner.lock().segment_count() == 0);
            if drained {
                for a in st.arenas.drain(..) {
                    a.inner.lock().pool = PoolTag::Spare;
                    spare.push(a);
                }
            }
            !drained
        });
    }

    /// Release idle segments of every arena of this device to the driver.
    /// Returns the bytes released. Call with `slow` held, and only when no
    /// capture is under way (`capture_underway`: that would invalidate it).
    pub(super) fn release_idle(&self, mode: Release) -> u64 {
        let mut released = 0;
        // Only a release of everything goes below the reservation (reserve.rs).
        let mut budget = self.floor_budget();
        for arena in self.arena_list() {
            let detached: Vec<Detached> = {
                let mut a = arena.inner.lock();
                // Frees held back by a capture that ended without its end
                // hook (see `capture_underway`) proceed now.
                if a.has_deferred() {
                    a.record_deferred(&self.core);
                }
                match a.pool {
                    PoolTag::None => {}
                    // A released pool's segments go only where every stream
                    // is synchronised (a replay may run on any).
                    PoolTag::Released(_) if mode == Release::All => {}
                    PoolTag::Live(_) => {
                        // Keeps its memory; its completed record_stream
                        // frees are its to reuse again.
                        a.flush_stash();
                        a.process_pending(&self.core, false);
                        continue;
                    }
                    PoolTag::Released(_) | PoolTag::Spare => continue,
                }
                a.flush_stash();
                a.process_pending(&self.core, mode == Release::All);
                if a.idle_segments().is_empty() {
                    continue;
                }
                if let Release::Useless {
                    pool,
                    rounded,
                    policy,
                } = mode
                {
                    if !a
                        .idle_segments()
                        .iter()
                        .any(|&s| useless(a.seg(s).pool, a.seg(s).size, pool, rounded, &policy))
                    {
                        continue;
                    }
                }
                if mode == Release::All {
                    // cuMemFree synchronises anyway; this makes the wait explicit.
                    let _ = self
                        .core
                        .driver
                        .stream_synchronize(self.core.index, arena.stream);
                }
                let mut candidates: Vec<u32> = match mode {
                    Release::All | Release::Completed => a.idle_segments().to_vec(),
                    Release::Useless {
                        pool,
                        rounded,
                        policy,
                    } => a
                        .idle_segments()
                        .iter()
                        .copied()
                        .filter(|&s| useless(a.seg(s).pool, a.seg(s).size, pool, rounded, &policy))
                        .collect(),
                };
                if mode != Release::All {
                    candidates.retain(|&s| budget.spend(a.seg(s).size));
                }
                take_proven(
                    &mut a,
                    arena.stream,
                    &self.core,
                    candidates,
                    mode == Release::All,
                    usize::MAX,
                )
            };
            released += self.give_back(&arena, detached);
        }
        if mode == Release::All {
            self.retire_drained_pools();
        }
        if matches!(mode, Release::All | Release::Completed) {
            released += self.vmm_release(mode == Release::All);
        }
        released
    }

    /// Give segment `d`, detached from `arena`, back to the driver. Returns
    /// whether it went. One the driver refuses to free is still allocated:
    /// it goes back into `arena` as an idle segment, so nothing is lost and
    /// `reserved` stays true (a later release tries again). After the
    /// driver's shutdown the memory is gone with it.
    pub(super) fn driver_free(&self, arena: &Arena, d: Detached) -> bool {
        match self.core.driver.mem_free(self.core.index, d.base, d.size) {
            Ok(()) | Err(DriverError::Deinitialized) => {
                self.core.counters.reserved.sub(d.size);
                self.core.counters.driver_frees.inc();
                if self.core.history.on() {
                    let h = &self.core.history;
                    h.record(TraceAction::SegmentFree, d.base, d.size, arena.stream);
                }
                true
            }
            Err(e) => {
                tracing::warn!(
                    device = self.core.index,
                    "freeing a segment of {} bytes failed: {e}; it stays cached",
                    d.size
                );
                arena.inner.lock().attach(d);
                false
            }
        }
    }

    /// Take an idle segment of another stream, whose free is proven complete,
    /// out of its arena for `me`. Call with `slow` held. The caller attaches
    /// it and carves its block in one critical section: attaching here and
    /// carving after a relock would let another thread on `me`'s stream take
    /// the segment's free block in between.
    pub(super) fn adopt(
        &self,
        me: &Arena,
        pool: Pool,
        rounded: u64,
        policy: &Policy,
    ) -> Option<Detached> {
        for other in self.arena_list() {
            if std::ptr::eq(Arc::as_ptr(&other), me) || other.pooled {
                continue;
            }
            let found = {
                let mut o = other.inner.lock();
                o.flush_stash();
                let mut cands: Vec<u32> = o
                    .idle_segments()
                    .iter()
                    .copied()
                    .filter(|&s| {
                        let seg = o.seg(s);
                        seg.pool == pool
                            && seg.size >= rounded
                            && policy.may_serve(pool, seg.size, seg.size, rounded)
                    })
                    .collect();
                cands.sort_by_key(|&s| o.seg(s).size);
                take_proven(&mut o, other.stream, &self.core, cands, false, 1).pop()
            };
            if let Some(d) = found {
                self.core.counters.adopted.inc();
                return Some(d);
            }
        }
        None
    }
}

impl Engine {
    /// Release idle cached segments of `device`, the longest idle first,
    /// until at least `want` bytes are released or none is left. Never
    /// blocks: a segment goes only once its free is proven complete. Never
    /// takes the reserved bytes below the warm-up reservation (`reserve:`).
    /// Returns the bytes released.
    pub fn trim(&self, device: usize, want: u64) -> u64 {
        let Ok(dev) = self.device(device) else {
            return 0;
        };
        let _slow = dev.slow.lock();
        if dev.capture_underway() {
            return 0;
        }
        // Pools keep their memory (pools.rs).
        let arenas: Vec<_> = dev.arena_list().into_iter().filter(|a| !a.pooled).collect();
        let mut cands: Vec<(u64, usize, u64)> = Vec::new();
        for (ai, a) in arenas.iter().enumerate() {
            let mut inner = a.inner.lock();
            inner.flush_stash();
            inner.process_pending(&dev.core, false);
            for &s in inner.idle_segments() {
                let seg = inner.seg(s);
                cands.push((seg.idle_since_ms, ai, seg.base));
            }
        }
        cands.sort_unstable();
        let mut released = 0;
        // Never below the warm-up reservation (reserve.rs).
        let mut budget = dev.floor_budget();
        for (_, ai, base) in cands {
            if released >= want {
                break;
            }
            let a = &arenas[ai];
            let detached = {
                let mut inner = a.inner.lock();
                // The stream is asked afresh under each lock: the segment may
                // have been used and freed again meanwhile.
                let found = inner
                    .idle_segments()
                    .iter()
                    .copied()
                    .find(|&s| inner.seg(s).base == base)
                    .filter(|&s| budget.fits(inner.seg(s).size));
                take_proven(&mut inner, a.stream, &dev.core, found, false, 1)
            };
            let gone = dev.give_back(a, detached);
            budget.spend(gone);
            released += gone;
        }
        if released < want {
            released += dev.vmm_trim(want - released);
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::*;

    #[test]
    fn other_stream_waits_for_the_event() {
        let (a, d) = sim("sim_memory:64MiB,sim_events:manual");
        d.set_manual_events(true);
        let p = a.malloc(40 << 20, 0, 1).unwrap();
        a.free(p, Some(0), 1).unwrap();
        // Stream 2 cannot take the segment before stream 1's work is done, and
        // there is no room for a second one: the ladder synchronises.
        let before = d.counters().stream_syncs;
        let q = a.malloc(40 << 20, 0, 2).unwrap();
        assert!(
            d.counters().stream_syncs > before,
            "had to wait for stream 1"
        );
        a.free(q, Some(0), 2).unwrap();
        // Now with room to spare: stream 3 is refused the idle segment while
        // its event is pending and gets a new one.
        let (a, d) = sim("sim_memory:1GiB");
        d.set_manual_events(true);
        let p = a.malloc(40 << 20, 0, 1).unwrap();
        a.free(p, Some(0), 1).unwrap();
        let q = a.malloc(40 << 20, 0, 3).unwrap();
        assert_ne!(p, q);
        assert_eq!(a.stats(0).unwrap().num_segments_adopted, 0);
        d.complete_stream(0, 1);
        a.free(q, Some(0), 3).unwrap();
        let r = a.malloc(40 << 20, 0, 4).unwrap();
        assert!(r == p || r == q);
        assert_eq!(a.stats(0).unwrap().num_segments_adopted, 1);
        a.check_invariants().unwrap();
    }

    /// A GPU that runs behind the host: idle segments freed before an epoch
    /// event are proven free once it completes (the host synchronised, say),
    /// though the stream is busy, so growth releases the ones too small.
    /// Segments freed after it stay unproven (their fallback event is
    /// recorded only when asked for, and has not completed).
    #[test]
    fn epoch_events_prove_segments_freed_before_them() {
        const M: u64 = 1 << 20;
        let (a, d) = sim("sim_memory:4GiB");
        d.set_manual_events(true);
        let s = 0x10;
        let n = EPOCH_SPACING as u64 + 3;
        let ps = own_segments(&a, s, n);
        assert_eq!(a.stats(0).unwrap().reserved_bytes, n * 30 * M);
        let before = d.counters().event_records;
        free_all(&a, s, &ps);
        // One epoch event, at the EPOCH_SPACING-th idle segment.
        assert_eq!(d.counters().event_records, before + 1);
        d.complete_all();
        let big = a.malloc(100 * M, 0, s).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(st.num_driver_frees, EPOCH_SPACING as u64);
        assert_eq!(st.reserved_bytes, 3 * 30 * M + 100 * M);
        // The last three have fallback events now; once those complete,
        // they go too, but not the segment freed since.
        d.complete_all();
        a.free(big, Some(0), s).unwrap();
        a.malloc(200 * M, 0, s).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(st.num_driver_frees, EPOCH_SPACING as u64 + 3);
        assert_eq!(st.reserved_bytes, 100 * M + 200 * M);
        a.check_invariants().unwrap();
    }

    /// A segment the driver refuses to free stays cached: nothing is lost,
    /// `reserved` stays true, the segment serves again, and a later release
    /// frees it.
    #[test]
    fn a_refused_driver_free_keeps_the_segment() {
        let (a, d) = sim("sim_memory:1GiB");
        let p = a.malloc(30 << 20, 0, 0x10).unwrap();
        a.free(p, Some(0), 0x10).unwrap();
        d.set_fail_frees(true);
        assert_eq!(a.empty_cache(), 0);
        let st = a.stats(0).unwrap();
        assert_eq!((st.reserved_bytes, st.num_driver_frees), (30 << 20, 0));
        a.check_invariants().unwrap();
        assert_eq!(
            a.malloc(30 << 20, 0, 0x10).unwrap(),
            p,
            "served from the cache"
        );
        a.free(p, Some(0), 0x10).unwrap();
        d.set_fail_frees(false);
        assert_eq!(a.empty_cache(), 30 << 20);
        assert_eq!((a.stats(0).unwrap().reserved_bytes, d.used(0)), (0, 0));
        a.check_invariants().unwrap();
    }

    /// One large block freed again and again (alone in its segment) counts
    /// as one segment per epoch: it records nothing by itself.
    #[test]
    fn one_segment_freed_in_a_loop_records_no_epoch_event() {
        let (a, d) = sim("sim_memory:4GiB");
        let before = d.counters().event_records;
        for _ in 0..10 * EPOCH_SPACING {
            let p = a.malloc(30 << 20, 0, 0x10).unwrap();
            a.free(p, Some(0), 0x10).unwrap();
        }
        assert_eq!(d.counters().event_records, before);
        assert_eq!(a.stats(0).unwrap().num_driver_allocs, 1);
    }

    /// A pass over idle segments asks a pending epoch event once, not once
    /// per segment it would cover.
    #[test]
    fn a_pending_epoch_event_is_queried_once_a_pass() {
        let (a, d) = sim("sim_memory:4GiB");
        d.set_manual_events(true);
        let s = 0x10;
        let n = EPOCH_SPACING as u64;
        free_all(&a, s, &own_segments(&a, s, n));
        let before = d.counters();
        a.malloc(100 << 20, 0, s).unwrap();
        let after = d.counters();
        // The epoch event once, then each segment's own fallback event.
        assert_eq!(after.event_queries - before.event_queries, 1 + n);
        assert_eq!(after.stream_queries - before.stream_queries, 1);
        assert_eq!(a.stats(0).unwrap().num_driver_frees, 0);
    }

    #[test]
    fn record_stream_delays_reuse() {
        let (a, d) = sim("sim_memory:1GiB");
        d.set_manual_events(true);
        let p = a.malloc(4096, 0, 1).unwrap();
        a.record_stream(p, 2).unwrap();
        a.free(p, Some(0), 1).unwrap();
        let q = a.malloc(4096, 0, 1).unwrap();
        assert_ne!(p, q, "block still in use by stream 2");
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 4096);
        a.check_invariants().unwrap();
        d.complete_stream(0, 2);
        let r = a.malloc(4096, 0, 1).unwrap();
        assert_eq!(r, p, "reused once stream 2's work completed");
        assert_eq!(
            a.record_stream(0xdead, 2).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER
        );
        a.check_invariants().unwrap();
    }
}
