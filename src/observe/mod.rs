//! Observability: small adaptors around the engine, in the manner of rmm's
//! tracking, statistics and logging adaptors. Each has one purpose:
//!
//! ```text
//! callsite   sampled call-site backtraces of allocations         backtrace, backtrace_sample
//! leak       leak report; old-allocation and growth alarms        leak_report, leak_age, leak_growth, leak_window
//! pressure   pressure levels from the driver's mem_info; trim     pressure_interval, trim_threshold
//! tracelog   RMM-format CSV of every allocate / free / failure    log_file
//! export     JSON stats, on demand and at exit; snapshots as JSON  stats_file
//! ```
//! They wrap the engine, in the manner of rmm's adaptors: `crate::Allocator`
//! calls [`Observer::after_malloc`] after each allocation when
//! [`Observer::on`] says so (with everything off the hot path pays one
//! predictable branch on a plain field), and gives the engine the trace log
//! as its journal ([`Observer::journal`]), which the engine tells of each
//! allocation and free under the block's arena's lock. The engine knows
//! nothing of this module. Periodic work
//! (pressure sampling, trim, the leak alarms) piggybacks on allocation calls:
//! a thread-local countdown reads the clock once every [`TICK_CALLS`] calls and
//! one thread claims a due tick with a compare-and-swap, so two threads on two
//! streams share no written cache line in the steady state.

pub mod callsite;
pub mod export;
pub mod leak;
pub mod pressure;
pub mod tracelog;

use crate::config::Config;
use crate::driver::Stream;
use crate::engine::{Engine, Journal};
use crate::error::Result;
use crate::live::now_ms;
use crate::stats::cudalloc_stats;
use callsite::Sampler;
use leak::{AgeAlarm, GrowthAlarm};
use once_cell::sync::OnceCell;
use parking_lot::{Mutex, RwLock};
use pressure::{Level, PressureCallback, PressureState};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
pub use tracelog::Action;
use tracelog::TraceLog;

/// Allocation calls per thread between two looks at the clock.
pub const TICK_CALLS: u32 = 64;

thread_local! {
    static TICK_COUNTDOWN: Cell<u32> = const { Cell::new(0) };
}

/// Whether this thread should look at the clock: once every [`TICK_CALLS`] calls.
#[inline]
fn tick_countdown() -> bool {
    TICK_COUNTDOWN
        .try_with(|c| {
            let n = c.get();
            c.set(if n == 0 { TICK_CALLS - 1 } else { n - 1 });
            n == 0
        })
        .unwrap_or(false)
}

/// One device's observed state.
#[derive(Debug)]
struct Watch {
    pressure: PressureState,
    age_alarms: AtomicU64,
    growth_alarms: AtomicU64,
    /// Alarm state, touched only by the thread running a tick.
    alarms: Mutex<(Option<AgeAlarm>, Option<GrowthAlarm>)>,
}

/// The observability adaptors of one allocator.
pub struct Observer {
    /// Some per-allocation hook is on (sampling, the log, periodic work).
    pub on: bool,
    /// The trace log or call-site sampling is on.
    per_call: bool,
    sampler: Option<Sampler>,
    log: Option<Arc<TraceLog>>,
    /// Milliseconds between ticks of periodic work; 0 = none.
    tick_ms: u64,
    next_tick: AtomicU64,
    pressure_on: bool,
    trim_threshold: f64,
    watches: Vec<Watch>,
    pressure_callbacks: RwLock<Vec<PressureCallback>>,
    /// The clock of periodic work, when a test sets one (see `set_clock`).
    clock: OnceCell<fn() -> u64>,
}

