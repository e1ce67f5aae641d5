//! Shared by the model, fault and stress tests: a spying driver that records
//! what the device has *proven* complete, and the reference model of the
//! allocator that `tests/model.rs` checks the engine against.
//!
//! **Stream safety, independently of the engine.** [`Spy`] wraps the sim
//! device and keeps a logical clock. For every `(device, stream)` it keeps the
//! tick up to which that stream's work is proven complete, learnt only from
//! what the driver said: an event recorded at tick `r` that queried complete
//! (or was synchronised) proves the stream's work up to `r`; a stream
//! synchronise proves it up to now; a `mem_free` synchronises the device (as
//! `cuMemFree` does). A test stamps every free with a tick, and an allocation
//! on stream T overlapping a range freed on stream S != T at tick `t` is a
//! violation unless S is proven complete past `t`.

#![allow(dead_code)] // each test binary uses a different part

use cudalloc::driver::sim::SimDriver;
use cudalloc::driver::{Driver, DriverResult, Event, Stream};
use cudalloc::error::ErrorCode;
use cudalloc::size_class::{round_size, Policy};
use cudalloc::{Allocator, Config};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What the spy knows about one device.
#[derive(Debug, Default, Clone)]
pub struct SpyDevice {
    /// Bytes the driver has handed out now, and the peak since the last reset.
    pub used: u64,
    pub used_peak: u64,
    /// Live driver segments: base -> size.
    pub segments: BTreeMap<u64, u64>,
    pub driver_allocs: u64,
    pub driver_frees: u64,
    /// Work on every stream of the device is complete up to this tick.
    pub device_done: u64,
    /// Per stream: work complete up to this tick.
    pub done: HashMap<Stream, u64>,
}

#[derive(Debug, Default)]
struct SpyState {
    tick: u64,
    devices: Vec<SpyDevice>,
    /// Event -> (device, stream, tick of its last record).
    recorded: HashMap<Event, (usize, Stream, u64)>,
}

impl SpyState {
    fn now(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
    fn proven(&mut self, device: usize, stream: Stream, upto: u64) {
        if let Some(d) = self.devices.get_mut(device) {
            let e = d.done.entry(stream).or_default();
            *e = (*e).max(upto);
        }
    }
}

/// A [`Driver`] that forwards to a [`SimDriver`] and records what it proved.
pub struct Spy {
    pub sim: SimDriver,
    state: Mutex<SpyState>,
    /// Mutation switch for the checker's own test: event queries claim
    /// completion the device never proved (the spy records no proof).
    pub lie_events: std::sync::atomic::AtomicBool,
}

impl Spy {
    pub fn new(devices: usize, capacity: u64) -> Self {
        Spy {
            sim: SimDriver::new(devices, capacity),
            state: Mutex::new(SpyState {
                tick: 1,
                devices: vec![SpyDevice::default(); devices],
                recorded: HashMap::new(),
            }),
            lie_events: Default::default(),
        }
    }

    /// A fresh tick, to stamp a free with (take it before calling free).
    pub fn stamp(&self) -> u64 {
        self.state.lock().now()
    }

    /// Whether work on `stream` of `device` is proven complete past tick `t`.
    pub fn complete_since(&self, device: usize, stream: Stream, t: u64) -> bool {
        let st = self.state.lock();
        let d = &st.devices[device];
        d.device_done > t || d.done.get(&stream).is_some_and(|&x| x > t)
    }

    /// The test completes `stream`'s work (a late or early GPU).
    pub fn complete_stream(&self, device: usize, stream: Stream) {
        let mut st = self.state.lock();
        self.sim.complete_stream(device, stream);
        let now = st.now();
        st.proven(device, stream, now);
    }

    pub fn complete_all(&self) {
        let mut st = self.state.lock();
        self.sim.complete_all();
        let now = st.now();
        for d in &mut st.devices {
            d.device_done = now;
        }
    }

    pub fn device(&self, device: usize) -> SpyDevice {
        self.state.lock().devices[device].clone()
    }

