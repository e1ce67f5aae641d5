//! Virtual segments (`expandable_segments:on`): the arena's side.
//!
//! A virtual segment is a reserved virtual range whose pages are mapped
//! only where blocks need them. Its block chain covers the whole range:
//! live, stashed, pending and free blocks lie on mapped pages, and
//! [`BlockState::Hole`] blocks are page-aligned stretches with nothing
//! mapped, kept out of the free index. So the hot path is the classic one:
//! the free index holds only mapped memory.
//!
//! The device (`engine/vmm.rs`) owns the physical memory. This file keeps
//! each segment's mappings (one per `cuMemMap` call: a mapping is unmapped
//! whole, or not at all), plans where a request goes ([`ArenaInner::vm_plan`]:
//! best fit over runs of free and unmapped space, as on one contiguous
//! heap), turns mapped holes into free blocks ([`ArenaInner::vm_fill`]), and
//! finds the mappings that lie wholly inside free blocks whose frees are
//! proven complete ([`ArenaInner::vm_movable`]): their pages may be unmapped
//! and mapped wherever a request needs them ([`ArenaInner::vm_unmapped`]).
//!
//! Each free in a virtual segment stamps the mappings it touches with the
//! arena's idle epoch and counts towards the next epoch event, so a
//! mapping is proven free the way an idle classic segment is.
//!
//! **The run index.** The runs (maximal stretches of free blocks and holes)
//! are indexed by size and by address, updated where blocks are taken and
//! freed in a virtual segment (mapping and unmapping change no run): the
//! plan is a `BTreeMap` lookup, and the search for memory to move visits
//! runs from the top down only until it has enough. That search still
//! walks every run when little is movable (a random workload's slow path:
//! docs/BENCHMARKS.md); capping it cost up to 0.02 reserved/requested on
//! the random traces.

use super::{ArenaInner, ProofPass};
use crate::driver::{PhysHandle, Stream};
use crate::engine::core::DeviceCore;
use crate::engine::tlsf::{Block, BlockState, NIL};
use crate::size_class::{Policy, Pool};
use std::collections::BTreeMap;

/// One `cuMemMap` of a virtual segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mapping {
    pub len: u64,
    pub handle: PhysHandle,
    /// Where in the handle the mapping starts.
    pub offset: u64,
    /// The arena's idle epoch when a free last touched it.
    freed_epoch: u64,
    /// 1 + the epoch in which a free last counted it towards an epoch event.
    counted: u64,
}

impl Mapping {
    pub fn new(len: u64, handle: PhysHandle, offset: u64) -> Self {
        Mapping {
            len,
            handle,
            offset,
            freed_epoch: 0,
            counted: 0,
        }
    }
}

/// The mappings of one virtual segment.
#[derive(Debug, Default)]
pub(crate) struct VSeg {
    /// By virtual address.
    pub maps: BTreeMap<u64, Mapping>,
    /// Bytes mapped.
    pub mapped: u64,
    /// The page size (every hole and mapping is a multiple of it).
    pub page: u64,
}

/// Where a request goes in a virtual segment, and what must be mapped first.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub seg: u32,
    /// Start of the request's block.
    pub start: u64,
    /// Page-aligned hole ranges `(va, len)` to map, in address order.
    pub holes: Vec<(u64, u64)>,
    /// The hole block holding each (a hint for [`ArenaInner::vm_fill`]).
    pub hole_blocks: Vec<u32>,
    /// The run's first block (a hint for [`ArenaInner::vm_alloc_at`]).
    pub first_block: u32,
    /// The virtual range the request and its mapping cover (kept out of
    /// the search for memory to move).
    pub span: (u64, u64),
}

impl Plan {
    /// Bytes to map.
    pub fn bytes(&self) -> u64 {
        self.holes.iter().map(|h| h.1).sum()
    }
}

