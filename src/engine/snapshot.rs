//! Memory snapshots in the shape of PyTorch's `torch.cuda.memory._snapshot()`:
//! every segment of every device with its blocks, and, while history is
//! switched on, a bounded history of the allocator's actions per device
//! (PyTorch's `_record_memory_history`). `observe::export::snapshot_json`
//! writes it in torch's format; torch's viewer (`torch.cuda._memory_viz`,
//! pytorch.org/memory_viz) reads it.
//!
//! **The walk.** [`Engine::snapshot`] takes a device's slow-path lock (no
//! segment comes from or goes back to the driver, none changes arena) and
//! then every arena lock of the device at once, so the segments and the
//! history it copies are one consistent state: the history's last action
//! for each address is what the segments show. (Nothing holds two arena
//! locks of a device without its slow-path lock, so this cannot deadlock.)
//!
//! **Block states**, in torch's three:
//! - live: `active_allocated`;
//! - freed but waiting for other streams' work (`record_stream`), for a
//!   capture to end (quarantine) or for a pool's capture (deferred):
//!   `active_pending_free`, as torch shows a block waiting on its events;
//! - free in the free index, and *stashed* (freed, kept whole for an exact
//!   size on the same stream, see `arena`): `inactive`. A stashed block is
//!   free to the user and reusable; only its coalescing is deferred, so a
//!   snapshot may show two `inactive` blocks side by side where torch's
//!   would have merged them. [`BlockStatus`] keeps the distinction.
//!
//! **The history** (off by default). Each device keeps a ring of at most
//! `max_entries` [`TraceEntry`]s, newest last, recorded under the lock that
//! decides the action (the block's arena lock; the slow-path lock for
//! segments), so each address's actions are in the engine's order. When
//! off, the hot path pays one relaxed load and a branch ([`History::on`]).
//! Switching it off drops what was recorded, as torch does.
//!
//! - `alloc` (requested bytes), `free_requested` and `free_completed` (the
//!   requested bytes of the allocation): a free that waits on other
//!   streams completes when they are proven done; any other free completes
//!   at once.
//! - `segment_alloc` / `segment_free`: a segment from / back to the driver.
//!   A segment that another stream adopts keeps its address and changes only
//!   its stream: there is no driver call, so no action (torch's segments
//!   never change streams; the snapshot shows the current one).
//! - `oom`: an allocation failed; `device_free` is the driver's free memory
//!   then (0 when it could not be asked, as during a graph capture).
//! - `snapshot`: a snapshot was handed out (size: the active bytes); unlike
//!   torch's, a snapshot's own mark is in the next one's history
//!   ([`Engine::mark_snapshot`]).

use super::arena::PoolTag;
use super::device::Device;
use super::tlsf::BlockState;
use super::{Engine, PoolId};
use crate::driver::Stream;
use crate::size_class::Pool;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a block is, in cudalloc's terms (see the module docs for torch's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// Handed out.
    Allocated,
    /// Freed by the user, waiting on other streams or a capture.
    PendingFree,
    /// In the free index.
    Free,
    /// Freed and stashed for an exact-size reuse on the same stream.
    Stashed,
}

impl BlockStatus {
    /// Torch's name: `active_allocated`, `active_pending_free` or `inactive`.
    pub fn torch_state(self) -> &'static str {
        match self {
            BlockStatus::Allocated => "active_allocated",
            BlockStatus::PendingFree => "active_pending_free",
            BlockStatus::Free | BlockStatus::Stashed => "inactive",
        }
    }

    /// Allocated or waiting to be free (torch's *active*).
    pub fn active(self) -> bool {
        matches!(self, BlockStatus::Allocated | BlockStatus::PendingFree)
    }
}

/// One block of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    pub address: u64,
    /// Its (rounded) size.
    pub size: u64,
    /// What its allocation asked for: exact for an allocated block; the
    /// rounded size for one pending free (the request is forgotten at the
    /// free); 0 for a free or stashed one.
    pub requested_size: u64,
    pub status: BlockStatus,
}

/// One segment (one driver allocation) and its blocks, lowest address first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub device: usize,
    pub address: u64,
    pub total_size: u64,
    /// The stream of the arena holding it now.
    pub stream: Stream,
    pub pool: Pool,
    /// The private pool (PyTorch's graph pools) it serves; (0, 0) for none.
    pub pool_id: PoolId,
    pub blocks: Vec<BlockInfo>,
}

