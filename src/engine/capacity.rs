//! `can_allocate`: whether a request would be served now, answered without
//! serving it. It walks what [`Engine::malloc`] would try (the stream's
//! cached blocks, other streams' idle segments, a growth within the limit
//! and the driver's free memory, after the OOM ladder released every idle
//! segment) and changes nothing: no driver allocation, no event, no
//! segment moved, no statistic counted.

use super::Engine;
use crate::driver::Stream;
use crate::error::Result;
use crate::size_class::round_size;

impl Engine {
    /// Whether a request of `size` bytes on `device` for `stream` could be
    /// served now without running out of memory: from a free block of the
    /// stream's own cache, from an idle segment of another stream (adopted,
    /// or released and taken again from the driver), or from a new segment
    /// within the limit (`max_memory`, `memory_fraction`) and the device's
    /// free memory (the driver's `mem_info`, plus the idle segments the OOM
    /// ladder would release first). Size 0 is `true` (served as NULL).
    ///
    /// A snapshot: other threads and processes allocate and free meanwhile,
    /// so a `true` is no promise that the allocation that follows succeeds,
    /// nor a `false` that it fails. It does not count what the OOM
    /// callbacks could free, blocks waiting on `record_stream` events,
    /// blocks in the small-pool stash (a few recently freed small blocks),
    /// or a private pool's memory. The driver's free memory is a total: a
    /// device whose free memory is fragmented may refuse a segment it
    /// counts. While a graph capture is under way on the device, only the
    /// stream's own cached blocks count (nothing is released during a
    /// capture, and asking the driver for its free memory could invalidate
    /// it).
    ///
    /// Errors: `CUDALLOC_ERR_INVALID_DEVICE` for a bad device; a driver
    /// failure asking for the free memory.
    pub fn can_allocate(&self, size: u64, device: usize, stream: Stream) -> Result<bool> {
        let dev = self.device(device)?;
        if size == 0 {
            return Ok(true);
        }
        let Some(rounded) = round_size(size) else {
            return Ok(false);
        };
        let Some(growth) = self.policy.growth_sizes(rounded) else {
            return Ok(false);
        };
        let pool = self.policy.pool(rounded);
        let _slow = dev.slow.lock();
        // The stream's own cache: what the hot path or the slow path's
        // first look would take.
        if let Some(a) = dev.find_arena(self.id, stream) {
            if a.inner.lock().largest_free(pool) >= rounded {
                return Ok(true);
            }
        }
        let capturing = matches!(self.driver.stream_is_capturing(device, stream), Ok(true))
            || dev.capture_underway();
        if capturing {
            return Ok(false);
        }
        let (total, limit) = (dev.total(), dev.limit());
        if rounded > total.min(limit) {
            return Ok(false);
        }
        if let Some(vmm) = dev.vmm() {
            // Virtual segments: the request's pages come from memory cached
            // unmapped, free pages anywhere (moved once proven free, or by
            // the ladder), or the driver within the limit. Free pages that
            // share a mapping with a live block cannot move: an estimate.
            let page = vmm.lock().page;
            let need = rounded.next_multiple_of(page);
            let free_mapped: u64 = dev
                .arena_list()
                .iter()
                .filter(|a| !a.pooled)
                .map(|a| {
                    let i = a.inner.lock();
                    i.vm_free_bytes()
                })
                .sum();
            let cached = dev.vmm_idle_bytes() + free_mapped / page * page;
            let (free, _) = self.driver.mem_info(device)?;
            let room = free.min(limit.saturating_sub(dev.core.counters.reserved.current()));
            return Ok(need <= cached.saturating_add(room));
        }
        // Other streams' idle segments: one that fits is adopted; the
        // ladder releases all of them before its last growth.
        let mut idle_bytes = 0u64;
        for a in dev.arena_list() {
            if a.pooled {
                continue;
            }
            let inner = a.inner.lock();
            for &s in inner.idle_segments() {
                let seg = inner.seg(s);
                if seg.pool == pool
                    && seg.size >= rounded
                    && self.policy.may_serve(pool, seg.size, seg.size, rounded)
                {
                    return Ok(true);
                }
                idle_bytes += seg.size;
            }
        }
        let (free, _) = self.driver.mem_info(device)?;
        let reserved = dev
            .core
            .counters
            .reserved
            .current()
            .saturating_sub(idle_bytes);
        let free = free.saturating_add(idle_bytes);
        Ok(growth
            .into_iter()
            .any(|g| g <= free && reserved.saturating_add(g) <= limit))
    }

