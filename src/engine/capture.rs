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
