//! Reclamation: idle segments proven free go back to the driver (the OOM
//! ladder, `empty_cache`, growth's release of useless segments, trim) or
//! to another stream's arena (adoption).

use super::arena::{Arena, ArenaInner, Detached, PoolTag, ProofPass};
use super::core::DeviceCore;
use super::device::Device;
use super::pool_state::Pools;
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
        for arena in self.arena_list() {
            let detached: Vec<Detached> = {
                let mut a = arena.inner.lock();
                // Frees held back by a capture that ended without its end
                // hook (see `capture_underway`) proceed now.
                if !a.deferred.is_empty() {
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
                if a.idle.is_empty() {
                    continue;
                }
                if let Release::Useless {
                    pool,
                    rounded,
                    policy,
                } = mode
                {
                    if !a
                        .idle
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
                let candidates: Vec<u32> = match mode {
                    Release::All | Release::Completed => a.idle.clone(),
                    Release::Useless {
                        pool,
                        rounded,
                        policy,
                    } => a
                        .idle
                        .iter()
                        .copied()
                        .filter(|&s| useless(a.seg(s).pool, a.seg(s).size, pool, rounded, &policy))
                        .collect(),
                };
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
                    .idle
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
    /// blocks: a segment goes only once its free is proven complete.
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
            for &s in &inner.idle {
                let seg = inner.seg(s);
                cands.push((seg.idle_since_ms, ai, seg.base));
            }
        }
        cands.sort_unstable();
        let mut released = 0;
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
                    .idle
                    .iter()
                    .copied()
                    .find(|&s| inner.seg(s).base == base);
                take_proven(&mut inner, a.stream, &dev.core, found, false, 1)
            };
            released += dev.give_back(a, detached);
        }
        released
    }
}