    pub fn reset_peak(&self, device: usize) {
        let mut st = self.state.lock();
        let d = &mut st.devices[device];
        d.used_peak = d.used;
    }

    /// Whether `[p, p + size)` lies inside one live driver segment of `device`.
    pub fn inside_segment(&self, device: usize, p: u64, size: u64) -> bool {
        let st = self.state.lock();
        st.devices[device]
            .segments
            .range(..=p)
            .next_back()
            .is_some_and(|(&b, &s)| p + size <= b + s)
    }
}

impl Driver for Spy {
    fn name(&self) -> &'static str {
        "spy"
    }
    fn device_count(&self) -> usize {
        self.sim.device_count()
    }
    fn mem_alloc(&self, device: usize, size: u64) -> DriverResult<u64> {
        let mut st = self.state.lock();
        let p = self.sim.mem_alloc(device, size)?;
        let d = &mut st.devices[device];
        d.used += size;
        d.used_peak = d.used_peak.max(d.used);
        d.driver_allocs += 1;
        assert!(
            d.segments.insert(p, size).is_none(),
            "sim reused a live base"
        );
        Ok(p)
    }
    fn mem_free(&self, device: usize, ptr: u64, size: u64) -> DriverResult<()> {
        let mut st = self.state.lock();
        self.sim.mem_free(device, ptr, size)?;
        let now = st.now();
        let d = &mut st.devices[device];
        assert_eq!(
            d.segments.remove(&ptr),
            Some(size),
            "segment freed with a wrong size"
        );
        d.used -= size;
        d.driver_frees += 1;
        d.device_done = now; // cuMemFree synchronises the device
        Ok(())
    }
    fn mem_info(&self, device: usize) -> DriverResult<(u64, u64)> {
        self.sim.mem_info(device)
    }
    fn event_create(&self, device: usize) -> DriverResult<Event> {
        self.sim.event_create(device)
    }
    fn event_record(&self, device: usize, event: Event, stream: Stream) -> DriverResult<()> {
        let mut st = self.state.lock();
        self.sim.event_record(device, event, stream)?;
        let now = st.now();
        st.recorded.insert(event, (device, stream, now));
        Ok(())
    }
    fn event_query(&self, device: usize, event: Event) -> DriverResult<bool> {
        let mut st = self.state.lock();
        let r = self.sim.event_query(device, event)?;
        if r {
            if let Some(&(d, s, at)) = st.recorded.get(&event) {
                st.proven(d, s, at);
            }
        }
        Ok(r || self.lie_events.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn event_synchronize(&self, device: usize, event: Event) -> DriverResult<()> {
        let mut st = self.state.lock();
        self.sim.event_synchronize(device, event)?;
        if let Some(&(d, s, at)) = st.recorded.get(&event) {
            st.proven(d, s, at);
        }
        Ok(())
    }
    fn event_destroy(&self, device: usize, event: Event) -> DriverResult<()> {
        let mut st = self.state.lock();
        st.recorded.remove(&event);
        self.sim.event_destroy(device, event)
    }
    fn stream_synchronize(&self, device: usize, stream: Stream) -> DriverResult<()> {
        let mut st = self.state.lock();
        self.sim.stream_synchronize(device, stream)?;
        let now = st.now();
        st.proven(device, stream, now);
        Ok(())
    }
    fn stream_query(&self, device: usize, stream: Stream) -> DriverResult<bool> {
        let mut st = self.state.lock();
        let r = self.sim.stream_query(device, stream)?;
        if r {
            let now = st.now();
            st.proven(device, stream, now);
        }
        Ok(r)
    }
    fn stream_is_capturing(&self, device: usize, stream: Stream) -> DriverResult<bool> {
        self.sim.stream_is_capturing(device, stream)
    }
}

/// Streams the model uses (0 is the legacy default stream).
pub const STREAMS: [Stream; 4] = [0, 0x10, 0x20, 0x30];

/// One step of a workload. Decoded from three random words, so proptest, the
/// soak and the fuzz targets share one generator (and shrinking moves toward
/// small mallocs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Malloc {
        dev: usize,
        stream: Stream,
        size: u64,
    },
    /// Free the `pick`th live allocation (mod the live count).
    Free {
        pick: u64,
        hint_dev: usize,
        hint_stream: Stream,
    },
    /// Free a pointer freed earlier (a double free unless it is live again).
    FreeStale {
        pick: u64,
        hint_dev: usize,
    },
    /// Free a pointer inside a live block.
    FreeInterior {
        pick: u64,
        off: u64,
    },
    /// Free an arbitrary address.
    FreeGarbage {
        ptr: u64,
        hint_dev: usize,
    },
    RecordStream {
        pick: u64,
        stream: Stream,
    },
    RecordUnknown {
        ptr: u64,
        stream: Stream,
    },
    /// The GPU finishes a stream's work (late or early relative to frees).
    Complete {
        dev: usize,
        stream: Stream,
    },
    CompleteAll,
    /// A C/C++ graph capture begins on `stream` of `dev`, or ends if one
    /// runs there. Begun only on a stream holding a live allocation there:
    /// cudalloc cannot see a capture on a stream it knows nothing of (README).
    Capture {
        dev: usize,
        stream: Stream,
    },
    EmptyCache,
    EmptyCacheDevice {
        dev: usize,
    },
    ResetPeak {
        dev: usize,
    },
    SetFraction {
        dev: usize,
        fraction: f64,
    },
}

