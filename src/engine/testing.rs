//! What the engine's unit tests share: an engine on the simulated device,
//! and a few moves that several concerns' tests make.

pub(crate) use super::arena::EPOCH_SPACING;
pub(crate) use super::Engine;
pub(crate) use crate::driver::sim::SimDriver;
pub(crate) use crate::driver::Stream;
pub(crate) use crate::error::ErrorCode;
pub(crate) use crate::stats::cudalloc_stats;
pub(crate) use crate::Config;
pub(crate) use parking_lot::Mutex;
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
pub(crate) use std::sync::Arc;

pub(crate) fn sim(conf: &str) -> (Engine, Arc<SimDriver>) {
    let c = Config::parse(conf).unwrap();
    let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
    (Engine::new(c, d.clone()), d)
}

/// A miss of `size` bytes on stream `s` while `s` captures asks no event
/// and no stream, and frees nothing; the capture then ends.
pub(crate) fn quiet_miss_during_capture(a: &Engine, d: &SimDriver, s: Stream, size: u64) {
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
pub(crate) fn own_segments(a: &Engine, s: Stream, n: u64) -> Vec<u64> {
    (0..n).map(|_| a.malloc(30 << 20, 0, s).unwrap()).collect()
}

pub(crate) fn free_all(a: &Engine, s: Stream, ps: &[u64]) {
    for &p in ps {
        a.free(p, Some(0), s).unwrap();
    }
}
