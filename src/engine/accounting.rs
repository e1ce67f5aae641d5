//! Statistics of the engine: snapshots, accumulated counters since a reset,
//! and peaks. The observability adaptors fill their own fields into the
//! same snapshot ([`Engine::stats_with`]), so one reset restarts them all.

use super::device::Device;
use super::Engine;
use crate::error::Result;
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
        log_records_dropped
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
            s.largest_free_block = s
                .largest_free_block
                .max(inner.index[0].largest(&inner.blocks))
                .max(inner.index[1].largest(&inner.blocks));
        }
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
