//! A stream arena: the segments, blocks, free index and live records of one
//! stream on one device, under one lock.
//!
//! Reuse within the arena needs no events: the stream orders a free before
//! every later use on the same stream. A segment whose blocks are all free is
//! *idle*: it stays in this arena's free index for same-stream reuse, and is
//! also a candidate for adoption by another stream's arena or for release to
//! the driver. Both of those first prove its free complete, only when someone
//! asks: the stream has no work left (`cuStreamQuery`; never on a capturing
//! stream), or else an event recorded on it since the segment went idle has
//! completed. So a block is never handed to another stream before its free
//! is proven complete, and on a GPU, where an event recorded a moment ago is
//! rarely complete yet, an idle stream's segment still changes hands at once.
//!
//! **The stash.** A freed small-pool block is first kept whole in a short
//! per-size LIFO (the stash, at most [`STASH_BLOCKS`] blocks) instead of being
//! coalesced, and a request of exactly its size takes it back without touching
//! the free index: the repeated same-size alloc/free of a training step costs
//! no split and no coalesce. Stashed blocks still count as used in their
//! segment, so the stash is flushed (coalesced into the free index) before
//! every miss, adoption, release and `empty_cache`: it never hides memory from
//! another stream or the driver.

mod proof;
mod vseg;
mod waits;

pub(crate) use proof::ProofPass;
#[cfg(test)]
pub(crate) use proof::EPOCH_SPACING;
pub(crate) use vseg::{Mapping, Plan, VSeg};
pub(crate) use waits::PendingFree;

use super::core::DeviceCore;
use super::tlsf::{Block, BlockState, Blocks, FreeIndex, NIL};
use crate::driver::{Event, Stream};
use crate::live::{now_ms, thread_id, LiveInfo, LiveRecord};
use crate::size_class::{Policy, Pool};
use crate::stats::{ArenaBytes, ArenaCounters};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

/// PyTorch's `MempoolId_t`.
pub type PoolId = (u64, u64);

/// Which private pool an arena serves.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolTag {
    /// A stream's own arena.
    #[default]
    None,
    /// A pool with references (a graph, or a capture under way).
    Live(PoolId),
    /// A pool whose last reference was dropped.
    Released(PoolId),
    /// A drained pool arena, kept for the next pool on its stream.
    Spare,
}

/// A block [`ArenaInner::free`] took back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Freed {
    /// Its (rounded) size.
    pub size: u64,
    /// What its allocation asked for.
    pub requested: u64,
    /// Not reusable yet: it waits for other streams' work or a capture's end.
    pub waits: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub base: u64,
    pub size: u64,
    pub pool: Pool,
    /// First block (lowest address).
    pub first: u32,
    /// Blocks live or pending (not free).
    pub used: u32,
    /// Position in the idle list, or NIL when not idle.
    pub idle_pos: u32,
    /// Event recorded on the arena's stream after the segment became idle.
    pub event: Option<Event>,
    /// When the segment last became idle (coarse ms), for oldest-first trim.
    pub idle_since_ms: u64,
    /// The arena's idle epoch when the segment last became idle: an epoch
    /// event tagged with it or later was recorded after that (see
    /// [`ArenaInner::record_epoch`]).
    pub idle_epoch: u64,
    /// 1 + the epoch in which a free last made the segment idle and was
    /// counted towards [`EPOCH_SPACING`] (0: never): one segment freed
    /// again and again (a large block alone in its segment, in a loop)
    /// counts once per epoch, so it alone never triggers a record.
    counted: u64,
    /// A virtual segment (`expandable_segments:on`; `vseg.rs`): `size` is
    /// its virtual range, its pages are mapped as blocks need them, and it
    /// is never idle (it never changes hands whole).
    pub virt: bool,
    /// Never handed out since the driver gave it (a warm-up reservation,
    /// `reserve.rs`): no stream ever used it, so it has no free to prove
    /// and any stream may adopt it at once.
    pub fresh: bool,
}

/// A segment detached from an arena, in transit to another arena or the driver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Detached {
    pub base: u64,
    pub size: u64,
    pub pool: Pool,
}

/// Most blocks the stash holds.
pub const STASH_BLOCKS: usize = 32;

