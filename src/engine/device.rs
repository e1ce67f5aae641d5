//! One device: its arenas (one per stream, and the private pools'), the
//! thread-local cache that finds an arena on the hot path, the device's
//! byte accounting and peak, and `empty_cache` for it.

use super::arena::{Arena, ArenaInner};
use super::core::DeviceCore;
use super::pool_state::{PoolState, Pools};
use super::reserve::Reserve;
use crate::config::Config;
use crate::driver::{Driver, Stream};
use crate::stats::cudalloc_stats;
use once_cell::sync::OnceCell;
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One device's state.
pub(super) struct Device {
    pub(super) core: DeviceCore,
    /// Every arena, by (stream, 0) for a stream's own and (stream, n > 0)
    /// for a private pool's (`pools.rs`). Never drops one.
    pub(super) arenas: RwLock<FxHashMap<(Stream, u64), Arc<Arena>>>,
    /// Serialises slow paths (driver calls, adoption, the OOM ladder).
    pub(super) slow: Mutex<()>,
    pub(super) max_memory: u64,
    pub(super) fraction_bits: AtomicU64,
    pub(super) total: OnceCell<u64>,
    /// Peak of allocated bytes (see `stats::ArenaBytes`).
    pub(super) peak: Mutex<u64>,
    /// The accumulated counters at the last `reset_accumulated` (all zero
    /// before one): `stats` reports the counts since. Boxed, as `pools`:
    /// cold data kept out of the device's hot lines (the hot path's speed
    /// on the sim moved by 20 ns with the size of this struct).
    pub(super) accumulated_base: Box<Mutex<cudalloc_stats>>,
    /// Private pools (PyTorch's graph pools; `pools.rs`).
    pub(super) pools: Box<Mutex<Pools>>,
    /// `expandable_segments:on` was asked for.
    pub(super) expandable: bool,
    /// The physical memory of virtual segments, once the first slow path
    /// found virtual memory available (`vmm.rs`); `None` inside: classic.
    pub(super) vmm: OnceCell<Option<Box<Mutex<super::vmm::Vmm>>>>,
    /// The warm-up reservation (`reserve.rs`).
    pub(super) reserve: Reserve,
}

impl Device {
    pub(super) fn new(index: usize, driver: Arc<dyn Driver>, config: &Config) -> Self {
        Device {
            core: DeviceCore::new(index, driver, config.small_max),
            arenas: RwLock::new(FxHashMap::default()),
            slow: Mutex::new(()),
            max_memory: config.max_memory,
            fraction_bits: AtomicU64::new(config.memory_fraction.to_bits()),
            total: OnceCell::new(),
            peak: Mutex::new(0),
            accumulated_base: Box::new(Mutex::new(cudalloc_stats::default())),
            pools: Box::new(Mutex::new(Pools::default())),
            expandable: config.expandable_segments,
            vmm: OnceCell::new(),
            reserve: Reserve::new(config.reserve_for(index)),
        }
    }

    /// The arena of `stream`, created on first use.
    pub(super) fn arena(&self, alloc_id: u64, stream: Stream) -> &Arena {
        if let Some(a) = self.find_arena(alloc_id, stream) {
            return a;
        }
        let mut map = self.arenas.write();
        let arc = map
            .entry((stream, 0))
            .or_insert_with(|| Arc::new(Arena::new(stream, self.core.clock())))
            .clone();
        drop(map);
        // SAFETY: arenas are never removed from `self.arenas`, so the Arc in
        // the map keeps this Arena alive as long as `self`.
        let a = unsafe { &*Arc::as_ptr(&arc) };
        remember_arena(alloc_id, self.core.index, stream, a);
        a
    }

    /// The arena of `stream` if it exists. The thread-local cache check is
    /// inlined into every caller; the map lookup is out of line.
    #[inline(always)]
    pub(super) fn find_arena(&self, alloc_id: u64, stream: Stream) -> Option<&Arena> {
        if let Some(a) = cached_arena(alloc_id, self.core.index, stream) {
            // SAFETY: the cache only holds arenas of the allocator `alloc_id`,
            // which is alive (we are borrowed from it) and never drops arenas.
            return Some(unsafe { &*a });
        }
        self.find_arena_slow(alloc_id, stream)
    }

    #[inline(never)]
    pub(super) fn find_arena_slow(&self, alloc_id: u64, stream: Stream) -> Option<&Arena> {
        let map = self.arenas.read();
        let arc = map.get(&(stream, 0))?;
        // SAFETY: as in `arena`: the map never drops an arena while `self` lives.
        let a = unsafe { &*Arc::as_ptr(arc) };
        drop(map);
        remember_arena(alloc_id, self.core.index, stream, a);
        Some(a)
    }

    /// Account `size` allocated bytes to `arena`. Call under the arena's lock.
    #[inline]
    pub(super) fn note_alloc(&self, arena: &Arena, size: u64) {
        let now = arena.bytes.current.load(Ordering::Relaxed) + size;
        arena.bytes.current.store(now, Ordering::Relaxed);
        if now > arena.bytes.budget.load(Ordering::Relaxed) {
            self.peak_check(arena);
        }
    }

    /// Account `size` freed bytes to `arena`, whose lock is held as `inner`,
    /// and record its epoch event when one is due (never in a pool's arena).
    #[inline]
    pub(super) fn note_free(&self, arena: &Arena, inner: &mut ArenaInner, size: u64) {
        let now = arena.bytes.current.load(Ordering::Relaxed) - size;
        arena.bytes.current.store(now, Ordering::Relaxed);
        if inner.epoch_due() && !arena.pooled {
            inner.record_epoch(arena.stream, &self.core);
        }
    }

