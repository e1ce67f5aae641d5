//! `cudalloc replay`: run a trace through an [`Allocator`] on the simulated
//! device and measure what the allocator did with it.

use super::Event;
use crate::config::Config;
use crate::driver::sim::SimDriver;
use crate::observe::tracelog::Action;
use crate::Allocator;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Instant;

/// Periodic work is off in replays unless the caller's configuration turns it
/// on again, so that figures do not depend on how fast the replay runs.
pub const REPLAY_DEFAULTS: &str = "backend:sim,pressure_interval:off,leak_age:off,leak_growth:off";

/// The configuration of a replay: [`REPLAY_DEFAULTS`], then `conf`, then the capacity.
pub fn replay_config(conf: &str, memory: u64) -> crate::Result<Config> {
    let mut c = Config::parse(REPLAY_DEFAULTS)?;
    c.apply(conf)?;
    c.apply("backend:sim,sim_devices:1")?;
    c.sim_memory = memory;
    Ok(c)
}

/// One point of the memory timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub time_us: u64,
    /// Requested bytes the trace holds live.
    pub live: u64,
    /// Bytes the allocator holds from the device.
    pub reserved: u64,
}

/// What a replay measured.
#[derive(Debug, Clone, Default)]
pub struct ReplayResult {
    pub events: usize,
    pub allocs: u64,
    pub frees: u64,
    /// Peak of the bytes the trace asked for (successful allocations).
    pub peak_requested: u64,
    /// Peak of the allocator's allocated bytes (rounded blocks).
    pub peak_live: u64,
    pub peak_reserved: u64,
    pub hit_rate: f64,
    /// Every call that takes or gives back device memory or address space:
    /// `cuMemAlloc`/`cuMemFree`, and with `expandable_segments:on` the
    /// virtual-memory calls ([`ReplayResult::vmm_calls`]).
    pub driver_calls: u64,
    /// The virtual-memory calls among them:
    /// `[create, release, map, unmap, set access, reserve and free a range]`.
    pub vmm_calls: [u64; 6],
    /// Events recorded and queried on the simulated device (the engine's
    /// proofs that freed memory is no longer in use: on a GPU each costs a
    /// driver call of about a microsecond).
    pub event_records: u64,
    pub event_queries: u64,
    /// Allocations that failed in this replay (would OOM at this capacity).
    pub failures: u64,
    /// `allocate failure` lines already in the trace.
    pub trace_failures: u64,
    /// Frees of pointers the replay does not hold (failed or never seen).
    pub unmatched_frees: u64,
    /// Allocations of a pointer the trace still holds live: the trace lost
    /// a free, or is out of order. The replay frees the old one first.
    pub allocs_of_live: u64,
    pub seconds: f64,
    pub capacity: u64,
    /// Times of the failures (replay and trace), in trace microseconds.
    pub oom_times: Vec<u64>,
    /// The timeline, when asked for.
    pub samples: Vec<Sample>,
    /// Index of the event after which the allocator's live bytes peaked.
    pub peak_event: usize,
}

impl ReplayResult {
    /// Peak reserved / peak requested live bytes: 1.0 is no waste. The
    /// denominator is what the program asked for, so rounding, unsplit block
    /// tails and holes all count as waste, and allocators compare fairly.
    pub fn fragmentation(&self) -> f64 {
        self.peak_reserved as f64 / self.peak_requested.max(1) as f64
    }

    /// Peak reserved / peak allocated (rounded block) bytes: torch's
    /// `memory_reserved / memory_allocated` view, which hides internal waste.
    pub fn reserved_over_allocated(&self) -> f64 {
        self.peak_reserved as f64 / self.peak_live.max(1) as f64
    }
}

