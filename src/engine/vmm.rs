//! Expandable segments (`expandable_segments:on`): the device's side.
//!
//! Each stream's arena keeps one virtual segment per pool (a reserved
//! virtual range; more when one fills), and maps pages into it only where
//! blocks need them (`arena/vseg.rs`). The device owns the physical memory:
//! handles from `cuMemCreate`, each mapped in one or more places, and the
//! *idle pieces* of handles mapped nowhere, cached for the next mapping.
//!
//! A request the free index cannot serve (the slow path,
//! [`Engine::serve_virtual`]) is placed by best fit over the runs of free
//! and unmapped space, as on one contiguous heap, and the unmapped pages
//! under it are mapped with memory found in this order:
//! 1. idle pieces;
//! 2. **moved pages**: mappings that lie wholly inside free blocks whose
//!    frees are proven complete (the stream, or the arena's epoch events:
//!    never a synchronisation), in this arena or another stream's, are
//!    unmapped and their memory mapped here;
//! 3. a new handle from the driver, one for the whole shortfall (within
//!    the limits).
//!
//! So the device asks for new memory only when no free page anywhere is
//! proven free: what an allocator that unmapped every empty page at once
//! would hold, give or take the chunks growth maps at the top of a
//! segment and the mappings shared with live blocks. One growth costs one
//! `cuMemCreate`, one `cuMemMap` per piece and one `cuMemSetAccess` per
//! hole mapped.
//!
//! Nothing is unmapped or released while a capture may be under way; new
//! pages are still created and mapped then (the CUDA backend runs those
//! calls in relaxed capture mode, as `cuMemAlloc`). The OOM ladder and
//! `empty_cache` unmap every free mapping (after synchronising, for the
//! ladder's second step) and release handles mapped nowhere; trim releases
//! what is proven free without waiting.

use super::arena::{Arena, ArenaInner, Mapping, Plan};
use super::device::Device;
use super::reserve::FloorBudget;
use super::slow::Want;
use super::Engine;
use crate::config::format_size as fs;
use crate::driver::{DriverError, PhysHandle, Stream};
use crate::error::{Error, ErrorCode, Result};
use crate::size_class::Pool;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

/// A request's pages are mapped in at most about this many mappings (of
/// at least a page each). On the committed traces (docs/BENCHMARKS.md),
/// one mapping per request pins free pages under any live block that
/// reuses part of it (up to 1.05 reserved/requested against 1.006 on the
/// training trace), one per page makes 5× the calls in a training step of
/// classic segments; a quarter of the request keeps both near their best.
const MAP_PARTS: u64 = 4;

/// Part of a handle mapped nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    handle: PhysHandle,
    offset: u64,
    len: u64,
}

impl Piece {
    /// The memory a mapping held, once it is unmapped.
    fn of(m: &Mapping) -> Piece {
        Piece {
            handle: m.handle,
            offset: m.offset,
            len: m.len,
        }
    }
}

/// A device's physical memory for virtual segments.
#[derive(Debug)]
pub(super) struct Vmm {
    /// The mapping granularity (2 MiB on current GPUs).
    pub page: u64,
    /// Every handle held: its size and the bytes of it mapped.
    handles: FxHashMap<PhysHandle, (u64, u64)>,
    /// Pieces mapped nowhere, by (handle, offset), adjacent ones merged.
    idle: Vec<Piece>,
}

impl Vmm {
    fn new(page: u64) -> Self {
        Vmm {
            page,
            handles: FxHashMap::default(),
            idle: Vec::new(),
        }
    }

    /// Bytes of the idle pieces.
    pub fn idle_bytes(&self) -> u64 {
        self.idle.iter().map(|p| p.len).sum()
    }

    /// Bytes of every handle held.
    pub fn physical_bytes(&self) -> u64 {
        self.handles.values().map(|h| h.0).sum()
    }

    /// A piece is mapped nowhere now.
    fn put(&mut self, p: Piece) {
        if let Some(h) = self.handles.get_mut(&p.handle) {
            h.1 -= p.len;
        }
        self.give(p);
    }

