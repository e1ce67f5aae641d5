//! The allocator as the library serves it: the engine (`engine/`) with the
//! observability adaptors (`observe/`) around it, in rmm's manner. The
//! engine knows nothing of the adaptors: this type calls them after each
//! allocation, gives the engine the trace log as its journal, and has them
//! fill their own fields of every statistics snapshot. Tests, the bench,
//! replays and the process-wide allocator behind the C ABI are all one of
//! these.

use crate::config::Config;
use crate::driver::{Driver, Stream};
use crate::engine::{Engine, OomCallback, PoolId};
use crate::error::Result;
use crate::live::LiveInfo;
use crate::observe::pressure::Level;
use crate::observe::{export, leak, Observer};
use crate::stats::cudalloc_stats;
use std::sync::Arc;

/// A caching allocator over all devices of one driver, with its
/// observability adaptors (call sites, trace log, pressure and trim, leak
/// alarms).
pub struct Allocator {
    engine: Engine,
    observe: Observer,
}

impl Allocator {
    /// An allocator over every device of `driver`, configured by `config`.
    pub fn new(config: Config, driver: Arc<dyn Driver>) -> Self {
        let observe = Observer::new(&config, driver.device_count());
        let engine = Engine::with_journal(config, driver, observe.journal());
        Allocator { engine, observe }
    }

    /// The engine, without the adaptors.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The observability adaptors.
    pub fn observer(&self) -> &Observer {
        &self.observe
    }

    /// Allocate `size` bytes on `device` for use on `stream` (see
    /// [`Engine::malloc`]), then the adaptors' per-call work.
    #[inline]
    pub fn malloc(&self, size: u64, device: usize, stream: Stream) -> Result<u64> {
        let r = self.engine.malloc(size, device, stream);
        self.observed(r, size, device, stream)
    }

    /// [`Allocator::malloc`] from private pool `id` (see [`Engine::malloc_pool`]).
    pub fn malloc_pool(&self, size: u64, device: usize, stream: Stream, id: PoolId) -> Result<u64> {
        let r = self.engine.malloc_pool(size, device, stream, id);
        self.observed(r, size, device, stream)
    }

    /// An allocation's result `r`, after the adaptors' per-call work.
    #[inline(always)]
    fn observed(&self, r: Result<u64>, size: u64, device: usize, stream: Stream) -> Result<u64> {
        if self.observe.on {
            self.observe
                .after_malloc(&self.engine, &r, size, device, stream);
        }
        r
    }

    /// Free `ptr` (see [`Engine::free`]).
    #[inline]
    pub fn free(&self, ptr: u64, device: Option<usize>, stream: Stream) -> Result<()> {
        self.engine.free(ptr, device, stream)
    }

    /// A statistics snapshot of `device`, the adaptors' fields included.
    pub fn stats(&self, device: usize) -> Result<cudalloc_stats> {
        self.engine
            .stats_with(device, |s| self.observe.fill_stats(device, s))
    }

    /// The pressure level of `device` now, sampled from the driver at once
    /// (the statistics' `pressure_level` is the last periodic sample, every
    /// `pressure_interval` on allocation calls). Records nothing: the
    /// periodic sample alone counts level changes and runs the pressure
    /// callbacks. While a graph capture may be under way on the device,
    /// the driver is not asked: the last periodic sample answers (LOW
    /// before the first).
    pub fn pressure_level_now(&self, device: usize) -> Result<Level> {
        Ok(match self.engine.mem_info_now(device)? {
            Some((free, total)) => Level::of(total.saturating_sub(free), total),
            None => self.observe.level(device),
        })
    }

    /// Whether `device`'s memory is low: its pressure level now
    /// ([`Allocator::pressure_level_now`]) is HIGH or CRITICAL (80% or more
    /// of the device's memory in use, by any process, cudalloc's own idle
    /// cache included: `empty_cache` lowers it).
    pub fn is_low_memory(&self, device: usize) -> Result<bool> {
        Ok(self.pressure_level_now(device)? >= Level::High)
    }