/// Replay `events` on a fresh sim-backed allocator configured by `config`.
/// With `gpu_lag` > 0 the simulated GPU runs behind: an event recorded at
/// one trace event completes `gpu_lag` trace events later, or at the next
/// `synchronize` line, and streams are never proven idle
/// ([`SimDriver::set_event_lag`]). With 0 device work completes at once.
/// With `timeline`, sample live and reserved bytes after every event.
pub fn replay(events: &[Event], config: &Config, timeline: bool, gpu_lag: u64) -> ReplayResult {
    let driver = Arc::new(SimDriver::new(1, config.sim_memory));
    driver.set_event_lag(gpu_lag);
    let a = Allocator::new(config.clone(), driver.clone());
    let mut map: FxHashMap<u64, (u64, u64)> = FxHashMap::default();
    let mut r = ReplayResult {
        events: events.len(),
        capacity: config.sim_memory,
        ..Default::default()
    };
    let (mut requested, mut live_now, mut live_peak) = (0u64, 0u64, 0u64);
    let t = Instant::now();
    for (i, e) in events.iter().enumerate() {
        driver.tick();
        match e.action {
            Action::Allocate => {
                if let Some((old, n)) = map.remove(&e.ptr) {
                    let _ = a.free(old, Some(0), e.stream);
                    requested -= n;
                    r.allocs_of_live += 1;
                }
                match a.malloc(e.size, 0, e.stream) {
                    Ok(0) => {}
                    Ok(p) => {
                        map.insert(e.ptr, (p, e.size));
                        r.allocs += 1;
                        requested += e.size;
                        r.peak_requested = r.peak_requested.max(requested);
                    }
                    Err(_) => {
                        r.failures += 1;
                        r.oom_times.push(e.time_us);
                    }
                }
            }
            Action::AllocateFailure => {
                r.trace_failures += 1;
                r.oom_times.push(e.time_us);
            }
            Action::Synchronize => driver.complete_all(),
            Action::Free => match map.remove(&e.ptr) {
                Some((p, n)) => {
                    let _ = a.free(p, Some(0), e.stream);
                    r.frees += 1;
                    requested -= n;
                }
                None => r.unmatched_frees += 1,
            },
        }
        if timeline {
            let s = a.stats(0).unwrap_or_default();
            live_now = requested;
            r.samples.push(Sample {
                time_us: e.time_us,
                live: requested,
                reserved: s.reserved_bytes,
            });
        }
        if timeline && live_now > live_peak {
            live_peak = live_now;
            r.peak_event = i;
        }
    }
    r.seconds = t.elapsed().as_secs_f64();
    let s = a.stats(0).unwrap_or_default();
    r.peak_live = s.allocated_bytes_peak;
    r.peak_reserved = s.reserved_bytes_peak;
    r.hit_rate = s.num_cache_hits as f64 / s.num_allocs.max(1) as f64;
    let c = driver.counters();
    r.vmm_calls = [
        c.phys_creates,
        c.phys_releases,
        c.maps,
        c.unmaps,
        c.set_accesses,
        c.va_reserves + c.va_frees,
    ];
    r.driver_calls = s.num_driver_allocs + s.num_driver_frees + r.vmm_calls.iter().sum::<u64>();
    r.event_records = c.event_records;
    r.event_queries = c.event_queries;
    r
}

/// The least device capacity (to 1 MiB) at which `events` replay with no
/// failure, found by bisection below `config.sim_memory`, with that replay.
/// `None` when even `config.sim_memory` is not enough.
pub fn min_capacity(
    events: &[Event],
    config: &Config,
    gpu_lag: u64,
) -> Option<(u64, ReplayResult)> {
    let run = |mem: u64| {
        let mut c = config.clone();
        c.sim_memory = mem;
        replay(events, &c, false, gpu_lag)
    };
    let top = run(config.sim_memory);
    if top.failures > 0 {
        return None;
    }
    const MIB: u64 = 1 << 20;
    let (mut lo, mut hi) = (top.peak_requested / MIB, config.sim_memory.div_ceil(MIB));
    let mut best = top;
    // Invariant: capacity hi MiB works; lo MiB is below the trace's own peak or failed.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let r = run(mid * MIB);
        if r.failures == 0 {
            hi = mid;
            best = r;
        } else {
            lo = mid;
        }
    }
    Some((hi * MIB, best))
}
