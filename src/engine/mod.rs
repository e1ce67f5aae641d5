//! The engine: per device, stream arenas over segments from the driver.
//!
//! ```text
//! Allocator ── Device 0 ── Arena(stream 0) ── segments ── blocks (TLSF free index)
//!           │           └─ Arena(stream 7) ── ...
//!           └─ Device 1 ── ...
//! ```
//! - **Hot path** (cache hit): one uncontended arena lock, a TLSF lookup, a
//!   hash insert. The arena for `(device, stream)` is found through a one-entry
//!   thread-local cache.
//! - **Slow path** (miss), serialised per device: adopt an idle segment of
//!   another stream whose free is proven complete, else get a segment from the
//!   driver, else the OOM ladder in [`Allocator::malloc`]'s docs.
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

mod arena;
mod pools;
pub mod tlsf;
mod trim;

pub use pools::PoolId;

use crate::config::Config;
use crate::driver::{Driver, DriverError, Event, Stream};
use crate::error::{Error, ErrorCode, Result};
use crate::observe::{Action, Observer};
use crate::size_class::{round_size, Policy, Pool};
use crate::stats::{cudalloc_stats, DeviceCounters};
use crate::tracking::LiveInfo;
use arena::{Arena, ArenaInner, Detached, ProofPass};
use once_cell::sync::OnceCell;
use parking_lot::{Mutex, RwLock};
use pools::PoolTag;
use rustc_hash::FxHashMap;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Called at step 3 of the OOM ladder with `(device, requested bytes)`.
pub type OomCallback = Box<dyn Fn(usize, u64) + Send + Sync>;

/// Out-of-memory diagnoses logged in full per device; after these, only a
/// line at each power of two (see `Allocator::oom`).
pub const OOM_DIAGNOSES_LOGGED: u64 = 5;

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

/// What one device's state shares with its arenas.
pub(crate) struct DeviceCore {
    pub index: usize,
    pub driver: Arc<dyn Driver>,
    pub counters: DeviceCounters,
    events: Mutex<Vec<Event>>,
    /// The policy's `small_max`: a live block is in the small pool exactly
    /// when its size is at most this (large-pool blocks serve larger requests).
    pub small_max: u64,
    /// Set once a capture was seen outside a pool (a slow path's stream, an
    /// arena's stream in `Device::capture_underway`, or a `record_stream`
    /// free's): from then on each free asks the driver whether its stream
    /// is capturing (quarantine), and no epoch event is recorded.
    pub capture_seen: AtomicBool,
    /// Pools routing allocations now (`pools.rs`). The fast paths' cheap
    /// test of a capture under way: while nonzero, they ask no event and a
    /// `record_stream` free records none (its events wait for the end).
    /// The slow paths ask `Device::capture_underway`, which tells a routing
    /// that outlived a failed capture from a capture that runs.
    pub captures: AtomicUsize,
    /// Streams seen capturing outside a pool (`note_capturing`), and those a
    /// quarantined block waits for: asked again by every slow path until
    /// `empty_cache` (`Device::capture_underway`). A `record_stream` stream
    /// may have no arena of its own, and leave no other trace.
    pub capture_streams: Mutex<Vec<Stream>>,
    /// The clock of new arenas' stamps, when a test set one
    /// (`Allocator::set_clock`).
    clock: OnceCell<fn() -> u64>,
}

impl DeviceCore {
    /// An event from the pool, or a new one.
    pub fn get_event(&self) -> std::result::Result<Event, DriverError> {
        if let Some(e) = self.events.lock().pop() {
            return Ok(e);
        }
        self.driver.event_create(self.index)
    }

    /// Whether any of `streams` is capturing a graph now (the legacy stream
    /// while another captures counts). Each one found is remembered in
    /// `capture_streams`, and sets `capture_seen`.
    pub fn note_capturing(&self, streams: &[Stream]) -> bool {
        let mut found = false;
        for &s in streams {
            if matches!(self.driver.stream_is_capturing(self.index, s), Ok(true)) {
                found = true;
                self.watch_streams(&[s]);
            }
        }
        if found {
            self.capture_seen.store(true, Ordering::Relaxed);
        }
        found
    }

    /// Add `streams` to `capture_streams`.
    pub fn watch_streams(&self, streams: &[Stream]) {
        let mut c = self.capture_streams.lock();
        for &s in streams {
            if !c.contains(&s) {
                c.push(s);
            }
        }
    }