    /// Restart the accumulated counters of `device` from zero, the
    /// adaptors' counts included (see [`Engine::reset_accumulated_with`]).
    pub fn reset_accumulated(&self, device: usize) -> Result<()> {
        self.engine
            .reset_accumulated_with(device, |s| self.observe.fill_stats(device, s))
    }

    /// Every device's statistics and the configuration, as JSON
    /// (`cudalloc_stats_json`, `stats_file`).
    pub fn stats_json(&self) -> String {
        let devices: Vec<(usize, cudalloc_stats)> = (0..self.device_count())
            .filter_map(|d| self.stats(d).ok().map(|s| (d, s)))
            .collect();
        export::stats_json(&devices, self.config())
    }

    /// Every segment, block and recorded action, as JSON in PyTorch's
    /// `_snapshot()` format (`cudalloc_snapshot_json`; see
    /// [`export::snapshot_json`]).
    pub fn snapshot_json(&self) -> String {
        export::snapshot_json(&self.engine.snapshot())
    }

    /// Stamp allocations, idle segments and periodic work (pressure, trim,
    /// the leak alarms) by `clock`, coarse monotonic milliseconds, instead
    /// of the real clock: tests advance time by counts instead of waiting.
    /// Call it before the first allocation; only the first call counts.
    #[doc(hidden)]
    pub fn set_clock(&self, clock: fn() -> u64) {
        self.engine.set_clock(clock);
        self.observe.set_clock(clock);
    }

    /// Exit-time work of the process-wide allocator: flush the trace log
    /// (and say how many records it dropped), write `stats_file`, print the
    /// leak report (`leak_report:exit`). Never calls the driver (the global
    /// driver refuses calls once the process is exiting).
    pub fn at_exit(&self) {
        use std::io::Write as _;
        self.observe.flush_log();
        if let Some((path, n)) = self.observe.log_drops() {
            if n > 0 {
                let _ = writeln!(
                    std::io::stderr(),
                    "cudalloc: log_file '{path}': {n} records dropped (its reader fell behind, went away or never came)"
                );
            }
        }
        let c = self.config();
        if !c.stats_file.is_empty() {
            if let Err(e) = std::fs::write(&c.stats_file, self.stats_json()) {
                let _ = writeln!(
                    std::io::stderr(),
                    "cudalloc: stats_file '{}': {e}",
                    c.stats_file
                );
            }
        }
        if c.leak_report_exit {
            let _ = std::io::stderr().write_all(leak::report(&self.engine, 0, false).as_bytes());
        }
    }
}

