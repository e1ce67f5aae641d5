//! Statistics of the engine: snapshots, accumulated counters since a reset,
//! and peaks. The observability adaptors fill their own fields into the
//! same snapshot ([`Engine::stats_with`]), so one reset restarts them all.

use super::device::Device;
use super::Engine;
use crate::error::Result;
use crate::size_class::Pool;
use crate::stats::cudalloc_stats;

/// Subtract `base`'s accumulated counters from `s`'s (every `num_*` count
/// and `trimmed_bytes`; see [`Engine::reset_accumulated`]).
fn accumulated(s: &mut cudalloc_stats, base: &cudalloc_stats) {
    macro_rules! since {
        ($($f:ident),*) => {$( s.$f = s.$f.saturating_sub(base.$f); )*};
    }
    since!(
        num_allocs,
        num_frees,
        num_cache_hits,
        num_driver_allocs,
        num_driver_frees,
        num_ooms,
        num_alloc_retries,
        num_invalid_frees,
        num_segments_adopted,
        num_pressure_low,
        num_pressure_moderate,
        num_pressure_high,
        num_pressure_critical,
        num_trims,
        trimmed_bytes,
        num_leak_age_alarms,
        num_leak_growth_alarms,
        log_records_dropped,
        num_vmm_creates,
        num_vmm_releases,
        num_vmm_maps,
        num_vmm_unmaps,
        num_vmm_set_access
    );
}

impl Engine {
    /// A statistics snapshot of `device`. The accumulated counters (see
    /// [`Engine::reset_accumulated`]) count from the last reset.
    pub fn stats(&self, device: usize) -> Result<cudalloc_stats> {
        self.stats_with(device, |_| {})
    }

    /// [`Engine::stats`], with `fill` adding the fields the engine does not
    /// keep (the observability adaptors': pressure, trims, alarms, the trace
    /// log's drops) before the counts since the last reset are taken.
    pub fn stats_with(
        &self,
        device: usize,
        fill: impl FnOnce(&mut cudalloc_stats),
    ) -> Result<cudalloc_stats> {
        let dev = self.device(device)?;
        // Segments come and go only under `slow`: holding it makes the
        // snapshot consistent (allocated <= reserved, every block counted
        // inside a segment counted), while cache hits and frees go on.
        let _slow = dev.slow.lock();
        let mut s = self.stats_since_start(dev);
        fill(&mut s);
        accumulated(&mut s, &dev.accumulated_base.lock());
        Ok(s)
    }

    /// Restart the accumulated counters of `device` from zero: the counts of
    /// allocations, frees, cache hits, driver calls, OOMs, retries, invalid
    /// frees, adoptions, pressure events, trims and leak alarms (torch's
    /// `reset_accumulated_memory_stats`). Current values and peaks stay.
    /// `fill` adds the adaptors' fields, as for [`Engine::stats_with`].
    pub fn reset_accumulated_with(
        &self,
        device: usize,
        fill: impl FnOnce(&mut cudalloc_stats),
    ) -> Result<()> {
        let dev = self.device(device)?;
        let _slow = dev.slow.lock();
        let mut now = self.stats_since_start(dev);
        fill(&mut now);
        *dev.accumulated_base.lock() = now;
        Ok(())
    }

    /// [`Engine::reset_accumulated_with`] for the engine's own counters.
    pub fn reset_accumulated(&self, device: usize) -> Result<()> {
        self.reset_accumulated_with(device, |_| {})
    }