    /// Add `p` to the idle pieces, merged with its neighbours of the same handle.
    fn give(&mut self, p: Piece) {
        let key = |x: &Piece| (x.handle, x.offset);
        let mut at = self.idle.partition_point(|x| key(x) < key(&p));
        self.idle.insert(at, p);
        if at > 0 {
            let (l, r) = (self.idle[at - 1], self.idle[at]);
            if l.handle == r.handle && l.offset + l.len == r.offset {
                self.idle[at - 1].len += r.len;
                self.idle.remove(at);
                at -= 1;
            }
        }
        if at + 1 < self.idle.len() {
            let (l, r) = (self.idle[at], self.idle[at + 1]);
            if l.handle == r.handle && l.offset + l.len == r.offset {
                self.idle[at].len += r.len;
                self.idle.remove(at + 1);
            }
        }
    }

    /// Take idle pieces worth up to `want` bytes (the last one cut to fit).
    fn take(&mut self, want: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut got = 0;
        while got < want {
            let Some(mut p) = self.idle.pop() else { break };
            if p.len > want - got {
                let rest = Piece {
                    handle: p.handle,
                    offset: p.offset + (want - got),
                    len: p.len - (want - got),
                };
                self.give(rest);
                p.len = want - got;
            }
            got += p.len;
            out.push(p);
        }
        out
    }

    /// Handles mapped nowhere, with their sizes.
    fn unmapped_handles(&self) -> Vec<(PhysHandle, u64)> {
        let mut v: Vec<(PhysHandle, u64)> = self
            .handles
            .iter()
            .filter(|(_, h)| h.1 == 0)
            .map(|(&k, h)| (k, h.0))
            .collect();
        v.sort_unstable();
        v
    }

    /// Forget handle `h` (released): its idle pieces go with it.
    fn forget(&mut self, h: PhysHandle) {
        self.handles.remove(&h);
        self.idle.retain(|p| p.handle != h);
    }
}

/// The virtual range reserved for a pool's segment: the device's memory
/// (virtual space is cheap; one range then serves a stream's whole pool),
/// an eighth of it for the small pool, and at least the request.
fn virtual_size(total: u64, rounded: u64, page: u64, pool: Pool) -> u64 {
    // Capped so that a simulated device of terabytes still has room for many.
    let total = total.min(1 << 40);
    let base = match pool {
        Pool::Small => total / 8,
        Pool::Large => total,
    };
    base.max(rounded).max(page).next_multiple_of(page)
}

impl Device {
    /// The device's physical-memory state when expandable segments are on
    /// and the driver and device support virtual memory; decided at the
    /// first slow path (asking the driver then, never at start-up). Where
    /// they do not, classic segments serve, after one warning.
    pub(super) fn vmm(&self) -> Option<&Mutex<Vmm>> {
        if !self.expandable {
            return None;
        }
        self.vmm
            .get_or_init(|| match self.core.driver.vmm_granularity(self.core.index) {
                Ok(g) if g > 0 && g % 512 == 0 => Some(Box::new(Mutex::new(Vmm::new(g)))),
                Ok(g) => {
                    tracing::warn!(
                        device = self.core.index,
                        "expandable_segments:on, but the driver's page size ({g} bytes) is not a multiple of 512; classic segments serve"
                    );
                    None
                }
                Err(e) => {
                    tracing::warn!(
                        device = self.core.index,
                        "expandable_segments:on, but virtual memory is not available ({e}); classic segments serve"
                    );
                    None
                }
            })
            .as_deref()
    }

    /// Bytes of physical memory cached unmapped (counted as reserved and free).
    pub(super) fn vmm_idle_bytes(&self) -> u64 {
        self.vmm
            .get()
            .and_then(|v| v.as_deref())
            .map_or(0, |v| v.lock().idle_bytes())
    }

    /// The warm-up reservation (`reserve:`) with virtual segments: `size`
    /// bytes of physical memory, cached unmapped for any stream and either
    /// pool. Returns the bytes taken. Call with `slow` held.
    pub(super) fn vmm_reserve(
        &self,
        vmm: &Mutex<Vmm>,
        size: u64,
    ) -> crate::driver::DriverResult<u64> {
        let page = vmm.lock().page;
        let size = size / page * page;
        if size == 0 {
            return Ok(0);
        }
        let p = self.vmm_create(vmm, size)?;
        vmm.lock().give(p);
        Ok(size)
    }