/// Recently freed small-pool blocks, per exact size, newest first.
#[derive(Debug, Default)]
pub(crate) struct Stash {
    /// (size, block) pairs; small enough that a linear scan beats hashing.
    entries: Vec<(u64, u32)>,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct ArenaInner {
    /// The clock of allocation and idle stamps when a test set one
    /// (`Engine::set_clock`); the real coarse clock otherwise.
    clock: Option<fn() -> u64>,
    stash: Stash,
    blocks: Blocks,
    segs: Vec<Option<Segment>>,
    seg_vacant: Vec<u32>,
    index: [FreeIndex; 2],
    live: FxHashMap<u64, LiveRecord>,
    /// Call sites of the sampled live allocations (`backtrace:N`); empty when off.
    sites: FxHashMap<u64, u32>,
    idle: Vec<u32>,
    pending: Vec<PendingFree>,
    /// Blocks freed while their stream was capturing a CUDA graph (or one
    /// `record_stream` named was): the graph may still use them, so they
    /// stay out of reuse until `empty_cache`, and then wait for the streams
    /// listed with them ([`ArenaInner::release_quarantine`]).
    quarantined: Vec<(u32, Vec<Stream>)>,
    /// Blocks freed during a capture (`pools.rs`) that wait on other
    /// streams (`record_stream`): their events are recorded when the
    /// capture ends ([`ArenaInner::record_deferred`]).
    deferred: Vec<(u32, Vec<Stream>)>,
    pub counters: ArenaCounters,
    seq: u64,
    /// The private pool this arena serves, if any (see `pools.rs`).
    pub pool: PoolTag,
    /// Epoch events: recorded on the arena's stream, oldest first, each
    /// with the epoch it closes ([`ArenaInner::record_epoch`]).
    epochs: Vec<(u64, Event)>,
    /// The current idle epoch, stamped on segments as they become idle.
    epoch: u64,
    /// Segments stamped with an epoch below this are proven free.
    epoch_proven: u64,
    /// Distinct segments frees made idle since the last epoch event (and
    /// mappings of virtual segments made wholly free).
    epoch_open: u32,
    /// The mappings of each virtual segment, by segment slot (`vseg.rs`).
    vsegs: FxHashMap<u32, VSeg>,
    /// The runs of free and unmapped space in virtual segments, per pool:
    /// `(length, start, segment)` to the run's first block (`vseg.rs`).
    runs: [std::collections::BTreeMap<(u64, u64, u32), u32>; 2],
    /// The same runs by start address: `(length, segment, first block)`.
    runs_at: std::collections::BTreeMap<u64, (u64, u32, u32)>,
    /// The arena's large pool lives in virtual segments: the hot path
    /// serves only near-exact fits (the request's own bin), and the slow
    /// path places the rest by best fit (`vseg.rs`).
    pub best_fit: bool,
}

/// One stream's arena on one device.
#[derive(Debug)]
pub struct Arena {
    pub stream: Stream,
    /// A private pool's arena (`pools.rs`), never a stream's own: fixed at
    /// creation, so readable without the lock.
    pub(crate) pooled: bool,
    pub(crate) inner: Mutex<ArenaInner>,
    /// Allocated bytes and peak budget; written only under `inner`'s lock.
    pub(crate) bytes: ArenaBytes,
}

impl Arena {
    /// `clock` stamps allocations and idle segments (see `ArenaInner::clock`).
    pub(crate) fn new(stream: Stream, clock: Option<fn() -> u64>) -> Self {
        Arena {
            stream,
            pooled: false,
            inner: Mutex::new(ArenaInner {
                clock,
                ..ArenaInner::default()
            }),
            bytes: ArenaBytes::default(),
        }
    }

    /// An arena for a private pool's allocations on `stream`.
    pub(crate) fn new_pooled(stream: Stream, clock: Option<fn() -> u64>) -> Self {
        Arena {
            pooled: true,
            ..Arena::new(stream, clock)
        }
    }
}

impl ArenaInner {
    /// Coarse monotonic milliseconds, by this arena's clock.
    #[inline]
    fn now_ms(&self) -> u64 {
        match self.clock {
            None => now_ms(),
            Some(c) => c(),
        }
    }

    pub fn seg(&self, s: u32) -> &Segment {
        self.segs[s as usize].as_ref().expect("segment slot in use")
    }

    fn seg_mut(&mut self, s: u32) -> &mut Segment {
        self.segs[s as usize].as_mut().expect("segment slot in use")
    }

