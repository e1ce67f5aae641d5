//! Live-allocation records, and the stamps they carry (when, which thread).
//!
//! The live table: one record per pointer handed out.
//!
//! It is always on: it validates frees (unknown and double frees are caught
//! here) and supplies the true size of every block, so the size argument of
//! free is never trusted. Each stream arena keeps the records of the blocks it
//! handed out, under the lock it already holds, so tracking adds one hash
//! insert and one hash remove per allocation and nothing shared between
//! threads.

use crate::driver::Stream;
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

/// What cudalloc knows of one live allocation.
#[derive(Debug, Clone)]
pub struct LiveRecord {
    /// Index of the block in its arena.
    pub block: u32,
    /// Bytes the caller asked for.
    pub requested: u64,
    /// Per-arena sequence number (allocation order within a stream).
    pub seq: u64,
    /// Coarse monotonic time of the allocation, in milliseconds.
    pub time_ms: u64,
    /// Small integer naming the allocating thread.
    pub thread: u32,
    /// Other streams the block was recorded on (`record_stream`).
    pub streams: Vec<Stream>,
}

/// A public view of one live allocation, for reports and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveInfo {
    pub ptr: u64,
    pub size: u64,
    pub requested: u64,
    pub device: usize,
    pub stream: Stream,
    pub seq: u64,
    pub time_ms: u64,
    pub thread: u32,
    /// Interned call site, 0 when none was captured.
    pub site: u32,
}

/// Coarse monotonic milliseconds: a vDSO read of `CLOCK_MONOTONIC_COARSE`,
/// a few nanoseconds, with a resolution of a few milliseconds. Precise enough
/// for leak ages; cheap enough for every allocation.
#[inline]
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

static NEXT_THREAD: AtomicU32 = AtomicU32::new(1);
thread_local! {
    static THREAD_ID: Cell<u32> = const { Cell::new(0) };
}

/// A small integer naming the calling thread (1, 2, 3, ... in first-use order).
#[inline]
pub fn thread_id() -> u32 {
    THREAD_ID
        .try_with(|c| {
            let id = c.get();
            if id != 0 {
                return id;
            }
            let id = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
            c.set(id);
            id
        })
        .unwrap_or(0)
}
