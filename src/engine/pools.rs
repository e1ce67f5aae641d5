//! Private memory pools: PyTorch's graph pools (`beginAllocateToPool`,
//! `endAllocateToPool`, `releasePool`; on with `graph_pools:on`).
//!
//! While a CUDA graph is captured, PyTorch sends the capture's allocations to
//! a pool of its own, so that the memory the graph replays into is never
//! handed to anyone else while the graph lives. Here a pool is a set of
//! arenas, one per stream it allocated on, kept in the device's arena map
//! under keys of their own (`(stream, n)`, n > 0; a stream's own arena is
//! `(stream, 0)`) and tagged with the pool ([`PoolTag`]). So statistics, frees, the leak report and the invariant
//! check see them as any arena, and:
//! - a pool's segments come only from the driver: a pool arena never adopts,
//!   and is never adopted from or trimmed, nor released by the OOM ladder's
//!   non-blocking steps or before growth;
//! - a block freed into a pool goes back to that pool, even during a capture
//!   (no quarantine): only the pool's later allocations can reuse it, in the
//!   order the graph (or the captures sharing the pool) fixes;
//! - while a capture may be under way on the device (a pool routes, and
//!   nothing was routed yet or a stream something was routed on is still
//!   capturing: `Device::pool_capture_underway`), nothing on that device goes
//!   back to the driver, no idle segment changes hands, no pending free is
//!   asked about, no `cuMemGetInfo` is made (pressure sampling, the OOM
//!   diagnosis), and a `record_stream` free records its events only once no
//!   stream it waits on captures: a `cuMemFree`, a synchronisation, or an
//!   event, stream or memory query would invalidate a global-mode capture
//!   (PyTorch's allocator holds back the same way). What still runs:
//!   `cuMemAlloc` in relaxed mode, and `cuStreamIsCapturing` (legal during a
//!   capture). `begin_pool` waits for the slow and fast paths already
//!   running, and reads the device's total before the capture starts;
//! - two routings of one pool at once are refused (as PyTorch's allocator
//!   does), unless the first outlived a failed capture: then it ends, and
//!   its reference is dropped (PyTorch never releases a failed graph);
//! - `begin_pool` takes a reference, `release_pool` drops one. At zero the
//!   pool is *released*: its idle segments go back to the driver at the next
//!   `empty_cache` or synchronising OOM-ladder step (which synchronise, and
//!   `cuMemFree` waits for the device: a replay still running on any stream
//!   is done first), and once it holds no segment its arenas become spares
//!   for the next pool on the same stream.
//!
//! Which allocations go to a pool is PyTorch's filter's answer. The FFI layer
//! keeps the filters and asks them (`ffi/cxx_function.rs`), then calls
//! [`Engine::malloc_pool`].

use super::arena::{Arena, PoolId, PoolTag};
use super::device::Device;
use super::pool_state::{show, Pools};
use super::Engine;
use crate::driver::Stream;
use crate::error::{Error, ErrorCode, Result};
use std::sync::Arc;

impl Device {
    /// The arena of pool `id` for `stream`, made (or taken from the spares)
    /// on first use.
    pub(super) fn pool_arena(&self, id: PoolId, stream: Stream) -> Result<&Arena> {
        let mut pools = self.pools.lock();
        let Pools {
            map,
            spare,
            next_key,
        } = &mut *pools;
        let st = match map.get_mut(&id) {
            Some(st) if st.refs > 0 => st,
            _ => {
                return Err(Error::new(
                    ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                    format!(
                        "{} of device {} is not live (allocation routed to a pool never begun, or released)",
                        show(id),
                        self.core.index
                    ),
                ))
            }
        };
        if st.routing > 0 && !st.routed_streams.contains(&stream) {
            st.routed_streams.push(stream);
            st.captured |= matches!(
                self.core
                    .driver
                    .stream_is_capturing(self.core.index, stream),
                Ok(true)
            );
        }
        let arc = match st.arenas.iter().find(|a| a.stream == stream) {
            Some(a) => a.clone(),
            None => {
                let arc = match spare.iter().position(|a| a.stream == stream) {
                    Some(i) => spare.swap_remove(i),
                    None => {
                        let arc = Arc::new(Arena::new_pooled(stream, self.core.clock()));
                        *next_key += 1;
                        self.arenas.write().insert((stream, *next_key), arc.clone());
                        arc
                    }
                };
                arc.inner.lock().pool = PoolTag::Live(id);
                st.arenas.push(arc.clone());
                arc
            }
        };
        // SAFETY: the arena is in `self.arenas`, which never drops an arena
        // while `self` lives (see `Device::arena`).
        Ok(unsafe { &*Arc::as_ptr(&arc) })
    }

