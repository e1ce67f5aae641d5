//! The slow path of an allocation (a cache miss), serialised per device:
//! adopt another stream's idle segment proven free, else grow from the
//! driver, else the OOM ladder (see [`Engine::malloc`]).

use super::arena::{Arena, Detached};
use super::device::Device;
use super::reclaim::Release;
use super::snapshot::TraceAction;
use super::Engine;
use crate::driver::DriverError;
use crate::error::{Error, ErrorCode, Result};
use crate::size_class::Pool;
use std::cell::Cell;

thread_local! {
    /// Set while this thread runs OOM callbacks: an allocation a callback
    /// makes runs the ladder without them (no recursion, no deadlock on a
    /// callback's own locks). Const, no destructor: usable during exit.
    static IN_OOM_CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

/// Marks the thread as running OOM callbacks until dropped (also on unwind).
struct CallbackScope;

impl CallbackScope {
    /// `None` when the thread already runs callbacks.
    fn enter() -> Option<CallbackScope> {
        let outer = IN_OOM_CALLBACKS
            .try_with(|c| c.replace(true))
            .unwrap_or(true);
        (!outer).then_some(CallbackScope)
    }
}

impl Drop for CallbackScope {
    fn drop(&mut self) {
        let _ = IN_OOM_CALLBACKS.try_with(|c| c.set(false));
    }
}

/// A slow path's request, as `try_serve` is asked it again and again.
#[derive(Clone, Copy)]
pub(super) struct Want {
    pub(super) pool: Pool,
    pub(super) rounded: u64,
    pub(super) size: u64,
    /// A capture is under way (the stream asking captures, or
    /// `Device::capture_underway`): adopt nothing, release nothing.
    pub(super) capture_underway: bool,
}

impl Engine {
    #[cold]
    pub(super) fn malloc_slow(
        &self,
        dev: &Device,
        arena: &Arena,
        rounded: u64,
        size: u64,
    ) -> Result<u64> {
        let pool = self.policy.pool(rounded);
        if self.policy.growth_sizes(rounded).is_none() {
            return Err(self.oom(dev, size, arena.stream, "the size overflows"));
        }
        // A pool's capture needs no quarantine (pools.rs): seeing it must not
        // make every later free ask the driver whether its stream captures.
        // A C/C++ capture is asked for on every slow path, seen before or
        // not: while it runs, this slow path gives nothing back to the
        // driver (cuMemFree would invalidate it) and takes no other stream's
        // segment. (Its arena may hold nothing yet, so `capture_underway`,
        // which asks the other streams, cannot tell.)
        let capturing = !arena.pooled && dev.core.note_capturing(&[arena.stream]);
        let (total, limit) = (dev.total(), dev.limit());
        if rounded > total.min(limit) {
            // No amount of flushing can help: fail without dropping the cache.
            use crate::config::format_size as fs;
            let why = if rounded > total {
                format!(
                    "the request ({}) is larger than the device's memory ({})",
                    fs(rounded),
                    fs(total)
                )
            } else {
                format!(
                    "the request ({}) is larger than the limit ({}; max_memory, memory_fraction)",
                    fs(rounded),
                    fs(limit)
                )
            };
            return Err(self.oom(dev, size, arena.stream, &why));
        }
        let mut slow = dev.slow.lock();
        let mut want = Want {
            pool,
            rounded,
            size,
            capture_underway: capturing || dev.capture_underway(),
        };
        self.warm_up(dev, arena, want.capture_underway);
        match self.try_serve(dev, arena, &want) {
            Ok(p) => return Ok(p),
            Err(e) if e.code != ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY => return Err(e),
            Err(_) => {}
        }
        dev.core.counters.alloc_retries.inc();
        if !want.capture_underway {
            for mode in [Release::Completed, Release::All] {
                let freed = dev.release_idle(mode);
                tracing::debug!(
                    device = dev.core.index,
                    ?mode,
                    freed,
                    "OOM ladder: released idle segments"
                );
                if let Ok(p) = self.try_serve(dev, arena, &want) {
                    return Ok(p);
                }
            }
        }
        // Callbacks may free memory (and so take arena locks): run them
        // unlocked. Not from a callback's own allocation: it would recurse.
        drop(slow);
        if let Some(_scope) = CallbackScope::enter() {
            let callbacks = self.oom_callbacks.read().clone();
            for cb in callbacks {
                cb(dev.core.index, size);
            }
        }
        slow = dev.slow.lock();
        want.capture_underway = capturing || dev.capture_underway();
        if !want.capture_underway {
            dev.release_idle(Release::All);
        }
        let last = self.try_serve(dev, arena, &want);
        drop(slow);
        last.map_err(|e| {
            if e.code == ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY {
                self.oom(dev, size, arena.stream, &e.message)
            } else {
                e
            }
        })
    }

    /// Own arena, then adoption, then the driver. Call with `slow` held.
    /// With `want.capture_underway` (a capture is under way), no adoption and no release.
    pub(super) fn try_serve(&self, dev: &Device, arena: &Arena, want: &Want) -> Result<u64> {
        let Want {
            pool,
            rounded,
            size,
            capture_underway,
        } = *want;
        {
            let mut a = arena.inner.lock();
            a.flush_stash();
            if let Some((p, block)) = a.try_alloc(rounded, size, &self.policy, &dev.core) {
                a.counters.cache_hits += 1;
                dev.note_alloc(arena, block);
                self.journal_allocated(dev, p, size, arena);
                return Ok(p);
            }
        }
        // Virtual segments (expandable_segments:on) for a stream's own
        // arena; a private pool keeps classic segments.
        if !arena.pooled {
            if let Some(vmm) = dev.vmm() {
                return self.serve_virtual(dev, arena, vmm, want);
            }
        }
        // A pool's memory comes only from the driver, and proving another
        // stream's segment free (stream and event queries) is illegal during
        // a capture (pools.rs).
        let adopted = if arena.pooled || capture_underway {
            None
        } else {
            dev.adopt(arena, pool, rounded, &self.policy)
        };
        if let Some(d) = adopted {
            let mut a = arena.inner.lock();
            a.counters.cache_hits += 1;
            let s = a.attach(d);
            let (p, block) = a.alloc_from_segment(s, rounded, size, &self.policy, &dev.core);
            dev.note_alloc(arena, block);
            self.journal_allocated(dev, p, size, arena);
            return Ok(p);
        }
        // About to grow: first give back idle segments of this pool that cannot
        // serve the request (too small, or whole-handed and far too big under
        // huge_split:off): they would only sit in the cache.
        if !capture_underway {
            dev.release_idle(Release::Useless {
                pool,
                rounded,
                policy: self.policy,
            });
        }
        let (base, seg_size) = self.grow(dev, rounded)?;
        if dev.core.history.on() {
            let h = &dev.core.history;
            h.record(TraceAction::SegmentAlloc, base, seg_size, arena.stream);
        }
        let mut a = arena.inner.lock();
        let s = a.attach(Detached {
            base,
            size: seg_size,
            pool,
        });
        let (p, block) = a.alloc_from_segment(s, rounded, size, &self.policy, &dev.core);
        dev.note_alloc(arena, block);
        self.journal_allocated(dev, p, size, arena);
        Ok(p)
    }

    /// A new segment for a rounded request, of the first of the policy's
    /// growth sizes that fits the limit and that the driver gives. Returns
    /// its base and size, counted as reserved. Call with `slow` held.
    pub(super) fn grow(&self, dev: &Device, rounded: u64) -> Result<(u64, u64)> {
        use crate::config::format_size as fs;
        let reserved = dev.core.counters.reserved.current();
        let limit = dev.limit();
        let mut failed = None;
        for seg_size in self.policy.growth_sizes(rounded).into_iter().flatten() {
            if reserved.saturating_add(seg_size) > limit {
                failed = Some(Error::new(
                    ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY,
                    format!(
                        "reserved {} plus a new segment of {} would pass the limit of {}",
                        fs(reserved),
                        fs(seg_size),
                        fs(limit)
                    ),
                ));
                continue;
            }
            match self.driver.mem_alloc(dev.core.index, seg_size) {
                Ok(base) => {
                    dev.core.counters.reserved.add(seg_size);
                    dev.core.counters.driver_allocs.inc();
                    return Ok((base, seg_size));
                }
                Err(DriverError::OutOfMemory) => {
                    failed = Some(Error::new(
                        ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY,
                        format!("the driver has no {} segment to give", fs(seg_size)),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(failed.unwrap_or_else(|| {
            Error::new(ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY, "the size overflows")
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::*;

    #[test]
    fn huge_split_off_hands_own_segments_out_whole() {
        const M: u64 = 1 << 20;
        for split in [true, false] {
            let conf = format!(
                "sim_memory:1GiB,huge_split:{}",
                if split { "on" } else { "off" }
            );
            let (a, d) = sim(&conf);
            let p = a.malloc(100 * M, 0, 0).unwrap();
            a.free(p, Some(0), 0).unwrap();
            // Within one large segment (20 MiB) of the cached 100 MiB: reused either way.
            let q = a.malloc(95 * M, 0, 0).unwrap();
            assert_eq!(q, p, "[{conf}]");
            let st = a.stats(0).unwrap();
            let want = if split { 95 * M } else { 100 * M };
            assert_eq!(st.allocated_bytes, want, "[{conf}] whole block when off");
            a.free(q, Some(0), 0).unwrap();
            // Far smaller: carved from the cached segment (on), or that segment is
            // released and a segment of its own made (off).
            let r = a.malloc(30 * M, 0, 0).unwrap();
            let st = a.stats(0).unwrap();
            if split {
                assert_eq!(
                    (r, st.reserved_bytes, d.counters().mem_frees),
                    (p, 100 * M, 0),
                    "[{conf}]"
                );
            } else {
                assert_eq!(
                    (st.reserved_bytes, st.allocated_bytes),
                    (30 * M, 30 * M),
                    "[{conf}]"
                );
                assert_eq!(
                    d.counters().mem_frees,
                    1,
                    "[{conf}] the useless 100 MiB segment released"
                );
            }
            a.free(r, Some(0), 0).unwrap();
            // Adoption follows the same rule: stream 0x20 takes 0x0's idle segment
            // only when it is within a large segment of the request.
            let before = a.stats(0).unwrap().num_segments_adopted;
            let s = a.malloc(26 * M, 0, 0x20).unwrap();
            let adopted = a.stats(0).unwrap().num_segments_adopted - before;
            let seg_left = if split { 100 * M } else { 30 * M };
            assert_eq!(
                adopted, 1,
                "[{conf}] the {seg_left}-byte segment serves 26 MiB"
            );
            assert_eq!(s, r);
            a.free(s, Some(0), 0x20).unwrap();
            a.check_invariants().unwrap();
            if !split {
                let t = a.malloc(2 * M, 0, 0x30).unwrap();
                let st = a.stats(0).unwrap();
                assert_eq!(
                    st.allocated_bytes,
                    2 * M,
                    "[{conf}] a 30 MiB whole segment never serves 2 MiB"
                );
                assert_eq!(
                    st.num_segments_adopted - before,
                    1,
                    "[{conf}] nor is it adopted for it"
                );
                assert_eq!(
                    st.reserved_bytes,
                    20 * M,
                    "[{conf}] released; a large segment made"
                );
                a.free(t, Some(0), 0x30).unwrap();
            }
            a.empty_cache();
            a.check_invariants().unwrap();
        }
    }

    #[test]
    fn limits_and_oom_ladder() {
        let (a, _) = sim("sim_memory:1GiB,max_memory:100MiB");
        let p = a.malloc(60 << 20, 0, 0).unwrap();
        let e = a.malloc(60 << 20, 0, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
        assert!(e.message.contains("largest live allocations"), "{e}");
        a.free(p, Some(0), 0).unwrap();
        let q = a.malloc(80 << 20, 0, 0).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(st.num_ooms, 1);
        assert!(st.num_alloc_retries >= 1);
        assert_eq!(
            st.reserved_bytes,
            80 << 20,
            "the idle 60 MiB segment was flushed"
        );
        a.free(q, Some(0), 0).unwrap();
        a.set_memory_fraction(0.05, 0).unwrap();
        let r = a.malloc(80 << 20, 0, 0).unwrap();
        assert_eq!(
            r, q,
            "a lowered limit caps growth; what is cached stays usable"
        );
        a.free(r, Some(0), 0).unwrap();
        assert_eq!(a.empty_cache(), 80 << 20);
        assert!(a.malloc(80 << 20, 0, 0).is_err());
        assert_eq!(a.stats(0).unwrap().limit_bytes, (1u64 << 30) / 20);
        // A fraction too small for one byte caps at 1 byte, not at 0 ("none").
        a.set_memory_fraction(1e-12, 0).unwrap();
        assert_eq!(a.stats(0).unwrap().limit_bytes, 1);
        assert!(a.malloc(512, 0, 0).is_err());
        a.set_memory_fraction(0.05, 0).unwrap();
        assert!(a.set_memory_fraction(0.0, 0).is_err());
        assert_eq!(
            a.memory_fraction(0).unwrap(),
            0.05,
            "a bad fraction changes nothing"
        );
        assert!(a.memory_fraction(1).is_err(), "one device");
        let (b, _) = sim("sim_memory:1GiB");
        assert_eq!(b.memory_fraction(0).unwrap(), 1.0, "the default");
        a.check_invariants().unwrap();
    }

    #[test]
    fn oom_callbacks_run_and_can_free() {
        let (a, _) = sim("sim_memory:64MiB");
        let a = Arc::new(a);
        let hog = a.malloc(50 << 20, 0, 0).unwrap();
        let a2 = Arc::downgrade(&a);
        a.register_oom_callback(Box::new(move |_, _| {
            if let Some(a) = a2.upgrade() {
                let _ = a.free(hog, Some(0), 0);
            }
        }));
        let p = a.malloc(50 << 20, 0, 0).unwrap();
        assert_ne!(p, 0);
        a.check_invariants().unwrap();
    }

    /// A callback that allocates (the README's example of a callback that
    /// "may free memory" gone wrong) used to recurse into the ladder until
    /// the stack overflowed. Its allocation now runs the ladder without
    /// callbacks and fails; the outer one fails too; service resumes.
    #[test]
    fn an_oom_callback_that_allocates_is_not_reentered() {
        let (a, _) = sim("sim_memory:1GiB");
        let a = Arc::new(a);
        let calls = Arc::new(AtomicU64::new(0));
        let inner = Arc::new(Mutex::new(Vec::new()));
        let (w, c, inn) = (Arc::downgrade(&a), calls.clone(), inner.clone());
        a.register_oom_callback(Box::new(move |d, n| {
            c.fetch_add(1, Ordering::Relaxed);
            if let Some(a) = w.upgrade() {
                let r = a.malloc(n, d, 0);
                if let Ok(p) = r {
                    a.free(p, Some(d), 0).unwrap();
                }
                inn.lock().push(r.map_err(|e| e.code));
            }
        }));
        let held: Vec<u64> = (0..9).map(|_| a.malloc(100 << 20, 0, 0).unwrap()).collect();
        let e = a.malloc(300 << 20, 0, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
        assert_eq!(calls.load(Ordering::Relaxed), 1, "one callback run");
        assert_eq!(
            *inner.lock(),
            vec![Err(ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY)],
            "the callback's own allocation fails without re-entering it"
        );
        for p in held {
            a.free(p, Some(0), 0).unwrap();
        }
        let p = a.malloc(300 << 20, 0, 0).unwrap();
        a.free(p, Some(0), 0).unwrap();
        a.check_invariants().unwrap();
    }

    /// Under a small limit, or on a small device, a growth falls back to the
    /// smallest segment that holds the request; what no segment can hold
    /// fails with the true reason.
    #[test]
    fn small_limits_and_small_devices_fall_back_to_smaller_segments() {
        let (a, _) = sim("sim_memory:1GiB,max_memory:10MiB");
        let p = a.malloc(2 << 20, 0, 0).unwrap();
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 2 << 20);
        let q = a.malloc(512, 0, 0).unwrap();
        let e = a.malloc(12 << 20, 0, 0).unwrap_err();
        assert!(
            e.message
                .contains("the request (12MiB) is larger than the limit (10MiB"),
            "{}",
            e.message
        );
        // 2 MiB live, 2 MiB small segment: 6 MiB of room, not 8.
        let e = a.malloc(7 << 20, 0, 0).unwrap_err();
        assert!(
            e.message.contains("would pass the limit of 10MiB"),
            "{}",
            e.message
        );
        let r = a.malloc(6 << 20, 0, 0).unwrap();
        for x in [p, q, r] {
            a.free(x, Some(0), 0).unwrap();
        }
        a.check_invariants().unwrap();

        // Room for a 4 MiB segment next to a full 20 MiB one, not a second 20.
        let (a, _) = sim("sim_memory:1GiB,max_memory:30MiB");
        let full = a.malloc(19 << 20, 0, 0).unwrap();
        let p = a.malloc(3 << 20, 0, 0).unwrap();
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 24 << 20);
        a.free(p, Some(0), 0).unwrap();
        a.free(full, Some(0), 0).unwrap();

        // A 1 MiB device serves a 1 MiB request; 2 MiB is past its memory.
        let (a, _) = sim("sim_memory:1MiB");
        let p = a.malloc(1 << 20, 0, 0).unwrap();
        let e = a.malloc(2 << 20, 0, 0).unwrap_err();
        assert!(
            e.message.contains("larger than the device's memory (1MiB)"),
            "{}",
            e.message
        );
        a.free(p, Some(0), 0).unwrap();
        a.check_invariants().unwrap();
    }
}
