//! The engine's side of the observability adaptors (`src/observe/`): trim,
//! call-site stamps and the lookups the trace log needs. Kept apart from the
//! hot paths in `mod.rs`.

use super::arena::{Detached, ProofPass};
use super::Allocator;
use crate::driver::Stream;
use crate::observe::Observer;

impl Allocator {
    /// The observability adaptors of this allocator.
    pub fn observer(&self) -> &Observer {
        &self.observe
    }

    /// Stamp allocations, idle segments and periodic work (pressure, trim,
    /// the leak alarms) by `clock`, coarse monotonic milliseconds, instead
    /// of the real clock: tests advance time by counts instead of waiting.
    /// Call it before the first allocation; only the first call counts.
    #[doc(hidden)]
    pub fn set_clock(&self, clock: fn() -> u64) {
        for d in &self.devices {
            d.core.set_clock(clock);
        }
        self.observe.set_clock(clock);
    }

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
            let d: Option<Detached> = {
                let mut inner = a.inner.lock();
                let found = inner
                    .idle
                    .iter()
                    .copied()
                    .find(|&s| inner.seg(s).base == base);
                match found {
                    // The stream is asked afresh under each lock: the segment
                    // may have been used and freed again meanwhile.
                    Some(s)
                        if inner.idle_free_complete(
                            s,
                            a.stream,
                            &dev.core,
                            &mut ProofPass::default(),
                        ) =>
                    {
                        Some(inner.detach(s, &dev.core))
                    }
                    _ => None,
                }
            };
            if let Some(d) = d {
                let size = d.size;
                if dev.driver_free(a, d) {
                    released += size;
                }
            }
        }
        released
    }

    /// Stamp the live allocation `ptr` with call site `site`.
    pub(crate) fn set_site(&self, ptr: u64, device: usize, stream: Stream, site: u32) {
        let stamp = |a: &super::Arena| {
            let mut inner = a.inner.lock();
            let live = inner.live.contains_key(&ptr);
            if live {
                inner.sites.insert(ptr, site);
            }
            live
        };
        if let Some(dev) = self.devices.get(device) {
            if let Some(a) = dev.find_arena(self.id, stream) {
                if stamp(a) {
                    return;
                }
            }
            for a in dev.arena_list() {
                if stamp(&a) {
                    return;
                }
            }
        }
    }
}