    /// A new handle of `size` bytes from the driver, counted as reserved:
    /// the whole of it, as a piece mapped nowhere yet.
    fn vmm_create(&self, vmm: &Mutex<Vmm>, size: u64) -> crate::driver::DriverResult<Piece> {
        let h = self.core.driver.phys_create(self.core.index, size)?;
        self.core.counters.reserved.add(size);
        self.core.counters.vmm_creates.inc();
        vmm.lock().handles.insert(h, (size, 0));
        Ok(Piece {
            handle: h,
            offset: 0,
            len: size,
        })
    }

    /// Check the physical memory against the mappings: each handle's mapped
    /// bytes are its mappings', and its mappings and idle pieces never
    /// overlap and never pass its end. Call with `slow` held.
    pub(super) fn check_vmm(&self) -> std::result::Result<(), String> {
        let Some(vmm) = self.vmm.get().and_then(|v| v.as_deref()) else {
            return Ok(());
        };
        let mut parts: FxHashMap<PhysHandle, Vec<(u64, u64)>> = FxHashMap::default();
        for a in self.arena_list() {
            for (_, m) in a.inner.lock().vm_mappings() {
                parts.entry(m.handle).or_default().push((m.offset, m.len));
            }
        }
        let v = vmm.lock();
        for (h, list) in &parts {
            let Some(&(_, mapped)) = v.handles.get(h) else {
                return Err(format!(
                    "device {}: a mapping of unknown handle {h}",
                    self.core.index
                ));
            };
            if list.iter().map(|p| p.1).sum::<u64>() != mapped {
                return Err(format!(
                    "device {}: handle {h}: mapped bytes drifted",
                    self.core.index
                ));
            }
        }
        for p in &v.idle {
            parts.entry(p.handle).or_default().push((p.offset, p.len));
        }
        for (h, &(size, _)) in &v.handles {
            let mut list = parts.remove(h).unwrap_or_default();
            list.sort_unstable();
            let mut at = 0;
            for (off, len) in list {
                if off != at {
                    return Err(format!(
                        "device {}: handle {h}: its mappings and idle pieces overlap or leave a gap",
                        self.core.index
                    ));
                }
                at = off + len;
            }
            if at != size {
                return Err(format!(
                    "device {}: handle {h}: its mappings and idle pieces cover {at} of {size} bytes",
                    self.core.index
                ));
            }
        }
        if !parts.is_empty() {
            return Err(format!(
                "device {}: idle pieces of unknown handles",
                self.core.index
            ));
        }
        Ok(())
    }

    /// Bytes of physical memory held for virtual segments.
    pub(super) fn vmm_physical_bytes(&self) -> u64 {
        self.vmm
            .get()
            .and_then(|v| v.as_deref())
            .map_or(0, |v| v.lock().physical_bytes())
    }

    /// Unmap mappings of `a` (the locked arena of `stream`) that lie in
    /// free blocks proven free (every one with `all_proven`: its stream was
    /// synchronised), outside `exclude`, until `want` bytes are unmapped.
    /// Their memory becomes idle pieces. Returns the bytes unmapped.
    fn vmm_unmap_free(
        &self,
        vmm: &Mutex<Vmm>,
        a: &mut ArenaInner,
        stream: Stream,
        exclude: Option<(u32, u64, u64)>,
        want: u64,
        all_proven: bool,
    ) -> u64 {
        let mut done = 0;
        for (s, va, len, hint) in a.vm_movable(stream, &self.core, exclude, want, all_proven) {
            match self.core.driver.unmap(self.core.index, va, len) {
                Ok(()) => {
                    self.core.counters.vmm_unmaps.inc();
                    let m = a.vm_unmapped(s, va, hint);
                    vmm.lock().put(Piece::of(&m));
                    done += len;
                }
                Err(e) => {
                    tracing::warn!(
                        device = self.core.index,
                        "unmapping {} at {va:#x} failed: {e}; it stays mapped",
                        fs(len)
                    );
                    break;
                }
            }
        }
        done
    }

