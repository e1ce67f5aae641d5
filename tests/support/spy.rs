//! A spying driver: [`Spy`] forwards every call to the sim device and records
//! what the device has *proven* complete, independently of the engine.
//!
//! The spy keeps a logical clock. For every `(device, stream)` it keeps the
//! tick up to which that stream's work is proven complete, learnt only from
//! what the driver said: an event recorded at tick `r` that queried complete
//! (or was synchronised) proves the stream's work up to `r`; a stream
//! synchronise or a stream query that says complete proves it up to now; a
//! `mem_free` synchronises the device (as `cuMemFree` does). The stream-safety
//! ledger (`super::ledger`) asks it through [`Spy::complete_since`].
//!
//! It also keeps the driver's own accounting (live segments, bytes in use and
//! their peak, allocation and free counts) for the reference model to compare
//! the engine's stats with.
//!
//! Every [`Driver`] method is implemented here, defaulted ones included, so a
//! method the engine starts calling cannot bypass the spy.

use cudalloc::driver::sim::SimDriver;
use cudalloc::driver::{Driver, DriverResult, Event, PhysHandle, Stream};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};

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
    /// Physical handles (virtual memory): handle -> (device, size).
    handles: HashMap<PhysHandle, (usize, u64)>,
    /// Unmaps not yet checked by the ledger.
    unmaps: Vec<Unmap>,
}

/// A `cuMemUnmap`, with what the device had proven when it was made: the
/// memory may be mapped anywhere from then on, so every free in the range
/// must have been proven complete by that moment.
#[derive(Debug, Clone)]
pub struct Unmap {
    pub device: usize,
    pub va: u64,
    pub len: u64,
    /// `SpyDevice::device_done` and `done` at the unmap.
    pub device_done: u64,
    pub done: HashMap<Stream, u64>,
}

impl Unmap {
    /// Whether `stream`'s work was proven complete past tick `t` at the unmap.
    pub fn proven(&self, stream: Stream, t: u64) -> bool {
        self.device_done > t || self.done.get(&stream).is_some_and(|&x| x > t)
    }
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
                handles: HashMap::new(),
                unmaps: Vec::new(),
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

    /// The unmaps since the last call.
    pub fn take_unmaps(&self) -> Vec<Unmap> {
        std::mem::take(&mut self.state.lock().unmaps)
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
    // Creating or destroying a stream proves nothing about work on it.
    fn stream_create(&self, device: usize) -> DriverResult<Stream> {
        self.sim.stream_create(device)
    }
    fn stream_destroy(&self, device: usize, stream: Stream) -> DriverResult<()> {
        self.sim.stream_destroy(device, stream)
    }
    // Virtual memory: a reserved range counts as a segment (the engine's
    // `segments`), physical memory as bytes in use.
    fn vmm_granularity(&self, device: usize) -> DriverResult<u64> {
        self.sim.vmm_granularity(device)
    }
    fn va_reserve(&self, device: usize, size: u64) -> DriverResult<u64> {
        let mut st = self.state.lock();
        let p = self.sim.va_reserve(device, size)?;
        assert!(st.devices[device].segments.insert(p, size).is_none());
        Ok(p)
    }
    fn va_free(&self, device: usize, base: u64, size: u64) -> DriverResult<()> {
        let mut st = self.state.lock();
        self.sim.va_free(device, base, size)?;
        assert_eq!(st.devices[device].segments.remove(&base), Some(size));
        Ok(())
    }
    fn phys_create(&self, device: usize, size: u64) -> DriverResult<PhysHandle> {
        let mut st = self.state.lock();
        let h = self.sim.phys_create(device, size)?;
        let d = &mut st.devices[device];
        d.used += size;
        d.used_peak = d.used_peak.max(d.used);
        st.handles.insert(h, (device, size));
        Ok(h)
    }
    fn phys_release(&self, device: usize, handle: PhysHandle) -> DriverResult<()> {
        let mut st = self.state.lock();
        self.sim.phys_release(device, handle)?;
        let (d, size) = st.handles.remove(&handle).expect("a known handle");
        st.devices[d].used -= size;
        Ok(())
    }
    fn map(
        &self,
        device: usize,
        va: u64,
        size: u64,
        handle: PhysHandle,
        offset: u64,
    ) -> DriverResult<()> {
        self.sim.map(device, va, size, handle, offset)
    }
    fn unmap(&self, device: usize, va: u64, size: u64) -> DriverResult<()> {
        let mut st = self.state.lock();
        self.sim.unmap(device, va, size)?;
        let d = &st.devices[device];
        let u = Unmap {
            device,
            va,
            len: size,
            device_done: d.device_done,
            done: d.done.clone(),
        };
        st.unmaps.push(u);
        Ok(())
    }
    fn set_access(&self, device: usize, va: u64, size: u64) -> DriverResult<()> {
        self.sim.set_access(device, va, size)
    }
}