    /// The pool bookkeeping agrees with the arenas' tags. Call with `slow` held.
    pub(super) fn check_pools(&self) -> std::result::Result<(), String> {
        let pools = self.pools.lock();
        let d = self.core.index;
        for (&id, st) in &pools.map {
            let want = if st.refs > 0 {
                PoolTag::Live(id)
            } else {
                PoolTag::Released(id)
            };
            for a in &st.arenas {
                let tag = a.inner.lock().pool;
                if !a.pooled || tag != want {
                    return Err(format!(
                        "device {d}: an arena of {} is tagged {tag:?}, not {want:?}",
                        show(id)
                    ));
                }
            }
        }
        for a in &pools.spare {
            let inner = a.inner.lock();
            if inner.pool != PoolTag::Spare || inner.segment_count() != 0 {
                return Err(format!(
                    "device {d}: a spare pool arena is tagged {:?} with {} segments",
                    inner.pool,
                    inner.segment_count()
                ));
            }
        }
        drop(pools);
        for a in self.arena_list() {
            if !a.pooled && a.inner.lock().pool != PoolTag::None {
                return Err(format!(
                    "device {d}: stream {:#x}'s own arena is tagged as a pool's",
                    a.stream
                ));
            }
        }
        Ok(())
    }
}

impl Engine {
    /// Start routing allocations to pool `id` of `device` (PyTorch's
    /// `beginAllocateToPool`; which allocations, the caller decides): the
    /// pool is made on first use, takes a reference, and until
    /// [`Engine::end_pool`] nothing on the device goes back to the driver
    /// while the capture runs. A pool already routing is an error, unless
    /// that routing outlived its capture (it failed before PyTorch ended
    /// it): then that routing ends and its reference is dropped. Returns how
    /// many routings it ended so (the caller drops their filters).
    pub fn begin_pool(&self, device: usize, id: PoolId) -> Result<u64> {
        let dev = self.device(device)?;
        // No slow path is running once this is held, and none starts before
        // `captures` is raised: none can release or query after PyTorch
        // starts the capture.
        let _slow = dev.slow.lock();
        // Read the device's total now: cuMemGetInfo once the capture runs
        // could invalidate it.
        dev.total();
        let ended = {
            let mut pools = dev.pools.lock();
            let ended = match pools.map.get(&id) {
                Some(st) if st.routing > 0 => {
                    // Stale: it served a capture that is over (one that
                    // failed before PyTorch ended it). A routing outside
                    // any capture is live however idle its streams are.
                    if !(st.captured && dev.routing_idle(st)) {
                        // PyTorch's own allocator refuses this too.
                        return Err(Error::new(
                            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                            format!(
                                "{} of device {device} is already routing a capture",
                                show(id)
                            ),
                        ));
                    }
                    st.routing
                }
                _ => 0,
            };
            let st = pools.map.entry(id).or_default();
            if ended > 0 {
                // A capture that failed after its first allocation: PyTorch
                // called neither the end hook nor, for that graph, the
                // release hook. End its routing and drop its reference.
                tracing::warn!(
                    device,
                    "{}: ending the routing of a capture that failed before PyTorch ended it",
                    show(id)
                );
                st.end_routings(ended);
                st.refs = st.refs.saturating_sub(ended);
                dev.core.capture.routings_end(ended as usize);
            }
            for a in &st.arenas {
                let mut inner = a.inner.lock();
                inner.pool = PoolTag::Live(id);
                // The pool's record_stream frees that completed meanwhile
                // are its again (not during another capture: no queries).
                if !dev.core.pools_routing() {
                    inner.process_pending(&dev.core, false);
                }
            }
            st.refs += 1;
            st.routing += 1;
            dev.core.capture.routings_begin(1);
            ended
        };
        // A fast path that read `captures` before the raise may still be
        // processing pending frees under its arena's lock: wait for it.
        for a in dev.arena_list() {
            drop(a.inner.lock());
        }
        Ok(ended)
    }

