//! The simulated device (`backend:sim`).
//!
//! It implements [`Driver`] with no GPU and no host memory behind the
//! addresses it hands out. It serves the tests, the benchmarks, trace replay,
//! and capacity planning without a GPU.
//!
//! - **Addresses** are fake and 2 MiB aligned. Every device has its own 16 TiB
//!   window, and consecutive allocations are separated by a 2 MiB guard gap, so
//!   two segments are never adjacent: an engine that coalesced across segments
//!   would be caught.
//! - **Capacity** is enforced on the bytes allocated, like a real device.
//! - **Events** complete at once by default. In manual mode
//!   ([`SimDriver::set_manual_events`]) a recorded event completes only when the
//!   test says so ([`SimDriver::complete_stream`], [`SimDriver::complete_all`])
//!   or when someone synchronises it or its stream, which is what lets the tests
//!   check stream safety. `stream_query` answers "idle" in auto mode and
//!   "not proven" in manual mode.
//! - **A lagging device** ([`SimDriver::set_event_lag`], for `cudalloc replay
//!   --gpu-lag`): an event recorded now completes `lag` ticks of a clock
//!   that only [`SimDriver::tick`] advances (the replay ticks once per trace
//!   event), or at a synchronisation; `stream_query` answers "not proven".
//!   It stands for a GPU running behind the host, as a training loop's does.
//! - **Faults** can be injected: the Nth driver allocation fails with OOM,
//!   capacity can shrink mid-run, event calls and frees can fail, the driver can report
//!   itself deinitialised, and a stream can be marked as capturing (the
//!   calls a GPU would take as invalidating the capture are counted).
//! - **Virtual memory** (contract, 9): 2 MiB pages. Physical capacity counts
//!   the handles created; reserved virtual ranges count against nothing but
//!   share the device's address window (so they never overlap a
//!   `mem_alloc` segment). Every rule is checked, and a call that breaks one
//!   fails and is counted in `vmm_violations`: a double map, a map outside
//!   a reserved range or past its handle's end, an unmap of anything but
//!   one whole mapping, access asked for an unmapped range, a release of a
//!   handle still mapped, a reserved range freed with mappings in it.
//!   Unmap, release and range frees while a stream captures count as
//!   capture violations. [`SimDriver::accessible`] tells whether a range
//!   is mapped with access granted, for tests that check every live block.
//! - **Counters** of every call are kept for tests ([`SimDriver::counters`]).

use super::{Driver, DriverError, DriverResult, Event, PhysHandle, Stream};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const WINDOW: u64 = 1 << 44; // 16 TiB of fake address space per device
const BASE: u64 = 0x1000_0000_0000;
const ALIGN: u64 = 2 << 20; // 2 MiB, like cuMemAlloc for large requests
const GUARD: u64 = 2 << 20;
/// The page of virtual-memory mappings, as on current GPUs.
pub const SIM_PAGE: u64 = 2 << 20;

/// Call counters, read back by tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimCounters {
    pub mem_allocs: u64,
    pub mem_alloc_failures: u64,
    pub mem_frees: u64,
    pub bad_frees: u64,
    pub mem_info_calls: u64,
    pub event_creates: u64,
    pub event_records: u64,
    pub event_queries: u64,
    pub event_syncs: u64,
    pub event_destroys: u64,
    pub stream_syncs: u64,
    pub stream_queries: u64,
    /// Calls that would invalidate a capture on a GPU: `mem_free` while any
    /// stream captures (cuMemFree synchronises the context), and
    /// `stream_synchronize` or `stream_query` on a capturing stream. They
    /// still succeed here; tests assert there are none.
    pub capture_violations: u64,
    /// Virtual-memory calls (contract, 9).
    pub va_reserves: u64,
    pub va_frees: u64,
    pub phys_creates: u64,
    pub phys_releases: u64,
    pub maps: u64,
    pub unmaps: u64,
    pub set_accesses: u64,
    /// Virtual-memory calls that broke a rule (and failed).
    pub vmm_violations: u64,
}