    /// Release the handles mapped nowhere, within `budget` (the
    /// reservation's floor) when given. Returns the bytes released.
    fn vmm_release_unmapped(&self, vmm: &Mutex<Vmm>, mut budget: Option<FloorBudget>) -> u64 {
        let idle = vmm.lock().unmapped_handles();
        let mut released = 0;
        for (h, size) in idle {
            if budget.as_mut().is_some_and(|b| !b.spend(size)) {
                continue;
            }
            match self.core.driver.phys_release(self.core.index, h) {
                Ok(()) | Err(DriverError::Deinitialized) => {
                    vmm.lock().forget(h);
                    self.core.counters.reserved.sub(size);
                    self.core.counters.vmm_releases.inc();
                    released += size;
                }
                Err(e) => tracing::warn!(
                    device = self.core.index,
                    "releasing {} of physical memory failed: {e}; it stays cached",
                    fs(size)
                ),
            }
        }
        released
    }

    /// The OOM ladder's and `empty_cache`'s release for virtual segments:
    /// unmap the free mappings (proven ones; with `all`, every one, after
    /// synchronising each stream), release the handles mapped nowhere, and
    /// with `all` give back the virtual ranges with nothing mapped. Returns
    /// the bytes of physical memory released. Call with `slow` held and no
    /// capture under way.
    pub(super) fn vmm_release(&self, all: bool) -> u64 {
        let Some(vmm) = self.vmm.get().and_then(|v| v.as_deref()) else {
            return 0;
        };
        for arena in self.arena_list().iter().filter(|a| !a.pooled) {
            let mut a = arena.inner.lock();
            if a.vm_bytes().1 == 0 {
                continue;
            }
            a.flush_stash();
            if all {
                let _ = self
                    .core
                    .driver
                    .stream_synchronize(self.core.index, arena.stream);
            }
            self.vmm_unmap_free(vmm, &mut a, arena.stream, None, u64::MAX, all);
            if all {
                for (s, base, size) in a.vm_empty() {
                    match self.core.driver.va_free(self.core.index, base, size) {
                        Ok(()) | Err(DriverError::Deinitialized) => a.vm_detach(s),
                        Err(e) => tracing::warn!(
                            device = self.core.index,
                            "freeing a virtual range of {} failed: {e}",
                            fs(size)
                        ),
                    }
                }
            }
        }
        // The ladder's first step keeps to the reservation; its second and
        // `empty_cache` do not (reserve.rs).
        let budget = (!all).then(|| self.floor_budget());
        self.vmm_release_unmapped(vmm, budget)
    }

    /// Trim for virtual segments: unmap what is proven free, without
    /// waiting, and release the handles mapped nowhere, until `want` bytes
    /// are released. Call with `slow` held and no capture under way.
    pub(super) fn vmm_trim(&self, want: u64) -> u64 {
        let Some(vmm) = self.vmm.get().and_then(|v| v.as_deref()) else {
            return 0;
        };
        let mut released = self.vmm_release_unmapped(vmm, Some(self.floor_budget()));
        for arena in self.arena_list().iter().filter(|a| !a.pooled) {
            if released >= want {
                break;
            }
            {
                let mut a = arena.inner.lock();
                a.flush_stash();
                self.vmm_unmap_free(vmm, &mut a, arena.stream, None, u64::MAX, false);
            }
            released += self.vmm_release_unmapped(vmm, Some(self.floor_budget()));
        }
        released
    }

