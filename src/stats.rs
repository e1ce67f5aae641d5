//! Statistics: the [`cudalloc_stats`] snapshot the C ABI fills in, and the
//! device-wide counters the engine keeps.
//!
//! Counters that change only on slow paths (driver calls, OOMs, invalid frees,
//! reserved bytes) live in per-device atomics. Counters that change on every
//! call (allocations, frees, cache hits, allocated bytes) live in each stream
//! arena, under the lock the arena already holds, and are summed when stats
//! are read: two threads on two streams never write the same cache line.
//! The allocated-bytes peak stays exact through per-arena budgets
//! ([`ArenaBytes`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of one device's statistics. Fields are only ever appended.
///
/// Byte counts are of rounded blocks (multiples of 512), as in torch.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct cudalloc_stats {
    /// Bytes in live allocations now.
    pub allocated_bytes: u64,
    /// Highest `allocated_bytes` since start or the last peak reset.
    pub allocated_bytes_peak: u64,
    /// Bytes held from the driver now (live + cached).
    pub reserved_bytes: u64,
    /// Highest `reserved_bytes` since start or the last peak reset.
    pub reserved_bytes_peak: u64,
    /// Bytes the callers asked for in live allocations (before rounding).
    pub requested_bytes: u64,
    /// Number of live allocations.
    pub active_allocations: u64,
    /// Successful allocations since start.
    pub num_allocs: u64,
    /// Successful frees since start.
    pub num_frees: u64,
    /// Allocations served from the cache without a driver call.
    pub num_cache_hits: u64,
    /// Segments obtained from the driver.
    pub num_driver_allocs: u64,
    /// Segments returned to the driver.
    pub num_driver_frees: u64,
    /// Allocations that failed after the whole OOM ladder.
    pub num_ooms: u64,
    /// Times the OOM ladder flushed the cache and retried.
    pub num_alloc_retries: u64,
    /// Frees of pointers that were not live (unknown or double frees).
    pub num_invalid_frees: u64,
    /// Whole free segments taken over by another stream after their free completed.
    pub num_segments_adopted: u64,
    /// Segments held now.
    pub segments: u64,
    /// Bytes in free cached blocks now.
    pub cached_free_bytes: u64,
    /// The largest free cached block now.
    pub largest_free_block: u64,
    /// Bytes freed by the user but waiting on `record_stream` events.
    pub pending_free_bytes: u64,
    /// The per-device limit on reserved bytes in force (0 = none).
    pub limit_bytes: u64,
    /// Memory pressure now: 0 LOW (< 60% of device memory in use), 1 MODERATE
    /// (< 80%), 2 HIGH (< 90%), 3 CRITICAL; sampled every `pressure_interval`.
    pub pressure_level: u64,
    /// Changes of the pressure level into LOW.
    pub num_pressure_low: u64,
    /// Changes of the pressure level into MODERATE.
    pub num_pressure_moderate: u64,
    /// Changes of the pressure level into HIGH.
    pub num_pressure_high: u64,
    /// Changes of the pressure level into CRITICAL.
    pub num_pressure_critical: u64,
    /// Trims above `trim_threshold` that released idle cached segments.
    pub num_trims: u64,
    /// Bytes released by those trims.
    pub trimmed_bytes: u64,
    /// Times the `leak_age` alarm logged allocations older than the age.
    pub num_leak_age_alarms: u64,
    /// Times the `leak_growth` alarm logged a steady rise of live bytes.
    pub num_leak_growth_alarms: u64,
    /// Trace-log (`log_file`) records dropped because the file's reader fell
    /// behind, went away or never came. Process-wide: the same on every
    /// device.
    pub log_records_dropped: u64,
    /// `expandable_segments:on`: bytes of device memory mapped into
    /// virtual segments now (part of `reserved_bytes`; the rest of it is
    /// classic segments and physical pages cached unmapped).
    pub mapped_bytes: u64,
    /// `expandable_segments:on`: bytes of virtual address space reserved now.
    pub virtual_bytes: u64,
    /// Physical memory handles created (`cuMemCreate`) since start.
    pub num_vmm_creates: u64,
    /// Physical memory handles released (`cuMemRelease`) since start.
    pub num_vmm_releases: u64,
    /// Mappings made (`cuMemMap`) since start.
    pub num_vmm_maps: u64,
    /// Mappings undone (`cuMemUnmap`) since start: pages moved where a
    /// request needed them, or released.
    pub num_vmm_unmaps: u64,
    /// Access grants (`cuMemSetAccess`) since start.
    pub num_vmm_set_access: u64,
}

/// A gauge with a peak, updated lock-free.
#[derive(Debug, Default)]
pub struct Gauge {
    current: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    #[inline]
    pub fn add(&self, n: u64) {
        let now = self.current.fetch_add(n, Ordering::Relaxed) + n;
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        self.current.fetch_sub(n, Ordering::Relaxed);
    }
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
    pub fn reset_peak(&self) {
        self.peak.store(self.current(), Ordering::Relaxed);
    }
}

/// A monotone counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A stream arena's allocated bytes, published for the device-wide sum, and
/// its share ("budget") of the device's allocated-bytes peak.
///
/// The budgets of a device's arenas add up to the device peak, so the sum of
/// the arenas' bytes can pass the peak only when some arena passes its budget:
/// only then does that arena take the device's peak lock and sum the arenas.
/// In the steady state no call writes anything another thread reads, and the
/// peak is exact whenever calls are sequential. Only the owning arena writes
/// `current`, under its own lock.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ArenaBytes {
    pub current: AtomicU64,
    pub budget: AtomicU64,
}

/// Device-wide counters.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub reserved: Gauge,
    pub driver_allocs: Counter,
    pub driver_frees: Counter,
    pub ooms: Counter,
    pub alloc_retries: Counter,
    pub invalid_frees: Counter,
    pub adopted: Counter,
    pub vmm_creates: Counter,
    pub vmm_releases: Counter,
    pub vmm_maps: Counter,
    pub vmm_unmaps: Counter,
    pub vmm_set_access: Counter,
}

/// Per-arena counters, kept under the arena's lock.
#[derive(Debug, Default, Clone, Copy)]
pub struct ArenaCounters {
    pub allocs: u64,
    pub frees: u64,
    pub cache_hits: u64,
    pub requested: u64,
    pub live: u64,
}
