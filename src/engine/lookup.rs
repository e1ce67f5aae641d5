//! Finding what a pointer is: frees that miss the hinted arena, the true
//! size of a live allocation.

use super::Allocator;
use crate::driver::Stream;
use crate::error::{Error, ErrorCode, Result};
use crate::observe::Action;
use std::sync::atomic::Ordering;

impl Allocator {
    #[cold]
    pub(super) fn free_search(
        &self,
        ptr: u64,
        device: Option<usize>,
        stream: Stream,
    ) -> Result<()> {
        for dev in &self.devices {
            for a in dev.arena_list() {
                let mut inner = a.inner.lock();
                if let Some(f) = inner.free(ptr, &dev.core, || {
                    !a.pooled && dev.core.captures_now(a.stream)
                }) {
                    dev.note_free(&a, &mut inner, f.size);
                    self.log_under_lock(Action::Free, ptr, f.requested, &a);
                    return Ok(());
                }
            }
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

    /// The true (rounded) size of a live allocation.
    pub fn size_of(&self, ptr: u64) -> Option<u64> {
        self.devices
            .iter()
            .flat_map(|d| d.arena_list())
            .find_map(|a| {
                let inner = a.inner.lock();
                inner.live.get(&ptr).map(|r| inner.blocks.get(r.block).size)
            })
    }
}