    /// Stop routing to pool `id` (PyTorch's `endAllocateToPool`). The pool
    /// keeps its reference and its memory.
    pub fn end_pool(&self, device: usize, id: PoolId) -> Result<()> {
        let dev = self.device(device)?;
        let _slow = dev.slow.lock();
        let mut pools = dev.pools.lock();
        match pools.map.get_mut(&id) {
            Some(st) if st.routing > 0 => {
                st.end_routings(1);
                let was = dev.core.capture.routings_end(1);
                drop(pools);
                if was == 1 {
                    // The last capture is over: record the events of the
                    // record_stream frees it held back.
                    for a in dev.arena_list() {
                        a.inner.lock().record_deferred(&dev.core);
                    }
                }
                Ok(())
            }
            _ => Err(Error::new(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                format!(
                    "end of routing to {} of device {device}, which nothing routes to",
                    show(id)
                ),
            )),
        }
    }

    /// Drop a reference to pool `id` (PyTorch's `releasePool`, when a graph
    /// is reset or destroyed). At zero the pool is released: its memory goes
    /// back to the driver at the next `empty_cache` once freed.
    pub fn release_pool(&self, device: usize, id: PoolId) -> Result<()> {
        let dev = self.device(device)?;
        let _slow = dev.slow.lock();
        let mut pools = dev.pools.lock();
        match pools.map.get_mut(&id) {
            Some(st) if st.refs > 0 => {
                st.refs -= 1;
                if st.refs == 0 {
                    for a in &st.arenas {
                        a.inner.lock().pool = PoolTag::Released(id);
                    }
                }
                Ok(())
            }
            _ => Err(Error::new(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                format!(
                    "release of {} of device {device}, which holds no reference",
                    show(id)
                ),
            )),
        }
    }

    /// Allocate `size` bytes on `device` for `stream` from pool `id`, which
    /// must be live ([`Engine::begin_pool`]). Freed with
    /// [`Engine::free`], like any allocation.
    pub fn malloc_pool(&self, size: u64, device: usize, stream: Stream, id: PoolId) -> Result<u64> {
        self.malloc_in(size, device, stream, Some(id))
    }

    /// The driver's `(free, total)` for `device`, unless a graph capture may
    /// be under way there (`None`: cuMemGetInfo could invalidate it). Holds
    /// the device's slow lock, so no pool's capture starts meanwhile (a
    /// C/C++ capture has no hook to wait on: README); without
    /// `wait`, `None` too when another thread holds it (a periodic sample
    /// skips rather than waits on a slow path).
    pub fn mem_info_outside_capture(
        &self,
        device: usize,
        wait: bool,
    ) -> Option<crate::driver::DriverResult<(u64, u64)>> {
        let dev = self.devices.get(device)?;
        let _slow = if wait {
            dev.slow.lock()
        } else {
            dev.slow.try_lock()?
        };
        if dev.capture_underway() {
            return None;
        }
        Some(self.driver.mem_info(device))
    }