    /// The clock a test set for this device's stamps, if any.
    pub fn clock(&self) -> Option<fn() -> u64> {
        self.clock.get().copied()
    }

    pub fn put_event(&self, e: Event) {
        self.events.lock().push(e);
    }

    /// Whether a pool routes on this device: a capture may be under way.
    /// The fast paths' cheap test (see `captures`); the slow paths ask
    /// `Device::capture_underway`, which tells a failed capture apart.
    pub fn pools_routing(&self) -> bool {
        self.captures.load(Ordering::Acquire) > 0
    }
}

/// How the OOM ladder and `empty_cache` release idle segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// Only segments whose event has already completed (never blocks).
    Completed,
    /// Every idle segment, synchronising streams as needed.
    All,
    /// Idle segments of `pool` that cannot serve a request of `rounded`
    /// bytes (smaller, or under `huge_split:off` a whole-handed segment far
    /// bigger) whose event has completed: before growing, drop cached memory
    /// that cannot serve the request anyway (never blocks).
    Useless {
        pool: Pool,
        rounded: u64,
        policy: Policy,
    },
}

/// Whether an idle segment (`seg_pool`, `seg_size` bytes) cannot serve a
/// request of `rounded` bytes from `pool`.
fn useless(seg_pool: Pool, seg_size: u64, pool: Pool, rounded: u64, policy: &Policy) -> bool {
    seg_pool == pool && (seg_size < rounded || !policy.may_serve(pool, seg_size, seg_size, rounded))
}

/// A slow path's request, as `try_serve` is asked it again and again.
#[derive(Clone, Copy)]
struct Want {
    pool: Pool,
    rounded: u64,
    size: u64,
    /// A capture is under way (the stream asking captures, or
    /// `Device::capture_underway`): adopt nothing, release nothing.
    hold: bool,
}

/// Subtract `base`'s accumulated counters from `s`'s (every `num_*` count
/// and `trimmed_bytes`; see [`Allocator::reset_accumulated`]).
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

struct Device {
    core: DeviceCore,
    /// Every arena, by (stream, 0) for a stream's own and (stream, n > 0)
    /// for a private pool's (`pools.rs`). Never drops one.
    arenas: RwLock<FxHashMap<(Stream, u64), Arc<Arena>>>,
    /// Serialises slow paths (driver calls, adoption, the OOM ladder).
    slow: Mutex<()>,
    max_memory: u64,
    fraction_bits: AtomicU64,
    total: OnceCell<u64>,
    /// Peak of allocated bytes (see `stats::ArenaBytes`).
    peak: Mutex<u64>,
    /// The accumulated counters at the last `reset_accumulated` (all zero
    /// before one): `stats` reports the counts since. Boxed, as `pools`:
    /// cold data kept out of the device's hot lines (the hot path's speed
    /// on the sim moved by 20 ns with the size of this struct).
    accumulated_base: Box<Mutex<cudalloc_stats>>,
    /// Private pools (PyTorch's graph pools; `pools.rs`).
    pools: Box<Mutex<pools::Pools>>,
}

