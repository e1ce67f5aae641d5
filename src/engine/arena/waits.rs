//! Frees that must wait: a block used on other streams (`record_stream`)
//! waits for their work (events, or a synchronisation); a block freed into
//! a capture is quarantined until `empty_cache`; frees during a pool's
//! capture record their events when it ends.

use super::ArenaInner;
use crate::driver::{DriverError, Event, Stream};
use crate::engine::core::DeviceCore;
use crate::engine::tlsf::BlockState;

#[derive(Debug)]
pub(crate) struct PendingFree {
    pub block: u32,
    /// An event recorded on each other stream the block was used on.
    pub events: Vec<(Event, Stream)>,
}

impl ArenaInner {
    /// The free of a block used on other streams (`record_stream`): it waits
    /// for their work; during a pool's capture no event or synchronisation
    /// is made now (pools.rs), the events are recorded when the capture
    /// ends. A block used on a stream capturing outside a pool (C/C++) is in
    /// that graph, which may replay it: it is quarantined until
    /// `empty_cache`, as a block freed on a capturing stream is (an event
    /// recorded there would be a node of the graph, and a synchronisation
    /// would invalidate the capture), then waits for all its streams.
    #[cold]
    #[inline(never)]
    pub(super) fn free_recorded(&mut self, block: u32, streams: Vec<Stream>, dev: &DeviceCore) {
        if dev.pools_routing() {
            self.blocks.get_mut(block).state = BlockState::Pending;
            self.deferred.push((block, streams));
        } else if dev.note_capturing(&streams) {
            self.quarantine(block, streams, dev);
        } else {
            self.wait_for_streams(block, &streams, dev);
        }
    }

    /// Keep `block` out of reuse until `empty_cache`; it then waits for
    /// `streams` (`record_stream`). Until then every slow path asks them
    /// whether they capture (the device's watched streams): the end of the
    /// quarantine records events on them.
    pub(super) fn quarantine(&mut self, block: u32, streams: Vec<Stream>, dev: &DeviceCore) {
        self.blocks.get_mut(block).state = BlockState::Pending;
        dev.capture.watch(&streams);
        self.quarantined.push((block, streams));
    }

    /// Record the events of the blocks freed during a capture, now that it
    /// is over (their frees then complete as any `record_stream` free).
    /// A block whose streams include one still capturing stays deferred: an
    /// event recorded into a capture proves nothing. (A stream the driver
    /// will not answer about, say one destroyed meanwhile, is left to
    /// `wait_for_streams`, which synchronises or quarantines.)
    pub fn record_deferred(&mut self, dev: &DeviceCore) {
        for (block, streams) in std::mem::take(&mut self.deferred) {
            let capturing = streams
                .iter()
                .any(|&s| matches!(dev.driver.stream_is_capturing(dev.index, s), Ok(true)));
            if capturing {
                self.deferred.push((block, streams));
            } else {
                self.wait_for_streams(block, &streams, dev);
            }
        }
    }

    /// Block `block` (pending) waits for the work enqueued so far on
    /// `streams`: an event on each, or else a synchronisation, or else
    /// quarantine until `empty_cache`. Out of line: off the free path's hot
    /// code (kept small, the live-table removal is inlined into it).
    #[cold]
    #[inline(never)]
    pub(super) fn wait_for_streams(&mut self, block: u32, streams: &[Stream], dev: &DeviceCore) {
        {
            // record_stream: the block waits for the other streams' work.
            let mut events = Vec::with_capacity(streams.len());
            let mut unproven = false;
            for &s in streams {
                match dev.record_event(s) {
                    Some(e) => events.push((e, s)),
                    // No event: wait for the stream now, or, if even that
                    // fails, keep the block out of reuse until empty_cache.
                    None => {
                        unproven |= !matches!(
                            dev.driver.stream_synchronize(dev.index, s),
                            Ok(()) | Err(DriverError::Deinitialized)
                        )
                    }
                }
            }
            self.blocks.get_mut(block).state = BlockState::Pending;
            if unproven {
                for (e, _) in events {
                    dev.put_event(e);
                }
                self.quarantined.push((block, Vec::new()));
                return;
            }
            self.pending.push(PendingFree { block, events });
        }
    }

    /// End the quarantine (the capture is over): each block goes back to the
    /// free index, or, if it was used on other streams (`record_stream`),
    /// waits for the work enqueued on them so far.
    pub fn release_quarantine(&mut self, dev: &DeviceCore) {
        for (i, streams) in std::mem::take(&mut self.quarantined) {
            if streams.is_empty() {
                self.history_completed(i, dev);
                self.release_block(i);
            } else {
                self.wait_for_streams(i, &streams, dev);
            }
        }
    }

    /// Release pending frees whose events have completed (all of them when `wait`).
    pub fn process_pending(&mut self, dev: &DeviceCore, wait: bool) {
        let mut i = 0;
        while i < self.pending.len() {
            let done = self.pending[i].events.iter().all(|&(e, s)| {
                let r = if wait {
                    // If the event cannot be waited on, wait for its stream.
                    dev.driver
                        .event_synchronize(dev.index, e)
                        .or_else(|_| dev.driver.stream_synchronize(dev.index, s))
                        .map(|()| true)
                } else {
                    dev.driver.event_query(dev.index, e)
                };
                // Only completion proves the other stream is done. A transient
                // error keeps the block waiting; a deinitialised driver means
                // no work will ever run again.
                matches!(r, Ok(true) | Err(DriverError::Deinitialized))
            });
            if done {
                let p = self.pending.swap_remove(i);
                for (e, _) in p.events {
                    dev.put_event(e);
                }
                self.history_completed(p.block, dev);
                self.release_block(p.block);
            } else {
                i += 1;
            }
        }
    }

    /// Tell the history, where it is on, that the waiting free of `block`
    /// completes (see `engine/snapshot.rs`).
    #[inline]
    fn history_completed(&self, block: u32, dev: &DeviceCore) {
        if dev.history.on() {
            let b = self.blocks.get(block);
            dev.history.completed(b.addr, b.size);
        }
    }
}