    /// `device`'s free and total memory from the driver now, or `None`
    /// while a graph capture may be under way there (asking could
    /// invalidate it; see [`Engine::mem_info_outside_capture`]). Waits for
    /// the device's slow path. `CUDALLOC_ERR_INVALID_DEVICE` for a bad
    /// device.
    pub fn mem_info_now(&self, device: usize) -> Result<Option<(u64, u64)>> {
        self.device(device)?;
        Ok(match self.mem_info_outside_capture(device, true) {
            None => None,
            Some(r) => Some(r?),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::driver::Driver;
    use crate::engine::testing::*;

    const M: u64 = 1 << 20;

    /// The answer follows what malloc does, and asking changes nothing.
    #[test]
    fn can_allocate_answers_as_malloc_serves_and_changes_nothing() {
        let (a, d) = sim("sim_memory:1GiB,max_memory:512MiB");
        assert!(a.can_allocate(0, 0, 0).unwrap(), "size 0 is served (NULL)");
        assert!(a.can_allocate(100 * M, 0, 0).unwrap());
        assert!(!a.can_allocate(600 * M, 0, 0).unwrap(), "past max_memory");
        assert!(!a.can_allocate(u64::MAX, 0, 0).unwrap(), "overflows");
        assert_eq!(
            a.can_allocate(1, 1, 0).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_DEVICE
        );
        let p = a.malloc(300 * M, 0, 0x10).unwrap();
        // 212 MiB left under the limit: 200 MiB fits, 250 MiB does not.
        let c = d.counters();
        let s = a.stats(0).unwrap();
        assert!(a.can_allocate(200 * M, 0, 0x20).unwrap());
        assert!(!a.can_allocate(250 * M, 0, 0x20).unwrap());
        assert_eq!(
            d.counters().mem_allocs,
            c.mem_allocs,
            "no driver allocation"
        );
        assert_eq!(d.counters().event_records, c.event_records, "no event");
        assert_eq!(a.stats(0).unwrap(), s, "no statistic changed");
        // Freed: stream 0x20 would adopt the idle 300 MiB segment (or the
        // ladder would release it): 400 MiB fits now, as malloc agrees.
        a.free(p, Some(0), 0x10).unwrap();
        assert!(a.can_allocate(400 * M, 0, 0x20).unwrap());
        let q = a.malloc(400 * M, 0, 0x20).unwrap();
        // The stream's own cache serves within its free block.
        let r = a.malloc(50 * M, 0, 0x20).unwrap();
        a.free(r, Some(0), 0x20).unwrap();
        let before = d.counters().mem_info_calls;
        assert!(a.can_allocate(50 * M, 0, 0x20).unwrap());
        assert_eq!(
            d.counters().mem_info_calls,
            before,
            "a cache hit asks no driver"
        );
        assert!(!a.can_allocate(200 * M, 0, 0x20).unwrap());
        assert!(a.malloc(200 * M, 0, 0x20).is_err(), "malloc agrees");
        a.free(q, Some(0), 0x20).unwrap();
        a.check_invariants().unwrap();
    }

    /// Without a limit, the driver's free memory decides: memory another
    /// process took is not there.
    #[test]
    fn can_allocate_counts_the_devices_free_memory() {
        let (a, d) = sim("sim_memory:1GiB");
        let hog = d.mem_alloc(0, 900 * M).unwrap();
        assert!(a.can_allocate(100 * M, 0, 0).unwrap());
        assert!(!a.can_allocate(200 * M, 0, 0).unwrap());
        assert!(a.malloc(200 * M, 0, 0).is_err(), "malloc agrees");
        d.mem_free(0, hog, 900 * M).unwrap();
        assert!(a.can_allocate(200 * M, 0, 0).unwrap());
    }

    /// During a capture, only the stream's own cached blocks count.
    #[test]
    fn can_allocate_during_a_capture_counts_only_the_streams_cache() {
        let (a, d) = sim("sim_memory:1GiB");
        let p = a.malloc(30 * M, 0, 0x10).unwrap();
        a.free(p, Some(0), 0x10).unwrap();
        d.set_capturing(0x10, true);
        let before = d.counters().mem_info_calls;
        assert!(a.can_allocate(30 * M, 0, 0x10).unwrap());
        assert!(!a.can_allocate(100 * M, 0, 0x10).unwrap());
        assert_eq!(d.counters().mem_info_calls, before, "no cuMemGetInfo");
        d.set_capturing(0x10, false);
        assert!(a.can_allocate(100 * M, 0, 0x10).unwrap());
    }
}