impl Observer {
    pub fn new(config: &Config, devices: usize) -> Observer {
        let sampler = (config.backtrace > 0).then_some(Sampler {
            frames: config.backtrace as usize,
            every: config.backtrace_sample.max(1),
        });
        let log = if config.log_file.is_empty() {
            None
        } else {
            match TraceLog::create(&config.log_file) {
                Ok(l) => Some(Arc::new(l)),
                Err(e) => {
                    tracing::error!(
                        "log_file: cannot create '{}': {e}; no trace log",
                        config.log_file
                    );
                    None
                }
            }
        };
        let pressure_on = config.pressure_interval_ms > 0;
        let leak_on = config.leak_age_ms > 0 || config.leak_growth > 0.0;
        let tick_ms = if pressure_on {
            config.pressure_interval_ms
        } else if leak_on {
            100
        } else {
            0
        };
        let watches = (0..devices)
            .map(|_| Watch {
                pressure: PressureState::default(),
                age_alarms: AtomicU64::new(0),
                growth_alarms: AtomicU64::new(0),
                alarms: Mutex::new((
                    (config.leak_age_ms > 0).then(|| AgeAlarm::new(config.leak_age_ms)),
                    (config.leak_growth > 0.0)
                        .then(|| GrowthAlarm::new(config.leak_growth, config.leak_window_ms)),
                )),
            })
            .collect();
        Observer {
            on: sampler.is_some() || log.is_some() || tick_ms > 0,
            per_call: sampler.is_some() || log.is_some(),
            sampler,
            log,
            tick_ms,
            next_tick: AtomicU64::new(0),
            pressure_on,
            trim_threshold: config.trim_threshold,
            watches,
            pressure_callbacks: RwLock::new(Vec::new()),
            clock: OnceCell::new(),
        }
    }

    /// Drive periodic work (its due times, the leak alarms' ages and
    /// windows) by `clock`, in coarse monotonic milliseconds like
    /// `live::now_ms`, instead of the real clock: tests advance time by
    /// counts, not by waiting. Only the first call counts.
    #[doc(hidden)]
    pub fn set_clock(&self, clock: fn() -> u64) {
        let _ = self.clock.set(clock);
    }

    /// Now, by the clock of periodic work.
    fn now(&self) -> u64 {
        self.clock.get().map_or_else(now_ms, |c| c())
    }

    /// After `alloc.malloc(size, device, stream)` returned `r` (only when
    /// [`Observer::on`]). Inline: with only periodic work on, this is a
    /// thread-local countdown; everything else is out of line.
    #[inline]
    pub fn after_malloc(
        &self,
        alloc: &Engine,
        r: &Result<u64>,
        size: u64,
        device: usize,
        stream: Stream,
    ) {
        if self.per_call {
            self.per_call_hooks(alloc, r, size, device, stream);
        }
        if self.tick_ms > 0 && tick_countdown() {
            self.maybe_tick(alloc);
        }
    }

    /// The trace log and call-site sampling.
    #[inline(never)]
    fn per_call_hooks(
        &self,
        alloc: &Engine,
        r: &Result<u64>,
        size: u64,
        device: usize,
        stream: Stream,
    ) {
        match r {
            Ok(0) => {}
            Ok(p) => {
                // (The allocation itself was logged under its arena's lock.)
                if let Some(s) = &self.sampler {
                    if s.hit() {
                        let site = s.capture();
                        alloc.set_site(*p, device, stream, site);
                    }
                }
            }
            Err(_) => {
                if let Some(log) = &self.log {
                    log.record(Action::AllocateFailure, 0, size, stream);
                }
            }
        }
    }

    /// The trace log, as the engine's journal: it is told of every
    /// allocation and free under the block's arena's lock (`tracelog`).
    pub fn journal(&self) -> Option<Arc<dyn Journal>> {
        self.log.clone().map(|l| l as Arc<dyn Journal>)
    }

    /// The clock, then one CAS to claim the tick; then the tick.
    #[cold]
    #[inline(never)]
    fn maybe_tick(&self, alloc: &Engine) {
        let now = self.now();
        let next = self.next_tick.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_tick
                .compare_exchange(
                    next,
                    now + self.tick_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.tick(alloc);
        }
    }

