//! The engine: per device, stream arenas over segments from the driver.
//!
//! ```text
//! Engine ── Device 0 ── Arena(stream 0) ── segments ── blocks (TLSF free index)
//!           │           └─ Arena(stream 7) ── ...
//!           └─ Device 1 ── ...
//! ```
//! - **Hot path** (cache hit): one uncontended arena lock, a TLSF lookup, a
//!   hash insert. The arena for `(device, stream)` is found through a one-entry
//!   thread-local cache.
//! - **Slow path** (miss), serialised per device: adopt an idle segment of
//!   another stream whose free is proven complete, else get a segment from the
//!   driver, else the OOM ladder in [`Engine::malloc`]'s docs.
//! - **Free** trusts nothing the caller says but the pointer: the stream and
//!   device arguments are hints for where to look first.
//! - **Proving a free complete.** An idle segment changes stream or goes
//!   back to the driver only once the work queued before its last free has
//!   run. The stream is asked first (`cuStreamIsCapturing`: a capturing
//!   stream proves nothing; `cuStreamQuery`: no work pending proves all).
//!   Then the *epoch events*: each arena records one on its stream after
//!   every 8 distinct segments its frees make idle, and once one completes,
//!   every segment idle before it is proven. Last, an event recorded for
//!   the segment when it is wanted. On a GPU the host runs ahead, so only
//!   the epoch events, recorded long before the segment is wanted, have
//!   usually completed (`cudalloc replay --gpu-lag` shows the difference).
//! - **Graph capture.** `cuMemAlloc` runs in relaxed capture mode (the CUDA
//!   backend switches the thread's mode around it). A block freed while its stream is capturing a graph is
//!   quarantined: the graph may still use it, so it is not reused until
//!   `empty_cache` (a simple, documented policy for C and C++ captures).
//!   Until a slow path (or an epoch event's `cuStreamIsCapturing`, once per
//!   8 segments made idle) first sees a capturing stream, frees do not ask.
//!   While the stream asking, or any stream an arena holds memory for,
//!   captures, nothing goes back to the driver and no segment changes
//!   streams (`Device::capture_underway`): cuMemFree synchronises the
//!   context, which would invalidate the capture. A `record_stream` free
//!   onto a capturing stream is quarantined too.
//!   PyTorch's captures get private pools instead (`pools.rs`,
//!   `graph_pools:on`).

mod accounting;
mod arena;
mod capture;
mod check;
mod core;
mod device;
mod diagnose;
mod limits;
mod lookup;
mod pool_state;
mod pools;
mod reclaim;
mod slow;
pub mod tlsf;

pub use arena::PoolId;
pub use diagnose::OOM_DIAGNOSES_LOGGED;

use crate::config::Config;
use crate::driver::{Driver, Stream};
use crate::error::{Error, Result};
use crate::size_class::{round_size, Policy};
use crate::tracking::LiveInfo;
use arena::Arena;
use device::Device;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Called at step 3 of the OOM ladder with `(device, requested bytes)`.
pub type OomCallback = Box<dyn Fn(usize, u64) + Send + Sync>;

/// Told of every allocation and free, under the lock of the block's arena,
/// where the block's fate is decided: so a journal sees each address's
/// allocations and frees in the engine's order, whatever the threads (the
/// trace log, `observe::tracelog`, is one). Called on the hot path: it must
/// be quick and must not call back into the engine.
pub trait Journal: Send + Sync {
    /// `ptr` was handed out for a request of `requested` bytes on `stream`.
    fn allocated(&self, ptr: u64, requested: u64, stream: Stream);
    /// `ptr`, which had asked for `requested` bytes, was freed; `stream` is
    /// the block's own.
    fn freed(&self, ptr: u64, requested: u64, stream: Stream);
}

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

/// The caching allocator over all devices of one driver, without the
/// observability adaptors (`crate::Allocator` wraps it with them).
pub struct Engine {
    id: u64,
    config: Config,
    policy: Policy,
    driver: Arc<dyn Driver>,
    devices: Vec<Device>,
    /// Shared, so that a run takes a copy of the list and holds no lock
    /// while callbacks run (one may register another).
    oom_callbacks: RwLock<Vec<Arc<OomCallback>>>,
    /// Invalid frees on an allocator without devices.
    stray_invalid_frees: AtomicU64,
    /// Told of every allocation and free, when set.
    journal: Option<Arc<dyn Journal>>,
}

