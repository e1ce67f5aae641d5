//! The slow path of an allocation (a cache miss), serialised per device:
//! adopt another stream's idle segment proven free, else grow from the
//! driver, else the OOM ladder (see [`Engine::malloc`]).

use super::arena::{Arena, Detached};
use super::device::Device;
use super::reclaim::Release;
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
    pool: Pool,
    rounded: u64,
    size: u64,
    /// A capture is under way (the stream asking captures, or
    /// `Device::capture_underway`): adopt nothing, release nothing.
    hold: bool,
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
            hold: capturing || dev.capture_underway(),
        };
        match self.try_serve(dev, arena, &want) {
            Ok(p) => return Ok(p),
            Err(e) if e.code != ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY => return Err(e),
            Err(_) => {}
        }
        dev.core.counters.alloc_retries.inc();
        if !want.hold {
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
        want.hold = capturing || dev.capture_underway();
        if !want.hold {
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
    /// With `want.hold` (a capture is under way), no adoption and no release.
    pub(super) fn try_serve(&self, dev: &Device, arena: &Arena, want: &Want) -> Result<u64> {
        let Want {
            pool,
            rounded,
            size,
            hold,
        } = *want;
        {
            let mut a = arena.inner.lock();
            a.flush_stash();
            if let Some((p, block)) = a.try_alloc(rounded, size, &self.policy, &dev.core) {
                a.counters.cache_hits += 1;
                dev.note_alloc(arena, block);
                self.journal_allocated(p, size, arena);
                return Ok(p);
            }
        }
        // A pool's memory comes only from the driver, and proving another
        // stream's segment free (stream and event queries) is illegal during
        // a capture (pools.rs).
        let adopted = if arena.pooled || hold {
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
            self.journal_allocated(p, size, arena);
            return Ok(p);
        }
        // About to grow: first give back idle segments of this pool that cannot
        // serve the request (too small, or whole-handed and far too big under
        // huge_split:off): they would only sit in the cache.
        if !hold {
            dev.release_idle(Release::Useless {
                pool,
                rounded,
                policy: self.policy,
            });
        }
        let (base, seg_size) = self.grow(dev, rounded)?;
        let mut a = arena.inner.lock();
        let s = a.attach(Detached {
            base,
            size: seg_size,
            pool,
        });
        let (p, block) = a.alloc_from_segment(s, rounded, size, &self.policy, &dev.core);
        dev.note_alloc(arena, block);
        self.journal_allocated(p, size, arena);
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