    /// Serve `rounded` bytes from the free index, if a block fits.
    #[inline]
    pub fn try_alloc(
        &mut self,
        rounded: u64,
        requested: u64,
        policy: &Policy,
        dev: &DeviceCore,
    ) -> Option<(u64, u64)> {
        let pool = policy.pool(rounded);
        if pool == Pool::Small {
            if let Some(pos) = self.stash.entries.iter().rposition(|e| e.0 == rounded) {
                let (_, i) = self.stash.entries.swap_remove(pos);
                self.stash.bytes -= rounded;
                return Some(self.hand_out(i, requested));
            }
        }
        let i = if self.best_fit && pool == Pool::Large {
            // Virtual segments: a near-exact fit, else the slow path's best
            // fit over free and unmapped space (vseg.rs).
            self.index[pool as usize].find_own_bin(&self.blocks, rounded)?
        } else {
            self.index[pool as usize].find(&self.blocks, rounded)?
        };
        // (`huge_split` first: the default path loads no segment.)
        if !policy.huge_split && pool == Pool::Large && {
            let b = self.blocks.get(i);
            let seg = self.seg(b.seg);
            !seg.virt && !policy.may_serve(pool, seg.size, b.size, rounded)
        } {
            // A whole-handed block far too big (`huge_split:off`): a miss;
            // the slow path releases it if idle and grows.
            return None;
        }
        Some(self.take_block(i, rounded, requested, pool, policy, dev))
    }

    /// Hand out free block `i` for a request of `rounded` bytes, splitting off
    /// the rest when the policy says so.
    fn take_block(
        &mut self,
        i: u32,
        rounded: u64,
        requested: u64,
        pool: Pool,
        policy: &Policy,
        dev: &DeviceCore,
    ) -> (u64, u64) {
        let virt = self.best_fit && self.seg(self.blocks.get(i).seg).virt;
        if virt {
            self.vm_run_forget(i);
        }
        self.index[pool as usize].remove(&mut self.blocks, i);
        let b = *self.blocks.get(i);
        let whole = !policy.huge_split && {
            let seg = self.seg(b.seg);
            !seg.virt && policy.whole(pool, seg.size)
        };
        // In a virtual segment a large block splits whatever the rest: a
        // sliver there coalesces on the next free, and the pages under it
        // can move (torch's rule keeps slivers out of classic segments).
        if !whole
            && (policy.should_split(pool, b.size, rounded)
                || (pool == Pool::Large && b.size > rounded && self.seg(b.seg).virt))
        {
            let rest = Block {
                addr: b.addr + rounded,
                size: b.size - rounded,
                seg: b.seg,
                prev: i,
                next: b.next,
                free_prev: NIL,
                free_next: NIL,
                state: BlockState::Free,
            };
            let r = self.blocks.insert(rest);
            if b.next != NIL {
                self.blocks.get_mut(b.next).prev = r;
            }
            let bm = self.blocks.get_mut(i);
            bm.size = rounded;
            bm.next = r;
            self.index[pool as usize].insert(&mut self.blocks, r);
        }
        let seg = self.blocks.get(i).seg;
        self.seg_used_inc(seg, dev);
        let out = self.hand_out(i, requested);
        if virt {
            self.vm_runs_beside(i);
        }
        out
    }

    /// Make block `i` (already counted as used in its segment) live.
    #[inline]
    fn hand_out(&mut self, i: u32, requested: u64) -> (u64, u64) {
        let bm = self.blocks.get_mut(i);
        bm.state = BlockState::Live;
        let (addr, size) = (bm.addr, bm.size);
        self.seq += 1;
        let rec = LiveRecord {
            block: i,
            requested,
            seq: self.seq,
            time_ms: self.now_ms(),
            thread: thread_id(),
            streams: Vec::new(),
        };
        self.live.insert(addr, rec);
        self.counters.allocs += 1;
        self.counters.live += 1;
        self.counters.requested += requested;
        (addr, size)
    }

    fn seg_used_inc(&mut self, s: u32, dev: &DeviceCore) {
        let seg = self.seg_mut(s);
        seg.used += 1;
        seg.fresh = false;
        if seg.used == 1 && seg.idle_pos != NIL {
            let pos = seg.idle_pos;
            let ev = seg.event.take();
            seg.idle_pos = NIL;
            self.idle_remove(pos);
            if let Some(e) = ev {
                dev.put_event(e);
            }
        }
    }

    fn idle_remove(&mut self, pos: u32) {
        self.idle.swap_remove(pos as usize);
        if let Some(&moved) = self.idle.get(pos as usize) {
            self.seg_mut(moved).idle_pos = pos;
        }
    }