    /// Live pools of `device` and their reference counts (tests, diagnosis).
    pub fn pools(&self, device: usize) -> Result<Vec<(PoolId, u64)>> {
        let dev = self.device(device)?;
        let pools = dev.pools.lock();
        let mut v: Vec<(PoolId, u64)> = pools.map.iter().map(|(&id, st)| (id, st.refs)).collect();
        v.sort_unstable();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::driver::sim::SimDriver;

    const MIB: u64 = 1 << 20;
    const P: PoolId = (1, 0);

    fn sim() -> (Engine, Arc<SimDriver>) {
        let c = Config::parse("sim_memory:1GiB").unwrap();
        let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
        (Engine::new(c, d.clone()), d)
    }

    fn arenas(a: &Engine) -> usize {
        a.devices[0].arenas.read().len()
    }

    #[test]
    fn a_pools_memory_serves_only_that_pool() {
        let (a, _) = sim();
        a.begin_pool(0, P).unwrap();
        let x = a.malloc_pool(4 * MIB, 0, 0x10, P).unwrap();
        a.free(x, Some(0), 0x10).unwrap();
        // The same stream, outside the pool: the pool's free block is not its.
        let e = a.malloc(4 * MIB, 0, 0x10).unwrap();
        assert_ne!(e, x);
        assert_eq!(
            a.malloc_pool(4 * MIB, 0, 0x10, P).unwrap(),
            x,
            "the pool reuses its own"
        );
        a.end_pool(0, P).unwrap();
        a.free(x, Some(0), 0x10).unwrap();
        a.free(e, Some(0), 0x10).unwrap();
        // Another stream never adopts the pool's idle segment.
        let adopted = a.stats(0).unwrap().num_segments_adopted;
        let f = a.malloc(4 * MIB, 0, 0x20).unwrap();
        assert_ne!(f, x);
        let st = a.stats(0).unwrap();
        assert_eq!(
            st.num_segments_adopted,
            adopted + 1,
            "adopted the stream's segment"
        );
        a.free(f, Some(0), 0x20).unwrap();
        // Nor does trim touch it.
        a.trim(0, u64::MAX);
        assert_eq!(
            a.stats(0).unwrap().reserved_bytes,
            20 * MIB,
            "the pool's 20 MiB segment"
        );
        a.check_invariants().unwrap();
    }

    #[test]
    fn nothing_goes_back_to_the_driver_during_a_capture() {
        let (a, d) = sim();
        let g = a.malloc(4 * MIB, 0, 0x10).unwrap();
        a.free(g, Some(0), 0x10).unwrap();
        a.begin_pool(0, P).unwrap();
        d.set_capturing(0x10, true);
        let x = a.malloc_pool(4 * MIB, 0, 0x10, P).unwrap();
        let reserved = a.stats(0).unwrap().reserved_bytes;
        let frees = d.counters().mem_frees;
        assert_eq!(a.empty_cache(), 0);
        assert_eq!(a.trim(0, u64::MAX), 0);
        assert_eq!(a.stats(0).unwrap().reserved_bytes, reserved);
        assert_eq!(
            d.counters().mem_frees,
            frees,
            "no cuMemFree during a capture"
        );
        // No segment changes hands, and no stream or event is asked.
        let c = d.counters();
        let h = a.malloc(4 * MIB, 0, 0x30).unwrap();
        assert_eq!(a.stats(0).unwrap().num_segments_adopted, 0);
        let c2 = d.counters();
        assert_eq!(
            (c2.stream_queries, c2.event_queries, c2.event_records),
            (c.stream_queries, c.event_queries, c.event_records)
        );
        a.free(h, Some(0), 0x30).unwrap();
        d.set_capturing(0x10, false);
        a.end_pool(0, P).unwrap();
        // After the capture: the streams' idle segments go, the live pool's stays.
        assert_eq!(a.empty_cache(), 40 * MIB);
        a.free(x, Some(0), 0x10).unwrap();
        assert_eq!(a.empty_cache(), 0, "a live pool keeps its memory");
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 20 * MIB);
        a.release_pool(0, P).unwrap();
        assert_eq!(
            a.empty_cache(),
            20 * MIB,
            "a released pool's memory goes back"
        );
        assert!(a.pools(0).unwrap().is_empty(), "and the pool is gone");
        a.check_invariants().unwrap();
        // Its arena is a spare: the next pool on that stream takes it.
        let n = arenas(&a);
        a.begin_pool(0, (2, 0)).unwrap();
        let y = a.malloc_pool(4 * MIB, 0, 0x10, (2, 0)).unwrap();
        assert_eq!(arenas(&a), n);
        a.free(y, Some(0), 0x10).unwrap();
        a.end_pool(0, (2, 0)).unwrap();
        a.check_invariants().unwrap();
    }

    #[test]
    fn a_released_pool_keeps_live_blocks_until_freed() {
        let (a, _) = sim();
        a.begin_pool(0, P).unwrap();
        let x = a.malloc_pool(MIB, 0, 0x10, P).unwrap();
        a.end_pool(0, P).unwrap();
        a.release_pool(0, P).unwrap();
        assert_eq!(a.empty_cache(), 0, "x is live");
        assert_eq!(a.pools(0).unwrap(), vec![(P, 0)]);
        assert!(
            a.malloc_pool(MIB, 0, 0x10, P).is_err(),
            "released: routes nothing"
        );
        a.free(x, Some(0), 0x10).unwrap();
        assert_eq!(a.empty_cache(), 2 * MIB);
        assert!(a.pools(0).unwrap().is_empty());
        a.check_invariants().unwrap();
    }