impl Device {
    /// The arena of `stream`, created on first use.
    fn arena(&self, alloc_id: u64, stream: Stream) -> &Arena {
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
    fn find_arena(&self, alloc_id: u64, stream: Stream) -> Option<&Arena> {
        if let Some(a) = cached_arena(alloc_id, self.core.index, stream) {
            // SAFETY: the cache only holds arenas of the allocator `alloc_id`,
            // which is alive (we are borrowed from it) and never drops arenas.
            return Some(unsafe { &*a });
        }
        self.find_arena_slow(alloc_id, stream)
    }

    #[inline(never)]
    fn find_arena_slow(&self, alloc_id: u64, stream: Stream) -> Option<&Arena> {
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
    fn note_alloc(&self, arena: &Arena, size: u64) {
        let now = arena.bytes.current.load(Ordering::Relaxed) + size;
        arena.bytes.current.store(now, Ordering::Relaxed);
        if now > arena.bytes.budget.load(Ordering::Relaxed) {
            self.peak_check(arena);
        }
    }

    /// Account `size` freed bytes to `arena`, whose lock is held as `inner`,
    /// and record its epoch event when one is due (never in a pool's arena).
    #[inline]
    fn note_free(&self, arena: &Arena, inner: &mut ArenaInner, size: u64) {
        let now = arena.bytes.current.load(Ordering::Relaxed) - size;
        arena.bytes.current.store(now, Ordering::Relaxed);
        if inner.epoch_due() && !arena.pooled {
            inner.record_epoch(arena.stream, &self.core);
        }
    }

    /// `arena` passed its budget: sum the arenas, raise the peak if passed,
    /// and share the peak out again, the slack going to `arena`.
    #[cold]
    fn peak_check(&self, me: &Arena) {
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
    fn allocated(&self) -> u64 {
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
    fn used(&self) -> bool {
        self.core.counters.driver_allocs.get() > 0
    }

    fn allocated_peak_with(&self, allocated: u64) -> u64 {
        (*self.peak.lock()).max(allocated)
    }

    fn reset_allocated_peak(&self) {
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
    fn holds_address(&self, ptr: u64) -> bool {
        self.arena_list()
            .iter()
            .any(|a| a.inner.lock().segment_holding(ptr).is_some())
    }

    /// Whether a block of `arena` freed now must be quarantined: its stream is
    /// capturing a CUDA graph. Costs nothing until the first capture is seen.
    #[inline]
    fn capturing(&self, arena: &Arena) -> bool {
        self.core.capture_seen.load(Ordering::Relaxed)
            && matches!(
                self.core
                    .driver
                    .stream_is_capturing(self.core.index, arena.stream),
                Ok(true)
            )
    }

    /// `empty_cache` for this device: end the quarantine and release every
    /// idle segment. Nothing while a capture is under way (pools.rs; a
    /// C/C++ capture on one of the device's streams too): that would
    /// invalidate it. Call with `slow` held.
    fn empty(&self) -> u64 {
        if self.capture_underway() {
            tracing::debug!(
                device = self.core.index,
                "empty_cache during a graph capture: nothing released"
            );
            return 0;
        }
        self.release_quarantine();
        // The captures are over: a stream they named may be destroyed now.
        self.core.capture_streams.lock().clear();
        self.release_idle(Release::All)
    }

    /// End every arena's quarantine. Call with `slow` held.
    fn release_quarantine(&self) {
        for a in self.arena_list() {
            a.inner.lock().release_quarantine(&self.core);
        }
    }

    fn arena_list(&self) -> Vec<Arc<Arena>> {
        self.arenas.read().values().cloned().collect()
    }

    /// The device's total memory, read once. A failed read is not cached
    /// (the next call asks again) and counts as no cap meanwhile.
    fn total(&self) -> u64 {
        self.total
            .get_or_try_init(|| self.core.driver.mem_info(self.core.index).map(|(_, t)| t))
            .copied()
            .unwrap_or(u64::MAX)
    }

    fn fraction(&self) -> f64 {
        f64::from_bits(self.fraction_bits.load(Ordering::Relaxed))
    }

    /// The cap on reserved bytes in force (`u64::MAX` when none).
    fn limit(&self) -> u64 {
        self.limit_with(self.total())
    }

    /// The limit as far as it is known without asking the driver: a device
    /// cudalloc never used has no total read yet, and reading it would make
    /// the CUDA backend hold a context there (statistics of such a device
    /// leave `memory_fraction` out).
    fn known_limit(&self) -> u64 {
        self.limit_with(self.total.get().copied().unwrap_or(u64::MAX))
    }

    fn limit_with(&self, total: u64) -> u64 {
        let mut limit = if self.max_memory == 0 {
            u64::MAX
        } else {
            self.max_memory
        };
        let f = self.fraction();
        if f < 1.0 && total != u64::MAX {
            // At least 1 byte: 0 would read as "no limit" in the statistics.
            limit = limit.min(((total as f64 * f) as u64).max(1));
        }
        limit
    }

    /// Release idle segments of every arena of this device to the driver.
    /// Returns the bytes released. Call with `slow` held, and only when no
    /// capture is under way (`capture_underway`: that would invalidate it).
    fn release_idle(&self, mode: Release) -> u64 {
        let mut released = 0;
        for arena in self.arena_list() {
            let detached: Vec<Detached> = {
                let mut a = arena.inner.lock();
                // Frees held back by a capture that ended without its end
                // hook (see `capture_underway`) proceed now.
                if !a.deferred.is_empty() {
                    a.record_deferred(&self.core);
                }
                match a.pool {
                    PoolTag::None => {}
                    // A released pool's segments go only where every stream
                    // is synchronised (a replay may run on any).
                    PoolTag::Released(_) if mode == Release::All => {}
                    PoolTag::Live(_) => {
                        // Keeps its memory; its completed record_stream
                        // frees are its to reuse again.
                        a.flush_stash();
                        a.process_pending(&self.core, false);
                        continue;
                    }
                    PoolTag::Released(_) | PoolTag::Spare => continue,
                }
                a.flush_stash();
                a.process_pending(&self.core, mode == Release::All);
                if a.idle.is_empty() {
                    continue;
                }
                if let Release::Useless {
                    pool,
                    rounded,
                    policy,
                } = mode
                {
                    if !a
                        .idle
                        .iter()
                        .any(|&s| useless(a.seg(s).pool, a.seg(s).size, pool, rounded, &policy))
                    {
                        continue;
                    }
                }
                if mode == Release::All {
                    // cuMemFree synchronises anyway; this makes the wait explicit.
                    let _ = self
                        .core
                        .driver
                        .stream_synchronize(self.core.index, arena.stream);
                }
                let idle = a.idle.clone();
                let mut out = Vec::with_capacity(idle.len());
                let mut pass = ProofPass::default();
                for s in idle {
                    let wanted = match mode {
                        Release::All => true,
                        Release::Completed => {
                            a.idle_free_complete(s, arena.stream, &self.core, &mut pass)
                        }
                        Release::Useless {
                            pool,
                            rounded,
                            policy,
                        } => {
                            let seg = a.seg(s);
                            useless(seg.pool, seg.size, pool, rounded, &policy)
                                && a.idle_free_complete(s, arena.stream, &self.core, &mut pass)
                        }
                    };
                    if wanted {
                        out.push(a.detach(s, &self.core));
                    }
                }
                out
            };
            for d in detached {
                let size = d.size;
                if self.driver_free(&arena, d) {
                    released += size;
                }
            }
        }
        if mode == Release::All {
            self.retire_drained_pools();
        }
        released
    }

    /// Give segment `d`, detached from `arena`, back to the driver. Returns
    /// whether it went. One the driver refuses to free is still allocated:
    /// it goes back into `arena` as an idle segment, so nothing is lost and
    /// `reserved` stays true (a later release tries again). After the
    /// driver's shutdown the memory is gone with it.
    fn driver_free(&self, arena: &Arena, d: Detached) -> bool {
        match self.core.driver.mem_free(self.core.index, d.base, d.size) {
            Ok(()) | Err(DriverError::Deinitialized) => {
                self.core.counters.reserved.sub(d.size);
                self.core.counters.driver_frees.inc();
                true
            }
            Err(e) => {
                tracing::warn!(
                    device = self.core.index,
                    "freeing a segment of {} bytes failed: {e}; it stays cached",
                    d.size
                );
                arena.inner.lock().attach(d);
                false
            }
        }
    }

    /// Take an idle segment of another stream, whose free is proven complete,
    /// out of its arena for `me`. Call with `slow` held. The caller attaches
    /// it and carves its block in one critical section: attaching here and
    /// carving after a relock would let another thread on `me`'s stream take
    /// the segment's free block in between.
    fn adopt(&self, me: &Arena, pool: Pool, rounded: u64, policy: &Policy) -> Option<Detached> {
        for other in self.arena_list() {
            if std::ptr::eq(Arc::as_ptr(&other), me) || other.pooled {
                continue;
            }
            let found = {
                let mut o = other.inner.lock();
                o.flush_stash();
                let mut cands: Vec<u32> = o
                    .idle
                    .iter()
                    .copied()
                    .filter(|&s| {
                        let seg = o.seg(s);
                        seg.pool == pool
                            && seg.size >= rounded
                            && policy.may_serve(pool, seg.size, seg.size, rounded)
                    })
                    .collect();
                cands.sort_by_key(|&s| o.seg(s).size);
                let mut pass = ProofPass::default();
                cands
                    .into_iter()
                    .find(|&s| o.idle_free_complete(s, other.stream, &self.core, &mut pass))
                    .map(|s| o.detach(s, &self.core))
            };
            if let Some(d) = found {
                self.core.counters.adopted.inc();
                return Some(d);
            }
        }
        None
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

static NEXT_ALLOCATOR_ID: AtomicU64 = AtomicU64::new(1);

/// A caching allocator over all devices of one driver.
pub struct Allocator {
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
    /// Observability adaptors (src/observe/): call sites, trace log, pressure, alarms.
    observe: Observer,
}

impl Allocator {
    /// An allocator over every device of `driver`, configured by `config`.
    pub fn new(config: Config, driver: Arc<dyn Driver>) -> Self {
        let devices = (0..driver.device_count())
            .map(|index| Device {
                core: DeviceCore {
                    index,
                    driver: driver.clone(),
                    counters: DeviceCounters::default(),
                    events: Mutex::new(Vec::new()),
                    small_max: config.small_max,
                    capture_seen: AtomicBool::new(false),
                    captures: AtomicUsize::new(0),
                    capture_streams: Mutex::new(Vec::new()),
                    clock: OnceCell::new(),
                },
                arenas: RwLock::new(FxHashMap::default()),
                slow: Mutex::new(()),
                max_memory: config.max_memory,
                fraction_bits: AtomicU64::new(config.memory_fraction.to_bits()),
                total: OnceCell::new(),
                peak: Mutex::new(0),
                accumulated_base: Box::new(Mutex::new(cudalloc_stats::default())),
                pools: Box::new(Mutex::new(pools::Pools::default())),
            })
            .collect();
        let observe = Observer::new(&config, driver.device_count());
        Allocator {
            id: NEXT_ALLOCATOR_ID.fetch_add(1, Ordering::Relaxed),
            policy: Policy::from_config(&config),
            config,
            driver,
            devices,
            oom_callbacks: RwLock::new(Vec::new()),
            stray_invalid_frees: AtomicU64::new(0),
            observe,
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
        self.malloc_from(size, device, stream, None)
    }

    /// [`Allocator::malloc`], from private pool `pool` when given
    /// (`pools.rs`; [`Allocator::malloc_pool`]).
    #[inline(always)]
    pub(crate) fn malloc_from(
        &self,
        size: u64,
        device: usize,
        stream: Stream,
        pool: Option<PoolId>,
    ) -> Result<u64> {
        let r = self.malloc_engine(size, device, stream, pool);
        if self.observe.on {
            self.observe.after_malloc(self, &r, size, device, stream);
        }
        r
    }

    #[inline(always)]
    fn malloc_engine(
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
                self.log_under_lock(Action::Allocate, p, size, arena);
                return Ok(p);
            }
        }
        self.malloc_slow(dev, arena, rounded, size)
    }

    #[cold]
    fn malloc_slow(&self, dev: &Device, arena: &Arena, rounded: u64, size: u64) -> Result<u64> {
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
    fn try_serve(&self, dev: &Device, arena: &Arena, want: &Want) -> Result<u64> {
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
                self.log_under_lock(Action::Allocate, p, size, arena);
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
            self.log_under_lock(Action::Allocate, p, size, arena);
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
        self.log_under_lock(Action::Allocate, p, size, arena);
        Ok(p)
    }

    /// Log an allocation or free of `arena`'s to the trace log, if on.
    /// Call under the arena's lock (see `observe::tracelog`: the log's
    /// order per address is then the engine's).
    #[inline(always)]
    fn log_under_lock(&self, action: Action, ptr: u64, requested: u64, arena: &Arena) {
        if self.observe.logging {
            self.observe.log(action, ptr, requested, arena.stream);
        }
    }

    /// A new segment for a rounded request, of the first of the policy's
    /// growth sizes that fits the limit and that the driver gives. Returns
    /// its base and size, counted as reserved. Call with `slow` held.
    fn grow(&self, dev: &Device, rounded: u64) -> Result<(u64, u64)> {
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

    /// Count an OOM, log the diagnosis, and make the error carrying it.
    ///
    /// The log is rate-limited per device, as invalid frees are: the first
    /// [`OOM_DIAGNOSES_LOGGED`] diagnoses in full, then one line with the
    /// count at each power of two (a loop that keeps failing must not flood
    /// stderr). The error always carries the full diagnosis.
    #[cold]
    fn oom(&self, dev: &Device, size: u64, stream: Stream, why: &str) -> Error {
        dev.core.counters.ooms.inc();
        let n = dev.core.counters.ooms.get();
        let diag = self.diagnose(dev.core.index, size, stream, why);
        if n <= OOM_DIAGNOSES_LOGGED {
            tracing::error!("{diag}");
        } else if n.is_power_of_two() {
            tracing::error!(
                "cudalloc: out of memory on device {}: could not allocate {size} bytes: {why}; \
                 {n} out-of-memory errors on this device so far (diagnoses after the first \
                 {OOM_DIAGNOSES_LOGGED} are logged at powers of two only; each error carries its own)",
                dev.core.index
            );
        }
        Error::new(ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY, diag)
    }

    /// A one-screen explanation of an allocation failure of `size` bytes on
    /// `device` and `stream`.
    pub fn diagnose(&self, device: usize, size: u64, stream: Stream, why: &str) -> String {
        use crate::config::format_size as fs;
        use std::fmt::Write as _;
        let Ok(st) = self.stats(device) else {
            return format!("cudalloc: out of memory on device {device}");
        };
        let dev = &self.devices[device];
        let mut s = String::new();
        let _ = writeln!(s, "cudalloc: out of memory on device {device}: could not allocate {} ({size} bytes): {why}", fs(size));
        let _ = writeln!(
            s,
            "  live {} in {} allocations; reserved {} in {} segments; cached free {}; pending {}",
            fs(st.allocated_bytes),
            st.active_allocations,
            fs(st.reserved_bytes),
            st.segments,
            fs(st.cached_free_bytes),
            fs(st.pending_free_bytes)
        );
        let frag = if st.cached_free_bytes == 0 {
            0.0
        } else {
            1.0 - st.largest_free_block as f64 / st.cached_free_bytes as f64
        };
        let _ = writeln!(
            s,
            "  largest free block {}; fragmentation of the free cache {:.0}%",
            fs(st.largest_free_block),
            frag * 100.0
        );
        // What this request could have used: free blocks of its own stream and
        // pool. Other streams' blocks move only as whole idle segments, the two
        // pools never lend to each other, and quarantined blocks wait for
        // empty_cache. `Here` also sums the free bytes of each pool over all
        // streams, for the hint.
        struct Here {
            rounded: u64,
            pool: Pool,
            largest: u64,
            pool_free: u64,
            other_free: u64,
        }
        let here = round_size(size).map(|r| {
            let pool = self.policy.pool(r);
            let mut h = Here {
                rounded: r,
                pool,
                largest: 0,
                pool_free: 0,
                other_free: 0,
            };
            for a in dev.arena_list() {
                let inner = a.inner.lock();
                let stash = inner.stash.bytes;
                let (small, large) = (inner.index[0].free_bytes + stash, inner.index[1].free_bytes);
                let (mine, other) = if pool == Pool::Small {
                    (small, large)
                } else {
                    (large, small)
                };
                h.pool_free += mine;
                h.other_free += other;
                if a.stream == stream {
                    h.largest = inner.index[pool as usize].largest(&inner.blocks);
                }
            }
            h
        });
        let pool_name = |p: Pool| if p == Pool::Small { "small" } else { "large" };
        if let Some(h) = &here {
            let _ = writeln!(
                s,
                "  on stream {stream:#x}: largest free block of the {} pool {}",
                pool_name(h.pool),
                fs(h.largest)
            );
        }
        let limit = dev.limit();
        // Not during a graph capture: cuMemGetInfo could invalidate it.
        let dinfo = match self.mem_info_outside_capture(device, true) {
            Some(Ok((free, total))) => format!("device free {} of {}", fs(free), fs(total)),
            Some(Err(e)) => format!("device memory unknown ({e})"),
            None => "device memory not asked (a graph capture may be under way)".to_string(),
        };
        let lim = if limit == u64::MAX {
            "none".to_string()
        } else {
            fs(limit)
        };
        let _ = writeln!(s, "  limit {lim}; {dinfo}; OOMs so far {}", st.num_ooms);
        let mut live = self.live_allocations(Some(device));
        live.sort_by_key(|l| std::cmp::Reverse(l.size));
        if !live.is_empty() {
            let _ = writeln!(s, "  largest live allocations:");
            for l in live.iter().take(5) {
                let _ = writeln!(
                    s,
                    "    {:#x} {} stream {:#x} thread {} seq {}",
                    l.ptr,
                    fs(l.size),
                    l.stream,
                    l.thread,
                    l.seq
                );
            }
        }
        match &here {
            Some(h) if h.pool_free >= h.rounded && h.largest < h.rounded => {
                let _ = write!(
                    s,
                    "  hint: the {} pool holds {} free, but no free block of this stream fits: \
                     fragmentation, or memory freed on other streams (idle segments were already \
                     released; the rest hold live blocks). Free long-lived tensors or free on \
                     the stream that allocates; or try a low-fragmentation profile (README): \
                     record a trace with log_file:PATH and run `cudalloc replay PATH --profiles`",
                    pool_name(h.pool),
                    fs(h.pool_free)
                );
            }
            Some(h) if h.pool_free + h.other_free >= h.rounded && h.other_free > 0 => {
                let _ = write!(
                    s,
                    "  hint: {} of the cache is free in the {} pool, which never serves {} \
                     requests like this one. Free tensors you no longer need, or try a \
                     profile that shares segments between sizes (small_max:256KiB or \
                     small_max:512; README): record a trace with log_file:PATH and run \
                     `cudalloc replay PATH --profiles`",
                    fs(h.other_free),
                    pool_name(if h.pool == Pool::Small {
                        Pool::Large
                    } else {
                        Pool::Small
                    }),
                    pool_name(h.pool)
                );
            }
            _ => {
                let _ = write!(s, "  hint: free tensors you no longer need, lower the batch size, or set max_memory/memory_fraction");
            }
        }
        s
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
                if let Some(f) = inner.free(ptr, &dev.core, || !a.pooled && dev.capturing(a)) {
                    dev.note_free(a, &mut inner, f.size);
                    self.log_under_lock(Action::Free, ptr, f.requested, a);
                    return Ok(());
                }
            }
        }
        self.free_search(ptr, device, stream)
    }

    #[cold]
    fn free_search(&self, ptr: u64, device: Option<usize>, stream: Stream) -> Result<()> {
        for dev in &self.devices {
            for a in dev.arena_list() {
                let mut inner = a.inner.lock();
                if let Some(f) = inner.free(ptr, &dev.core, || !a.pooled && dev.capturing(&a)) {
                    dev.note_free(&a, &mut inner, f.size);
                    self.log_under_lock(Action::Free, ptr, f.requested, &a);
                    return Ok(());
                }
            }
        }
        // Counted on the hinted device; with no such device, where the
        // pointer lies (a double free), else on device 0: a count nobody
        // can read would hide the bug.
        let counted = device
            .and_then(|d| self.devices.get(d))
            .or_else(|| self.devices.iter().find(|d| d.holds_address(ptr)))
            .or_else(|| self.devices.first());
        let n = match counted {
            Some(dev) => {
                dev.core.counters.invalid_frees.inc();
                dev.core.counters.invalid_frees.get()
            }
            None => self.stray_invalid_frees.fetch_add(1, Ordering::Relaxed) + 1,
        };
        if n <= 10 || n.is_power_of_two() {
            tracing::warn!("invalid free of {ptr:#x} (device {device:?}, stream {stream:#x}): not a live cudalloc allocation; {n} so far");
        }
        Err(Error::new(
            ErrorCode::CUDALLOC_ERR_INVALID_FREE,
            format!("free of {ptr:#x}: not a live cudalloc allocation (unknown or double free)"),
        ))
    }

    /// Make the free of `ptr` also wait for work enqueued on `stream` up to the free.
    pub fn record_stream(&self, ptr: u64, stream: Stream) -> Result<()> {
        for dev in &self.devices {
            for a in dev.arena_list() {
                let mut inner = a.inner.lock();
                if let Some(rec) = inner.live.get_mut(&ptr) {
                    if stream != a.stream && !rec.streams.contains(&stream) {
                        rec.streams.push(stream);
                    }
                    return Ok(());
                }
            }
        }
        Err(Error::new(
            ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER,
            format!("record_stream of {ptr:#x}: not a live cudalloc allocation"),
        ))
    }

    /// Release every idle cached segment on every device to the driver.
    /// Returns the bytes released.
    pub fn empty_cache(&self) -> u64 {
        self.devices
            .iter()
            .map(|dev| {
                let _slow = dev.slow.lock();
                dev.empty()
            })
            .sum()
    }

    /// Release the idle cached segments of one device.
    pub fn empty_cache_device(&self, device: usize) -> Result<u64> {
        let dev = self.device(device)?;
        let _slow = dev.slow.lock();
        Ok(dev.empty())
    }

    /// A statistics snapshot of `device`. The accumulated counters (see
    /// [`Allocator::reset_accumulated`]) count from the last reset.
    pub fn stats(&self, device: usize) -> Result<cudalloc_stats> {
        let dev = self.device(device)?;
        // Segments come and go only under `slow`: holding it makes the
        // snapshot consistent (allocated <= reserved, every block counted
        // inside a segment counted), while cache hits and frees go on.
        let _slow = dev.slow.lock();
        let mut s = self.stats_since_start(dev);
        accumulated(&mut s, &dev.accumulated_base.lock());
        Ok(s)
    }

    /// Restart the accumulated counters of `device` from zero: the counts of
    /// allocations, frees, cache hits, driver calls, OOMs, retries, invalid
    /// frees, adoptions, pressure events, trims and leak alarms (torch's
    /// `reset_accumulated_memory_stats`). Current values and peaks stay.
    pub fn reset_accumulated(&self, device: usize) -> Result<()> {
        let dev = self.device(device)?;
        let _slow = dev.slow.lock();
        let now = self.stats_since_start(dev);
        *dev.accumulated_base.lock() = now;
        Ok(())
    }

    /// `stats` with the accumulated counters since the allocator started.
    /// Call with `slow` held.
    fn stats_since_start(&self, dev: &Device) -> cudalloc_stats {
        let device = dev.core.index;
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
        self.observe.fill_stats(device, &mut s);
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

    /// The fraction of `device`'s total memory cudalloc may reserve, as set
    /// by [`Allocator::set_memory_fraction`] (1.0 until then; torch's
    /// `get_per_process_memory_fraction`).
    pub fn memory_fraction(&self, device: usize) -> Result<f64> {
        Ok(self.device(device)?.fraction())
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

    /// Set the per-device fraction of total memory cudalloc may reserve
    /// (torch's `set_per_process_memory_fraction`).
    pub fn set_memory_fraction(&self, fraction: f64, device: usize) -> Result<()> {
        let dev = self.device(device)?;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::new(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                format!("memory fraction {fraction} is not in (0, 1]"),
            ));
        }
        dev.fraction_bits
            .store(fraction.to_bits(), Ordering::Relaxed);
        if fraction < 1.0 {
            // The caller named this device, so reading its total (and, on
            // CUDA, retaining its context) is expected; stats then report
            // the cap at once.
            dev.total();
        }
        Ok(())
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

    /// The true (rounded) size of a live allocation.
    pub fn size_of(&self, ptr: u64) -> Option<u64> {
        self.devices
            .iter()
            .flat_map(|d| d.arena_list())
            .find_map(|a| {
                let inner = a.inner.lock();
                inner.live.get(&ptr).map(|r| inner.blocks.get(r.block).size)
            })
    }

    /// Walk every structure and check the invariants of DESIGN.md. Exact when
    /// no other thread is allocating or freeing meanwhile.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        for dev in &self.devices {
            let _slow = dev.slow.lock();
            let mut ranges = Vec::new();
            let (mut seg_bytes, mut free, mut pending, mut live_bytes) = (0u64, 0u64, 0u64, 0u64);
            for a in dev.arena_list() {
                let inner = a.inner.lock();
                let r = inner.check().map_err(|e| {
                    format!("device {} stream {:#x}: {e}", dev.core.index, a.stream)
                })?;
                live_bytes += r.iter().map(|x| x.1).sum::<u64>();
                ranges.extend(r);
                seg_bytes += inner.segment_bytes();
                free += inner.free_bytes();
                pending += inner.pending_bytes();
            }
            ranges.sort_unstable();
            for w in ranges.windows(2) {
                if w[0].0 + w[0].1 > w[1].0 {
                    return Err(format!(
                        "device {}: live blocks {:#x} and {:#x} overlap",
                        dev.core.index, w[0].0, w[1].0
                    ));
                }
            }
            let c = &dev.core.counters;
            if seg_bytes != c.reserved.current() {
                return Err(format!(
                    "device {}: segments hold {seg_bytes} bytes, reserved says {}",
                    dev.core.index,
                    c.reserved.current()
                ));
            }
            if live_bytes != dev.allocated() {
                return Err(format!(
                    "device {}: live blocks hold {live_bytes} bytes, allocated says {}",
                    dev.core.index,
                    dev.allocated()
                ));
            }
            dev.check_pools()?;
            if seg_bytes != live_bytes + free + pending {
                return Err(format!(
                    "device {}: reserved {seg_bytes} != live {live_bytes} + free {free} + pending {pending}",
                    dev.core.index
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sim::SimDriver;

    fn sim(conf: &str) -> (Allocator, Arc<SimDriver>) {
        let c = Config::parse(conf).unwrap();
        let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
        (Allocator::new(c, d.clone()), d)
    }

    /// A miss of `size` bytes on stream `s` while `s` captures asks no event
    /// and no stream, and frees nothing; the capture then ends.
    fn quiet_miss_during_capture(a: &Allocator, d: &SimDriver, s: Stream, size: u64) {
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
    fn own_segments(a: &Allocator, s: Stream, n: u64) -> Vec<u64> {
        (0..n).map(|_| a.malloc(30 << 20, 0, s).unwrap()).collect()
    }

    fn free_all(a: &Allocator, s: Stream, ps: &[u64]) {
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
        a.observer().tick(&a);
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