impl Engine {
    /// An engine over every device of `driver`, configured by `config`.
    pub fn new(config: Config, driver: Arc<dyn Driver>) -> Self {
        Engine::with_journal(config, driver, None)
    }

    /// [`Engine::new`], telling `journal` of every allocation and free.
    pub fn with_journal(
        config: Config,
        driver: Arc<dyn Driver>,
        journal: Option<Arc<dyn Journal>>,
    ) -> Self {
        let devices = (0..driver.device_count())
            .map(|index| Device::new(index, driver.clone(), &config))
            .collect();
        Engine {
            id: NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed),
            policy: Policy::from_config(&config),
            config,
            driver,
            devices,
            oom_callbacks: RwLock::new(Vec::new()),
            stray_invalid_frees: AtomicU64::new(0),
            journal,
        }
    }

    /// Stamp allocations and idle segments by `clock`, coarse monotonic
    /// milliseconds, instead of the real clock: tests advance time by
    /// counts instead of waiting. Call it before the first allocation;
    /// only the first call counts.
    #[doc(hidden)]
    pub fn set_clock(&self, clock: fn() -> u64) {
        for d in &self.devices {
            d.core.set_clock(clock);
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Whether cudalloc ever took memory from the driver on `device`. The
    /// periodic pressure sample skips devices that it did not: asking the
    /// driver about one would make the CUDA backend hold a context there.
    pub fn device_used(&self, device: usize) -> bool {
        self.devices.get(device).is_some_and(Device::used)
    }

    fn device(&self, device: usize) -> Result<&Device> {
        self.devices
            .get(device)
            .ok_or_else(|| Error::invalid_device(device as i64, self.devices.len()))
    }

    /// Allocate `size` bytes on `device` for use on `stream`. Size 0 gives
    /// `Ok(0)` (NULL, not an error). The address is 512-byte aligned.
    ///
    /// On a miss, in order: adopt another stream's idle segment whose free is
    /// proven complete; get a segment from the driver (within the limits);
    /// then the OOM ladder: (1) release idle segments whose events completed,
    /// retry; (2) synchronise and release every idle segment, retry; (3) run
    /// the OOM callbacks, retry; (4) fail with `CUDALLOC_ERR_OUT_OF_MEMORY`,
    /// count `num_ooms` and log a diagnosis. While a capture is under way on
    /// the device, no segment is adopted or released: only the cache, the
    /// driver (in relaxed mode) and the callbacks can serve.
    #[inline]
    pub fn malloc(&self, size: u64, device: usize, stream: Stream) -> Result<u64> {
        self.malloc_in(size, device, stream, None)
    }

    /// [`Engine::malloc`], from private pool `pool` when given (`pools.rs`).
    #[inline(always)]
    pub(super) fn malloc_in(
        &self,
        size: u64,
        device: usize,
        stream: Stream,
        pool: Option<PoolId>,
    ) -> Result<u64> {
        // A bad device is an error even for size 0 (as for a negative index).
        let dev = self.device(device)?;
        if size == 0 {
            return Ok(0);
        }
        let Some(rounded) = round_size(size) else {
            return Err(self.oom(dev, size, stream, "the size overflows"));
        };
        let arena = match pool {
            None => dev.arena(self.id, stream),
            Some(id) => dev.pool_arena(id, stream)?,
        };
        {
            let mut a = arena.inner.lock();
            // cuEventQuery is illegal during a capture (pools.rs).
            if !a.pending.is_empty() && !dev.core.pools_routing() {
                a.process_pending(&dev.core, false);
            }
            if let Some((p, block)) = a.try_alloc(rounded, size, &self.policy, &dev.core) {
                a.counters.cache_hits += 1;
                dev.note_alloc(arena, block);
                self.journal_allocated(p, size, arena);
                return Ok(p);
            }
        }
        self.malloc_slow(dev, arena, rounded, size)
    }

    /// Tell the journal, if any, of an allocation from `arena`. Call under
    /// the arena's lock (see [`Journal`]).
    #[inline(always)]
    fn journal_allocated(&self, ptr: u64, requested: u64, arena: &Arena) {
        if let Some(j) = &self.journal {
            j.allocated(ptr, requested, arena.stream);
        }
    }

    /// Free `ptr`. `device` and `stream` are hints for where to look first;
    /// the live table decides. Freeing NULL is a no-op. An unknown or
    /// double free changes nothing but `num_invalid_frees`.
    #[inline]
    pub fn free(&self, ptr: u64, device: Option<usize>, stream: Stream) -> Result<()> {
        if ptr == 0 {
            return Ok(());
        }
        if let Some(dev) = device.and_then(|d| self.devices.get(d)) {
            if let Some(a) = dev.find_arena(self.id, stream) {
                let mut inner = a.inner.lock();
                if let Some(f) = inner.free(ptr, &dev.core, || {
                    !a.pooled && dev.core.captures_now(a.stream)
                }) {
                    dev.note_free(a, &mut inner, f.size);
                    if let Some(j) = &self.journal {
                        j.freed(ptr, f.requested, a.stream);
                    }
                    return Ok(());
                }
            }
        }
        self.free_search(ptr, device, stream)
    }

    /// Release every idle cached segment on every device to the driver.
    /// Returns the bytes released.
    pub fn empty_cache(&self) -> u64 {
        self.devices
            .iter()
            .map(|dev| {
                let _slow = dev.slow.lock();
                dev.empty_cache()
            })
            .sum()
    }

    /// Release the idle cached segments of one device.
    pub fn empty_cache_device(&self, device: usize) -> Result<u64> {
        let dev = self.device(device)?;
        let _slow = dev.slow.lock();
        Ok(dev.empty_cache())
    }

    /// Register a callback for step 3 of the OOM ladder.
    pub fn register_oom_callback(&self, cb: OomCallback) {
        self.oom_callbacks.write().push(Arc::new(cb));
    }

    /// Every live allocation, of one device or all.
    pub fn live_allocations(&self, device: Option<usize>) -> Vec<LiveInfo> {
        let mut out = Vec::new();
        for dev in self
            .devices
            .iter()
            .filter(|d| device.is_none_or(|x| x == d.core.index))
        {
            for a in dev.arena_list() {
                a.inner
                    .lock()
                    .live_infos(dev.core.index, a.stream, &mut out);
            }
        }
        out
    }
}

/// An allocator other than the process-wide one (a test's, the bench's, a
/// replay's) gives its idle segments back to the driver when dropped, and
/// destroys its events. Live allocations stay the caller's: their
/// segments are not freed under them.
impl Drop for Engine {
    fn drop(&mut self) {
        self.empty_cache();
        for dev in &self.devices {
            for a in dev.arena_list() {
                a.inner.lock().return_events(&dev.core);
            }
            dev.core.destroy_events();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sim::SimDriver;
    use crate::error::ErrorCode;
    use crate::stats::cudalloc_stats;
    use parking_lot::Mutex;

    fn sim(conf: &str) -> (Engine, Arc<SimDriver>) {
        let c = Config::parse(conf).unwrap();
        let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
        (Engine::new(c, d.clone()), d)
    }

    /// A miss of `size` bytes on stream `s` while `s` captures asks no event
    /// and no stream, and frees nothing; the capture then ends.
    fn quiet_miss_during_capture(a: &Engine, d: &SimDriver, s: Stream, size: u64) {
        d.set_capturing(s, true);
        let before = d.counters();
        a.malloc(size, 0, s).unwrap();
        let after = d.counters();
        assert_eq!(after.event_queries, before.event_queries);
        assert_eq!(after.stream_queries, before.stream_queries);
        assert_eq!(after.mem_frees, before.mem_frees);
        d.set_capturing(s, false);
        a.check_invariants().unwrap();
    }

    /// `n` blocks of 30 MiB on stream `s`, each alone in its own segment.
    fn own_segments(a: &Engine, s: Stream, n: u64) -> Vec<u64> {
        (0..n).map(|_| a.malloc(30 << 20, 0, s).unwrap()).collect()
    }

    fn free_all(a: &Engine, s: Stream, ps: &[u64]) {
        for &p in ps {
            a.free(p, Some(0), s).unwrap();
        }
    }

    /// An OOM with enough cached free bytes but no block that fits says so,
    /// with the requesting stream's own largest block; a plain OOM does not.
    #[test]
    fn oom_diagnosis_tells_fragmentation_from_a_full_device() {
        const M: u64 = 1 << 20;
        let (a, _) = sim("sim_memory:40MiB");
        let s = 0x10;
        // Two 20 MiB large segments, four 5 MiB blocks each.
        let blocks: Vec<u64> = (0..8).map(|_| a.malloc(5 * M, 0, s).unwrap()).collect();
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 40 * M);
        let e = a.malloc(8 * M, 0, s).unwrap_err();
        assert!(e.message.contains("hint: free tensors"), "{}", e.message);
        assert!(!e.message.contains("fragmentation, or"), "{}", e.message);
        // Free every other block: 20 MiB cached, no two free blocks adjacent.
        for p in blocks.iter().step_by(2) {
            a.free(*p, Some(0), s).unwrap();
        }
        let e = a.malloc(8 * M, 0, s).unwrap_err();
        assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
        let m = &e.message;
        assert!(
            m.contains("on stream 0x10: largest free block of the large pool 5MiB"),
            "{m}"
        );
        assert!(
            m.contains("the large pool holds 20MiB free, but no free block of this stream fits"),
            "{m}"
        );
        // Another stream sees none of it: its own largest block is 0.
        let e = a.malloc(8 * M, 0, 0x20).unwrap_err();
        assert!(
            e.message
                .contains("on stream 0x20: largest free block of the large pool 0B"),
            "{}",
            e.message
        );
        a.check_invariants().unwrap();
        for p in blocks.iter().skip(1).step_by(2) {
            a.free(*p, Some(0), s).unwrap();
        }
    }

    /// Free bytes in the other pool are not fragmentation of this one: the
    /// hint says where they are (found in review: a full large pool with a
    /// half-free small pool was called fragmentation).
    #[test]
    fn oom_diagnosis_names_free_bytes_in_the_other_pool() {
        const M: u64 = 1 << 20;
        let (a, _) = sim("sim_memory:40MiB");
        let s = 0x10;
        let small: Vec<u64> = (0..40)
            .map(|_| a.malloc(512 << 10, 0, s).unwrap())
            .collect();
        for (i, p) in small.iter().enumerate() {
            if i % 4 != 0 {
                a.free(*p, Some(0), s).unwrap();
            }
        }
        let mut large = Vec::new();
        while let Ok(p) = a.malloc(4 * M, 0, s) {
            large.push(p);
        }
        let e = a.malloc(8 * M, 0, s).unwrap_err();
        let m = &e.message;
        assert!(!m.contains("fragmentation, or"), "{m}");
        assert!(
            m.contains("free in the small pool, which never serves large"),
            "{m}"
        );
        a.check_invariants().unwrap();
        for p in large.into_iter().chain(small.into_iter().step_by(4)) {
            a.free(p, Some(0), s).unwrap();
        }
    }

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
    fn reuse_split_and_coalesce() {
        let (a, d) = sim("sim_memory:1GiB,small_segment:1MiB");
        let p1 = a.malloc(1000, 0, 0).unwrap();
        let p2 = a.malloc(1000, 0, 0).unwrap();
        assert_eq!(p2, p1 + 1024, "split from the same small segment");
        assert_eq!(d.counters().mem_allocs, 1);
        a.free(p1, Some(0), 0).unwrap();
        a.free(p2, Some(0), 0).unwrap();
        a.check_invariants().unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(
            (st.allocated_bytes, st.reserved_bytes, st.segments),
            (0, 1 << 20, 1)
        );
        assert_eq!(
            st.cached_free_bytes,
            1 << 20,
            "stashed blocks count as cached"
        );
        // Same size again: straight from the stash, newest first.
        assert_eq!(a.malloc(1000, 0, 0).unwrap(), p2);
        a.free(p2, Some(0), 0).unwrap();
        // A size the stash cannot serve: the miss flushes and coalesces it, and
        // the whole (1 MiB) segment serves the request without a driver call.
        let big = a.malloc(1 << 20, 0, 0).unwrap();
        assert_eq!(big, p1, "coalesced back into one block");
        assert_eq!(d.counters().mem_allocs, 1);
        a.free(big, Some(0), 0).unwrap();
        a.check_invariants().unwrap();
        let p3 = a.malloc(2 << 20, 0, 0).unwrap();
        assert_eq!(
            d.counters().mem_allocs,
            2,
            "2 MiB is a large request: new 20 MiB segment"
        );
        a.free(p3, None, 99).unwrap();
        a.check_invariants().unwrap();
    }

    #[test]
    fn frees_during_capture_are_quarantined_until_empty_cache() {
        let (a, d) = sim("sim_memory:1GiB");
        // Before any capture is seen, frees never ask the driver.
        let p = a.malloc(4096, 0, 7).unwrap();
        a.free(p, Some(0), 7).unwrap();
        a.empty_cache();
        d.set_capturing(7, true);
        let p = a.malloc(4096, 0, 7).unwrap(); // a miss: the slow path sees the capture
        a.free(p, Some(0), 7).unwrap();
        let q = a.malloc(4096, 0, 7).unwrap();
        assert_ne!(p, q, "a block freed during capture is not reused");
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 4096);
        a.check_invariants().unwrap();
        d.set_capturing(7, false);
        a.free(q, Some(0), 7).unwrap();
        let r = a.malloc(4096, 0, 7).unwrap();
        assert_eq!(r, q, "after the capture, frees are reused again");
        a.free(r, Some(0), 7).unwrap();
        a.empty_cache();
        let st = a.stats(0).unwrap();
        assert_eq!(
            (st.pending_free_bytes, st.reserved_bytes),
            (0, 0),
            "empty_cache ends the quarantine"
        );
        a.check_invariants().unwrap();
    }

    #[test]
    fn invalid_frees_change_nothing() {
        let (a, _) = sim("sim_memory:1GiB");
        let p = a.malloc(4096, 0, 0).unwrap();
        let before = a.stats(0).unwrap();
        assert_eq!(
            a.free(p + 512, Some(0), 0).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_FREE
        );
        let after = a.stats(0).unwrap();
        assert_eq!(after.num_invalid_frees, 1);
        assert_eq!(after.allocated_bytes, before.allocated_bytes);
        a.free(p, Some(0), 0).unwrap();
        assert!(a.free(p, Some(0), 0).is_err(), "double free");
        assert_eq!(a.stats(0).unwrap().num_invalid_frees, 2);
        a.check_invariants().unwrap();
    }

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
        let n = arena::EPOCH_SPACING as u64 + 3;
        let ps = own_segments(&a, s, n);
        assert_eq!(a.stats(0).unwrap().reserved_bytes, n * 30 * M);
        let before = d.counters().event_records;
        free_all(&a, s, &ps);
        // One epoch event, at the EPOCH_SPACING-th idle segment.
        assert_eq!(d.counters().event_records, before + 1);
        d.complete_all();
        let big = a.malloc(100 * M, 0, s).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(st.num_driver_frees, arena::EPOCH_SPACING as u64);
        assert_eq!(st.reserved_bytes, 3 * 30 * M + 100 * M);
        // The last three have fallback events now; once those complete,
        // they go too, but not the segment freed since.
        d.complete_all();
        a.free(big, Some(0), s).unwrap();
        a.malloc(200 * M, 0, s).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(st.num_driver_frees, arena::EPOCH_SPACING as u64 + 3);
        assert_eq!(st.reserved_bytes, 100 * M + 200 * M);
        a.check_invariants().unwrap();
    }

    /// No epoch event goes on a capturing stream, nor on any stream of a
    /// device where a capture was seen (a record on the legacy stream would
    /// invalidate another stream's capture).
    #[test]
    fn no_epoch_event_during_a_capture() {
        let (a, d) = sim("sim_memory:4GiB");
        let (s, t) = (0x10, 0x20);
        let n = arena::EPOCH_SPACING as u64;
        let ps = own_segments(&a, s, n);
        // The capture begins after the allocations: no slow path saw it, so
        // the frees are not quarantined and make their segments idle.
        d.set_capturing(s, true);
        let before = d.counters().event_records;
        free_all(&a, s, &ps);
        assert_eq!(
            a.stats(0).unwrap().cached_free_bytes,
            arena::EPOCH_SPACING as u64 * (30 << 20)
        );
        assert_eq!(
            d.counters().event_records,
            before,
            "none on a capturing stream"
        );
        d.set_capturing(s, false);
        free_all(&a, t, &own_segments(&a, t, n));
        assert_eq!(
            d.counters().event_records,
            before,
            "none once a capture was seen"
        );
        a.check_invariants().unwrap();
    }

    /// A capture that begins after warm-up steps recorded epoch events: a
    /// miss during it proves nothing on the capturing stream (no event
    /// query, no segment released), as before epoch events.
    #[test]
    fn no_epoch_proof_on_a_capturing_stream() {
        let (a, d) = sim("sim_memory:4GiB");
        let s = 0x10;
        free_all(&a, s, &own_segments(&a, s, arena::EPOCH_SPACING as u64));
        quiet_miss_during_capture(&a, &d, s, 100 << 20);
    }

    /// A C/C++ capture (no pool) gives nothing back to the driver and
    /// synchronises no capturing stream (either would invalidate it on a
    /// GPU): not the idle segment too small for its growth, not its OOM
    /// ladder's, not `empty_cache`'s. Once it ends, all of them are.
    #[test]
    fn a_c_capture_gives_nothing_back_to_the_driver() {
        let (a, d) = sim("sim_memory:1GiB");
        let (s, c) = (0x10, 0x20);
        let p = a.malloc(30 << 20, 0, s).unwrap();
        a.free(p, Some(0), s).unwrap();
        d.set_capturing(c, true);
        let q = a.malloc(100 << 20, 0, c).unwrap();
        let e = a.malloc(1000 << 20, 0, c).unwrap_err();
        assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
        a.empty_cache();
        assert_eq!(d.counters().capture_violations, 0);
        assert_eq!(d.counters().mem_frees, 0);
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 130 << 20);
        d.set_capturing(c, false);
        a.free(q, Some(0), c).unwrap();
        let r = a.malloc(1000 << 20, 0, c).unwrap();
        assert_eq!(d.counters().mem_frees, 2, "the ladder released both");
        a.free(r, Some(0), c).unwrap();
        a.empty_cache();
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
        a.check_invariants().unwrap();
    }

    /// A capture served from the cache alone (warmed up first, the usual
    /// pattern) never reaches a slow path on its stream. It is still seen:
    /// `empty_cache`, another stream's growth and the pressure sampler's
    /// trim give nothing back and synchronise nothing meanwhile.
    #[test]
    fn a_capture_served_from_the_cache_alone_is_still_seen() {
        let (a, d) = sim("sim_memory:200MiB");
        let (s, c, t) = (0x10, 0x20, 0x30);
        let warm: Vec<u64> = (0..2).map(|_| a.malloc(30 << 20, 0, c).unwrap()).collect();
        free_all(&a, c, &warm);
        let p = a.malloc(30 << 20, 0, s).unwrap();
        d.set_capturing(c, true);
        let q = a.malloc(30 << 20, 0, c).unwrap(); // a cache hit
        a.free(p, Some(0), s).unwrap();
        let before = d.counters();
        assert_eq!(a.empty_cache(), 0);
        let r = a.malloc(100 << 20, 0, t).unwrap(); // s's idle 30 MiB is too small
                                                    // What periodic work does (observe/): trim, and sample device memory.
        a.trim(0, u64::MAX);
        let _ = a.mem_info_outside_capture(0, false);
        let after = d.counters();
        assert_eq!(after.capture_violations, 0);
        assert_eq!(after.mem_frees, before.mem_frees);
        assert_eq!(after.stream_syncs, before.stream_syncs);
        assert_eq!(after.mem_info_calls, before.mem_info_calls);
        d.set_capturing(c, false);
        for (x, st) in [(q, c), (r, t)] {
            a.free(x, Some(0), st).unwrap();
        }
        a.empty_cache();
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
        a.check_invariants().unwrap();
    }

    /// A block `record_stream`ed onto a stream capturing a C/C++ graph is in
    /// that graph, which may replay it: its free records no event (one on the
    /// capturing stream would be a node of the graph) and quarantines it,
    /// through an `empty_cache` during the capture too (the capturing stream
    /// has no arena of its own), until the first `empty_cache` after it,
    /// which then waits for every stream it was used on.
    #[test]
    fn a_block_used_by_a_capture_is_quarantined_at_its_free() {
        let (a, d) = sim("sim_memory:1GiB");
        let (s, c, t) = (0x10, 0x20, 0x30);
        let p = a.malloc(4096, 0, s).unwrap();
        a.record_stream(p, c).unwrap();
        a.record_stream(p, t).unwrap();
        d.set_capturing(c, true);
        let before = d.counters();
        a.free(p, Some(0), s).unwrap();
        assert_eq!(d.counters().event_records, before.event_records);
        a.empty_cache();
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 4096);
        assert_ne!(a.malloc(4096, 0, s).unwrap(), p, "not reused");
        assert_eq!(d.counters().capture_violations, 0);
        d.set_capturing(c, false);
        let before = d.counters();
        a.empty_cache();
        let after = d.counters();
        assert_eq!(
            after.event_records - before.event_records,
            2,
            "it waits for c's and t's work"
        );
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 0);
        a.check_invariants().unwrap();
    }

    /// A block freed on its own capturing stream waits, when the quarantine
    /// ends, for the other streams it was used on too; and while one of
    /// those (known only through `record_stream`) captures, the quarantine
    /// does not end.
    #[test]
    fn a_quarantined_block_waits_for_every_stream_it_was_used_on() {
        let (a, d) = sim("sim_memory:1GiB");
        let (s, t) = (0x10, 0x30);
        let p = a.malloc(4096, 0, s).unwrap();
        a.record_stream(p, t).unwrap();
        d.set_capturing(s, true);
        let q = a.malloc(30 << 20, 0, s).unwrap(); // a slow path sees the capture
        a.free(p, Some(0), s).unwrap();
        d.set_capturing(s, false);
        d.set_capturing(t, true);
        a.empty_cache();
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 4096);
        assert_eq!(d.counters().capture_violations, 0);
        d.set_capturing(t, false);
        let before = d.counters().event_records;
        a.empty_cache();
        assert_eq!(d.counters().event_records - before, 1, "it waits for t");
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 0);
        a.free(q, Some(0), s).unwrap();
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
        for _ in 0..10 * arena::EPOCH_SPACING {
            let p = a.malloc(30 << 20, 0, 0x10).unwrap();
            a.free(p, Some(0), 0x10).unwrap();
        }
        assert_eq!(d.counters().event_records, before);
        assert_eq!(a.stats(0).unwrap().num_driver_allocs, 1);
    }

    /// No epoch event while a pool routes (a PyTorch graph capture may be
    /// under way: an event recorded on the legacy stream would invalidate
    /// it), even on a stream that is not capturing.
    #[test]
    fn no_epoch_event_while_a_pool_routes() {
        let (a, d) = sim("sim_memory:4GiB");
        let s = 0x10;
        let ps = own_segments(&a, s, arena::EPOCH_SPACING as u64);
        a.begin_pool(0, (7, 0)).unwrap();
        let before = d.counters().event_records;
        free_all(&a, s, &ps);
        assert_eq!(d.counters().event_records, before);
        a.end_pool(0, (7, 0)).unwrap();
        a.check_invariants().unwrap();
    }

    /// A segment with an event of its own is not asked about while its
    /// stream captures: the stream's capture state comes first.
    #[test]
    fn a_segments_own_event_is_not_queried_during_a_capture() {
        let (a, d) = sim("sim_memory:4GiB");
        d.set_manual_events(true);
        let s = 0x10;
        let p = a.malloc(30 << 20, 0, s).unwrap();
        a.free(p, Some(0), s).unwrap();
        // A growth records the segment's own event (the stream is busy).
        let q = a.malloc(100 << 20, 0, s).unwrap();
        assert_eq!(a.stats(0).unwrap().num_driver_frees, 0);
        a.free(q, Some(0), s).unwrap();
        d.complete_all();
        quiet_miss_during_capture(&a, &d, s, 200 << 20);
    }

    /// A pass over idle segments asks a pending epoch event once, not once
    /// per segment it would cover.
    #[test]
    fn a_pending_epoch_event_is_queried_once_a_pass() {
        let (a, d) = sim("sim_memory:4GiB");
        d.set_manual_events(true);
        let s = 0x10;
        let n = arena::EPOCH_SPACING as u64;
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

    #[test]
    fn bad_device_and_sizes() {
        let (a, _) = sim("sim_devices:2,sim_memory:1GiB");
        assert_eq!(
            a.malloc(1, 2, 0).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_DEVICE
        );
        assert_eq!(a.malloc(0, 0, 0).unwrap(), 0);
        assert_eq!(
            a.malloc(0, 2, 0).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_DEVICE
        );
        assert_eq!(
            a.malloc(u64::MAX, 0, 0).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY
        );
        assert_eq!(
            a.malloc(1 << 50, 1, 0).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY
        );
        assert!(a.malloc(1 << 20, 1, 0).is_ok());
        a.check_invariants().unwrap();
    }
}
