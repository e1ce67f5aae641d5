//! Finding a live pointer: the hinted arena first (the caller's device and
//! stream), then every arena of every device. Frees that miss the hint,
//! `record_stream`, the true size of an allocation and call-site stamps all
//! look up the same way ([`Engine::find_live`]).

use super::arena::{Arena, ArenaInner};
use super::device::Device;
use super::Engine;
use crate::driver::Stream;
use crate::error::{Error, ErrorCode, Result};
use std::sync::atomic::Ordering;

impl Engine {
    /// Run `f` under the lock of each arena in turn, the hinted one
    /// (`device`, `stream`) first, until it answers `Some`: `f` looks for
    /// `ptr` in the arena's live table. `None` when no arena answered.
    pub(super) fn find_live<R>(
        &self,
        device: Option<usize>,
        stream: Stream,
        mut f: impl FnMut(&Device, &Arena, &mut ArenaInner) -> Option<R>,
    ) -> Option<R> {
        let hinted = device
            .and_then(|d| self.devices.get(d))
            .and_then(|dev| Some((dev, dev.find_arena(self.id, stream)?)));
        if let Some((dev, a)) = hinted {
            if let Some(r) = f(dev, a, &mut a.inner.lock()) {
                return Some(r);
            }
        }
        for dev in &self.devices {
            for a in dev.arena_list() {
                if hinted.is_some_and(|(_, h)| std::ptr::eq(h, &*a)) {
                    continue;
                }
                if let Some(r) = f(dev, &a, &mut a.inner.lock()) {
                    return Some(r);
                }
            }
        }
        None
    }

    /// A free that missed the hinted arena (see [`Engine::free`]).
    #[cold]
    pub(super) fn free_search(
        &self,
        ptr: u64,
        device: Option<usize>,
        stream: Stream,
    ) -> Result<()> {
        let freed = self.find_live(None, stream, |dev, a, inner| {
            self.free_from(dev, a, inner, ptr)
        });
        if freed.is_some() {
            return Ok(());
        }
        // Counted on the hinted device; with no such device, where the
        // pointer lies (a double free), else on device 0: a count nobody
        // can read would hide the bug.
        let counted = device
            .and_then(|d| self.devices.get(d))
            .or_else(|| self.devices.iter().find(|d| d.holds_address(ptr)))
            .or_else(|| self.devices.first());
        let n = match counted {
            Some(dev) => {
                dev.core.counters.invalid_frees.inc();
                dev.core.counters.invalid_frees.get()
            }
            None => self.stray_invalid_frees.fetch_add(1, Ordering::Relaxed) + 1,
        };
        if n <= 10 || n.is_power_of_two() {
            tracing::warn!("invalid free of {ptr:#x} (device {device:?}, stream {stream:#x}): not a live cudalloc allocation; {n} so far");
        }
        Err(Error::new(
            ErrorCode::CUDALLOC_ERR_INVALID_FREE,
            format!("free of {ptr:#x}: not a live cudalloc allocation (unknown or double free)"),
        ))
    }

    /// Make the free of `ptr` also wait for work enqueued on `stream` up to the free.
    pub fn record_stream(&self, ptr: u64, stream: Stream) -> Result<()> {
        self.find_live(None, 0, |_, a, inner| {
            inner.record_stream(ptr, stream, a.stream)
        })
        .ok_or_else(|| {
            Error::new(
                ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER,
                format!("record_stream of {ptr:#x}: not a live cudalloc allocation"),
            )
        })
    }

    /// The true (rounded) size of a live allocation.
    pub fn size_of(&self, ptr: u64) -> Option<u64> {
        self.find_live(None, 0, |_, _, inner| inner.live_size(ptr))
    }

    /// Stamp the live allocation `ptr` with call site `site` (for leak
    /// reports; the allocation was made on `device` and `stream`).
    pub fn set_site(&self, ptr: u64, device: usize, stream: Stream, site: u32) {
        self.find_live(Some(device), stream, |_, _, inner| {
            inner.stamp_site(ptr, site)
        });
    }
}