/// The engine's other calls, unchanged by the adaptors.
macro_rules! delegate {
    ($($(#[$m:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl Allocator {
            $(
                $(#[$m])*
                #[inline]
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.engine.$name($($arg),*)
                }
            )*
        }
    };
}

delegate! {
    /// See [`Engine::config`].
    fn config(&self) -> &Config;
    /// See [`Engine::driver`].
    fn driver(&self) -> &Arc<dyn Driver>;
    /// See [`Engine::device_count`].
    fn device_count(&self) -> usize;
    /// See [`Engine::device_used`].
    fn device_used(&self, device: usize) -> bool;
    /// See [`Engine::record_stream`].
    fn record_stream(&self, ptr: u64, stream: Stream) -> Result<()>;
    /// See [`Engine::empty_cache`].
    fn empty_cache(&self) -> u64;
    /// See [`Engine::empty_cache_device`].
    fn empty_cache_device(&self, device: usize) -> Result<u64>;
    /// See [`Engine::reset_peak`].
    fn reset_peak(&self, device: usize) -> Result<()>;
    /// See [`Engine::memory_fraction`].
    fn memory_fraction(&self, device: usize) -> Result<f64>;
    /// See [`Engine::set_memory_fraction`].
    fn set_memory_fraction(&self, fraction: f64, device: usize) -> Result<()>;
    /// See [`Engine::register_oom_callback`].
    fn register_oom_callback(&self, cb: OomCallback) -> ();
    /// See [`Engine::live_allocations`].
    fn live_allocations(&self, device: Option<usize>) -> Vec<LiveInfo>;
    /// See [`Engine::size_of`].
    fn size_of(&self, ptr: u64) -> Option<u64>;
    /// See [`Engine::snapshot`].
    fn snapshot(&self) -> crate::engine::Snapshot;
    /// See [`Engine::record_history`].
    fn record_history(&self, on: bool, max_entries: usize, clear: bool) -> ();
    /// See [`Engine::check_invariants`].
    fn check_invariants(&self) -> std::result::Result<(), String>;
    /// See [`Engine::diagnose`].
    fn diagnose(&self, device: usize, size: u64, stream: Stream, why: &str) -> String;
    /// See [`Engine::trim`].
    fn trim(&self, device: usize, want: u64) -> u64;
    /// See [`Engine::can_allocate`].
    fn can_allocate(&self, size: u64, device: usize, stream: Stream) -> Result<bool>;
    /// See [`Engine::mem_info_outside_capture`].
    fn mem_info_outside_capture(&self, device: usize, wait: bool) -> Option<crate::driver::DriverResult<(u64, u64)>>;
    /// See [`Engine::begin_pool`].
    fn begin_pool(&self, device: usize, id: PoolId) -> Result<u64>;
    /// See [`Engine::end_pool`].
    fn end_pool(&self, device: usize, id: PoolId) -> Result<()>;
    /// See [`Engine::release_pool`].
    fn release_pool(&self, device: usize, id: PoolId) -> Result<()>;
    /// See [`Engine::pools`].
    fn pools(&self, device: usize) -> Result<Vec<(PoolId, u64)>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sim::SimDriver;

    const P: PoolId = (1, 0);

    /// `is_low_memory` samples the device now (any process's use counts),
    /// records nothing, and during a capture answers from the last sample.
    #[test]
    fn is_low_memory_samples_now_and_records_nothing() {
        use crate::driver::Driver as _;
        use crate::error::ErrorCode;
        let c = Config::parse("sim_memory:1GiB,pressure_interval:off").unwrap();
        let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
        let a = Allocator::new(c, d.clone());
        assert!(!a.is_low_memory(0).unwrap());
        let hog = d.mem_alloc(0, 700 << 20).unwrap(); // 68%: MODERATE
        assert!(!a.is_low_memory(0).unwrap());
        assert_eq!(a.pressure_level_now(0).unwrap(), Level::Moderate);
        let p = a.malloc(150 << 20, 0, 0).unwrap(); // 83%: HIGH
        assert!(a.is_low_memory(0).unwrap());
        let s = a.stats(0).unwrap();
        assert_eq!(
            (s.pressure_level, s.num_pressure_high),
            (0, 0),
            "nothing recorded"
        );
        a.begin_pool(0, P).unwrap();
        let before = d.counters().mem_info_calls;
        assert!(!a.is_low_memory(0).unwrap(), "the last sample (none: LOW)");
        assert_eq!(d.counters().mem_info_calls, before, "no cuMemGetInfo");
        a.end_pool(0, P).unwrap();
        assert_eq!(
            a.is_low_memory(1).unwrap_err().code,
            ErrorCode::CUDALLOC_ERR_INVALID_DEVICE
        );
        a.free(p, Some(0), 0).unwrap();
        d.mem_free(0, hog, 700 << 20).unwrap();
        assert!(!a.is_low_memory(0).unwrap());
    }

    #[test]
    fn pressure_sampling_waits_for_the_capture() {
        let c = Config::parse("sim_memory:1GiB,pressure_interval:1ms").unwrap();
        let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
        let a = Allocator::new(c, d.clone());
        let tick = |a: &Allocator| {
            let p = a.malloc(4096, 0, 0x20).unwrap();
            a.free(p, Some(0), 0x20).unwrap();
            a.observer().tick(a.engine());
        };
        tick(&a);
        let before = d.counters().mem_info_calls;
        tick(&a);
        assert!(
            d.counters().mem_info_calls > before,
            "sampled without a capture"
        );
        a.begin_pool(0, P).unwrap();
        let during = d.counters().mem_info_calls;
        for _ in 0..3 {
            tick(&a);
        }
        assert_eq!(
            d.counters().mem_info_calls,
            during,
            "no cuMemGetInfo during a capture"
        );
        a.end_pool(0, P).unwrap();
        tick(&a);
        assert!(d.counters().mem_info_calls > during);
    }
}