const MENU: [u64; 8] = [1, 512, 513, 1000, 4096, 65_536, 100_000, 1 << 20];

impl Op {
    /// Decode one op for a device count of `ndev` (a malloc may name device
    /// `ndev`, which is invalid).
    pub fn decode(w: [u64; 3], ndev: usize) -> Op {
        let kind = w[0] % 100;
        let dev = ((w[0] / 100) % ndev as u64) as usize;
        let stream = STREAMS[((w[0] / 1000) % 4) as usize];
        let hint_dev = ((w[2] >> 32) % (ndev as u64 + 1)) as usize;
        let hint_stream = STREAMS[((w[2] >> 40) % 4) as usize];
        match kind {
            0..=34 => Op::Malloc {
                dev,
                stream,
                size: size_from(w[1], w[2]),
            },
            35..=69 => Op::Free {
                pick: w[1],
                hint_dev,
                hint_stream,
            },
            70..=72 => Op::FreeStale {
                pick: w[1],
                hint_dev,
            },
            73..=74 => Op::FreeInterior {
                pick: w[1],
                off: w[2],
            },
            75..=76 => Op::FreeGarbage {
                ptr: garbage(w[1]),
                hint_dev,
            },
            77..=80 => Op::RecordStream {
                pick: w[1],
                stream: hint_stream,
            },
            81 => Op::RecordUnknown {
                ptr: garbage(w[1]),
                stream,
            },
            82..=89 => Op::Complete { dev, stream },
            90 => Op::CompleteAll,
            91 => Op::EmptyCache,
            92 => Op::EmptyCacheDevice { dev },
            93..=94 => Op::ResetPeak { dev },
            95..=97 => Op::SetFraction {
                dev,
                fraction: [
                    0.05,
                    0.1,
                    0.25,
                    0.5,
                    0.75,
                    1.0,
                    1.0,
                    0.0,
                    -1.0,
                    1.5,
                    f64::NAN,
                ][(w[1] % 11) as usize],
            },
            98 => Op::Capture { dev, stream },
            _ => Op::Malloc {
                dev: ndev,
                stream,
                size: size_from(w[1], w[2]),
            },
        }
    }
}

