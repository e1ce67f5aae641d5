//! The engine: per device, stream arenas over segments from the driver.
//!
//! ```text
//! Engine ── Device 0 ── Arena(stream 0) ── segments ── blocks (TLSF free index)
//!        │           └─ Arena(stream 7) ── ...
//!        └─ Device 1 ── ...
//! ```
//! One concern per file, top to bottom (nothing imports a file above it):
//! ```text
//! mod.rs       Engine: malloc, free, empty_cache, the Journal hook, Drop
//! slow.rs      the slow path: adopt, grow (with smaller segments under a
//!              tight limit), the OOM ladder and its callbacks
//! diagnose.rs  the out-of-memory diagnosis, rate-limited
//! lookup.rs    find_live: frees that miss their hint, record_stream, sizes
//! accounting.rs stats, accumulated counters and their reset, peaks
//! limits.rs    max_memory and memory_fraction
//! reclaim.rs   idle segments proven free: release, adoption, trim
//! reserve.rs   the warm-up reservation (`reserve:`) and trim's floor
//! capacity.rs  can_allocate: would a request be served now, read-only
//! pools.rs     PyTorch's private graph pools
//! check.rs     the invariants, walked
//! snapshot.rs  segments and blocks walked for PyTorch's snapshots; the
//!              history of actions (off by default)
//! device.rs    a device: its arenas and their thread-local cache, byte
//!              accounting, whether a capture is under way
//! pool_state.rs the pools' plain state
//! arena.rs     a stream's arena: segments, blocks, stash, epoch proofs
//! core.rs      what a device shares with its arenas: driver, events, clock
//! capture.rs   CaptureWatch: what the device knows of graph captures
//! vmm.rs       expandable segments: the device's physical memory, moved
//!              between virtual segments where requests need it
//! arena/vseg.rs a virtual segment's mappings, holes and placement
//! tlsf.rs      the free index (two-level segregated fit)
//! ```
//!
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
//!   streams (`Device::capture_underway`, `capture.rs`): cuMemFree synchronises the
//!   context, which would invalidate the capture. A `record_stream` free
//!   onto a capturing stream is quarantined too.
//!   PyTorch's captures get private pools instead (`pools.rs`,
//!   `graph_pools:on`).

mod accounting;
mod arena;
mod capacity;
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
mod reserve;
mod slow;
pub mod snapshot;
#[cfg(test)]
mod testing;
pub mod tlsf;
mod vmm;

pub use arena::PoolId;
pub use diagnose::OOM_DIAGNOSES_LOGGED;
pub use snapshot::Snapshot;

use crate::config::Config;
use crate::driver::{Driver, Stream};
use crate::error::{Error, Result};
use crate::live::LiveInfo;
use crate::size_class::{round_size, Policy};
use arena::{Arena, ArenaInner};
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
    /// Whether anyone is told of allocations and frees: a journal, or a
    /// device's history switched on. One check on the hot path for both.
    observed: std::sync::atomic::AtomicBool,
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
            observed: std::sync::atomic::AtomicBool::new(journal.is_some()),
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
    /// On a miss, in order (the device's first miss takes its warm-up
    /// reservation first, `reserve:`, in `reserve.rs`): adopt another
    /// stream's idle segment whose free is proven complete; get a segment from the driver (within the limits);
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
            if a.has_pending() && !dev.core.pools_routing() {
                a.process_pending(&dev.core, false);
            }
            if let Some((p, block)) = a.try_alloc(rounded, size, &self.policy, &dev.core) {
                a.counters.cache_hits += 1;
                dev.note_alloc(arena, block);
                self.journal_allocated(dev, p, size, arena);
                return Ok(p);
            }
        }
        self.malloc_slow(dev, arena, rounded, size)
    }

    /// Tell the journal, if any, and `dev`'s history, where on, of an
    /// allocation from `arena`. Call under the arena's lock (see [`Journal`]).
    #[inline(always)]
    fn journal_allocated(&self, dev: &Device, ptr: u64, requested: u64, arena: &Arena) {
        if self.observed.load(Ordering::Relaxed) {
            self.tell_allocated(dev, ptr, requested, arena);
        }
    }

    #[inline(never)]
    fn tell_allocated(&self, dev: &Device, ptr: u64, requested: u64, arena: &Arena) {
        if let Some(j) = &self.journal {
            j.allocated(ptr, requested, arena.stream);
        }
        if dev.core.history.on() {
            let h = &dev.core.history;
            h.record(snapshot::TraceAction::Alloc, ptr, requested, arena.stream);
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
                if self.free_from(dev, a, &mut inner, ptr).is_some() {
                    return Ok(());
                }
            }
        }
        self.free_search(ptr, device, stream)
    }

    /// Free `ptr` if `a` (of `dev`, locked as `inner`) holds it live: the
    /// block goes back (or into quarantine, when its stream captures), the
    /// bytes are accounted and the journal is told. `None` when `a` does
    /// not hold it.
    #[inline(always)]
    fn free_from(&self, dev: &Device, a: &Arena, inner: &mut ArenaInner, ptr: u64) -> Option<()> {
        let f = inner.free(ptr, &dev.core, || {
            !a.pooled && dev.core.captures_now(a.stream)
        })?;
        dev.note_free(a, inner, f.size);
        if self.observed.load(Ordering::Relaxed) {
            self.tell_freed(dev, a, ptr, f);
        }
        Some(())
    }

    #[inline(never)]
    fn tell_freed(&self, dev: &Device, a: &Arena, ptr: u64, f: arena::Freed) {
        if let Some(j) = &self.journal {
            j.freed(ptr, f.requested, a.stream);
        }
        if dev.core.history.on() {
            dev.core.history.freed(ptr, f.requested, a.stream, f.waits);
        }
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
    use crate::engine::testing::*;

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

    /// A dropped engine gives its idle segments back and destroys every
    /// event it made; a live allocation's segment stays (the caller's).
    #[test]
    fn a_dropped_engine_gives_back_what_it_holds() {
        let (a, d) = sim("sim_memory:1GiB,sim_events:manual");
        d.set_manual_events(true);
        let keep = a.malloc(30 << 20, 0, 1).unwrap();
        let ps: Vec<u64> = (0..12).map(|_| a.malloc(30 << 20, 0, 2).unwrap()).collect();
        free_all(&a, 2, &ps); // idle segments and epoch events
        a.record_stream(keep, 3).unwrap();
        let _ = a.malloc(30 << 20, 0, 4).unwrap(); // adoption asks events
        assert!(d.counters().event_creates > 0);
        drop(a);
        let c = d.counters();
        assert_eq!(
            d.live_allocations(0),
            2,
            "the two live allocations' segments stay"
        );
        assert_eq!(c.event_destroys, c.event_creates, "every event destroyed");
        let _ = keep;
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
