//! Limits on reserved bytes: `max_memory`, and `memory_fraction` of the
//! device's total memory (torch's `set_per_process_memory_fraction`).

use super::device::Device;
use super::Engine;
use crate::error::{Error, ErrorCode, Result};
use std::sync::atomic::Ordering;

impl Device {
    /// The device's total memory, read once. A failed read is not cached
    /// (the next call asks again) and counts as no cap meanwhile.
    pub(super) fn total(&self) -> u64 {
        self.total
            .get_or_try_init(|| self.core.driver.mem_info(self.core.index).map(|(_, t)| t))
            .copied()
            .unwrap_or(u64::MAX)
    }

    pub(super) fn fraction(&self) -> f64 {
        f64::from_bits(self.fraction_bits.load(Ordering::Relaxed))
    }

    /// The cap on reserved bytes in force (`u64::MAX` when none).
    pub(super) fn limit(&self) -> u64 {
        self.limit_with(self.total())
    }

    /// The limit as far as it is known without asking the driver: a device
    /// cudalloc never used has no total read yet, and reading it would make
    /// the CUDA backend hold a context there (statistics of such a device
    /// leave `memory_fraction` out).
    pub(super) fn known_limit(&self) -> u64 {
        self.limit_with(self.total.get().copied().unwrap_or(u64::MAX))
    }

    pub(super) fn limit_with(&self, total: u64) -> u64 {
        let mut limit = if self.max_memory == 0 {
            u64::MAX
        } else {
            self.max_memory
        };
        let f = self.fraction();
        if f < 1.0 && total != u64::MAX {
            // At least 1 byte: 0 would read as "no limit" in the statistics.
            limit = limit.min(((total as f64 * f) as u64).max(1));
        }
        limit
    }
}

impl Engine {
    /// The fraction of `device`'s total memory cudalloc may reserve, as set
    /// by [`Engine::set_memory_fraction`] (1.0 until then; torch's
    /// `get_per_process_memory_fraction`).
    pub fn memory_fraction(&self, device: usize) -> Result<f64> {
        Ok(self.device(device)?.fraction())
    }

    /// Set the per-device fraction of total memory cudalloc may reserve
    /// (torch's `set_per_process_memory_fraction`).
    pub fn set_memory_fraction(&self, fraction: f64, device: usize) -> Result<()> {
        let dev = self.device(device)?;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::new(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                format!("memory fraction {fraction} is not in (0, 1]"),
            ));
        }
        dev.fraction_bits
            .store(fraction.to_bits(), Ordering::Relaxed);
        if fraction < 1.0 {
            // The caller named this device, so reading its total (and, on
            // CUDA, retaining its context) is expected; stats then report
            // the cap at once.
            dev.total();
        }
        Ok(())
    }
}
