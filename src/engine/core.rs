//! What one device's state shares with its arenas ([`DeviceCore`]): the
//! driver, the device's counters, its pool of events, its capture watch
//! and the clock of its stamps. It sits below the arena: arenas take it to
//! record events and ask about captures; they never see the device above.

use super::capture::CaptureWatch;
use super::snapshot::History;
use crate::driver::{Driver, DriverError, Event, Stream};
use crate::stats::DeviceCounters;
use once_cell::sync::OnceCell;
use parking_lot::Mutex;
use std::sync::Arc;

/// What one device's state shares with its arenas.
pub(crate) struct DeviceCore {
    pub index: usize,
    pub driver: Arc<dyn Driver>,
    pub counters: DeviceCounters,
    /// Events no longer in use, for the next one asked.
    events: Mutex<Vec<Event>>,
    /// The policy's `small_max`: a live block is in the small pool exactly
    /// when its size is at most this (large-pool blocks serve larger requests).
    pub small_max: u64,
    /// What the device knows of graph captures (`capture.rs`).
    pub capture: CaptureWatch,
    /// The clock of new arenas' stamps, when a test set one
    /// (`Engine::set_clock`).
    clock: OnceCell<fn() -> u64>,
    /// The history of actions for snapshots, when switched on (`snapshot.rs`).
    pub history: History,
}

impl DeviceCore {
    pub fn new(index: usize, driver: Arc<dyn Driver>, small_max: u64) -> Self {
        DeviceCore {
            index,
            driver,
            counters: DeviceCounters::default(),
            events: Mutex::new(Vec::new()),
            small_max,
            capture: CaptureWatch::default(),
            clock: OnceCell::new(),
            history: History::default(),
        }
    }

    /// An event from the pool, or a new one.
    pub fn get_event(&self) -> std::result::Result<Event, DriverError> {
        if let Some(e) = self.events.lock().pop() {
            return Ok(e);
        }
        self.driver.event_create(self.index)
    }

    /// An event from the pool recorded on `stream` now, or `None` when no
    /// event could be had or recorded (the event, if any, goes back).
    pub fn record_event(&self, stream: Stream) -> Option<Event> {
        let e = self.get_event().ok()?;
        if self.driver.event_record(self.index, e, stream).is_err() {
            self.put_event(e);
            return None;
        }
        Some(e)
    }

    /// Give an event back to the pool.
    pub fn put_event(&self, e: Event) {
        self.events.lock().push(e);
    }

    /// Destroy every pooled event (the allocator is going away).
    pub fn destroy_events(&self) {
        for e in std::mem::take(&mut *self.events.lock()) {
            let _ = self.driver.event_destroy(self.index, e);
        }
    }

    /// The clock a test set for this device's stamps, if any.
    pub fn clock(&self) -> Option<fn() -> u64> {
        self.clock.get().copied()
    }

    /// Stamp by `clock` from now on (only the first call counts).
    pub fn set_clock(&self, clock: fn() -> u64) {
        let _ = self.clock.set(clock);
    }
}

impl DeviceCore {
    /// Whether any of `streams` is capturing a graph now (the legacy stream
    /// while another captures counts). Each one found is watched, and the
    /// capture is *seen*.
    pub fn note_capturing(&self, streams: &[Stream]) -> bool {
        let mut found = false;
        for &s in streams {
            if matches!(self.driver.stream_is_capturing(self.index, s), Ok(true)) {
                found = true;
                self.capture.watch(&[s]);
            }
        }
        if found {
            self.capture.mark_seen();
        }
        found
    }

    /// Whether a block freed now on `stream` must be quarantined: `stream`
    /// is capturing a graph. Costs nothing until a capture is seen.
    #[inline]
    pub fn captures_now(&self, stream: Stream) -> bool {
        self.capture.seen()
            && matches!(
                self.driver.stream_is_capturing(self.index, stream),
                Ok(true)
            )
    }

    /// Whether a pool routes allocations now (see `CaptureWatch::pools_routing`).
    #[inline]
    pub fn pools_routing(&self) -> bool {
        self.capture.pools_routing()
    }
}