#[derive(Debug)]
struct SimDevice {
    capacity: u64,
    used: u64,
    /// Free address ranges: start -> length.
    free_ranges: BTreeMap<u64, u64>,
    /// Live allocations: start -> (size asked, range length taken).
    live: FxHashMap<u64, (u64, u64)>,
    /// Reserved virtual ranges: start -> (size, range length taken).
    ranges: BTreeMap<u64, (u64, u64)>,
    /// Physical handles: handle -> (size, bytes of it mapped).
    handles: FxHashMap<PhysHandle, (u64, u64)>,
    /// Mappings: virtual start -> (size, handle, offset, access granted).
    maps: BTreeMap<u64, (u64, PhysHandle, u64, bool)>,
}

impl SimDevice {
    /// Take `size` bytes of address window (plus the guard gap).
    fn take_range(&mut self, size: u64) -> Option<(u64, u64)> {
        let take = round_up(size, ALIGN) + GUARD;
        let (&start, &len) = self.free_ranges.iter().find(|(_, &len)| len >= take)?;
        self.free_ranges.remove(&start);
        if len > take {
            self.free_ranges.insert(start + take, len - take);
        }
        Some((start, take))
    }

    /// Give back a window range, merging with free neighbours.
    fn give_range(&mut self, start: u64, take: u64) {
        let (mut start, mut len) = (start, take);
        if let Some((&ps, &pl)) = self.free_ranges.range(..start).next_back() {
            if ps + pl == start {
                self.free_ranges.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free_ranges.get(&(start + len)) {
            self.free_ranges.remove(&(start + len));
            len += nl;
        }
        self.free_ranges.insert(start, len);
    }

    /// The reserved range holding `[va, va + size)`, if one does.
    fn range_holding(&self, va: u64, size: u64) -> Option<u64> {
        let (&start, &(rsize, _)) = self.ranges.range(..=va).next_back()?;
        (va + size <= start + rsize).then_some(start)
    }

    /// Whether any mapping overlaps `[va, va + size)`.
    fn mapped_within(&self, va: u64, size: u64) -> bool {
        if let Some((&m, &(ms, ..))) = self.maps.range(..va).next_back() {
            if m + ms > va {
                return true;
            }
        }
        self.maps.range(va..va + size).next().is_some()
    }
}

impl SimDevice {
    fn new(index: usize, capacity: u64) -> Self {
        let mut free_ranges = BTreeMap::new();
        free_ranges.insert(BASE + index as u64 * WINDOW, WINDOW);
        SimDevice {
            capacity,
            used: 0,
            free_ranges,
            live: FxHashMap::default(),
            ranges: BTreeMap::new(),
            handles: FxHashMap::default(),
            maps: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct SimEvent {
    device: usize,
    stream: Stream,
    /// The lag clock's reading from which it is complete: 0 when complete
    /// at once or told so, `u64::MAX` until told (manual mode).
    ready_at: u64,
    /// Order of its last record among all records (0: never recorded).
    seq: u64,
}

/// The simulated driver. Cheap to create; one per allocator instance.
#[derive(Debug)]
pub struct SimDriver {
    devices: Vec<Mutex<SimDevice>>,
    events: Mutex<FxHashMap<Event, SimEvent>>,
    next_event: AtomicU64,
    records: AtomicU64,
    manual_events: AtomicBool,
    /// Ticks a recorded event takes to complete (0: at once).
    event_lag: AtomicU64,
    clock: AtomicU64,
    /// Fail the allocation whose 1-based ordinal equals this (0 = never).
    fail_alloc_at: AtomicU64,
    alloc_ordinal: AtomicU64,
    fail_events: AtomicBool,
    fail_frees: AtomicBool,
    deinitialized: AtomicBool,
    /// Capturing streams: (device, stream), or (`None`, stream) on every device.
    capturing: Mutex<Vec<(Option<usize>, Stream)>>,
    counters: Mutex<SimCounters>,
    /// Whether the device has virtual memory management (on by default).
    vmm: AtomicBool,
    next_handle: AtomicU64,
}

impl SimDriver {
    /// `devices` devices of `capacity` bytes each.
    pub fn new(devices: usize, capacity: u64) -> Self {
        SimDriver {
            devices: (0..devices)
                .map(|i| Mutex::new(SimDevice::new(i, capacity)))
                .collect(),
            events: Mutex::new(FxHashMap::default()),
            next_event: AtomicU64::new(1),
            records: AtomicU64::new(0),
            manual_events: AtomicBool::new(false),
            event_lag: AtomicU64::new(0),
            clock: AtomicU64::new(0),
            fail_alloc_at: AtomicU64::new(0),
            alloc_ordinal: AtomicU64::new(0),
            fail_events: AtomicBool::new(false),
            fail_frees: AtomicBool::new(false),
            deinitialized: AtomicBool::new(false),
            capturing: Mutex::new(Vec::new()),
            counters: Mutex::new(SimCounters::default()),
            vmm: AtomicBool::new(true),
            next_handle: AtomicU64::new(1),
        }
    }

    /// In manual mode, recorded events complete only when told.
    pub fn set_manual_events(&self, manual: bool) {
        self.manual_events.store(manual, Ordering::SeqCst);
    }

    /// Fail the `n`th driver allocation counted from the start (1-based);
    /// 0 turns injection off.
    pub fn fail_alloc_at(&self, n: u64) {
        self.fail_alloc_at.store(n, Ordering::SeqCst);
    }

    /// Fail the `n`th driver allocation counted from now (1-based).
    pub fn fail_nth_alloc_from_now(&self, n: u64) {
        let now = self.alloc_ordinal.load(Ordering::SeqCst);
        self.fail_alloc_at.store(now + n, Ordering::SeqCst);
    }

    /// Make every event call fail (`Other`), or work again.
    pub fn set_fail_events(&self, fail: bool) {
        self.fail_events.store(fail, Ordering::SeqCst);
    }

    /// Make every `mem_free` fail (`Other`, the memory kept), or work again.
    pub fn set_fail_frees(&self, fail: bool) {
        self.fail_frees.store(fail, Ordering::SeqCst);
    }

    /// Make every call report `Deinitialized`, as at process exit.
    pub fn set_deinitialized(&self, deinit: bool) {
        self.deinitialized.store(deinit, Ordering::SeqCst);
    }

    /// Mark `stream` as capturing into a graph on every device, or not.
    pub fn set_capturing(&self, stream: Stream, capturing: bool) {
        self.mark_capturing(None, stream, capturing);
    }

    /// Mark `stream` of `device` alone as capturing, or not (a stream
    /// belongs to one device; `set_capturing` covers them all).
    pub fn set_capturing_on(&self, device: usize, stream: Stream, capturing: bool) {
        self.mark_capturing(Some(device), stream, capturing);
    }

    fn mark_capturing(&self, device: Option<usize>, stream: Stream, capturing: bool) {
        let mut c = self.capturing.lock();
        c.retain(|&(d, s)| (d, s) != (device, stream));
        if capturing {
            c.push((device, stream));
        }
    }

    fn is_capturing(&self, device: usize, stream: Stream) -> bool {
        self.capturing
            .lock()
            .iter()
            .any(|&(d, s)| s == stream && d.is_none_or(|d| d == device))
    }

    /// Change a device's capacity, as when another process takes memory.
    /// Allocations already made stay; new ones fail until usage drops below it.
    pub fn set_capacity(&self, device: usize, capacity: u64) {
        if let Some(d) = self.devices.get(device) {
            d.lock().capacity = capacity;
        }
    }

    /// Bytes the driver has handed out on `device` and not had back.
    pub fn used(&self, device: usize) -> u64 {
        self.devices.get(device).map_or(0, |d| d.lock().used)
    }

    /// Number of live driver allocations on `device`.
    pub fn live_allocations(&self, device: usize) -> usize {
        self.devices.get(device).map_or(0, |d| d.lock().live.len())
    }

    /// With `lag` > 0, a recorded event completes once [`SimDriver::tick`]
    /// has been called `lag` times since (or when it or its stream is
    /// synchronised, or [`SimDriver::complete_all`]), and streams are never
    /// proven idle. 0 turns it off. Manual mode takes precedence.
    pub fn set_event_lag(&self, lag: u64) {
        self.event_lag.store(lag, Ordering::SeqCst);
    }

    /// Advance the lag clock by one.
    pub fn tick(&self) {
        self.clock.fetch_add(1, Ordering::Relaxed);
    }

    /// Complete every event recorded on `stream` of `device`.
    pub fn complete_stream(&self, device: usize, stream: Stream) {
        for e in self.events.lock().values_mut() {
            if e.device == device && e.stream == stream {
                e.ready_at = 0;
            }
        }
    }

    /// Complete every recorded event.
    pub fn complete_all(&self) {
        for e in self.events.lock().values_mut() {
            e.ready_at = 0;
        }
    }

    /// Number of recorded events not yet complete.
    pub fn pending_events(&self) -> usize {
        let now = self.clock.load(Ordering::Relaxed);
        self.events
            .lock()
            .values()
            .filter(|e| now < e.ready_at)
            .count()
    }

    /// A copy of the call counters.
    pub fn counters(&self) -> SimCounters {
        *self.counters.lock()
    }

    fn check(&self, device: usize) -> DriverResult<()> {
        if self.deinitialized.load(Ordering::Relaxed) {
            return Err(DriverError::Deinitialized);
        }
        if device >= self.devices.len() {
            return Err(DriverError::InvalidDevice(device));
        }
        Ok(())
    }

    /// Count a synchronisation or query of a capturing stream.
    fn note_if_capturing(&self, device: usize, stream: Stream) {
        if self.is_capturing(device, stream) {
            self.counters.lock().capture_violations += 1;
        }
    }

    /// Say the device has no virtual memory management (a driver or GPU
    /// without it): `vmm_granularity` fails, as on such a device.
    pub fn set_vmm_supported(&self, supported: bool) {
        self.vmm.store(supported, Ordering::Relaxed);
    }

    /// Whether `[va, va + size)` is wholly mapped with access granted.
    pub fn accessible(&self, device: usize, va: u64, size: u64) -> bool {
        let d = self.devices[device].lock();
        let mut at = va;
        while at < va + size {
            match d.maps.range(..=at).next_back() {
                Some((&m, &(ms, _, _, true))) if m + ms > at => at = m + ms,
                _ => return false,
            }
        }
        true
    }

    /// Physical bytes created and not released, and bytes mapped.
    pub fn vmm_bytes(&self, device: usize) -> (u64, u64) {
        let d = self.devices[device].lock();
        (
            d.handles.values().map(|h| h.0).sum(),
            d.maps.values().map(|m| m.0).sum(),
        )
    }

    /// A broken VMM rule: counted, and the call fails.
    fn vmm_violation(&self, message: String) -> DriverError {
        self.counters.lock().vmm_violations += 1;
        DriverError::Other { code: 1, message }
    }

    /// The locked device when `size` more bytes of memory fit its capacity
    /// (`mem_alloc`, `phys_create`): each such request counts towards
    /// [`SimDriver::fail_alloc_at`], and a refusal is an OOM.
    fn room_for(
        &self,
        device: usize,
        size: u64,
    ) -> DriverResult<parking_lot::MutexGuard<'_, SimDevice>> {
        let ordinal = self.alloc_ordinal.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = self.fail_alloc_at.load(Ordering::SeqCst) == ordinal;
        let d = self.devices[device].lock();
        if fail || size == 0 || d.used.checked_add(size).is_none_or(|u| u > d.capacity) {
            self.counters.lock().mem_alloc_failures += 1;
            return Err(DriverError::OutOfMemory);
        }
        Ok(d)
    }

    /// Count a call that would invalidate a capture under way on `device`
    /// (`mem_free` synchronises the context; unmap and release are not legal).
    fn note_if_any_capturing(&self, device: usize) {
        if self
            .capturing
            .lock()
            .iter()
            .any(|&(d, _)| d.is_none_or(|d| d == device))
        {
            self.counters.lock().capture_violations += 1;
        }
    }

    /// Checks common to the VMM calls: the device, support, page alignment.
    fn check_vmm(&self, device: usize, values: &[u64]) -> DriverResult<()> {
        self.check(device)?;
        if !self.vmm.load(Ordering::Relaxed) {
            return Err(DriverError::not_supported("virtual memory management"));
        }
        if values.iter().any(|v| v % SIM_PAGE != 0) {
            return Err(self.vmm_violation(format!(
                "sim: VMM sizes, offsets and addresses must be multiples of the page ({values:x?})"
            )));
        }
        Ok(())
    }

    fn check_events(&self, device: usize) -> DriverResult<()> {
        self.check(device)?;
        if self.fail_events.load(Ordering::Relaxed) {
            return Err(DriverError::Other {
                code: 999,
                message: "injected event failure".into(),
            });
        }
        Ok(())
    }
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn device_count(&self) -> usize {
        self.devices.len()
    }

    fn mem_alloc(&self, device: usize, size: u64) -> DriverResult<u64> {
        self.check(device)?;
        let mut d = self.room_for(device, size)?;
        let Some((start, take)) = d.take_range(size) else {
            self.counters.lock().mem_alloc_failures += 1;
            return Err(DriverError::OutOfMemory);
        };
        d.live.insert(start, (size, take));
        d.used += size;
        self.counters.lock().mem_allocs += 1;
        Ok(start)
    }

    fn mem_free(&self, device: usize, ptr: u64, size: u64) -> DriverResult<()> {
        self.check(device)?;
        self.note_if_any_capturing(device);
        if self.fail_frees.load(Ordering::Relaxed) {
            return Err(DriverError::Other {
                code: 999,
                message: "injected free failure".into(),
            });
        }
        let mut d = self.devices[device].lock();
        let Some((asked, take)) = d.live.remove(&ptr) else {
            self.counters.lock().bad_frees += 1;
            return Err(DriverError::Other {
                code: 1,
                message: format!("sim: free of unknown address {ptr:#x}"),
            });
        };
        debug_assert_eq!(
            asked, size,
            "sim: segment freed with a size other than its own"
        );
        d.used -= asked;
        d.give_range(ptr, take);
        self.counters.lock().mem_frees += 1;
        Ok(())
    }

    fn mem_info(&self, device: usize) -> DriverResult<(u64, u64)> {
        self.check(device)?;
        self.counters.lock().mem_info_calls += 1;
        let d = self.devices[device].lock();
        Ok((d.capacity.saturating_sub(d.used), d.capacity))
    }

    fn event_create(&self, device: usize) -> DriverResult<Event> {
        self.check_events(device)?;
        let id = self.next_event.fetch_add(1, Ordering::Relaxed);
        self.events.lock().insert(
            id,
            SimEvent {
                device,
                stream: 0,
                ready_at: 0,
                seq: 0,
            },
        );
        self.counters.lock().event_creates += 1;
        Ok(id)
    }

    fn event_record(&self, device: usize, event: Event, stream: Stream) -> DriverResult<()> {
        self.check_events(device)?;
        let manual = self.manual_events.load(Ordering::Relaxed);
        let lag = self.event_lag.load(Ordering::Relaxed);
        let mut ev = self.events.lock();
        let e = ev.get_mut(&event).ok_or_else(|| bad_event(event))?;
        *e = SimEvent {
            device,
            stream,
            ready_at: match (manual, lag) {
                (true, _) => u64::MAX,
                (false, 0) => 0,
                (false, l) => self.clock.load(Ordering::Relaxed).saturating_add(l),
            },
            seq: self.records.fetch_add(1, Ordering::Relaxed) + 1,
        };
        self.counters.lock().event_records += 1;
        Ok(())
    }

    fn event_query(&self, device: usize, event: Event) -> DriverResult<bool> {
        self.check_events(device)?;
        self.counters.lock().event_queries += 1;
        let now = self.clock.load(Ordering::Relaxed);
        self.events
            .lock()
            .get(&event)
            .map(|e| now >= e.ready_at)
            .ok_or_else(|| bad_event(event))
    }

    fn event_synchronize(&self, device: usize, event: Event) -> DriverResult<()> {
        self.check_events(device)?;
        self.counters.lock().event_syncs += 1;
        let mut ev = self.events.lock();
        let e = ev.get_mut(&event).ok_or_else(|| bad_event(event))?;
        // Waiting for the event means its stream's work up to the record is
        // done: it and the events recorded there before it complete, not
        // the ones recorded after it.
        let (stream, seq) = (e.stream, e.seq);
        for e in ev.values_mut() {
            if e.device == device && e.stream == stream && e.seq <= seq {
                e.ready_at = 0;
            }
        }
        Ok(())
    }

    fn event_destroy(&self, device: usize, event: Event) -> DriverResult<()> {
        self.check_events(device)?;
        self.counters.lock().event_destroys += 1;
        self.events
            .lock()
            .remove(&event)
            .map(|_| ())
            .ok_or_else(|| bad_event(event))
    }

    fn stream_synchronize(&self, device: usize, stream: Stream) -> DriverResult<()> {
        self.check(device)?;
        self.note_if_capturing(device, stream);
        self.counters.lock().stream_syncs += 1;
        self.complete_stream(device, stream);
        Ok(())
    }

    /// Auto events: every stream is idle (its work completes at once, as
    /// its events do). Manual events or a lag: never proven idle, so stream
    /// safety rests on the events the tests complete (or the lag clock).
    fn stream_query(&self, device: usize, stream: Stream) -> DriverResult<bool> {
        self.check(device)?;
        self.note_if_capturing(device, stream);
        self.counters.lock().stream_queries += 1;
        Ok(!self.manual_events.load(Ordering::Relaxed)
            && self.event_lag.load(Ordering::Relaxed) == 0)
    }

    fn stream_is_capturing(&self, device: usize, stream: Stream) -> DriverResult<bool> {
        self.check(device)?;
        Ok(self.is_capturing(device, stream))
    }

    fn stream_create(&self, device: usize) -> DriverResult<Stream> {
        self.check(device)?;
        Ok(0x5000_0000 + self.next_event.fetch_add(1, Ordering::Relaxed))
    }

    fn vmm_granularity(&self, device: usize) -> DriverResult<u64> {
        self.check_vmm(device, &[])?;
        Ok(SIM_PAGE)
    }

    fn va_reserve(&self, device: usize, size: u64) -> DriverResult<u64> {
        self.check_vmm(device, &[size])?;
        let mut d = self.devices[device].lock();
        let Some((start, take)) = d.take_range(size.max(1)) else {
            return Err(DriverError::OutOfMemory);
        };
        d.ranges.insert(start, (size, take));
        self.counters.lock().va_reserves += 1;
        Ok(start)
    }

    fn va_free(&self, device: usize, base: u64, size: u64) -> DriverResult<()> {
        self.check_vmm(device, &[base, size])?;
        self.note_if_any_capturing(device);
        let mut d = self.devices[device].lock();
        match d.ranges.get(&base) {
            Some(&(s, _)) if s == size => {}
            _ => {
                return Err(
                    self.vmm_violation(format!("sim: {base:#x}+{size:#x} is not a reserved range"))
                )
            }
        }
        if d.mapped_within(base, size) {
            return Err(self.vmm_violation(format!(
                "sim: range {base:#x} freed with memory mapped in it"
            )));
        }
        let (_, take) = d.ranges.remove(&base).expect("checked");
        d.give_range(base, take);
        self.counters.lock().va_frees += 1;
        Ok(())
    }

    fn phys_create(&self, device: usize, size: u64) -> DriverResult<PhysHandle> {
        self.check_vmm(device, &[size])?;
        let mut d = self.room_for(device, size)?;
        d.used += size;
        let h = self.next_handle.fetch_add(1, Ordering::Relaxed);
        d.handles.insert(h, (size, 0));
        self.counters.lock().phys_creates += 1;
        Ok(h)
    }

    fn phys_release(&self, device: usize, handle: PhysHandle) -> DriverResult<()> {
        self.check_vmm(device, &[])?;
        self.note_if_any_capturing(device);
        let mut d = self.devices[device].lock();
        match d.handles.get(&handle) {
            None => return Err(self.vmm_violation(format!("sim: unknown handle {handle}"))),
            Some(&(_, mapped)) if mapped > 0 => {
                return Err(self.vmm_violation(format!(
                    "sim: handle {handle} released with {mapped} bytes still mapped"
                )))
            }
            Some(_) => {}
        }
        let (size, _) = d.handles.remove(&handle).expect("checked");
        d.used -= size;
        self.counters.lock().phys_releases += 1;
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
        self.check_vmm(device, &[va, size, offset])?;
        let mut d = self.devices[device].lock();
        if size == 0 || d.range_holding(va, size).is_none() {
            return Err(self.vmm_violation(format!(
                "sim: map of {va:#x}+{size:#x} outside every reserved range"
            )));
        }
        match d.handles.get(&handle) {
            Some(&(hs, _)) if offset + size <= hs => {}
            _ => {
                return Err(self.vmm_violation(format!(
                    "sim: map of {size:#x} bytes from {offset:#x} of handle {handle}: past its end or unknown"
                )))
            }
        }
        if d.mapped_within(va, size) {
            return Err(self.vmm_violation(format!("sim: {va:#x}+{size:#x} is already mapped")));
        }
        d.maps.insert(va, (size, handle, offset, false));
        d.handles.get_mut(&handle).expect("checked").1 += size;
        self.counters.lock().maps += 1;
        Ok(())
    }

    fn unmap(&self, device: usize, va: u64, size: u64) -> DriverResult<()> {
        self.check_vmm(device, &[va, size])?;
        self.note_if_any_capturing(device);
        let mut d = self.devices[device].lock();
        let Some(&(ms, h, _, _)) = d.maps.get(&va).filter(|m| m.0 == size) else {
            return Err(self.vmm_violation(format!(
                "sim: unmap of {va:#x}+{size:#x}, which is not one whole mapping"
            )));
        };
        d.maps.remove(&va);
        d.handles.get_mut(&h).expect("a mapping's handle exists").1 -= ms;
        self.counters.lock().unmaps += 1;
        Ok(())
    }

    fn set_access(&self, device: usize, va: u64, size: u64) -> DriverResult<()> {
        self.check_vmm(device, &[va, size])?;
        let mut d = self.devices[device].lock();
        // Whole mappings, back to back, covering the range exactly.
        let covered: Vec<u64> = d.maps.range(va..va + size).map(|(&m, _)| m).collect();
        let mut at = va;
        for &m in &covered {
            let ms = d.maps[&m].0;
            if m != at {
                break;
            }
            at = m + ms;
        }
        if size == 0 || at != va + size {
            return Err(self.vmm_violation(format!(
                "sim: access asked for {va:#x}+{size:#x}, which is not whole mappings"
            )));
        }
        for m in covered {
            d.maps.get_mut(&m).expect("listed").3 = true;
        }
        self.counters.lock().set_accesses += 1;
        Ok(())
    }
}

fn bad_event(event: Event) -> DriverError {
    DriverError::Other {
        code: 400,
        message: format!("sim: unknown event {event}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_aligned_disjoint_and_capacity_is_enforced() {
        let d = SimDriver::new(2, 64 << 20);
        let a = d.mem_alloc(0, 20 << 20).unwrap();
        let b = d.mem_alloc(0, 20 << 20).unwrap();
        assert_eq!(a % 512, 0);
        assert!(b >= a + (20 << 20) + GUARD, "segments must not be adjacent");
        assert_eq!(d.mem_alloc(0, 30 << 20), Err(DriverError::OutOfMemory));
        let c = d.mem_alloc(1, 60 << 20).unwrap();
        assert!(c >= BASE + WINDOW, "device 1 has its own window");
        d.mem_free(0, a, 20 << 20).unwrap();
        assert!(d.mem_alloc(0, 30 << 20).is_ok());
        assert!(
            d.mem_free(0, a, 20 << 20).is_err(),
            "double free is refused"
        );
        assert_eq!(d.counters().bad_frees, 1);
    }

    #[test]
    fn manual_events_complete_only_when_told() {
        let d = SimDriver::new(1, 1 << 30);
        d.set_manual_events(true);
        let e = d.event_create(0).unwrap();
        assert!(
            d.event_query(0, e).unwrap(),
            "never-recorded event is complete"
        );
        d.event_record(0, e, 7).unwrap();
        assert!(!d.event_query(0, e).unwrap());
        d.complete_stream(0, 8);
        assert!(!d.event_query(0, e).unwrap());
        d.complete_stream(0, 7);
        assert!(d.event_query(0, e).unwrap());
    }

    #[test]
    fn lagging_events_complete_after_their_ticks_or_a_sync() {
        let d = SimDriver::new(1, 1 << 30);
        d.set_event_lag(3);
        assert!(
            !d.stream_query(0, 7).unwrap(),
            "a lagging stream is never idle"
        );
        let e = d.event_create(0).unwrap();
        d.event_record(0, e, 7).unwrap();
        for _ in 0..2 {
            d.tick();
            assert!(!d.event_query(0, e).unwrap());
        }
        assert_eq!(d.pending_events(), 1);
        d.tick();
        assert!(d.event_query(0, e).unwrap(), "three ticks later");
        assert_eq!(d.pending_events(), 0);
        d.event_record(0, e, 7).unwrap();
        assert!(!d.event_query(0, e).unwrap(), "recorded again: three more");
        let later = d.event_create(0).unwrap();
        d.event_record(0, later, 7).unwrap();
        d.event_synchronize(0, e).unwrap();
        assert!(d.event_query(0, e).unwrap(), "or a synchronisation");
        assert!(
            !d.event_query(0, later).unwrap(),
            "not of work recorded after it"
        );
        d.complete_all();
        assert!(d.event_query(0, later).unwrap());
        d.set_event_lag(0);
        d.event_record(0, e, 7).unwrap();
        assert!(d.event_query(0, e).unwrap() && d.stream_query(0, 7).unwrap());
    }

    #[test]
    fn nth_allocation_fails_once() {
        let d = SimDriver::new(1, 1 << 30);
        d.fail_alloc_at(2);
        assert!(d.mem_alloc(0, 1 << 20).is_ok());
        assert_eq!(d.mem_alloc(0, 1 << 20), Err(DriverError::OutOfMemory));
        assert!(d.mem_alloc(0, 1 << 20).is_ok());
    }
}