    /// `arena` passed its budget: sum the arenas, raise the peak if passed,
    /// and share the peak out again, the slack going to `arena`.
    #[cold]
    pub(super) fn peak_check(&self, me: &Arena) {
        let mut peak = self.peak.lock();
        let arenas = self.arenas.read();
        let total: u64 = arenas
            .values()
            .map(|a| a.bytes.current.load(Ordering::Relaxed))
            .sum();
        *peak = (*peak).max(total);
        let mine = me.bytes.current.load(Ordering::Relaxed);
        for a in arenas.values() {
            if !std::ptr::eq(Arc::as_ptr(a), me) {
                a.bytes
                    .budget
                    .store(a.bytes.current.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        me.bytes
            .budget
            .store(*peak - (total - mine), Ordering::Relaxed);
    }

    /// Allocated bytes now: the sum over the arenas.
    pub(super) fn allocated(&self) -> u64 {
        self.arenas
            .read()
            .values()
            .map(|a| a.bytes.current.load(Ordering::Relaxed))
            .sum()
    }

    /// The peak of allocated bytes, given a current value just read (so that
    /// a snapshot never shows a peak below its own current value while
    /// other threads allocate and free).
    /// Whether cudalloc ever took memory from the driver on this device.
    pub(super) fn used(&self) -> bool {
        self.core.counters.driver_allocs.get() > 0 || self.core.counters.vmm_creates.get() > 0
    }

    pub(super) fn allocated_peak_with(&self, allocated: u64) -> u64 {
        (*self.peak.lock()).max(allocated)
    }

    pub(super) fn reset_allocated_peak(&self) {
        let mut peak = self.peak.lock();
        let arenas = self.arenas.read();
        for a in arenas.values() {
            a.bytes
                .budget
                .store(a.bytes.current.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        *peak = arenas
            .values()
            .map(|a| a.bytes.current.load(Ordering::Relaxed))
            .sum();
    }

    /// Whether `ptr` lies inside a segment of this device.
    pub(super) fn holds_address(&self, ptr: u64) -> bool {
        self.arena_list()
            .iter()
            .any(|a| a.inner.lock().segment_holding(ptr).is_some())
    }

    /// End every arena's quarantine. Call with `slow` held.
    pub(super) fn release_quarantine(&self) {
        for a in self.arena_list() {
            a.inner.lock().release_quarantine(&self.core);
        }
    }

    pub(super) fn arena_list(&self) -> Vec<Arc<Arena>> {
        self.arenas.read().values().cloned().collect()
    }

    /// Whether a capture may be under way on this device: then nothing goes
    /// back to the driver, no idle segment moves between streams, and no
    /// stream or event is asked. Either a pool's (PyTorch's graphs) or a
    /// C/C++ one: a stream cudalloc holds memory for (one of the device's
    /// arenas', not emptied) or watches is capturing now, or is the legacy
    /// stream while another captures. Finding one also marks the capture
    /// *seen*. (A C/C++ capture on a stream cudalloc knows nothing of is not
    /// noticed: README.) Slow paths only: it asks the driver once per
    /// stream. Call with `slow` held.
    pub(super) fn capture_underway(&self) -> bool {
        if self.pool_capture_underway() {
            return true;
        }
        // Only an arena holding memory: a program may destroy a stream once
        // its blocks are freed and `empty_cache` emptied its arena (README).
        let mut streams: Vec<Stream> = self
            .arena_list()
            .iter()
            .filter(|a| !a.pooled && a.inner.lock().segment_count() > 0)
            .map(|a| a.stream)
            .collect();
        streams.extend(self.core.capture.watched());
        self.core.note_capturing(&streams)
    }

    /// Whether a pool's capture may be under way on this device. A pool routes
    /// (between `begin_pool` and `end_pool`) and either nothing was routed
    /// to it yet, or a stream something was routed on is capturing (or the
    /// driver will not say). So a routing whose capture failed before
    /// PyTorch's end hook (PyTorch skips the hook when `cudaStreamEndCapture`
    /// fails) holds nothing back once its streams stop capturing; one that
    /// failed before its first allocation does, until the process ends (see
    /// docs/PYTHON.md). Routing outside a capture (a thread's allocations
    /// sent to a pool) holds back only until its first allocation.
    pub(super) fn pool_capture_underway(&self) -> bool {
        if !self.core.pools_routing() {
            return false;
        }
        let pools = self.pools.lock();
        pools
            .map
            .values()
            .any(|st| st.routing > 0 && !self.routing_idle(st))
    }

    /// Whether `st`'s routing holds nothing back now: something was routed,
    /// and none of the streams it was routed on is capturing (its capture
    /// ended, or it routes outside any capture).
    pub(super) fn routing_idle(&self, st: &PoolState) -> bool {
        !st.routed_streams.is_empty()
            && st.routed_streams.iter().all(|&s| {
                matches!(
                    self.core.driver.stream_is_capturing(self.core.index, s),
                    Ok(false)
                )
            })
    }
}

thread_local! {
    static LAST_ARENA: Cell<(u64, usize, Stream, *const Arena)> = const { Cell::new((0, 0, 0, std::ptr::null())) };
}

#[inline]
fn cached_arena(alloc_id: u64, device: usize, stream: Stream) -> Option<*const Arena> {
    LAST_ARENA
        .try_with(|c| {
            let (id, d, s, p) = c.get();
            (id == alloc_id && d == device && s == stream && !p.is_null()).then_some(p)
        })
        .ok()
        .flatten()
}

#[inline]
fn remember_arena(alloc_id: u64, device: usize, stream: Stream, a: &Arena) {
    let _ = LAST_ARENA.try_with(|c| c.set((alloc_id, device, stream, a as *const Arena)));
}