impl SegmentInfo {
    /// Bytes in allocated blocks.
    pub fn allocated_size(&self) -> u64 {
        self.sum(|b| b.status == BlockStatus::Allocated, |b| b.size)
    }

    /// Bytes in allocated blocks and blocks pending free.
    pub fn active_size(&self) -> u64 {
        self.sum(|b| b.status.active(), |b| b.size)
    }

    /// What the active blocks asked for (torch sums it the same way).
    pub fn requested_size(&self) -> u64 {
        self.sum(|b| b.status.active(), |b| b.requested_size)
    }

    fn sum(&self, keep: impl Fn(&BlockInfo) -> bool, f: impl Fn(&BlockInfo) -> u64) -> u64 {
        self.blocks.iter().filter(|b| keep(b)).map(f).sum()
    }
}

/// An action of the history, by torch's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceAction {
    Alloc,
    FreeRequested,
    FreeCompleted,
    SegmentAlloc,
    SegmentFree,
    Oom,
    Snapshot,
}

impl TraceAction {
    pub fn name(self) -> &'static str {
        match self {
            TraceAction::Alloc => "alloc",
            TraceAction::FreeRequested => "free_requested",
            TraceAction::FreeCompleted => "free_completed",
            TraceAction::SegmentAlloc => "segment_alloc",
            TraceAction::SegmentFree => "segment_free",
            TraceAction::Oom => "oom",
            TraceAction::Snapshot => "snapshot",
        }
    }
}

/// One recorded action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    pub action: TraceAction,
    /// The address; for `oom`, the driver's free bytes (torch's
    /// `device_free`); 0 for `snapshot`.
    pub addr: u64,
    pub size: u64,
    pub stream: Stream,
    /// Microseconds since the Unix epoch.
    pub time_us: u64,
}

/// Every segment of every device, and each device's history.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// By device, then address.
    pub segments: Vec<SegmentInfo>,
    /// One list per device, oldest first (empty while history is off).
    pub device_traces: Vec<Vec<TraceEntry>>,
}

/// A device's history of actions (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct History {
    /// Switched on: the hot path's only look.
    on: AtomicBool,
    /// Boxed: cold, and kept out of the device's hot lines.
    log: Box<Mutex<Log>>,
}

#[derive(Debug, Default)]
struct Log {
    entries: VecDeque<TraceEntry>,
    /// Most entries kept; 0 while off.
    max: usize,
    /// Frees requested and not yet completed, with their blocks' streams
    /// (the completion is found without its arena's stream).
    pending: FxHashMap<u64, Stream>,
}

/// Entries allocated up front at most, whatever `max_entries` says.
const INITIAL_CAPACITY: usize = 4096;

impl History {
    /// Whether actions are being recorded. Checked before every record.
    #[inline(always)]
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Switch recording on, keeping at most `max_entries` (at least 1), or
    /// off (dropping what was recorded). `clear` drops it when switching on.
    pub fn set(&self, on: bool, max_entries: usize, clear: bool) {
        let mut log = self.log.lock();
        if !on || clear {
            *log = Log::default();
        }
        if on {
            log.max = max_entries.max(1);
            while log.entries.len() > log.max {
                log.entries.pop_front();
            }
            let want = log.max.min(INITIAL_CAPACITY);
            let have = log.entries.len();
            log.entries.reserve(want.saturating_sub(have));
        }
        self.on.store(on, Ordering::Relaxed);
    }

    /// Record `action` (only while on; a switch-off raced with is honoured).
    #[cold]
    pub fn record(&self, action: TraceAction, addr: u64, size: u64, stream: Stream) {
        let mut log = self.log.lock();
        log.push(action, addr, size, stream);
    }

    /// A free of `addr` (`requested` bytes asked for, on `stream`) was
    /// requested; with `waits`, it completes later ([`History::completed`]).
    #[cold]
    pub fn freed(&self, addr: u64, requested: u64, stream: Stream, waits: bool) {
        let mut log = self.log.lock();
        log.push(TraceAction::FreeRequested, addr, requested, stream);
        if waits {
            if log.max > 0 {
                log.pending.insert(addr, stream);
            }
        } else {
            log.push(TraceAction::FreeCompleted, addr, requested, stream);
        }
    }

    /// The waiting free of the block at `addr` (`size` bytes) completed.
    #[cold]
    pub fn completed(&self, addr: u64, size: u64) {
        let mut log = self.log.lock();
        // A free requested before recording began has no stream on record.
        let stream = log.pending.remove(&addr).unwrap_or(0);
        log.push(TraceAction::FreeCompleted, addr, size, stream);
    }

