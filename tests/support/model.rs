//! The reference model: [`Harness`] runs the allocator under test over a
//! spied sim device and keeps its own account of what the engine's stats,
//! live allocations, limits and errors must be, op by op ([`Harness::step`],
//! [`Harness::check`], [`Harness::drain`]). Stream safety is checked through
//! a [`Ledger`]; violations are collected in [`Harness::violations`] for the
//! test to assert on.

use super::ledger::Ledger;
use super::ops::Op;
use super::spy::Spy;
use cudalloc::driver::Stream;
use cudalloc::error::ErrorCode;
use cudalloc::size_class::{round_size, Policy};
use cudalloc::{Allocator, Config};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A live allocation as the model knows it.
#[derive(Debug, Clone)]
pub struct Live {
    pub dev: usize,
    pub stream: Stream,
    pub requested: u64,
    pub size: u64,
    pub recorded: Vec<Stream>,
}

#[derive(Debug, Clone, Default)]
struct DevModel {
    allocs: u64,
    frees: u64,
    invalid_frees: u64,
    ooms: u64,
    allocated: u64,
    allocated_peak: u64,
    requested: u64,
    live: u64,
    fraction: f64,
}

/// The reference model plus the allocator under test.
pub struct Harness {
    pub alloc: Allocator,
    pub spy: Arc<Spy>,
    pub live: BTreeMap<u64, Live>,
    /// Recently freed pointers, for double frees.
    stale: Vec<u64>,
    devs: Vec<DevModel>,
    /// Frees not yet proven complete, for the stream-safety check.
    ledger: Ledger,
    /// Device size at start (what memory_fraction is a fraction of) and now.
    total: u64,
    capacity: Vec<u64>,
    max_memory: u64,
    policy: Policy,
    /// Stream-safety violations seen (the test asserts 0).
    pub violations: Vec<String>,
    pub ops: u64,
    /// Streams capturing now (`Op::Capture`).
    capturing: Vec<(usize, Stream)>,
}

impl Harness {
    /// An allocator over a spied sim device configured by `conf`.
    pub fn new(conf: &str, manual_events: bool) -> Self {
        let c = Config::parse(conf).unwrap();
        let spy = Arc::new(Spy::new(c.sim_devices, c.sim_memory));
        spy.sim.set_manual_events(manual_events);
        let devs = vec![
            DevModel {
                fraction: c.memory_fraction,
                ..Default::default()
            };
            c.sim_devices
        ];
        let ledger = Ledger::new(c.sim_devices);
        Harness {
            total: c.sim_memory,
            capacity: vec![c.sim_memory; c.sim_devices],
            max_memory: c.max_memory,
            policy: Policy::from_config(&c),
            alloc: Allocator::new(c, spy.clone()),
            spy,
            live: BTreeMap::new(),
            stale: Vec::new(),
            devs,
            ledger,
            violations: Vec::new(),
            ops: 0,
            capturing: Vec::new(),
        }
    }

    pub fn ndev(&self) -> usize {
        self.devs.len()
    }

    fn limit(&self, dev: usize) -> u64 {
        let mut l = if self.max_memory == 0 {
            u64::MAX
        } else {
            self.max_memory
        };
        let f = self.devs[dev].fraction;
        if f < 1.0 {
            l = l.min((self.total as f64 * f) as u64);
        }
        l
    }

    /// Shrink or grow a device, as when another process takes or gives back memory.
    pub fn set_capacity(&mut self, dev: usize, capacity: u64) {
        self.spy.sim.set_capacity(dev, capacity);
        self.capacity[dev] = capacity;
    }

    fn nth_live(&self, pick: u64) -> Option<u64> {
        if self.live.is_empty() {
            return None;
        }
        self.live
            .keys()
            .nth((pick % self.live.len() as u64) as usize)
            .copied()
    }

    /// An invalid free of `p` counts on the hinted device; without such a
    /// device, on the one whose segment holds `p`, else on device 0.
    fn count_invalid(&mut self, p: u64, hint_dev: Option<usize>) {
        let n = self.devs.len();
        let d = hint_dev
            .filter(|&d| d < n)
            .or_else(|| (0..n).find(|&d| self.spy.inside_segment(d, p, 1)))
            .unwrap_or(0);
        self.devs[d].invalid_frees += 1;
    }

