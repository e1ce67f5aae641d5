//! What a device knows of CUDA graph captures, in one vocabulary.
//!
//! A capture in global mode is invalidated by any call that synchronises
//! (`cuMemFree`, a stream or event synchronisation) or queries (`cuEventQuery`,
//! `cuStreamQuery`, `cuMemGetInfo` outside relaxed mode), so the engine must
//! know when one may be under way. Two kinds reach it:
//! - **PyTorch's**, through its pool hooks (`pools.rs`): the device counts
//!   the pools *routing* allocations now ([`CaptureWatch::pools_routing`]),
//!   the fast paths' cheap test;
//! - **C and C++ ones**, which give no notice: the engine asks the streams
//!   it knows (`cuStreamIsCapturing`, legal during a capture). A stream
//!   found capturing is *watched* until the next `empty_cache`, and sets
//!   *seen* for good: from then on each free asks whether its stream
//!   captures (`DeviceCore::captures_now`: its block is then
//!   quarantined), and no epoch event is recorded.
//!
//! The slow paths' precise test is `Device::capture_underway`: a pool's
//! capture runs, or a stream holding memory or watched captures (the legacy
//! stream counts while another captures: the driver answers "implicit").

use crate::driver::Stream;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A device's knowledge of captures (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct CaptureWatch {
    /// A capture was seen outside a pool, once.
    seen: AtomicBool,
    /// Pools routing allocations now.
    pools_routing: AtomicUsize,
    /// Streams seen capturing outside a pool, and those a quarantined block
    /// waits for (`record_stream`): asked again by every slow path until
    /// `empty_cache`. A `record_stream` stream may have no arena of its
    /// own, and leave no other trace.
    watched: Mutex<Vec<Stream>>,
}

impl CaptureWatch {
    /// Whether a capture was ever seen outside a pool on this device.
    #[inline]
    pub fn seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }

    pub fn mark_seen(&self) {
        self.seen.store(true, Ordering::Relaxed);
    }

    /// Whether a pool routes allocations now: a capture may be under way.
    /// The fast paths' cheap test: while true they ask no event, and a
    /// `record_stream` free records none (its events wait for the end).
    /// The slow paths ask `Device::capture_underway`, which tells a
    /// routing that outlived a failed capture from a capture that runs.
    #[inline]
    pub fn pools_routing(&self) -> bool {
        self.pools_routing.load(Ordering::Acquire) > 0
    }

    /// `n` more pools route allocations.
    pub fn routings_begin(&self, n: usize) {
        self.pools_routing.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` routings ended; returns how many there were before.
    pub fn routings_end(&self, n: usize) -> usize {
        self.pools_routing.fetch_sub(n, Ordering::AcqRel)
    }

    /// Watch `streams` until the next `empty_cache`.
    pub fn watch(&self, streams: &[Stream]) {
        let mut w = self.watched.lock();
        for &s in streams {
            if !w.contains(&s) {
                w.push(s);
            }
        }
    }

    /// The streams watched now.
    pub fn watched(&self) -> Vec<Stream> {
        self.watched.lock().clone()
    }

    /// The captures are over (`empty_cache`): a stream they named may be
    /// destroyed now, so it is not asked again.
    pub fn forget_watched(&self) {
        self.watched.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::*;

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

    /// No epoch event goes on a capturing stream, nor on any stream of a
    /// device where a capture was seen (a record on the legacy stream would
    /// invalidate another stream's capture).
    #[test]
    fn no_epoch_event_during_a_capture() {
        let (a, d) = sim("sim_memory:4GiB");
        let (s, t) = (0x10, 0x20);
        let n = EPOCH_SPACING as u64;
        let ps = own_segments(&a, s, n);
        // The capture begins after the allocations: no slow path saw it, so
        // the frees are not quarantined and make their segments idle.
        d.set_capturing(s, true);
        let before = d.counters().event_records;
        free_all(&a, s, &ps);
        assert_eq!(
            a.stats(0).unwrap().cached_free_bytes,
            EPOCH_SPACING as u64 * (30 << 20)
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
        free_all(&a, s, &own_segments(&a, s, EPOCH_SPACING as u64));
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
        // s's idle 30 MiB is too small for this.
        let r = a.malloc(100 << 20, 0, t).unwrap();
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

    /// No epoch event while a pool routes (a PyTorch graph capture may be
    /// under way: an event recorded on the legacy stream would invalidate
    /// it), even on a stream that is not capturing.
    #[test]
    fn no_epoch_event_while_a_pool_routes() {
        let (a, d) = sim("sim_memory:4GiB");
        let s = 0x10;
        let ps = own_segments(&a, s, EPOCH_SPACING as u64);
        a.begin_pool(0, (7, 0)).unwrap();
        let before = d.counters().event_records;
        free_all(&a, s, &ps);
        assert_eq!(d.counters().event_records, before);
        a.end_pool(0, (7, 0)).unwrap();
        a.check_invariants().unwrap();
    }
}