    /// `stats` with the accumulated counters since the allocator started.
    /// Call with `slow` held.
    pub(super) fn stats_since_start(&self, dev: &Device) -> cudalloc_stats {
        let c = &dev.core.counters;
        let allocated = dev.allocated();
        let mut s = cudalloc_stats {
            allocated_bytes: allocated,
            allocated_bytes_peak: dev.allocated_peak_with(allocated),
            reserved_bytes: c.reserved.current(),
            reserved_bytes_peak: c.reserved.peak(),
            num_driver_allocs: c.driver_allocs.get(),
            num_driver_frees: c.driver_frees.get(),
            num_ooms: c.ooms.get(),
            num_alloc_retries: c.alloc_retries.get(),
            num_invalid_frees: c.invalid_frees.get(),
            num_segments_adopted: c.adopted.get(),
            num_vmm_creates: c.vmm_creates.get(),
            num_vmm_releases: c.vmm_releases.get(),
            num_vmm_maps: c.vmm_maps.get(),
            num_vmm_unmaps: c.vmm_unmaps.get(),
            num_vmm_set_access: c.vmm_set_access.get(),
            limit_bytes: match if dev.used() {
                dev.limit()
            } else {
                dev.known_limit()
            } {
                u64::MAX => 0,
                l => l,
            },
            ..Default::default()
        };
        for a in dev.arena_list() {
            let inner = a.inner.lock();
            s.num_allocs += inner.counters.allocs;
            s.num_frees += inner.counters.frees;
            s.num_cache_hits += inner.counters.cache_hits;
            s.requested_bytes += inner.counters.requested;
            s.active_allocations += inner.counters.live;
            s.segments += inner.segment_count();
            s.cached_free_bytes += inner.free_bytes();
            s.pending_free_bytes += inner.pending_bytes();
            let (mapped, virt) = inner.vm_bytes();
            s.mapped_bytes += mapped;
            s.virtual_bytes += virt;
            s.largest_free_block = s
                .largest_free_block
                .max(inner.largest_free(Pool::Small))
                .max(inner.largest_free(Pool::Large));
        }
        s.cached_free_bytes += dev.vmm_idle_bytes();
        s
    }

    /// Reset the peaks of `device` to the current values.
    pub fn reset_peak(&self, device: usize) -> Result<()> {
        let dev = self.device(device)?;
        // Reserved bytes change only under `slow`: resetting under it cannot
        // store a peak below a current value raised meanwhile.
        let _slow = dev.slow.lock();
        dev.reset_allocated_peak();
        dev.core.counters.reserved.reset_peak();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::*;

    #[test]
    fn reset_accumulated_restarts_the_counts_and_keeps_the_rest() {
        let (a, _) = sim("sim_memory:1GiB,max_memory:100MiB");
        let p = a.malloc(60 << 20, 0, 0).unwrap();
        assert!(a.malloc(60 << 20, 0, 0).is_err());
        assert!(a.free(0xdead, Some(0), 0).is_err());
        let q = a.malloc(4096, 0, 0).unwrap();
        a.free(q, Some(0), 0).unwrap();
        let before = a.stats(0).unwrap();
        assert!(before.num_ooms == 1 && before.num_invalid_frees == 1 && before.num_allocs == 2);
        a.reset_accumulated(0).unwrap();
        let after = a.stats(0).unwrap();
        let zeroed = cudalloc_stats {
            num_allocs: 0,
            num_frees: 0,
            num_cache_hits: 0,
            num_driver_allocs: 0,
            num_driver_frees: 0,
            num_ooms: 0,
            num_alloc_retries: 0,
            num_invalid_frees: 0,
            num_segments_adopted: 0,
            ..before
        };
        assert_eq!(after, zeroed, "only the accumulated counters restart");
        // Counting goes on from zero; the peaks stay.
        let r = a.malloc(4096, 0, 0).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!((st.num_allocs, st.num_cache_hits), (1, 1));
        assert_eq!(st.allocated_bytes_peak, before.allocated_bytes_peak);
        a.free(r, Some(0), 0).unwrap();
        a.free(p, Some(0), 0).unwrap();
        assert_eq!(a.stats(0).unwrap().num_frees, 2);
        assert!(a.reset_accumulated(1).is_err());
        a.check_invariants().unwrap();
    }
}