    fn make_idle(&mut self, s: u32) {
        if self.seg(s).virt {
            return;
        }
        let pos = self.idle.len() as u32;
        self.idle.push(s);
        let (epoch, now) = (self.epoch, self.now_ms());
        let seg = self.seg_mut(s);
        debug_assert_eq!(seg.idle_pos, NIL);
        seg.idle_pos = pos;
        seg.idle_since_ms = now;
        seg.idle_epoch = epoch;
    }

    /// A new segment slot over `[base, base + size)` of `pool`, holding one
    /// block: free in a classic segment, a hole in a virtual one (`virt`).
    /// Returns the slot and the block; the caller indexes the block.
    fn new_segment(&mut self, base: u64, size: u64, pool: Pool, virt: bool) -> (u32, u32) {
        let s = match self.seg_vacant.pop() {
            Some(s) => s,
            None => {
                self.segs.push(None);
                (self.segs.len() - 1) as u32
            }
        };
        let b = self.blocks.insert(Block {
            addr: base,
            size,
            seg: s,
            prev: NIL,
            next: NIL,
            free_prev: NIL,
            free_next: NIL,
            state: if virt {
                BlockState::Hole
            } else {
                BlockState::Free
            },
        });
        self.segs[s as usize] = Some(Segment {
            base,
            size,
            pool,
            first: b,
            used: 0,
            idle_pos: NIL,
            event: None,
            idle_since_ms: 0,
            idle_epoch: 0,
            counted: 0,
            virt,
            fresh: false,
        });
        (s, b)
    }

    /// Add a segment as one free block; it is idle until something is taken from it.
    pub fn attach(&mut self, d: Detached) -> u32 {
        let (s, b) = self.new_segment(d.base, d.size, d.pool, false);
        self.index[d.pool as usize].insert(&mut self.blocks, b);
        self.make_idle(s);
        self.debug_check();
        s
    }

    /// [`ArenaInner::attach`] a segment the driver just gave and nobody
    /// used yet: marked fresh (see [`Segment::fresh`]).
    pub fn attach_fresh(&mut self, d: Detached) -> u32 {
        let s = self.attach(d);
        self.seg_mut(s).fresh = true;
        s
    }

    /// Allocate from a segment just attached (it has one free block).
    pub fn alloc_from_segment(
        &mut self,
        s: u32,
        rounded: u64,
        requested: u64,
        policy: &Policy,
        dev: &DeviceCore,
    ) -> (u64, u64) {
        let seg = *self.seg(s);
        self.take_block(seg.first, rounded, requested, seg.pool, policy, dev)
    }

    /// Take idle segment `s` out of this arena. Its event, if any, goes back to the pool.
    pub fn detach(&mut self, s: u32, dev: &DeviceCore) -> Detached {
        let seg = *self.seg(s);
        debug_assert!(seg.used == 0 && seg.idle_pos != NIL);
        self.idle_remove(seg.idle_pos);
        self.index[seg.pool as usize].remove(&mut self.blocks, seg.first);
        self.blocks.remove(seg.first);
        self.segs[s as usize] = None;
        self.seg_vacant.push(s);
        if let Some(e) = seg.event {
            dev.put_event(e);
        }
        Detached {
            base: seg.base,
            size: seg.size,
            pool: seg.pool,
        }
    }

    /// Free `ptr` if this arena holds it live, returning the block's sizes.
    /// `None` when it does not.
    /// `quarantine` is asked only when the pointer is found: a true answer
    /// (the stream is capturing a graph) keeps the block out of reuse until
    /// [`ArenaInner::release_quarantine`]. (A private pool's arena answers
    /// false: its block goes back to the pool even during a capture, where
    /// only the pool's later allocations, ordered by the graph or by the
    /// captures sharing the pool, can reuse it.)
    #[inline(always)]
    pub fn free(
        &mut self,
        ptr: u64,
        dev: &DeviceCore,
        quarantine: impl FnOnce() -> bool,
    ) -> Option<Freed> {
        let rec = self.live.remove(&ptr)?;
        if !self.sites.is_empty() {
            self.sites.remove(&ptr);
        }
        let size = self.blocks.get(rec.block).size;
        self.counters.frees += 1;
        self.counters.live -= 1;
        self.counters.requested -= rec.requested;
        if quarantine() {
            self.quarantine(rec.block, rec.streams, dev);
            return Some(Freed {
                size,
                requested: rec.requested,
                waits: true,
            });
        }
        let waits = !rec.streams.is_empty();
        if !waits {
            // Small pool (see `DeviceCore::small_max`), without loading the segment.
            debug_assert_eq!(
                size <= dev.small_max,
                self.seg(self.blocks.get(rec.block).seg).pool == Pool::Small
            );
            if size <= dev.small_max {
                if self.stash.entries.len() == STASH_BLOCKS {
                    // Full: the oldest goes to the free index.
                    let (_, old) = self.stash.entries.remove(0);
                    self.stash.bytes -= self.blocks.get(old).size;
                    self.release_block(old);
                }
                self.blocks.get_mut(rec.block).state = BlockState::Stashed;
                self.stash.entries.push((size, rec.block));
                self.stash.bytes += size;
            } else {
                self.release_block(rec.block);
            }
        } else {
            self.free_recorded(rec.block, rec.streams, dev);
        }
        Some(Freed {
            size,
            requested: rec.requested,
            waits,
        })
    }