    /// The recorded actions, oldest first.
    pub fn entries(&self) -> Vec<TraceEntry> {
        self.log.lock().entries.iter().copied().collect()
    }
}

impl Log {
    fn push(&mut self, action: TraceAction, addr: u64, size: u64, stream: Stream) {
        if self.max == 0 {
            return;
        }
        if self.entries.len() == self.max {
            self.entries.pop_front();
        }
        self.entries.push_back(TraceEntry {
            action,
            addr,
            size,
            stream,
            time_us: now_us(),
        });
    }
}

/// Microseconds since the Unix epoch (torch's `time_us`).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Engine {
    /// Every segment and block of every device, and each device's history
    /// (see the module docs). Records nothing ([`Engine::mark_snapshot`] does).
    pub fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::default();
        for dev in &self.devices {
            let _slow = dev.slow.lock();
            let arenas = dev.arena_list();
            let guards: Vec<_> = arenas.iter().map(|a| a.inner.lock()).collect();
            let first = out.segments.len();
            for (a, inner) in arenas.iter().zip(&guards) {
                let pool_id = match inner.pool {
                    PoolTag::Live(id) | PoolTag::Released(id) => id,
                    PoolTag::None | PoolTag::Spare => (0, 0),
                };
                for seg in inner.segments() {
                    // A virtual segment shows as one segment per mapped
                    // stretch: its holes have no memory behind them.
                    let mut runs: Vec<(u64, Vec<BlockInfo>)> = Vec::new();
                    let mut in_run = false;
                    for b in inner.blocks_of(seg) {
                        let (status, requested_size) = match b.state {
                            BlockState::Hole => {
                                in_run = false;
                                continue;
                            }
                            BlockState::Live => (
                                BlockStatus::Allocated,
                                inner.live_requested(b.addr).unwrap_or(b.size),
                            ),
                            BlockState::Pending => (BlockStatus::PendingFree, b.size),
                            BlockState::Stashed => (BlockStatus::Stashed, 0),
                            BlockState::Free | BlockState::Vacant => (BlockStatus::Free, 0),
                        };
                        if !in_run {
                            runs.push((b.addr, Vec::new()));
                            in_run = true;
                        }
                        runs.last_mut().expect("just pushed").1.push(BlockInfo {
                            address: b.addr,
                            size: b.size,
                            requested_size,
                            status,
                        });
                    }
                    for (address, blocks) in runs {
                        out.segments.push(SegmentInfo {
                            device: dev.core.index,
                            address,
                            total_size: blocks.iter().map(|b| b.size).sum(),
                            stream: a.stream,
                            pool: seg.pool,
                            pool_id,
                            blocks,
                        });
                    }
                }
            }
            out.segments[first..].sort_unstable_by_key(|s| s.address);
            out.device_traces.push(dev.core.history.entries());
        }
        out
    }

    /// Record a `snapshot` action (size: the active bytes) where history is
    /// on, for snapshot `s` just handed to a user: later snapshots' histories
    /// show when it was taken. (Torch's own snapshot holds its own mark; this
    /// one's is in the next, so that a size query followed by the real read
    /// sees the same text.)
    pub fn mark_snapshot(&self, s: &Snapshot) {
        for dev in &self.devices {
            let h = &dev.core.history;
            if h.on() {
                let active = s
                    .segments
                    .iter()
                    .filter(|x| x.device == dev.core.index)
                    .map(SegmentInfo::active_size)
                    .sum();
                h.record(TraceAction::Snapshot, 0, active, 0);
            }
        }
    }

    /// Switch every device's history on (keeping at most `max_entries`
    /// actions each) or off (dropping them); `clear` drops them when
    /// switching on. Torch's `_record_memory_history(enabled, max_entries=,
    /// clear_history=)`.
    pub fn record_history(&self, on: bool, max_entries: usize, clear: bool) {
        for dev in &self.devices {
            dev.core.history.set(on, max_entries, clear);
        }
        self.observed
            .store(self.journal.is_some() || on, Ordering::Relaxed);
    }

    /// Record the `oom` of a request of `size` bytes on `stream`, where
    /// history is on (asks the driver for its free memory).
    pub(super) fn history_oom(&self, dev: &Device, size: u64, stream: Stream) {
        if dev.core.history.on() {
            let free = match self.mem_info_outside_capture(dev.core.index, true) {
                Some(Ok((free, _))) => free,
                _ => 0,
            };
            dev.core
                .history
                .record(TraceAction::Oom, free, size, stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::*;

    const M: u64 = 1 << 20;

    /// Every byte of every segment in exactly one block, blocks in address
    /// order from the segment's base; the sums agree with the statistics.
    fn check_walk(a: &Engine, s: &Snapshot) {
        for seg in &s.segments {
            let mut at = seg.address;
            for b in &seg.blocks {
                assert_eq!(b.address, at, "blocks of {:#x} are contiguous", seg.address);
                assert!(b.size > 0 && b.requested_size <= b.size, "{b:?}");
                at += b.size;
            }
            assert_eq!(
                at,
                seg.address + seg.total_size,
                "every byte of {:#x}",
                seg.address
            );
        }
        for d in 0..a.device_count() {
            let st = a.stats(d).unwrap();
            let segs: Vec<&SegmentInfo> = s.segments.iter().filter(|x| x.device == d).collect();
            assert!(segs.windows(2).all(|w| w[0].address < w[1].address));
            let sum = |f: &dyn Fn(&SegmentInfo) -> u64| segs.iter().map(|x| f(x)).sum::<u64>();
            assert_eq!(sum(&|x| x.total_size), st.reserved_bytes);
            assert_eq!(sum(&|x| x.allocated_size()), st.allocated_bytes);
            assert_eq!(
                sum(&|x| x.active_size() - x.allocated_size()),
                st.pending_free_bytes
            );
            let requested: u64 = segs
                .iter()
                .flat_map(|x| &x.blocks)
                .filter(|b| b.status == BlockStatus::Allocated)
                .map(|b| b.requested_size)
                .sum();
            assert_eq!(requested, st.requested_bytes);
            assert_eq!(segs.len() as u64, st.segments);
        }
    }

    fn block(s: &Snapshot, addr: u64) -> BlockInfo {
        s.segments
            .iter()
            .flat_map(|x| &x.blocks)
            .find(|b| b.address == addr)
            .cloned()
            .unwrap_or_else(|| panic!("no block at {addr:#x}"))
    }

    #[test]
    fn the_walk_accounts_for_every_byte_in_every_state() {
        let (a, d) = sim("sim_devices:2,sim_memory:1GiB,sim_events:manual");
        d.set_manual_events(true);
        let s1 = 0x10;
        let small: Vec<u64> = (0..6)
            .map(|i| a.malloc(1000 + i * 512, 0, s1).unwrap())
            .collect();
        let large = a.malloc(3 * M, 0, s1).unwrap();
        let other = a.malloc(5 * M + 7, 1, 0x20).unwrap();
        a.free(small[1], Some(0), s1).unwrap(); // stashed
        a.record_stream(small[3], 0x30).unwrap();
        a.free(small[3], Some(0), s1).unwrap(); // waits for stream 0x30
        let snap = a.snapshot();
        check_walk(&a, &snap);
        assert_eq!(snap.device_traces, vec![vec![], vec![]], "history is off");
        assert_eq!(snap.segments.len(), 3);
        let b = block(&snap, small[0]);
        assert_eq!(
            (b.status, b.size, b.requested_size),
            (BlockStatus::Allocated, 1024, 1000)
        );
        assert_eq!(block(&snap, small[1]).status, BlockStatus::Stashed);
        assert_eq!(block(&snap, small[1]).status.torch_state(), "inactive");
        let p = block(&snap, small[3]);
        assert_eq!(
            (p.status, p.requested_size),
            (BlockStatus::PendingFree, p.size)
        );
        assert_eq!(p.status.torch_state(), "active_pending_free");
        let seg = snap
            .segments
            .iter()
            .find(|x| x.address == small[0])
            .unwrap();
        assert_eq!((seg.pool, seg.stream, seg.device), (Pool::Small, s1, 0));
        assert_eq!(seg.blocks.last().unwrap().status, BlockStatus::Free);
        assert_eq!(seg.allocated_size(), 1024 + 2048 + 3072 + 3584);
        assert_eq!(seg.active_size(), seg.allocated_size() + p.size);
        assert_eq!(seg.requested_size(), 1000 + 2024 + 3048 + 3560 + p.size);
        let l = snap.segments.iter().find(|x| x.address == large).unwrap();
        assert_eq!(
            (l.pool, l.total_size, l.blocks.len()),
            (Pool::Large, 20 * M, 2)
        );
        let o = snap.segments.iter().find(|x| x.device == 1).unwrap();
        assert_eq!(
            (o.stream, o.blocks[0].address, o.blocks[0].requested_size),
            (0x20, other, 5 * M + 7)
        );
        // The wait ends: the block is free (coalesced with its neighbours).
        d.complete_stream(0, 0x30);
        a.free(large, Some(0), s1).unwrap(); // the slow path below runs process_pending
        let _ = a.malloc(4 * M, 0, s1).unwrap();
        let snap = a.snapshot();
        check_walk(&a, &snap);
        assert!(snap
            .segments
            .iter()
            .flat_map(|x| &x.blocks)
            .all(|b| b.status != BlockStatus::PendingFree));
    }

    /// Replays a device's history from the start onto nothing and checks it
    /// arrives at the snapshot's state: the segments, and the active blocks
    /// with their states (what torch's viewer relies on).
    fn replay_matches(s: &Snapshot, device: usize) {
        use std::collections::BTreeMap;
        let mut segs = BTreeMap::new();
        let mut blocks: BTreeMap<u64, (u64, bool)> = BTreeMap::new(); // addr -> (size, pending)
        for e in &s.device_traces[device] {
            match e.action {
                TraceAction::SegmentAlloc => assert!(segs.insert(e.addr, e.size).is_none()),
                TraceAction::SegmentFree => assert_eq!(segs.remove(&e.addr), Some(e.size)),
                TraceAction::Alloc => assert!(blocks.insert(e.addr, (e.size, false)).is_none()),
                TraceAction::FreeRequested => {
                    blocks.get_mut(&e.addr).expect("freed block").1 = true
                }
                TraceAction::FreeCompleted => assert!(blocks.remove(&e.addr).unwrap().1),
                TraceAction::Oom | TraceAction::Snapshot => {}
            }
        }
        let mine = s.segments.iter().filter(|x| x.device == device);
        let want: BTreeMap<u64, u64> = mine.clone().map(|x| (x.address, x.total_size)).collect();
        assert_eq!(segs, want, "segments");
        let want: BTreeMap<u64, (u64, bool)> = mine
            .flat_map(|x| &x.blocks)
            .filter(|b| b.status.active())
            .map(|b| {
                let pending = b.status == BlockStatus::PendingFree;
                (
                    b.address,
                    (if pending { b.size } else { b.requested_size }, pending),
                )
            })
            .collect();
        let got: BTreeMap<u64, (u64, bool)> = blocks
            .into_iter()
            .map(|(k, (size, pending))| {
                // A pending block's requested size is forgotten: compare sizes.
                let size = if pending { block(s, k).size } else { size };
                (k, (size, pending))
            })
            .collect();
        assert_eq!(got, want, "active blocks");
    }

    #[test]
    fn the_history_replays_to_the_snapshot() {
        let (a, d) = sim("sim_memory:128MiB,sim_events:manual");
        d.set_manual_events(true);
        a.record_history(true, 1 << 20, false);
        let s = 0x10;
        let ps: Vec<u64> = (0..40)
            .map(|i| a.malloc((i % 7 + 1) * 300_000, 0, s).unwrap())
            .collect();
        for p in ps.iter().step_by(3) {
            a.free(*p, Some(0), s).unwrap();
        }
        a.record_stream(ps[1], 0x30).unwrap();
        a.free(ps[1], Some(0), s).unwrap();
        let big = a.malloc(30 * M, 0, s).unwrap();
        a.free(big, Some(0), s).unwrap();
        assert!(a.malloc(200 * M, 0, s).is_err(), "over the device");
        let snap = a.snapshot();
        check_walk(&a, &snap);
        replay_matches(&snap, 0);
        let t = &snap.device_traces[0];
        let count = |act| t.iter().filter(|e| e.action == act).count();
        assert_eq!(count(TraceAction::Alloc), 41);
        assert_eq!(count(TraceAction::FreeRequested), 16);
        assert_eq!(
            count(TraceAction::FreeCompleted),
            15,
            "one waits on stream 0x30"
        );
        assert!(count(TraceAction::SegmentAlloc) >= 2);
        let oom = t.iter().find(|e| e.action == TraceAction::Oom).unwrap();
        assert_eq!((oom.size, oom.stream), (200 * M, s));
        assert!(
            oom.addr > 0 && oom.addr <= 128 * M,
            "device_free: the driver's free bytes"
        );
        assert!(t.iter().all(|e| e.time_us > 0));
        // empty_cache waits for the pending free (free_completed on the
        // block's stream) and gives the idle segments back.
        a.empty_cache();
        let snap = a.snapshot();
        check_walk(&a, &snap);
        replay_matches(&snap, 0);
        let t = &snap.device_traces[0];
        let done = t
            .iter()
            .rfind(|e| e.action == TraceAction::FreeCompleted && e.addr == ps[1])
            .unwrap();
        assert_eq!(done.stream, s);
        assert!(t
            .iter()
            .any(|e| e.action == TraceAction::SegmentFree && e.addr == big));
    }

    #[test]
    fn the_history_is_bounded_and_switching_off_drops_it() {
        let (a, _) = sim("sim_memory:1GiB");
        let p = a.malloc(4096, 0, 0).unwrap();
        a.free(p, Some(0), 0).unwrap();
        assert!(a.snapshot().device_traces[0].is_empty(), "off by default");
        a.record_history(true, 5, false);
        for _ in 0..10 {
            let p = a.malloc(4096, 0, 0).unwrap();
            a.free(p, Some(0), 0).unwrap();
        }
        let snap = a.snapshot();
        a.mark_snapshot(&snap);
        let t = &snap.device_traces[0];
        let names: Vec<&str> = t.iter().map(|e| e.action.name()).collect();
        assert_eq!(
            names,
            [
                "free_requested",
                "free_completed",
                "alloc",
                "free_requested",
                "free_completed"
            ],
            "the newest 5"
        );
        let t = a.snapshot().device_traces[0].clone();
        assert_eq!(t.last().unwrap().action, TraceAction::Snapshot, "the mark");
        assert_eq!(t.last().unwrap().size, 0, "nothing active at the mark");
        assert_eq!(t.len(), 5);
        a.record_history(true, 3, false);
        assert_eq!(
            a.snapshot().device_traces[0].len(),
            3,
            "shrunk to the newest"
        );
        a.record_history(true, 100, true);
        assert!(a.snapshot().device_traces[0].is_empty(), "cleared");
        a.record_history(false, 100, false);
        let p = a.malloc(4096, 0, 0).unwrap();
        a.free(p, Some(0), 0).unwrap();
        assert!(a.snapshot().device_traces[0].is_empty(), "off drops it all");
    }

    /// Snapshots taken while four threads allocate and free on their own
    /// streams (some frees waiting on another stream) each replay exactly:
    /// the walk and the history are one state, whatever the interleaving.
    #[test]
    fn snapshots_under_concurrent_use_are_consistent() {
        let (a, _) = sim("sim_memory:256MiB");
        a.record_history(true, usize::MAX, false);
        let a = Arc::new(a);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let (a, stop) = (a.clone(), stop.clone());
                std::thread::spawn(move || {
                    let s = 0x100 + t;
                    let mut live = Vec::new();
                    let mut x = t + 1;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if live.len() < 24 && x % 3 != 0 {
                            if let Ok(p) = a.malloc(x % (3 * M) + 1, 0, s) {
                                live.push(p);
                            }
                        } else if let Some(p) = live.pop() {
                            if x % 5 == 0 {
                                a.record_stream(p, 0x900).unwrap();
                            }
                            a.free(p, Some(0), s).unwrap();
                        }
                    }
                    free_all(&a, s, &live);
                })
            })
            .collect();
        // Until the workers have done a few thousand actions, 30 at least.
        let mut taken = 0;
        loop {
            let snap = a.snapshot();
            replay_matches(&snap, 0);
            taken += 1;
            if taken >= 30 && snap.device_traces[0].len() > 5000 {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        a.empty_cache();
        let snap = a.snapshot();
        check_walk(&a, &snap);
        replay_matches(&snap, 0);
        assert!(snap.segments.is_empty(), "all freed and released");
    }

    #[test]
    fn private_pools_name_their_segments() {
        let (a, _) = sim("sim_memory:1GiB,graph_pools:on");
        a.begin_pool(0, (7, 1)).unwrap();
        let p = a.malloc_pool(4096, 0, 0x10, (7, 1)).unwrap();
        a.end_pool(0, (7, 1)).unwrap();
        let q = a.malloc(4096, 0, 0x10).unwrap();
        let snap = a.snapshot();
        check_walk(&a, &snap);
        let seg_of = |x: u64| {
            snap.segments
                .iter()
                .find(|s| s.blocks.iter().any(|b| b.address == x))
                .unwrap()
                .pool_id
        };
        assert_eq!((seg_of(p), seg_of(q)), ((7, 1), (0, 0)));
    }
}
