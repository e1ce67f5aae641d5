//! The state of one device's private pools (`pools.rs`): per pool its
//! references, routings, the streams routed on, and its arenas; the spare
//! arenas of drained pools. Plain data, below the device that holds it.

use super::arena::{Arena, PoolId};
use crate::driver::Stream;
use rustc_hash::FxHashMap;
use std::sync::Arc;

#[derive(Debug, Default)]
pub(super) struct PoolState {
    /// `begin_pool` calls minus `release_pool` calls.
    pub(super) refs: u64,
    /// `begin_pool` calls not yet ended.
    pub(super) routing: u64,
    /// The streams allocations were routed on since routing began: where
    /// the capture runs (see `Device::pool_capture_underway`).
    pub(super) routed_streams: Vec<Stream>,
    /// One of `routed_streams` was capturing when first routed: this
    /// routing serves a capture (not `use_mem_pool`-style routing outside
    /// one), so once none of them captures, the capture is over.
    pub(super) captured: bool,
    pub(super) arenas: Vec<Arc<Arena>>,
}

impl PoolState {
    /// End `n` of the routings; the last one takes the routed streams with it.
    pub(super) fn end_routings(&mut self, n: u64) {
        self.routing -= n;
        if self.routing == 0 {
            self.routed_streams.clear();
            self.captured = false;
        }
    }
}

/// One device's pools.
#[derive(Debug, Default)]
pub(crate) struct Pools {
    pub(super) map: FxHashMap<PoolId, PoolState>,
    pub(super) spare: Vec<Arc<Arena>>,
    pub(super) next_key: u64,
}

pub(super) fn show(id: PoolId) -> String {
    format!("pool ({}, {})", id.0, id.1)
}