    /// Coalesce every stashed block into the free index. Returns whether
    /// there was anything to flush.
    pub fn flush_stash(&mut self) -> bool {
        if self.stash.entries.is_empty() {
            return false;
        }
        for (_, i) in std::mem::take(&mut self.stash.entries) {
            self.release_block(i);
        }
        self.stash.bytes = 0;
        self.debug_check();
        true
    }

    /// Return block `i` to the free index, coalescing with free neighbours.
    fn release_block(&mut self, mut i: u32) {
        let b = *self.blocks.get(i);
        let seg = self.seg(b.seg);
        let pool = seg.pool as usize;
        let virt = seg.virt;
        if virt {
            self.vm_note_free(b.seg, b.addr, b.size);
            self.vm_runs_forget_beside(i);
        }
        let prev = b.prev;
        if prev != NIL && self.blocks.get(prev).state == BlockState::Free {
            self.index[pool].remove(&mut self.blocks, prev);
            let next = b.next;
            let p = self.blocks.get_mut(prev);
            p.size += b.size;
            p.next = next;
            if next != NIL {
                self.blocks.get_mut(next).prev = prev;
            }
            self.blocks.remove(i);
            i = prev;
        }
        let next = self.blocks.get(i).next;
        if next != NIL && self.blocks.get(next).state == BlockState::Free {
            self.index[pool].remove(&mut self.blocks, next);
            let n = *self.blocks.get(next);
            let c = self.blocks.get_mut(i);
            c.size += n.size;
            c.next = n.next;
            if n.next != NIL {
                self.blocks.get_mut(n.next).prev = i;
            }
            self.blocks.remove(next);
        }
        self.index[pool].insert(&mut self.blocks, i);
        if virt {
            self.vm_run_note(i);
        }
        let s = b.seg;
        let seg = self.seg_mut(s);
        seg.used -= 1;
        if seg.used == 0 && !seg.virt {
            self.make_idle(s);
            let epoch = self.epoch + 1;
            let seg = self.seg_mut(s);
            if seg.counted != epoch {
                seg.counted = epoch;
                // Saturating: arenas that never record (pools) never reset it.
                self.epoch_open = self.epoch_open.saturating_add(1);
            }
        }
    }

    /// Bytes in free blocks of both pools.
    pub fn free_bytes(&self) -> u64 {
        self.index[0].free_bytes + self.index[1].free_bytes + self.stash.bytes
    }

    /// Bytes in blocks waiting on `record_stream` events.
    pub fn pending_bytes(&self) -> u64 {
        let pending: u64 = self
            .pending
            .iter()
            .map(|p| self.blocks.get(p.block).size)
            .sum();
        pending
            + self
                .quarantined
                .iter()
                .chain(&self.deferred)
                .map(|(i, _)| i)
                .map(|&i| self.blocks.get(i).size)
                .sum::<u64>()
    }

    /// The largest free block of `pool` in the free index.
    pub fn largest_free(&self, pool: Pool) -> u64 {
        self.index[pool as usize].largest(&self.blocks)
    }

    /// Free bytes of `pool`: its free index, and for the small pool the
    /// stash's blocks too.
    pub fn pool_free_bytes(&self, pool: Pool) -> u64 {
        let stash = if pool == Pool::Small {
            self.stash.bytes
        } else {
            0
        };
        self.index[pool as usize].free_bytes + stash
    }

    /// The idle segments, oldest position first.
    pub fn idle_segments(&self) -> &[u32] {
        &self.idle
    }