impl ArenaInner {
    /// Add a reserved virtual range as a virtual segment: one hole.
    pub fn attach_virtual(&mut self, base: u64, size: u64, pool: Pool, page: u64) -> u32 {
        let (s, b) = self.new_segment(base, size, pool, true);
        self.vsegs.insert(
            s,
            VSeg {
                page,
                ..VSeg::default()
            },
        );
        self.run_insert(pool as usize, (size, base, s), b);
        s
    }

    /// Index a run (by size for placement, by address for moving pages).
    fn run_insert(&mut self, pool: usize, key: (u64, u64, u32), first: u32) {
        self.runs[pool].insert(key, first);
        self.runs_at.insert(key.1, (key.0, key.2, first));
    }

    /// Forget a run.
    fn run_remove(&mut self, pool: usize, key: (u64, u64, u32)) {
        self.runs[pool].remove(&key);
        self.runs_at.remove(&key.1);
    }

    /// Whether block `i` is free or unmapped space (part of a run).
    fn in_run(&self, i: u32) -> bool {
        i != NIL
            && matches!(
                self.blocks.get(i).state,
                BlockState::Free | BlockState::Hole
            )
    }

    /// The run holding block `i` (free or a hole): its key and first block.
    fn run_around(&self, i: u32) -> ((u64, u64, u32), u32) {
        let (mut first, mut last) = (i, i);
        while self.in_run(self.blocks.get(first).prev) {
            first = self.blocks.get(first).prev;
        }
        while self.in_run(self.blocks.get(last).next) {
            last = self.blocks.get(last).next;
        }
        let (f, l) = (self.blocks.get(first), self.blocks.get(last));
        ((l.addr + l.size - f.addr, f.addr, f.seg), first)
    }

    fn run_pool(&self, i: u32) -> usize {
        self.seg(self.blocks.get(i).seg).pool as usize
    }

    /// Block `i`, free, is about to be taken: its run leaves the index.
    pub(super) fn vm_run_forget(&mut self, i: u32) {
        let (key, _) = self.run_around(i);
        let pool = self.run_pool(i);
        self.run_remove(pool, key);
    }

    /// Block `i` was just taken: the runs on either side enter the index.
    pub(super) fn vm_runs_beside(&mut self, i: u32) {
        let b = *self.blocks.get(i);
        for n in [b.prev, b.next] {
            if self.in_run(n) {
                self.vm_run_note(n);
            }
        }
    }

    /// Block `i` is about to be freed: the runs on either side leave the
    /// index (they merge with it).
    pub(super) fn vm_runs_forget_beside(&mut self, i: u32) {
        let b = *self.blocks.get(i);
        let pool = self.run_pool(i);
        for n in [b.prev, b.next] {
            if self.in_run(n) {
                let (key, _) = self.run_around(n);
                self.run_remove(pool, key);
            }
        }
    }

    /// The run holding block `i` enters the index.
    pub(super) fn vm_run_note(&mut self, i: u32) {
        let (key, first) = self.run_around(i);
        let pool = self.run_pool(i);
        self.run_insert(pool, key, first);
    }

