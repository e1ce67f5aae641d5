//! Memory pressure: the level of device memory in use, sampled from the
//! driver now and then, and the proactive trim above `trim_threshold`.
//!
//! Levels: LOW < 60% <= MODERATE < 80% <= HIGH < 90% <= CRITICAL of the
//! device's memory in use (by anyone: `total - free` from the driver).
//! Each change of level counts one event of the new level and runs the
//! registered pressure callbacks.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// A pressure level (the value is what `cudalloc_stats.pressure_level` holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Low = 0,
    Moderate = 1,
    High = 2,
    Critical = 3,
}

impl Level {
    /// The level of `used` out of `total` bytes.
    pub fn of(used: u64, total: u64) -> Level {
        if total == 0 {
            return Level::Low;
        }
        let f = used as f64 / total as f64;
        if f >= 0.9 {
            Level::Critical
        } else if f >= 0.8 {
            Level::High
        } else if f >= 0.6 {
            Level::Moderate
        } else {
            Level::Low
        }
    }

    pub fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Low,
            1 => Level::Moderate,
            2 => Level::High,
            _ => Level::Critical,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Moderate => "moderate",
            Level::High => "high",
            Level::Critical => "critical",
        }
    }
}

/// Called with `(device, new level)` when a device's level changes.
pub type PressureCallback = Box<dyn Fn(usize, Level) + Send + Sync>;

/// One device's pressure state; written only by the periodic check.
#[derive(Debug, Default)]
pub struct PressureState {
    level: AtomicU8,
    events: [AtomicU64; 4],
    pub trims: AtomicU64,
    pub trimmed_bytes: AtomicU64,
}

impl PressureState {
    pub fn level(&self) -> Level {
        Level::from_u8(self.level.load(Ordering::Relaxed))
    }

    pub fn events(&self, l: Level) -> u64 {
        self.events[l as usize].load(Ordering::Relaxed)
    }

    /// Record a sample's level. Returns the new level when it changed.
    /// The first sample counts only when it is above LOW.
    pub fn observe(&self, l: Level) -> Option<Level> {
        let old = self.level.swap(l as u8, Ordering::Relaxed);
        if old == l as u8 {
            return None;
        }
        self.events[l as usize].fetch_add(1, Ordering::Relaxed);
        Some(l)
    }
}

/// Bytes to release so that `used` drops to `threshold * total`, or 0.
pub fn trim_target(used: u64, total: u64, threshold: f64) -> u64 {
    if threshold >= 1.0 || total == 0 {
        return 0;
    }
    let limit = (threshold * total as f64) as u64;
    used.saturating_sub(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_targets() {
        assert_eq!(Level::of(59, 100), Level::Low);
        assert_eq!(Level::of(60, 100), Level::Moderate);
        assert_eq!(Level::of(80, 100), Level::High);
        assert_eq!(Level::of(90, 100), Level::Critical);
        let p = PressureState::default();
        assert_eq!(p.observe(Level::Low), None, "first LOW is no event");
        assert_eq!(p.observe(Level::High), Some(Level::High));
        assert_eq!(p.observe(Level::High), None);
        assert_eq!(p.events(Level::High), 1);
        assert_eq!(trim_target(90, 100, 0.85), 5);
        assert_eq!(trim_target(80, 100, 0.85), 0);
        assert_eq!(trim_target(99, 100, 1.0), 0);
    }
}