    /// Free `p`, live or not, checking the result against the model.
    fn free(&mut self, p: u64, hint_dev: usize, hint_stream: Stream) -> Result<(), String> {
        let tick = self.spy.stamp();
        let r = self.alloc.free(p, Some(hint_dev), hint_stream);
        match self.live.remove(&p) {
            Some(l) => {
                r.map_err(|e| format!("free of live {p:#x} failed: {e}"))?;
                let m = &mut self.devs[l.dev];
                m.frees += 1;
                m.live -= 1;
                m.allocated -= l.size;
                m.requested -= l.requested;
                let mut streams = l.recorded;
                streams.push(l.stream);
                if self.ledger.overlaps(l.dev, p, p + l.size) {
                    return Err(format!("model: freed ranges overlap at {p:#x}"));
                }
                self.ledger.freed(l.dev, p, l.size, streams, tick);
                if self.stale.len() >= 64 {
                    self.stale.remove(0);
                }
                self.stale.push(p);
            }
            None if p == 0 => {
                r.map_err(|e| format!("free(NULL) failed: {e}"))?;
            }
            None => {
                let e = r.err().ok_or(format!("invalid free of {p:#x} succeeded"))?;
                if e.code != ErrorCode::CUDALLOC_ERR_INVALID_FREE {
                    return Err(format!("invalid free of {p:#x}: wrong code {:?}", e.code));
                }
                self.count_invalid(p, Some(hint_dev));
            }
        }
        Ok(())
    }

    fn malloc(&mut self, dev: usize, stream: Stream, size: u64) -> Result<(), String> {
        let before = (dev < self.devs.len()).then(|| self.spy.device(dev).driver_allocs);
        let r = self.alloc.malloc(size, dev, stream);
        if size == 0 && dev < self.devs.len() {
            // Size 0 on a valid device is NULL and no error (torch passes it through).
            return match r {
                Ok(0) => Ok(()),
                other => Err(format!("malloc(0) gave {other:?}")),
            };
        }
        if dev >= self.devs.len() {
            let e = r.err().ok_or("malloc on an invalid device succeeded")?;
            if e.code != ErrorCode::CUDALLOC_ERR_INVALID_DEVICE {
                return Err(format!("bad device: wrong code {:?}", e.code));
            }
            return Ok(());
        }
        let p = match r {
            Ok(0) => return Err(format!("malloc({size}) returned NULL without an error")),
            Ok(p) => p,
            Err(e) => {
                if e.code != ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY {
                    return Err(format!("malloc({size}) failed with {:?}: {e}", e.code));
                }
                self.devs[dev].ooms += 1;
                // The ladder released every idle segment: only a new segment
                // past the limit or the device could have failed.
                let reserved = self.alloc.stats(dev).unwrap().reserved_bytes;
                let seg = round_size(size)
                    .and_then(|r| self.policy.segment_size(r))
                    .unwrap_or(u64::MAX);
                let cap = self.limit(dev).min(self.capacity[dev]);
                // During a capture the ladder releases nothing either.
                if reserved.saturating_add(seg) <= cap && self.capturing.is_empty() {
                    return Err(format!(
                        "malloc({size}) on device {dev} failed with room to spare: reserved {reserved} + segment {seg} <= {cap}"
                    ));
                }
                return Ok(());
            }
        };
        let rounded = round_size(size).unwrap();
        let got = self
            .alloc
            .size_of(p)
            .ok_or(format!("size_of({p:#x}) unknown right after malloc"))?;
        if p % 512 != 0 || got < rounded {
            return Err(format!(
                "malloc({size}) gave {p:#x} of {got} bytes (need {rounded}, 512-aligned)"
            ));
        }
        if let Some((&q, l)) = self.live.range(..p + got).next_back() {
            if q + l.size > p {
                return Err(format!(
                    "{p:#x}+{got} overlaps live {q:#x}+{} (handed out twice)",
                    l.size
                ));
            }
        }
        if !self.spy.inside_segment(dev, p, got) {
            return Err(format!("{p:#x}+{got} is not inside a driver segment"));
        }
        if self.spy.device(dev).driver_allocs != before.unwrap() {
            let reserved = self.spy.device(dev).used;
            if reserved > self.limit(dev) {
                return Err(format!(
                    "a new segment took reserved to {reserved}, past the limit {}",
                    self.limit(dev)
                ));
            }
        }
        self.check_reuse(dev, stream, p, got);
        let m = &mut self.devs[dev];
        m.allocs += 1;
        m.live += 1;
        m.allocated += got;
        m.allocated_peak = m.allocated_peak.max(m.allocated);
        m.requested += size;
        self.live.insert(
            p,
            Live {
                dev,
                stream,
                requested: size,
                size: got,
                recorded: Vec::new(),
            },
        );
        Ok(())
    }