    /// The virtual segments of `pool`.
    fn vsegs_of(&self, pool: Pool) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .vsegs
            .keys()
            .copied()
            .filter(|&s| self.seg(s).pool == pool)
            .collect();
        v.sort_unstable_by_key(|&s| self.seg(s).base);
        v
    }

    /// Where a request of `rounded` bytes of `pool` goes: best fit over the
    /// runs of free and unmapped blocks of the pool's virtual segments (the
    /// smallest run that holds it, then the lowest address; from the run
    /// index), at the run's start, as on one contiguous heap; only the pages
    /// under the request are mapped (growing by bigger chunks at the top of
    /// the heap reserved more on three of four committed traces and saved
    /// no call in a training step). `None` when no run holds it.
    pub fn vm_plan(&self, pool: Pool, rounded: u64) -> Option<Plan> {
        // The smallest run that holds it, the lowest address among equals.
        let (&(_, start, seg), &first_block) =
            self.runs[pool as usize].range((rounded, 0, 0)..).next()?;
        let page = self.vsegs[&seg].page;
        let end = start + rounded;
        let mut holes = Vec::new();
        let mut hole_blocks = Vec::new();
        let mut span_end = end;
        let mut i = first_block;
        while i != NIL {
            let b = *self.blocks.get(i);
            if b.addr >= end {
                break;
            }
            if b.state == BlockState::Hole && b.addr + b.size > start {
                let lo = b.addr.max(start);
                let hi = (b.addr + b.size).min(end.next_multiple_of(page));
                holes.push((lo, hi - lo));
                hole_blocks.push(i);
                span_end = span_end.max(hi);
            }
            i = b.next;
        }
        Some(Plan {
            seg,
            start,
            holes,
            hole_blocks,
            first_block,
            span: (start, span_end),
        })
    }

    /// The block of virtual segment `s` holding `addr`: `hint` when it
    /// does (a block index the caller remembered, which later surgery may
    /// have changed), else found by a walk.
    fn vm_block_at(&self, s: u32, addr: u64, hint: u32) -> u32 {
        if let Some(b) = self.blocks.slots.get(hint as usize) {
            if b.state != BlockState::Vacant
                && b.seg == s
                && addr >= b.addr
                && addr < b.addr + b.size
            {
                return hint;
            }
        }
        let mut i = self.seg(s).first;
        while i != NIL {
            let b = self.blocks.get(i);
            if addr >= b.addr && addr < b.addr + b.size {
                return i;
            }
            i = b.next;
        }
        panic!("cudalloc: no block of segment {s} holds {addr:#x}");
    }

    /// Make `[lo, hi)`, inside block `i` (free or a hole), a block of its
    /// own of state `to` (free or hole), coalesced with neighbours of that
    /// state; the rest of `i` keeps its state. Free blocks enter the index.
    fn vm_recarve(&mut self, i: u32, lo: u64, hi: u64, to: BlockState) -> u32 {
        let b = *self.blocks.get(i);
        let pool = self.seg(b.seg).pool as usize;
        debug_assert!(lo >= b.addr && hi <= b.addr + b.size && lo < hi);
        if b.state == BlockState::Free {
            self.index[pool].remove(&mut self.blocks, i);
        }
        let mut mid = i;
        if lo > b.addr {
            mid = self.split_off(i, lo - b.addr);
        }
        if hi < b.addr + b.size {
            self.split_off(mid, hi - lo);
        }
        // Left and right parts keep the old state (free ones go back in the index).
        if b.state == BlockState::Free {
            if mid != i {
                self.index[pool].insert(&mut self.blocks, i);
            }
            let right = self.blocks.get(mid).next;
            if hi < b.addr + b.size {
                self.index[pool].insert(&mut self.blocks, right);
            }
        }
        self.blocks.get_mut(mid).state = to;
        // Coalesce with neighbours of the same state.
        let prev = self.blocks.get(mid).prev;
        if prev != NIL && self.blocks.get(prev).state == to {
            if to == BlockState::Free {
                self.index[pool].remove(&mut self.blocks, prev);
            }
            mid = self.merge_next(prev);
        }
        let next = self.blocks.get(mid).next;
        if next != NIL && self.blocks.get(next).state == to {
            if to == BlockState::Free {
                self.index[pool].remove(&mut self.blocks, next);
            }
            self.merge_next(mid);
        }
        if to == BlockState::Free {
            self.index[pool].insert(&mut self.blocks, mid);
        } else {
            self.blocks.get_mut(mid).state = to;
        }
        mid
    }

    /// Split block `i` (out of the index) after `at` bytes; the new right
    /// part (same state) is returned.
    fn split_off(&mut self, i: u32, at: u64) -> u32 {
        let b = *self.blocks.get(i);
        let r = self.blocks.insert(Block {
            addr: b.addr + at,
            size: b.size - at,
            seg: b.seg,
            prev: i,
            next: b.next,
            free_prev: NIL,
            free_next: NIL,
            state: b.state,
        });
        if b.next != NIL {
            self.blocks.get_mut(b.next).prev = r;
        }
        let bm = self.blocks.get_mut(i);
        bm.size = at;
        bm.next = r;
        r
    }

    /// Merge block `i`'s next neighbour into it (both out of the index).
    fn merge_next(&mut self, i: u32) -> u32 {
        let next = self.blocks.get(i).next;
        let n = *self.blocks.get(next);
        let c = self.blocks.get_mut(i);
        c.size += n.size;
        c.next = n.next;
        if n.next != NIL {
            self.blocks.get_mut(n.next).prev = i;
        }
        self.blocks.remove(next);
        i
    }

    /// Hole range `(va, len)` of segment `s` is now mapped by `maps`
    /// (address order, covering it exactly, access granted): it becomes
    /// free memory.
    pub fn vm_fill(&mut self, s: u32, va: u64, len: u64, hint: u32, maps: Vec<(u64, Mapping)>) {
        let i = self.vm_block_at(s, va, hint);
        debug_assert_eq!(self.blocks.get(i).state, BlockState::Hole);
        self.vm_recarve(i, va, va + len, BlockState::Free);
        let v = self.vsegs.get_mut(&s).expect("a virtual segment");
        for (at, m) in maps {
            v.mapped += m.len;
            v.maps.insert(at, m);
        }
        self.debug_check();
    }

    /// Serve a request at `start` of virtual segment `s`, where a free
    /// block of at least `rounded` bytes starts now (after [`Self::vm_fill`]).
    #[allow(clippy::too_many_arguments)]
    pub fn vm_alloc_at(
        &mut self,
        s: u32,
        start: u64,
        hint: u32,
        rounded: u64,
        requested: u64,
        policy: &Policy,
        dev: &DeviceCore,
    ) -> (u64, u64) {
        let i = self.vm_block_at(s, start, hint);
        let b = *self.blocks.get(i);
        assert!(
            b.state == BlockState::Free && b.addr == start && b.size >= rounded,
            "cudalloc: planned block at {start:#x} is not free and big enough"
        );
        let pool = self.seg(s).pool;
        self.take_block(i, rounded, requested, pool, policy, dev)
    }

    /// A free of `[addr, addr + size)` in virtual segment `s`: stamp the
    /// mappings it touches with the current idle epoch (they are proven
    /// free once an epoch event after it completes), counting each towards
    /// the next epoch event once per epoch.
    pub(super) fn vm_note_free(&mut self, s: u32, addr: u64, size: u64) {
        let (epoch, counted) = (self.epoch, self.epoch + 1);
        let Some(v) = self.vsegs.get_mut(&s) else {
            return;
        };
        let mut newly = 0;
        for (&at, m) in v.maps.range_mut(..addr + size).rev() {
            if at + m.len <= addr {
                break;
            }
            m.freed_epoch = epoch;
            if m.counted != counted {
                m.counted = counted;
                newly += 1;
            }
        }
        self.epoch_open = self.epoch_open.saturating_add(newly);
    }

    /// Mappings that lie wholly inside free blocks and whose frees are
    /// proven complete (see [`ArenaInner::mapping_free_complete`]; every
    /// one with `all_proven`: the stream was synchronised), outside
    /// `exclude` (a segment and range), as `(segment, va, len)`, until at
    /// least `want` bytes are found. Their memory may be unmapped and used
    /// anywhere.
    pub fn vm_movable(
        &mut self,
        stream: Stream,
        dev: &DeviceCore,
        exclude: Option<(u32, u64, u64)>,
        want: u64,
        all_proven: bool,
    ) -> Vec<(u32, u64, u64, u32)> {
        // The highest addresses first: placement fills each range from the
        // bottom (best fit, lowest address among equals), so memory taken
        // from the top leaves the busy low part mapped and makes holes
        // where requests go last. On the sawtooth trace this moved 4.8x
        // fewer pages than oldest-freed-first, for 1.071 against 1.067
        // reserved/requested (docs/BENCHMARKS.md). Taken in this order, a
        // block's lower mappings keep their block's index valid (the
        // surgery keeps the left part's index), so each is a good hint.
        // Runs are visited from the top down, and only until enough
        // candidates are found.
        let mut pass = ProofPass::default();
        let mut out = Vec::new();
        let mut found = 0;
        let mut below = u64::MAX;
        while found < want {
            let Some((&start, &(_, s, first))) = self.runs_at.range(..below).next_back() else {
                break;
            };
            below = start;
            let page = self.vsegs[&s].page;
            let mut cands = Vec::new();
            let mut i = first;
            while self.in_run(i) {
                let b = self.blocks.get(i);
                if b.state == BlockState::Free && b.size >= page {
                    let (lo, hi) = (b.addr, b.addr + b.size);
                    for (&at, m) in self.vsegs[&s].maps.range(lo..hi) {
                        if at + m.len > hi {
                            break;
                        }
                        let excluded = exclude
                            .is_some_and(|(xs, xl, xh)| xs == s && at < xh && at + m.len > xl);
                        if !excluded {
                            cands.push((at, m.len, m.freed_epoch, i));
                        }
                    }
                }
                i = b.next;
            }
            for (at, len, epoch, block) in cands.into_iter().rev() {
                if found >= want {
                    break;
                }
                if all_proven || self.mapping_free_complete(epoch, stream, dev, &mut pass) {
                    out.push((s, at, len, block));
                    found += len;
                }
            }
        }
        out
    }

    /// Mapping `va` of segment `s` was unmapped: its range becomes a hole.
    /// Returns the mapping.
    pub fn vm_unmapped(&mut self, s: u32, va: u64, hint: u32) -> Mapping {
        let v = self.vsegs.get_mut(&s).expect("a virtual segment");
        let m = v.maps.remove(&va).expect("a mapping");
        v.mapped -= m.len;
        let i = self.vm_block_at(s, va, hint);
        debug_assert_eq!(self.blocks.get(i).state, BlockState::Free);
        self.vm_recarve(i, va, va + m.len, BlockState::Hole);
        self.debug_check();
        m
    }

    /// Virtual segments with nothing mapped (one hole), as `(slot, base, size)`.
    pub fn vm_empty(&self) -> Vec<(u32, u64, u64)> {
        self.vsegs
            .iter()
            .filter(|(_, v)| v.maps.is_empty())
            .map(|(&s, _)| (s, self.seg(s).base, self.seg(s).size))
            .collect()
    }

    /// Take empty virtual segment `s` out of the arena (its range goes back).
    pub fn vm_detach(&mut self, s: u32) {
        let seg = *self.seg(s);
        debug_assert_eq!(self.blocks.get(seg.first).state, BlockState::Hole);
        debug_assert_eq!(self.blocks.get(seg.first).next, NIL);
        self.run_remove(seg.pool as usize, (seg.size, seg.base, s));
        self.blocks.remove(seg.first);
        self.segs[s as usize] = None;
        self.seg_vacant.push(s);
        self.vsegs.remove(&s);
    }

    /// Bytes mapped in virtual segments, and their virtual size.
    pub fn vm_bytes(&self) -> (u64, u64) {
        self.vsegs
            .iter()
            .map(|(&s, v)| (v.mapped, self.seg(s).size))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Bytes of free blocks in virtual segments (mapped, not live).
    pub fn vm_free_bytes(&self) -> u64 {
        self.blocks
            .slots
            .iter()
            .filter(|b| b.state == BlockState::Free && self.seg(b.seg).virt)
            .map(|b| b.size)
            .sum()
    }

    /// Every mapping of this arena, as `(va, mapping)`.
    pub fn vm_mappings(&self) -> Vec<(u64, Mapping)> {
        self.vsegs
            .values()
            .flat_map(|v| v.maps.iter().map(|(&a, &m)| (a, m)))
            .collect()
    }

    /// Check the run index against a scan of every virtual segment.
    pub(super) fn vm_check_runs(&self) -> Result<(), String> {
        for pool in [Pool::Small, Pool::Large] {
            let mut scan = std::collections::BTreeMap::new();
            for s in self.vsegs_of(pool) {
                let mut i = self.seg(s).first;
                while i != NIL {
                    if self.in_run(i) && !self.in_run(self.blocks.get(i).prev) {
                        let (key, first) = self.run_around(i);
                        scan.insert(key, first);
                    }
                    i = self.blocks.get(i).next;
                }
            }
            for (&(len, start, seg), &first) in &scan {
                if self.runs_at.get(&start) != Some(&(len, seg, first)) {
                    return Err(format!("run {start:#x} missing from the address index"));
                }
            }
            if scan != self.runs[pool as usize] {
                return Err(format!(
                    "{pool:?} pool: the run index {:?} is not the runs {:?}",
                    self.runs[pool as usize], scan
                ));
            }
        }
        if self.runs_at.len() != self.runs[0].len() + self.runs[1].len() {
            return Err("the address index of runs holds stale runs".into());
        }
        Ok(())
    }

    /// Check virtual segment `s`: holes page-aligned, coalesced and
    /// unmapped; every other block wholly mapped; the mapped count true.
    pub(super) fn vm_check(&self, s: u32) -> Result<(), String> {
        let v = self
            .vsegs
            .get(&s)
            .ok_or_else(|| format!("virtual segment {s} has no mappings table"))?;
        let seg = self.seg(s);
        let mut at = seg.base;
        for (&va, m) in &v.maps {
            if va < at || m.len == 0 || va % v.page != 0 || m.len % v.page != 0 {
                return Err(format!(
                    "segment {:#x}: mapping {va:#x} overlaps or is misaligned",
                    seg.base
                ));
            }
            at = va + m.len;
        }
        if at > seg.base + seg.size {
            return Err(format!(
                "segment {:#x}: a mapping runs past its end",
                seg.base
            ));
        }
        if v.maps.values().map(|m| m.len).sum::<u64>() != v.mapped {
            return Err(format!("segment {:#x}: mapped bytes drifted", seg.base));
        }
        let mapped = |lo: u64, hi: u64| -> u64 {
            // Bytes of [lo, hi) covered by mappings.
            let mut n = 0;
            let first = v
                .maps
                .range(..=lo)
                .next_back()
                .map(|(&a, _)| a)
                .unwrap_or(lo);
            for (&a, m) in v.maps.range(first..hi) {
                let (x, y) = (a.max(lo), (a + m.len).min(hi));
                if y > x {
                    n += y - x;
                }
            }
            n
        };
        let mut i = seg.first;
        let mut prev_hole = false;
        while i != NIL {
            let b = self.blocks.get(i);
            let covered = mapped(b.addr, b.addr + b.size);
            if b.state == BlockState::Hole {
                if prev_hole || b.addr % v.page != 0 || b.size % v.page != 0 || covered != 0 {
                    return Err(format!(
                        "segment {:#x}: hole {:#x} is misaligned, uncoalesced or mapped",
                        seg.base, b.addr
                    ));
                }
            } else if covered != b.size {
                return Err(format!(
                    "segment {:#x}: block {:#x} ({:?}) is not wholly mapped",
                    seg.base, b.addr, b.state
                ));
            }
            prev_hole = b.state == BlockState::Hole;
            i = b.next;
        }
        Ok(())
    }
}