    /// Physical memory for `need` bytes of the plan's holes: idle pieces,
    /// then memory moved from free mappings proven free (this arena's
    /// outside the plan, then other streams'), then one new handle. Call
    /// with `slow` held; `a` is `arena`'s lock.
    #[allow(clippy::too_many_arguments)]
    fn vmm_pages(
        &self,
        vmm: &Mutex<Vmm>,
        arena: &Arena,
        a: &mut ArenaInner,
        plan: &Plan,
        need: u64,
        capture_underway: bool,
    ) -> Result<Vec<Piece>> {
        let idle = vmm.lock().idle_bytes();
        if idle < need && !capture_underway {
            let mut short = need - idle;
            let exclude = Some((plan.seg, plan.span.0, plan.span.1));
            short = short.saturating_sub(self.vmm_unmap_free(
                vmm,
                a,
                arena.stream,
                exclude,
                short,
                false,
            ));
            for other in self.arena_list() {
                if short == 0 {
                    break;
                }
                if std::ptr::eq(std::sync::Arc::as_ptr(&other), arena) || other.pooled {
                    continue;
                }
                let mut o = other.inner.lock();
                if o.vm_bytes().0 == 0 {
                    continue;
                }
                o.flush_stash();
                let moved = self.vmm_unmap_free(vmm, &mut o, other.stream, None, short, false);
                short = short.saturating_sub(moved);
            }
        }
        let mut pieces = vmm.lock().take(need);
        let got: u64 = pieces.iter().map(|p| p.len).sum();
        if got < need {
            let n = need - got;
            let (reserved, limit) = (self.core.counters.reserved.current(), self.limit());
            let fail = |why: String, pieces: Vec<Piece>| {
                let mut v = vmm.lock();
                for p in pieces {
                    v.give(p);
                }
                Error::new(ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY, why)
            };
            if reserved.saturating_add(n) > limit {
                return Err(fail(
                    format!(
                        "reserved {} plus {} of new pages would pass the limit of {}",
                        fs(reserved),
                        fs(n),
                        fs(limit)
                    ),
                    pieces,
                ));
            }
            match self.vmm_create(vmm, n) {
                Ok(p) => pieces.push(p),
                Err(DriverError::OutOfMemory) => {
                    return Err(fail(
                        format!("the driver has no {} of physical memory to give", fs(n)),
                        pieces,
                    ))
                }
                Err(e) => return Err(fail(e.to_string(), pieces)),
            }
        }
        Ok(pieces)
    }

    /// Map `pieces` (worth exactly the plan's holes) into the holes, grant
    /// access, and make them free blocks. On a driver failure, the hole
    /// being mapped is undone and every unused piece goes back.
    fn vmm_map(
        &self,
        vmm: &Mutex<Vmm>,
        a: &mut ArenaInner,
        plan: &Plan,
        pieces: Vec<Piece>,
    ) -> Result<()> {
        let dev = self.core.index;
        let driver = &self.core.driver;
        let mut pieces: std::collections::VecDeque<Piece> = pieces.into();
        // Each mapping is unmapped whole or not at all: smaller ones let free
        // pages move sooner, bigger ones cost fewer calls (see MAP_PARTS).
        let page = vmm.lock().page;
        let unit = ((plan.span.1 - plan.span.0) / MAP_PARTS)
            .max(page)
            .next_multiple_of(page);
        for (&(va, len), &hint) in plan.holes.iter().zip(&plan.hole_blocks) {
            let mut maps: Vec<(u64, Mapping)> = Vec::new();
            let mut at = va;
            let mut failed = None;
            while at < va + len {
                let p = *pieces.front().expect("pieces cover the holes");
                let n = (va + len - at).min(p.len).min(unit);
                if let Err(e) = driver.map(dev, at, n, p.handle, p.offset) {
                    failed = Some(e);
                    break;
                }
                self.core.counters.vmm_maps.inc();
                if let Some(h) = vmm.lock().handles.get_mut(&p.handle) {
                    h.1 += n;
                }
                maps.push((at, Mapping::new(n, p.handle, p.offset)));
                let f = pieces.front_mut().expect("just read");
                f.offset += n;
                f.len -= n;
                if f.len == 0 {
                    pieces.pop_front();
                }
                at += n;
            }
            if failed.is_none() {
                match driver.set_access(dev, va, len) {
                    Ok(()) => self.core.counters.vmm_set_access.inc(),
                    Err(e) => failed = Some(e),
                }
            }
            if let Some(e) = failed {
                let mut v = vmm.lock();
                for (m_at, m) in maps {
                    if driver.unmap(dev, m_at, m.len).is_ok() {
                        self.core.counters.vmm_unmaps.inc();
                        v.put(Piece::of(&m));
                    } else {
                        tracing::warn!(device = dev, "undoing a mapping at {m_at:#x} failed");
                    }
                }
                for p in pieces {
                    v.give(p);
                }
                return Err(e.into());
            }
            a.vm_fill(plan.seg, va, len, hint, maps);
        }
        debug_assert!(pieces.is_empty());
        Ok(())
    }
}