    /// Periodic work now, for every device: pressure and trim, then the alarms.
    pub fn tick(&self, alloc: &Engine) {
        let now = self.now();
        for (d, w) in self.watches.iter().enumerate() {
            if !alloc.device_used(d) {
                // Nothing to sample, trim or alarm about; and asking the
                // driver would make the CUDA backend hold a context there.
                continue;
            }
            if self.pressure_on {
                self.sample_pressure(alloc, d, w);
            }
            let Some(mut alarms) = w.alarms.try_lock() else {
                continue;
            };
            if let Some(a) = alarms.0.as_mut() {
                if a.check(alloc, d, now) {
                    w.age_alarms.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(g) = alarms.1.as_mut() {
                let live = alloc.stats(d).map(|s| s.allocated_bytes).unwrap_or(0);
                if g.sample(d, live, now) {
                    w.growth_alarms.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn sample_pressure(&self, alloc: &Engine, d: usize, w: &Watch) {
        // Nothing while a graph capture may be under way there: cuMemGetInfo
        // could invalidate it (engine/pools.rs; trim holds back too).
        let Some(Ok((free, total))) = alloc.mem_info_outside_capture(d, false) else {
            return;
        };
        let used = total.saturating_sub(free);
        self.set_level(d, w, Level::of(used, total));
        let want = pressure::trim_target(used, total, self.trim_threshold);
        if want == 0 {
            return;
        }
        let released = alloc.trim(d, want);
        if released > 0 {
            w.pressure.trims.fetch_add(1, Ordering::Relaxed);
            w.pressure
                .trimmed_bytes
                .fetch_add(released, Ordering::Relaxed);
            tracing::info!(
                device = d,
                released,
                "trim: released idle cached segments above trim_threshold"
            );
            if let Some(Ok((free, total))) = alloc.mem_info_outside_capture(d, false) {
                self.set_level(d, w, Level::of(total.saturating_sub(free), total));
            }
        }
    }

    fn set_level(&self, d: usize, w: &Watch, l: Level) {
        if let Some(l) = w.pressure.observe(l) {
            tracing::debug!(
                device = d,
                level = l.name(),
                "memory pressure level changed"
            );
            for cb in self.pressure_callbacks.read().iter() {
                cb(d, l);
            }
        }
    }

    /// Register a callback run when a device's pressure level changes.
    pub fn register_pressure_callback(&self, cb: PressureCallback) {
        self.pressure_callbacks.write().push(cb);
    }

    /// The current pressure level of `device` (LOW before the first sample).
    pub fn level(&self, device: usize) -> Level {
        self.watches
            .get(device)
            .map_or(Level::Low, |w| w.pressure.level())
    }

    /// Fill the observability fields of a stats snapshot.
    pub fn fill_stats(&self, device: usize, s: &mut cudalloc_stats) {
        let Some(w) = self.watches.get(device) else {
            return;
        };
        let p = &w.pressure;
        s.pressure_level = p.level() as u64;
        s.num_pressure_low = p.events(Level::Low);
        s.num_pressure_moderate = p.events(Level::Moderate);
        s.num_pressure_high = p.events(Level::High);
        s.num_pressure_critical = p.events(Level::Critical);
        s.num_trims = p.trims.load(Ordering::Relaxed);
        s.trimmed_bytes = p.trimmed_bytes.load(Ordering::Relaxed);
        s.num_leak_age_alarms = w.age_alarms.load(Ordering::Relaxed);
        s.num_leak_growth_alarms = w.growth_alarms.load(Ordering::Relaxed);
        s.log_records_dropped = self.log.as_ref().map_or(0, |l| l.dropped());
    }

    /// The trace log's clock (see `TraceLog::set_clock`), for tests.
    #[doc(hidden)]
    pub fn set_log_clock(&self, clock: fn() -> u64) {
        if let Some(l) = &self.log {
            l.set_clock(clock);
        }
    }

    /// The trace log's path and the records it dropped, when it is on.
    pub fn log_drops(&self) -> Option<(&str, u64)> {
        self.log.as_ref().map(|l| (l.path(), l.dropped()))
    }

    /// Append every buffered trace line to the log file.
    pub fn flush_log(&self) {
        if let Some(l) = &self.log {
            l.flush();
        }
    }
}