fn size_from(a: u64, b: u64) -> u64 {
    match a % 20 {
        0..=8 | 19 => MENU[((a / 20) % MENU.len() as u64) as usize],
        9..=13 => 1 + b % (1 << 20),
        14..=16 => (1 << 20) + 1 + b % (23 << 20),
        17 => (30 << 20) + b % (90 << 20),
        _ => [0, 1 << 30, 1 << 50, u64::MAX][(b % 4) as usize],
    }
}

fn garbage(a: u64) -> u64 {
    match a % 4 {
        // Near the sim's address window, 512-aligned: the likeliest to confuse.
        0 | 1 => 0x1000_0000_0000 + (a >> 8) % (1 << 36) / 512 * 512,
        2 => a | 1,
        _ => a,
    }
}

/// A live allocation as the model knows it.
#[derive(Debug, Clone)]
pub struct Live {
    pub dev: usize,
    pub stream: Stream,
    pub requested: u64,
    pub size: u64,
    pub recorded: Vec<Stream>,
}

/// A freed range still waiting for proof that its streams' work is done.
#[derive(Debug, Clone)]
struct Freed {
    end: u64,
    /// Streams whose work must be complete before another stream reuses it.
    streams: Vec<Stream>,
    tick: u64,
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
    freed: BTreeMap<u64, Freed>,
}

/// The reference model plus the allocator under test.
pub struct Harness {
    pub alloc: Allocator,
    pub spy: Arc<Spy>,
    pub live: BTreeMap<u64, Live>,
    /// Recently freed pointers, for double frees.
    stale: Vec<u64>,
    devs: Vec<DevModel>,
    /// Device size at start (what memory_fraction is a fraction of) and now.
    total: u64,
    capacity: Vec<u64>,
    max_memory: u64,
    policy: Policy,
    /// Stream-safety violations seen (the test asserts 0).
    pub violations: Vec<String>,
    pub ops: u64,
    injected: bool,
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
            violations: Vec::new(),
            ops: 0,
            injected: false,
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

    /// An injected driver failure makes OOMs legitimate whatever the room.
    pub fn allow_injected_ooms(&mut self, allow: bool) {
        self.injected = allow;
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
                let end = p + l.size;
                if let Some((_, prev)) = m.freed.range(..end).next_back() {
                    if prev.end > p {
                        return Err(format!("model: freed ranges overlap at {p:#x}"));
                    }
                }
                m.freed.insert(p, Freed { end, streams, tick });
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
                if reserved.saturating_add(seg) <= cap
                    && !self.injected
                    && self.capturing.is_empty()
                {
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
        let end = p + size;
        let overl: Vec<u64> = self.devs[dev]
            .freed
            .range(..end)
            .rev()
            .take_while(|(_, f)| f.end > p)
            .map(|(&s, _)| s)
            .collect();
        for s in overl {
            let f = self.devs[dev].freed.remove(&s).unwrap();
            for &w in &f.streams {
                if w != stream && !self.spy.complete_since(dev, w, f.tick) {
                    self.violations.push(format!(
                        "op {}: {p:#x}+{size} handed to stream {stream:#x} on device {dev} while its free on stream {w:#x} (tick {}) is not proven complete",
                        self.ops, f.tick
                    ));
                }
            }
            // Keep the parts this allocation does not cover.
            if s < p {
                self.devs[dev].freed.insert(
                    s,
                    Freed {
                        end: p,
                        ..f.clone()
                    },
                );
            }
            if f.end > end {
                self.devs[dev].freed.insert(end, Freed { end: f.end, ..f });
            }
        }
    }

    /// Forget freed ranges whose streams are all proven complete (keeps the
    /// soak's memory bounded).
    pub fn prune(&mut self) {
        for (d, m) in self.devs.iter_mut().enumerate() {
            let spy = &self.spy;
            m.freed
                .retain(|_, f| !f.streams.iter().all(|&w| spy.complete_since(d, w, f.tick)));
        }
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

/// splitmix64: a tiny deterministic generator for soaks and stress tests.
pub struct Mix(pub u64);

impl Mix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn words(&mut self) -> [u64; 3] {
        [self.next(), self.next(), self.next()]
    }
}