    /// Stream safety: `[p, p+size)` handed to `stream` must not overlap a
    /// range freed on another stream whose work is not proven complete.
    pub fn check_reuse(&mut self, dev: usize, stream: Stream, p: u64, size: u64) {
        let unproven = self.ledger.hand_out(&self.spy, dev, stream, p, size);
        for u in unproven {
            self.violations.push(format!("op {}: {u}", self.ops));
        }
    }

    /// Stream safety of moved pages: memory unmapped (to be mapped for any
    /// stream) must hold no free not yet proven complete.
    pub fn check_unmaps(&mut self) {
        for u in self.spy.take_unmaps() {
            for v in self.ledger.unmapped(&u) {
                self.violations
                    .push(format!("op {}: unmapped while {v}", self.ops));
            }
        }
    }

    /// Forget freed ranges whose streams are all proven complete (keeps the
    /// soak's memory bounded).
    pub fn prune(&mut self) {
        self.ledger.prune(&self.spy);
    }

    /// Run one op and check its direct results.
    pub fn step(&mut self, op: Op) -> Result<(), String> {
        self.ops += 1;
        match op {
            Op::Malloc { dev, stream, size } => self.malloc(dev, stream, size)?,
            Op::Free {
                pick,
                hint_dev,
                hint_stream,
            } => {
                if let Some(p) = self.nth_live(pick) {
                    self.free(p, hint_dev, hint_stream)?;
                } else {
                    self.free(0, hint_dev, hint_stream)?;
                }
            }
            Op::FreeStale { pick, hint_dev } => {
                if !self.stale.is_empty() {
                    let p = self.stale[(pick % self.stale.len() as u64) as usize];
                    self.free(p, hint_dev, 0)?;
                }
            }
            Op::FreeInterior { pick, off } => {
                if let Some(p) = self.nth_live(pick) {
                    let size = self.live[&p].size;
                    let q = p + 1 + off % (size - 1);
                    self.free(q, self.live[&p].dev, 0)?;
                }
            }
            Op::FreeGarbage { ptr, hint_dev } => self.free(ptr, hint_dev, 0)?,
            Op::RecordStream { pick, stream } => {
                if let Some(p) = self.nth_live(pick) {
                    self.alloc
                        .record_stream(p, stream)
                        .map_err(|e| format!("record_stream on live {p:#x}: {e}"))?;
                    let l = self.live.get_mut(&p).unwrap();
                    if stream != l.stream && !l.recorded.contains(&stream) {
                        l.recorded.push(stream);
                    }
                }
            }
            Op::RecordUnknown { ptr, stream } => {
                let r = self.alloc.record_stream(ptr, stream);
                if self.live.contains_key(&ptr) {
                    r.map_err(|e| e.to_string())?;
                    let l = self.live.get_mut(&ptr).unwrap();
                    if stream != l.stream && !l.recorded.contains(&stream) {
                        l.recorded.push(stream);
                    }
                } else if r.map_err(|e| e.code) != Err(ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER) {
                    return Err(format!(
                        "record_stream({ptr:#x}) on an unknown pointer: wrong result"
                    ));
                }
            }
            Op::Complete { dev, stream } => self.spy.complete_stream(dev, stream),
            Op::CompleteAll => self.spy.complete_all(),
            Op::Capture { dev, stream } => {
                let known = self
                    .live
                    .values()
                    .any(|l| l.dev == dev && l.stream == stream);
                if known || self.capturing.contains(&(dev, stream)) {
                    self.toggle_capture(dev, stream);
                }
            }
            Op::EmptyCache => {
                self.alloc.empty_cache();
                for d in 0..self.ndev() {
                    self.after_empty(d)?;
                }
            }
            Op::EmptyCacheDevice { dev } => {
                self.alloc
                    .empty_cache_device(dev)
                    .map_err(|e| e.to_string())?;
                self.after_empty(dev)?;
            }
            Op::ResetPeak { dev } => {
                self.alloc.reset_peak(dev).map_err(|e| e.to_string())?;
                self.spy.reset_peak(dev);
                let m = &mut self.devs[dev];
                m.allocated_peak = m.allocated;
            }
            Op::SetFraction { dev, fraction } => {
                let r = self.alloc.set_memory_fraction(fraction, dev);
                if fraction > 0.0 && fraction <= 1.0 {
                    r.map_err(|e| e.to_string())?;
                    self.devs[dev].fraction = fraction;
                } else if r.map_err(|e| e.code) != Err(ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT) {
                    return Err(format!("set_memory_fraction({fraction}) not refused"));
                }
            }
        }
        Ok(())
    }