impl Engine {
    /// A request the free index could not serve, in a virtual segment: plan
    /// it (reserving a new range when none holds it), map what it needs,
    /// and carve it. Call with `slow` held.
    pub(super) fn serve_virtual(
        &self,
        dev: &Device,
        arena: &Arena,
        vmm: &Mutex<Vmm>,
        want: &Want,
    ) -> Result<u64> {
        let (pool, rounded, size) = (want.pool, want.rounded, want.size);
        let page = vmm.lock().page;
        let mut a = arena.inner.lock();
        a.best_fit = true;
        let plan = match a.vm_plan(pool, rounded) {
            Some(p) => p,
            None => {
                let vsize = virtual_size(dev.total(), rounded, page, pool);
                let base = self
                    .driver
                    .va_reserve(dev.core.index, vsize)
                    .map_err(|e| match e {
                        DriverError::OutOfMemory => Error::new(
                            ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY,
                            format!("no virtual address range of {} is left", fs(vsize)),
                        ),
                        e => e.into(),
                    })?;
                a.attach_virtual(base, vsize, pool, page);
                a.vm_plan(pool, rounded)
                    .expect("a fresh virtual range holds the request")
            }
        };
        let need = plan.bytes();
        if need > 0 {
            let pieces = dev.vmm_pages(vmm, arena, &mut a, &plan, need, want.capture_underway)?;
            dev.vmm_map(vmm, &mut a, &plan, pieces)?;
        } else {
            a.counters.cache_hits += 1;
        }
        let (p, block) = a.vm_alloc_at(
            plan.seg,
            plan.start,
            plan.first_block,
            rounded,
            size,
            &self.policy,
            &dev.core,
        );
        dev.note_alloc(arena, block);
        self.journal_allocated(dev, p, size, arena);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::*;

    const M: u64 = 1 << 20;

    /// Every live block lies on mapped pages with access granted, and the
    /// driver saw no broken rule.
    fn all_live_accessible(a: &Engine, d: &SimDriver) {
        for l in a.live_allocations(None) {
            assert!(
                d.accessible(l.device, l.ptr, l.size),
                "live block {:#x} of {} bytes is not accessible",
                l.ptr,
                l.size
            );
        }
        assert_eq!(d.counters().vmm_violations, 0, "a VMM rule was broken");
        a.check_invariants().unwrap();
    }

    /// Growth maps only the pages requests need, in one virtual range per
    /// stream and pool, with one create, a few maps and one access grant
    /// per growth; no classic segment is made.
    #[test]
    fn growth_maps_only_the_pages_requests_need() {
        let (a, d) = sim("sim_memory:1GiB,expandable_segments:on");
        let p = a.malloc(3 * M, 0, 0).unwrap();
        let q = a.malloc(5 * M + 1000, 0, 0).unwrap();
        let r = a.malloc(4096, 0, 0).unwrap();
        all_live_accessible(&a, &d);
        assert_eq!(q, p + 3 * M, "placed back to back, as on one heap");
        let st = a.stats(0).unwrap();
        // 3 MiB -> 2 pages; 5 MiB + 1000 from 3 MiB on -> pages up to 10 MiB; the small pool: one page.
        assert_eq!(st.mapped_bytes, 10 * M + 2 * M);
        assert_eq!(st.reserved_bytes, st.mapped_bytes);
        assert_eq!(d.counters().mem_allocs, 0, "no classic segment");
        assert_eq!(d.counters().va_reserves, 2, "one range per pool");
        assert_eq!(st.num_vmm_creates, 3);
        assert_eq!(st.num_vmm_set_access, 3);
        for x in [p, q, r] {
            a.free(x, Some(0), 0).unwrap();
        }
        // Freed memory stays mapped and is reused with no driver call.
        let c = d.counters();
        let s = a.malloc(8 * M, 0, 0).unwrap();
        assert_eq!(s, p);
        assert_eq!(d.counters().maps, c.maps);
        a.free(s, Some(0), 0).unwrap();
        all_live_accessible(&a, &d);
    }

    /// A request that fits no free stretch takes the pages of a free
    /// mapping elsewhere (proven free: the stream is idle) instead of new
    /// memory: reserved stays at the high-water mark of live pages.
    #[test]
    fn free_pages_move_where_a_request_needs_them() {
        let (a, d) = sim("sim_memory:1GiB,expandable_segments:on");
        let x = a.malloc(10 * M, 0, 0).unwrap();
        let y = a.malloc(10 * M, 0, 0).unwrap();
        a.free(x, Some(0), 0).unwrap();
        let creates = a.stats(0).unwrap().num_vmm_creates;
        // 12 MiB fits not x's 10 MiB hole: it goes above y, on x's pages.
        let z = a.malloc(12 * M, 0, 0).unwrap();
        assert_eq!(z, y + 10 * M);
        let st = a.stats(0).unwrap();
        assert!(st.num_vmm_unmaps > 0, "x's pages moved");
        assert_eq!(
            st.num_vmm_creates,
            creates + 1,
            "only the 2 MiB x's 10 did not cover"
        );
        assert_eq!(st.reserved_bytes, 22 * M);
        all_live_accessible(&a, &d);
        for p in [y, z] {
            a.free(p, Some(0), 0).unwrap();
        }
        all_live_accessible(&a, &d);
    }

    /// Pages move to another stream only once the frees on them are proven
    /// complete: not while the stream's work may still use them, and then
    /// once an epoch event recorded after the frees has completed.
    #[test]
    fn pages_move_to_another_stream_only_once_proven_free() {
        let (a, d) = sim("sim_memory:1GiB,expandable_segments:on");
        d.set_manual_events(true);
        // Stream 1 frees EPOCH_SPACING distinct mappings: an epoch event is due
        // and recorded at the last free.
        let ps: Vec<u64> = (0..EPOCH_SPACING)
            .map(|_| a.malloc(4 * M, 0, 1).unwrap())
            .collect();
        free_all(&a, 1, &ps);
        let before = a.stats(0).unwrap();
        // Stream 2 wants 8 MiB: stream 1's pages are not proven free yet.
        let q = a.malloc(8 * M, 0, 2).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(st.num_vmm_unmaps, before.num_vmm_unmaps, "nothing moved");
        assert_eq!(
            st.reserved_bytes,
            before.reserved_bytes + 8 * M,
            "new memory"
        );
        // Stream 1's work completes: its epoch event proves its frees.
        d.complete_stream(0, 1);
        let r = a.malloc(16 * M, 0, 2).unwrap();
        let st2 = a.stats(0).unwrap();
        assert!(st2.num_vmm_unmaps > st.num_vmm_unmaps, "moved once proven");
        assert_eq!(st2.reserved_bytes, st.reserved_bytes, "no new memory");
        all_live_accessible(&a, &d);
        free_all(&a, 2, &[q, r]);
        all_live_accessible(&a, &d);
    }

    /// During a capture nothing is unmapped or released (either would
    /// invalidate it); new pages are still created and mapped (relaxed
    /// mode). `empty_cache` waits for the capture to end.
    #[test]
    fn nothing_is_unmapped_or_released_during_a_capture() {
        let (a, d) = sim("sim_memory:1GiB,expandable_segments:on");
        let x = a.malloc(20 * M, 0, 1).unwrap();
        a.free(x, Some(0), 1).unwrap();
        d.set_capturing(2, true);
        let c = d.counters();
        let y = a.malloc(20 * M, 0, 2).unwrap();
        assert_eq!(a.empty_cache(), 0, "nothing released during a capture");
        let c2 = d.counters();
        assert_eq!((c2.unmaps, c2.phys_releases, c2.va_frees), (c.unmaps, 0, 0));
        assert!(c2.phys_creates > c.phys_creates && c2.maps > c.maps);
        assert_eq!(c2.capture_violations, 0);
        d.set_capturing(2, false);
        a.free(y, Some(0), 2).unwrap();
        assert_eq!(a.empty_cache(), 40 * M);
        all_live_accessible(&a, &d);
    }

    /// `empty_cache` unmaps every free page, releases the memory and gives
    /// the virtual ranges back; the OOM ladder synchronises and moves pages
    /// that were not proven free.
    #[test]
    fn empty_cache_and_the_oom_ladder_give_memory_back() {
        let (a, d) = sim("sim_memory:64MiB,expandable_segments:on");
        d.set_manual_events(true);
        let x = a.malloc(40 * M, 0, 1).unwrap();
        a.free(x, Some(0), 1).unwrap();
        // Not proven free, and no room for 40 MiB more: the ladder's second
        // step synchronises stream 1 and moves its pages.
        let y = a.malloc(40 * M, 0, 2).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!(st.reserved_bytes, 40 * M);
        assert!(st.num_alloc_retries >= 1 && st.num_ooms == 0);
        all_live_accessible(&a, &d);
        a.free(y, Some(0), 2).unwrap();
        assert_eq!(a.empty_cache(), 40 * M);
        let st = a.stats(0).unwrap();
        assert_eq!(
            (st.reserved_bytes, st.mapped_bytes, st.virtual_bytes),
            (0, 0, 0)
        );
        assert_eq!(d.vmm_bytes(0), (0, 0));
        let c = d.counters();
        assert_eq!(c.va_frees, c.va_reserves, "every range given back");
        // A request past the device fails cleanly, with the diagnosis.
        let e = a.malloc(80 * M, 0, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
        all_live_accessible(&a, &d);
    }

    /// The OOM diagnosis says what virtual segments hold.
    #[test]
    fn the_diagnosis_reports_mapped_physical_and_virtual_bytes() {
        let (a, _) = sim("sim_memory:64MiB,expandable_segments:on");
        let x = a.malloc(30 * M, 0, 0).unwrap();
        let e = a.malloc(40 * M, 0, 0).unwrap_err();
        assert!(
            e.message
                .contains("expandable segments: mapped 30MiB, physical 30MiB (0B cached unmapped), virtual range"),
            "{}",
            e.message
        );
        a.free(x, Some(0), 0).unwrap();
    }

    /// Without virtual memory (an old driver or GPU) classic segments serve.
    #[test]
    fn without_virtual_memory_classic_segments_serve() {
        let (a, d) = sim("sim_memory:1GiB,expandable_segments:on");
        d.set_vmm_supported(false);
        let (p, logs) = crate::global::capture_logs(|| a.malloc(3 * M, 0, 0).unwrap());
        assert!(logs.contains("virtual memory is not available"), "{logs}");
        let (q, logs) = crate::global::capture_logs(|| a.malloc(3 * M, 0, 0).unwrap());
        assert!(logs.is_empty(), "one warning: {logs}");
        assert_eq!(d.counters().mem_allocs, 1);
        assert_eq!(a.stats(0).unwrap().virtual_bytes, 0);
        free_all(&a, 0, &[p, q]);
        a.check_invariants().unwrap();
    }

    /// Sizes that waste a tenth of the device in classic segments (3 and
    /// 9 MiB do not divide 20 MiB; 11 MiB is not a multiple of 2 MiB) fill
    /// at least 0.99 of it with virtual segments.
    #[test]
    fn single_sizes_fill_the_device() {
        for size in [3 * M, 9 * M, 11 * M] {
            let (a, d) = sim("sim_memory:1GiB,expandable_segments:on");
            let mut held = Vec::new();
            while let Ok(p) = a.malloc(size, 0, 0) {
                held.push(p);
            }
            let used = held.len() as u64 * size;
            assert!(
                used as f64 >= 0.99 * (1u64 << 30) as f64,
                "{size}: {used} bytes of 1 GiB"
            );
            all_live_accessible(&a, &d);
            free_all(&a, 0, &held);
        }
    }

    /// The warm-up reservation is physical memory cached unmapped: any
    /// stream and both pools are served from it with no new memory.
    #[test]
    fn the_reservation_serves_any_stream_and_both_pools() {
        let (a, d) = sim("sim_memory:1GiB,expandable_segments:on,reserve:64MiB");
        let p = a.malloc(30 * M, 0, 1).unwrap();
        let q = a.malloc(20 * M, 0, 2).unwrap();
        let r = a.malloc(1000, 0, 3).unwrap();
        let st = a.stats(0).unwrap();
        assert_eq!((st.num_vmm_creates, st.reserved_bytes), (1, 64 * M));
        all_live_accessible(&a, &d);
        free_all(&a, 1, &[p]);
        free_all(&a, 2, &[q]);
        free_all(&a, 3, &[r]);
        assert_eq!(a.trim(0, u64::MAX), 0, "trim keeps the reservation");
        assert_eq!(a.empty_cache(), 64 * M);
        a.check_invariants().unwrap();
    }
}