    #[test]
    fn frees_into_a_pool_during_a_capture_are_its_to_reuse() {
        let (a, d) = sim();
        // The capture is seen (a general miss on the capturing stream) ...
        d.set_capturing(0x10, true);
        let g = a.malloc(4096, 0, 0x10).unwrap();
        a.free(g, Some(0), 0x10).unwrap();
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 4096, "quarantined");
        // ... but a pool's block freed during it goes back to the pool.
        a.begin_pool(0, P).unwrap();
        let x = a.malloc_pool(4096, 0, 0x10, P).unwrap();
        a.free(x, Some(0), 0x10).unwrap();
        assert_eq!(a.malloc_pool(4096, 0, 0x10, P).unwrap(), x);
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 4096);
        a.check_invariants().unwrap();
    }

    #[test]
    fn pools_refcount_across_graphs_that_share_one() {
        let (a, _) = sim();
        // make_graphed_callables: two captures into one pool, two releases.
        for _ in 0..2 {
            a.begin_pool(0, P).unwrap();
            let x = a.malloc_pool(MIB, 0, 0x10, P).unwrap();
            a.free(x, Some(0), 0x10).unwrap();
            a.end_pool(0, P).unwrap();
        }
        assert_eq!(a.pools(0).unwrap(), vec![(P, 2)]);
        a.release_pool(0, P).unwrap();
        assert_eq!(a.empty_cache(), 0, "one graph still holds the pool");
        a.release_pool(0, P).unwrap();
        assert_eq!(a.empty_cache(), 2 * MIB);
        a.check_invariants().unwrap();
    }

    #[test]
    fn record_stream_frees_during_a_capture_record_their_events_at_its_end() {
        let (a, d) = sim();
        let p = a.malloc(4096, 0, 0x10).unwrap();
        a.record_stream(p, 0x20).unwrap();
        a.begin_pool(0, P).unwrap();
        let records = d.counters().event_records;
        a.free(p, Some(0), 0x10).unwrap();
        assert_eq!(
            d.counters().event_records,
            records,
            "no event during the capture"
        );
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 4096);
        a.check_invariants().unwrap();
        a.end_pool(0, P).unwrap();
        assert_eq!(
            d.counters().event_records,
            records + 1,
            "recorded at the end"
        );
        assert_eq!(
            a.malloc(4096, 0, 0x10).unwrap(),
            p,
            "then reused once complete"
        );
        a.check_invariants().unwrap();
    }

    #[test]
    fn a_pools_record_stream_frees_come_back_to_it() {
        let (a, _) = sim();
        a.begin_pool(0, P).unwrap();
        let x = a.malloc_pool(4 * MIB, 0, 0x10, P).unwrap();
        a.record_stream(x, 0x20).unwrap();
        a.free(x, Some(0), 0x10).unwrap();
        a.end_pool(0, P).unwrap();
        // The next capture into the pool finds the block free again.
        a.begin_pool(0, P).unwrap();
        assert_eq!(a.malloc_pool(4 * MIB, 0, 0x10, P).unwrap(), x);
        a.end_pool(0, P).unwrap();
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 20 * MIB);
        a.check_invariants().unwrap();
    }

    #[test]
    fn a_capture_that_ended_without_its_end_hook_holds_nothing_back() {
        // PyTorch skips endAllocateToPool when cudaStreamEndCapture fails.
        let (a, d) = sim();
        let g = a.malloc(4 * MIB, 0, 0x20).unwrap();
        a.free(g, Some(0), 0x20).unwrap();
        a.begin_pool(0, P).unwrap();
        assert_eq!(a.empty_cache(), 0, "begun, nothing routed yet: held back");
        d.set_capturing(0x10, true);
        let x = a.malloc_pool(MIB, 0, 0x10, P).unwrap();
        assert_eq!(a.empty_cache(), 0, "its stream is capturing: held back");
        d.set_capturing(0x10, false); // the capture failed; no end hook
        assert_eq!(
            a.empty_cache(),
            20 * MIB,
            "the stream's own idle segment goes"
        );
        a.free(x, Some(0), 0x10).unwrap();
        a.check_invariants().unwrap();
    }

    #[test]
    fn a_second_routing_of_a_pool_is_refused_unless_the_first_outlived_its_capture() {
        let (a, d) = sim();
        a.begin_pool(0, P).unwrap();
        d.set_capturing(0x10, true);
        let x = a.malloc_pool(MIB, 0, 0x10, P).unwrap();
        assert_eq!(
            a.begin_pool(0, P).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
            "PyTorch refuses two captures into one pool at once"
        );
        // The capture fails: no end hook, no release for that graph.
        d.set_capturing(0x10, false);
        assert_eq!(a.begin_pool(0, P).unwrap(), 1, "the stale routing ends");
        assert_eq!(a.pools(0).unwrap(), vec![(P, 1)], "and its reference goes");
        a.end_pool(0, P).unwrap();
        assert!(!a.devices[0].core.pools_routing());
        a.free(x, Some(0), 0x10).unwrap();
        a.release_pool(0, P).unwrap();
        assert_eq!(a.empty_cache(), 2 * MIB);
        a.check_invariants().unwrap();
    }

    #[test]
    fn a_routing_outside_any_capture_is_never_ended_by_another() {
        // use_mem_pool-style routing: allocations sent to the pool with no
        // capture; a second begin on that pool must be refused, not end it.
        let (a, _) = sim();
        a.begin_pool(0, P).unwrap();
        let x = a.malloc_pool(MIB, 0, 0x10, P).unwrap();
        assert_eq!(
            a.begin_pool(0, P).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
        );
        assert_eq!(a.pools(0).unwrap(), vec![(P, 1)]);
        a.end_pool(0, P).unwrap();
        a.free(x, Some(0), 0x10).unwrap();
        a.release_pool(0, P).unwrap();
        a.check_invariants().unwrap();
    }

    #[test]
    fn deferred_frees_wait_while_their_stream_captures() {
        let (a, d) = sim();
        let p = a.malloc(4096, 0, 0x10).unwrap();
        a.record_stream(p, 0x20).unwrap();
        a.begin_pool(0, P).unwrap();
        a.free(p, Some(0), 0x10).unwrap();
        d.set_capturing(0x20, true); // 0x20 captures past the end hook
        let records = d.counters().event_records;
        a.end_pool(0, P).unwrap();
        assert_eq!(
            d.counters().event_records,
            records,
            "no event into a capture"
        );
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 4096);
        d.set_capturing(0x20, false);
        a.empty_cache();
        assert_eq!(d.counters().event_records, records + 1);
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 0, "then freed");
        a.check_invariants().unwrap();
    }

    #[test]
    fn a_pools_capture_leaves_frees_without_driver_calls() {
        let (a, d) = sim();
        a.begin_pool(0, P).unwrap();
        d.set_capturing(0x10, true);
        let x = a.malloc_pool(MIB, 0, 0x10, P).unwrap();
        a.free(x, Some(0), 0x10).unwrap();
        d.set_capturing(0x10, false);
        a.end_pool(0, P).unwrap();
        assert!(
            !a.devices[0].core.capture.seen(),
            "later frees would each ask cuStreamIsCapturing"
        );
        // And they do not: a free on a stream's own arena asks nothing.
        let p = a.malloc(4096, 0, 0x20).unwrap();
        d.set_capturing(0x20, true); // would quarantine, were it asked
        a.free(p, Some(0), 0x20).unwrap();
        assert_eq!(a.stats(0).unwrap().pending_free_bytes, 0);
    }

    #[test]
    fn bad_pool_calls_are_errors_and_change_nothing() {
        let (a, _) = sim();
        let code = |r: Result<()>| r.unwrap_err().code;
        assert_eq!(
            code(a.end_pool(0, P)),
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            code(a.release_pool(0, P)),
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            a.malloc_pool(MIB, 0, 0x10, P).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            a.begin_pool(3, P).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_DEVICE
        );
        assert!(a.pools(0).unwrap().is_empty());
        a.begin_pool(0, P).unwrap();
        a.end_pool(0, P).unwrap();
        assert_eq!(
            code(a.end_pool(0, P)),
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
        );
        a.release_pool(0, P).unwrap();
        assert_eq!(
            code(a.release_pool(0, P)),
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
        );
        assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
        assert!(!a.devices[0].capture_underway());
        a.check_invariants().unwrap();
    }
}