    fn toggle_capture(&mut self, dev: usize, stream: Stream) {
        let on = !self.capturing.contains(&(dev, stream));
        self.spy.sim.set_capturing_on(dev, stream, on);
        if on {
            self.capturing.push((dev, stream));
        } else {
            self.capturing.retain(|&c| c != (dev, stream));
        }
    }

    fn after_empty(&self, dev: usize) -> Result<(), String> {
        if !self.capturing.is_empty() {
            // Nothing is released during a capture (quarantine included).
            return Ok(());
        }
        let s = self.alloc.stats(dev).unwrap();
        if s.pending_free_bytes != 0 {
            return Err(format!("device {dev}: pending bytes after empty_cache"));
        }
        if s.active_allocations == 0 && s.reserved_bytes != 0 {
            return Err(format!(
                "device {dev}: {} bytes reserved with nothing live after empty_cache",
                s.reserved_bytes
            ));
        }
        Ok(())
    }

    /// Compare the engine's stats with the model's; `full` adds the
    /// structure walk and the per-pointer size check.
    pub fn check(&self, full: bool) -> Result<(), String> {
        let violations = self.spy.sim.counters().capture_violations;
        if violations != 0 {
            return Err(format!(
                "{violations} driver calls that would invalidate a capture"
            ));
        }
        if full {
            self.alloc.check_invariants()?;
            for (&p, l) in &self.live {
                if self.alloc.size_of(p) != Some(l.size) {
                    return Err(format!("live {p:#x} lost or resized"));
                }
            }
        }
        for (d, m) in self.devs.iter().enumerate() {
            let s = self.alloc.stats(d).unwrap();
            let spy = self.spy.device(d);
            let lim = match self.limit(d) {
                u64::MAX => 0,
                l => l,
            };
            let want = [
                ("active_allocations", s.active_allocations, m.live),
                ("requested_bytes", s.requested_bytes, m.requested),
                ("allocated_bytes", s.allocated_bytes, m.allocated),
                (
                    "allocated_bytes_peak",
                    s.allocated_bytes_peak,
                    m.allocated_peak,
                ),
                ("num_allocs", s.num_allocs, m.allocs),
                ("num_frees", s.num_frees, m.frees),
                ("num_invalid_frees", s.num_invalid_frees, m.invalid_frees),
                ("num_ooms", s.num_ooms, m.ooms),
                ("reserved_bytes", s.reserved_bytes, spy.used),
                ("reserved_bytes_peak", s.reserved_bytes_peak, spy.used_peak),
                ("segments", s.segments, spy.segments.len() as u64),
                ("num_driver_allocs", s.num_driver_allocs, spy.driver_allocs),
                ("num_driver_frees", s.num_driver_frees, spy.driver_frees),
                ("limit_bytes", s.limit_bytes, lim),
                (
                    "reserved = allocated + cached + pending",
                    s.reserved_bytes,
                    s.allocated_bytes + s.cached_free_bytes + s.pending_free_bytes,
                ),
            ];
            for (name, got, exp) in want {
                if got != exp {
                    return Err(format!(
                        "op {}: device {d}: {name} is {got}, model says {exp}",
                        self.ops
                    ));
                }
            }
        }
        Ok(())
    }

    /// Free everything live, complete all work, empty the cache: the device
    /// must come back to nothing reserved.
    pub fn drain(&mut self) -> Result<(), String> {
        while let Some(&(d, s)) = self.capturing.first() {
            self.toggle_capture(d, s);
        }
        while let Some((&p, l)) = self.live.iter().next() {
            let d = l.dev;
            self.free(p, d, 0)?;
        }
        self.spy.complete_all();
        self.alloc.empty_cache();
        self.check(true)?;
        for d in 0..self.ndev() {
            if self.spy.device(d).used != 0 {
                return Err(format!("device {d}: memory left reserved after drain"));
            }
        }
        Ok(())
    }
}