    /// Whether frees wait for other streams' events (`record_stream`).
    #[inline]
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether frees wait for a pool's capture to end.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// The rounded size of live allocation `ptr`.
    pub fn live_size(&self, ptr: u64) -> Option<u64> {
        self.live.get(&ptr).map(|r| self.blocks.get(r.block).size)
    }

    /// Make the free of live `ptr` also wait for `stream` (`record_stream`);
    /// `own` is the arena's stream. `None` when `ptr` is not live here.
    pub fn record_stream(&mut self, ptr: u64, stream: Stream, own: Stream) -> Option<()> {
        let rec = self.live.get_mut(&ptr)?;
        if stream != own && !rec.streams.contains(&stream) {
            rec.streams.push(stream);
        }
        Some(())
    }

    /// Stamp live `ptr` with call site `site`. `None` when not live here.
    pub fn stamp_site(&mut self, ptr: u64, site: u32) -> Option<()> {
        self.live.contains_key(&ptr).then(|| {
            self.sites.insert(ptr, site);
        })
    }

    /// Every segment (snapshots walk them).
    pub fn segments(&self) -> impl Iterator<Item = &Segment> + '_ {
        self.segs.iter().flatten()
    }

    /// The blocks of `seg` (one of this arena's), lowest address first.
    pub fn blocks_of<'a>(&'a self, seg: &Segment) -> impl Iterator<Item = &'a Block> + 'a {
        let mut i = seg.first;
        std::iter::from_fn(move || {
            (i != NIL).then(|| {
                let b = self.blocks.get(i);
                i = b.next;
                b
            })
        })
    }

    /// What live `ptr` asked for.
    pub fn live_requested(&self, ptr: u64) -> Option<u64> {
        self.live.get(&ptr).map(|r| r.requested)
    }

    /// The segment whose range holds `addr`, if any.
    pub fn segment_holding(&self, addr: u64) -> Option<u32> {
        self.segs
            .iter()
            .position(|s| {
                s.as_ref()
                    .is_some_and(|s| addr >= s.base && addr - s.base < s.size)
            })
            .map(|i| i as u32)
    }

    /// Bytes of device memory the segments hold: a classic segment's size,
    /// a virtual segment's mapped bytes.
    pub fn segment_bytes(&self) -> u64 {
        self.segs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.as_ref()?)))
            .map(|(i, s)| {
                if s.virt {
                    self.vsegs.get(&(i as u32)).map_or(0, |v| v.mapped)
                } else {
                    s.size
                }
            })
            .sum()
    }

    /// Segments held (every vacant slot is in `seg_vacant`).
    pub fn segment_count(&self) -> u64 {
        (self.segs.len() - self.seg_vacant.len()) as u64
    }

    pub fn live_infos(&self, device: usize, stream: Stream, out: &mut Vec<LiveInfo>) {
        for (&ptr, r) in &self.live {
            out.push(LiveInfo {
                ptr,
                size: self.blocks.get(r.block).size,
                requested: r.requested,
                device,
                stream,
                seq: r.seq,
                time_ms: r.time_ms,
                thread: r.thread,
                site: self.sites.get(&ptr).copied().unwrap_or(0),
            });
        }
    }

    /// In debug builds, walk this arena and panic on a broken invariant. Run
    /// after every slow-path change (attach, detach, stash flush); the panic
    /// boundary turns a failure into `CUDALLOC_ERR_PANIC` at the C ABI.
    #[inline]
    pub fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if let Err(e) = self.check() {
            panic!("cudalloc invariant broken: {e}");
        }
    }

    /// Check this arena's structure. Returns the live block ranges.
    pub fn check(&self) -> Result<Vec<(u64, u64)>, String> {
        self.index[0].check(&self.blocks)?;
        self.index[1].check(&self.blocks)?;
        let mut live_ranges = Vec::new();
        let mut blocks_seen = 0usize;
        for (s, seg) in self.segs.iter().enumerate() {
            let Some(seg) = seg else { continue };
            let (mut i, mut at, mut prev, mut used) = (seg.first, seg.base, NIL, 0u32);
            let mut prev_free = false;
            while i != NIL {
                let b = self.blocks.get(i);
                blocks_seen += 1;
                if b.addr != at
                    || b.seg as usize != s
                    || b.prev != prev
                    || b.size == 0
                    || b.size % 512 != 0
                {
                    return Err(format!(
                        "segment {:#x}: block {i} at {:#x} breaks the chain",
                        seg.base, b.addr
                    ));
                }
                match b.state {
                    BlockState::Free if prev_free => {
                        return Err(format!(
                            "segment {:#x}: adjacent free blocks not coalesced",
                            seg.base
                        ))
                    }
                    BlockState::Free => {}
                    BlockState::Live => {
                        used += 1;
                        match self.live.get(&b.addr) {
                            Some(r) if r.block == i => live_ranges.push((b.addr, b.size)),
                            _ => {
                                return Err(format!("live block {:#x} has no live record", b.addr))
                            }
                        }
                    }
                    BlockState::Pending => used += 1,
                    BlockState::Stashed => {
                        used += 1;
                        if !self.stash.entries.iter().any(|e| e.1 == i && e.0 == b.size) {
                            return Err(format!("stashed block {:#x} is not in the stash", b.addr));
                        }
                    }
                    BlockState::Hole if !seg.virt => {
                        return Err(format!(
                            "segment {:#x}: a hole in a classic segment",
                            seg.base
                        ))
                    }
                    BlockState::Hole => {}
                    BlockState::Vacant => return Err("vacant block in a segment chain".into()),
                }
                prev_free = b.state == BlockState::Free;
                at += b.size;
                prev = i;
                i = b.next;
            }
            if at != seg.base + seg.size {
                return Err(format!(
                    "segment {:#x}: blocks cover {} of {} bytes",
                    seg.base,
                    at - seg.base,
                    seg.size
                ));
            }
            if seg.virt {
                self.vm_check(s as u32)?;
            }
            if used != seg.used || (used == 0 && !seg.virt) != (seg.idle_pos != NIL) {
                return Err(format!(
                    "segment {:#x}: used count {} vs {used}, idle {}",
                    seg.base, seg.used, seg.idle_pos
                ));
            }
            if seg.idle_pos != NIL && self.idle.get(seg.idle_pos as usize) != Some(&(s as u32)) {
                return Err(format!("segment {:#x}: idle list position wrong", seg.base));
            }
        }
        if !self.vsegs.is_empty() || self.runs.iter().any(|r| !r.is_empty()) {
            self.vm_check_runs()?;
        }
        if self.stash.bytes != self.stash.entries.iter().map(|e| e.0).sum::<u64>() {
            return Err("stash byte count drifted".into());
        }
        if blocks_seen != self.blocks.occupied().count() {
            return Err("blocks exist outside every segment chain".into());
        }
        if live_ranges.len() != self.live.len() || self.counters.live != self.live.len() as u64 {
            return Err("live records and live blocks disagree".into());
        }
        let requested: u64 = self.live.values().map(|r| r.requested).sum();
        if requested != self.counters.requested {
            return Err("requested-bytes counter drifted".into());
        }
        Ok(live_ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::driver::sim::SimDriver;
    use crate::driver::Driver;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    /// An arena's parts over a simulated device: the arena, its device
    /// core, the default policy and the driver (manual events when asked).
    fn parts(manual: bool) -> (ArenaInner, DeviceCore, Policy, Arc<SimDriver>) {
        let c = Config::parse("backend:sim,sim_memory:1GiB").unwrap();
        let d = Arc::new(SimDriver::new(1, c.sim_memory));
        d.set_manual_events(manual);
        let core = DeviceCore::new(0, d.clone(), c.small_max);
        (ArenaInner::default(), core, Policy::from_config(&c), d)
    }

    /// A new segment of `size` bytes of `pool` from the driver, attached.
    fn segment(a: &mut ArenaInner, d: &SimDriver, size: u64, pool: Pool) -> (u32, u64) {
        let base = d.mem_alloc(0, size).unwrap();
        (a.attach(Detached { base, size, pool }), base)
    }

    fn alloc(a: &mut ArenaInner, core: &DeviceCore, p: &Policy, size: u64) -> u64 {
        let r = crate::size_class::round_size(size).unwrap();
        a.try_alloc(r, size, p, core).expect("a block fits").0
    }

    fn free(a: &mut ArenaInner, core: &DeviceCore, ptr: u64) -> Freed {
        a.free(ptr, core, || false).expect("live")
    }

    /// Blocks are carved from the segment's start, in address order, and
    /// freed neighbours coalesce back into one block: the segment is idle
    /// again, whole.
    #[test]
    fn carve_then_coalesce_back_to_one_idle_segment() {
        let (mut a, core, p, d) = parts(false);
        let (s, base) = segment(&mut a, &d, 2 * MIB, Pool::Small);
        assert_eq!(a.idle, vec![s], "a new segment is idle");
        let x = alloc(&mut a, &core, &p, 512);
        let y = alloc(&mut a, &core, &p, 1000);
        let z = alloc(&mut a, &core, &p, 512);
        assert_eq!((x, y, z), (base, base + 512, base + 1536));
        assert!(a.idle.is_empty(), "a segment in use is not idle");
        assert_eq!(free(&mut a, &core, y).requested, 1000);
        for q in [x, z] {
            free(&mut a, &core, q);
        }
        a.flush_stash();
        a.check().unwrap();
        assert_eq!(a.idle, vec![s]);
        assert_eq!(a.index[Pool::Small as usize].largest(&a.blocks), 2 * MIB);
        assert_eq!(a.free_bytes(), 2 * MIB);
        assert!(
            a.free(x, &core, || false).is_none(),
            "a double free is refused"
        );
    }

    /// A freed small block waits whole in the stash: a request of exactly
    /// its size takes it back, another size does not; a full stash sends
    /// its oldest block to the free index, and a flush empties it.
    #[test]
    fn the_stash_serves_exact_sizes_and_flushes() {
        let (mut a, core, p, d) = parts(false);
        segment(&mut a, &d, 2 * MIB, Pool::Small);
        let x = alloc(&mut a, &core, &p, 4096);
        free(&mut a, &core, x);
        assert_eq!(a.stash.bytes, 4096);
        let y = alloc(&mut a, &core, &p, 8192);
        assert_ne!(y, x, "another size is carved afresh");
        assert_eq!(
            alloc(&mut a, &core, &p, 4096),
            x,
            "the same size takes it back"
        );
        assert_eq!(a.stash.bytes, 0);
        let ps: Vec<u64> = (0..STASH_BLOCKS + 1)
            .map(|_| alloc(&mut a, &core, &p, 512))
            .collect();
        for &q in &ps {
            free(&mut a, &core, q);
        }
        assert_eq!(
            a.stash.bytes,
            STASH_BLOCKS as u64 * 512,
            "at most STASH_BLOCKS"
        );
        assert!(a.flush_stash());
        assert_eq!(a.stash.bytes, 0);
        assert!(!a.flush_stash(), "nothing left to flush");
        a.check().unwrap();
    }

    /// Large blocks split only when more than `small_max` would be left
    /// (torch's rule): the rest of a 20 MiB segment after 19 MiB stays with
    /// the block.
    #[test]
    fn large_blocks_split_only_past_small_max() {
        let (mut a, core, p, d) = parts(false);
        let (_, base) = segment(&mut a, &d, 20 * MIB, Pool::Large);
        let x = alloc(&mut a, &core, &p, 19 * MIB);
        assert_eq!(x, base);
        assert_eq!(free(&mut a, &core, x).size, 20 * MIB, "not split");
        let y = alloc(&mut a, &core, &p, 18 * MIB);
        assert_eq!(free(&mut a, &core, y).size, 18 * MIB, "split");
        a.check().unwrap();
    }

    /// After EPOCH_SPACING distinct segments go idle an epoch event is due;
    /// once recorded and complete it proves every segment idle before it,
    /// while the stream itself proves nothing (it is busy).
    #[test]
    fn an_epoch_event_proves_the_segments_idle_before_it() {
        let (mut a, core, p, d) = parts(true);
        let stream = 0x10;
        let mut segs = Vec::new();
        let mut ptrs = Vec::new();
        for _ in 0..EPOCH_SPACING {
            let (s, _) = segment(&mut a, &d, 20 * MIB, Pool::Large);
            segs.push(s);
            ptrs.push(alloc(&mut a, &core, &p, 20 * MIB));
        }
        for (i, q) in ptrs.into_iter().enumerate() {
            assert!(!a.epoch_due(), "due after {i} idle segments");
            free(&mut a, &core, q);
        }
        assert!(a.epoch_due());
        a.record_epoch(stream, &core);
        assert!(!a.epoch_due());
        let proven = |a: &mut ArenaInner| {
            let mut pass = ProofPass::default();
            segs.iter()
                .filter(|&&s| a.idle_free_complete(s, stream, &core, &mut pass))
                .count()
        };
        assert_eq!(proven(&mut a), 0, "the epoch event is pending");
        d.complete_stream(0, stream);
        assert_eq!(proven(&mut a), segs.len(), "all proven by one event");
        a.check().unwrap();
    }
}
