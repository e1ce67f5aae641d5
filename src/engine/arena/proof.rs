//! Proving an idle segment's free complete, so that it may change hands
//! or go back to the driver: the stream first, then the arena's epoch
//! events, then an event of the segment's own (see
//! [`ArenaInner::idle_free_complete`]).

use super::ArenaInner;
use crate::driver::Stream;
use crate::engine::core::DeviceCore;

/// Most epoch events an arena keeps (see [`ArenaInner::record_epoch`]).
const EPOCH_EVENTS: usize = 4;
/// Distinct segments frees make idle between two epoch events of one
/// arena. A count, not a time, so that replays (which run far faster than
/// the trace) see what a GPU run does. On the CPU-recorded trace of
/// bench/torch_bench.py's training loop, with the GPU behind the host
/// (`replay --gpu-lag`), 8 records 7.5 events a step (with the fallback
/// events) and keeps 4.59 GiB reserved, against 4.58 GiB and 16 events for
/// 4, 4.69 GiB and 4.3 for 16, and 6.12 GiB with no epoch events
/// (docs/BENCHMARKS.md).
pub(crate) const EPOCH_SPACING: u32 = 8;

/// What one pass over an arena's idle segments learned (see
/// [`ArenaInner::idle_free_complete`]).
#[derive(Debug, Default)]
pub(crate) struct ProofPass {
    stream: Option<StreamState>,
    /// The oldest epoch event found incomplete.
    epoch_pending: Option<u64>,
}

/// What a stream was found to be, for one pass over an arena's idle
/// segments (see [`ArenaInner::idle_free_complete`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamState {
    /// All its work so far has completed.
    Idle,
    /// Work pending (or not known): prove with an event.
    Busy,
    /// Capturing a graph (or the driver would not say): neither queried nor
    /// recorded on, so nothing of it is proven.
    Capturing,
}

impl ArenaInner {
    /// Whether an epoch event is due: frees made [`EPOCH_SPACING`]
    /// distinct segments idle since the last one.
    #[inline]
    pub fn epoch_due(&self) -> bool {
        self.epoch_open >= EPOCH_SPACING
    }

    /// Record an epoch event on `stream`, the arena's: it closes the current
    /// idle epoch, so once it completes every segment that became idle
    /// before it is proven free ([`ArenaInner::idle_free_complete`]). This
    /// is what proves a segment free on a GPU that runs behind the host:
    /// recorded soon after the segment goes idle (one per [`EPOCH_SPACING`]
    /// idle segments), it has usually completed by the time the segment is
    /// wanted (a training step later, say), where an event recorded only
    /// then (the fallback) has not.
    /// Nothing is recorded while a capture may be under way on the device
    /// (a pool routes, or a capture was ever seen: an event recorded on the
    /// legacy stream would invalidate another stream's capture) or on a
    /// capturing stream; those segments take the fallback.
    pub fn record_epoch(&mut self, stream: Stream, dev: &DeviceCore) {
        self.epoch_open = 0;
        if dev.pools_routing() || dev.capture.seen() {
            return;
        }
        match dev.driver.stream_is_capturing(dev.index, stream) {
            Ok(false) => {}
            Ok(true) => {
                dev.capture.mark_seen();
                return;
            }
            Err(_) => return,
        }
        let Some(e) = dev.record_event(stream) else {
            return;
        };
        if self.epochs.len() == EPOCH_EVENTS {
            // A later event covers what the oldest did.
            dev.put_event(self.epochs.remove(0).1);
        }
        self.epochs.push((self.epoch, e));
        self.epoch += 1;
    }

    /// Whether segments stamped with idle epoch `k` are proven free: an
    /// epoch event closing `k` or later has completed. Events on one stream
    /// complete in order, so the oldest such event is the one asked, and the
    /// events up to it are done with.
    ///
    /// `pending` is the oldest epoch event found incomplete in this pass:
    /// it and every later one are not asked again.
    pub(super) fn epoch_proves(
        &mut self,
        k: u64,
        dev: &DeviceCore,
        pending: &mut Option<u64>,
    ) -> bool {
        if k < self.epoch_proven {
            return true;
        }
        let Some(pos) = self.epochs.iter().position(|&(t, _)| t >= k) else {
            return false;
        };
        let (t, e) = self.epochs[pos];
        if pending.is_some_and(|p| t >= p) {
            return false;
        }
        if !matches!(dev.driver.event_query(dev.index, e), Ok(true)) {
            *pending = Some(t);
            return false;
        }
        self.epoch_proven = t + 1;
        for (_, old) in self.epochs.drain(..=pos) {
            dev.put_event(old);
        }
        true
    }

    /// Whether the free of idle segment `s` is proven complete, so that the
    /// segment may change hands or go back to the driver. A fresh segment
    /// (never handed out: a warm-up reservation) needs no proof. Otherwise,
    /// asked in order:
    /// 1. `stream` itself (`cuStreamIsCapturing`, then `cuStreamQuery`): a
    ///    capturing stream proves nothing and is never queried or recorded
    ///    on (that would invalidate the capture, and an event recorded into
    ///    a capture proves nothing); a stream with no work pending proves
    ///    everything enqueued before the segment went idle done;
    /// 2. an epoch event recorded since the segment went idle
    ///    ([`Self::record_epoch`]), if one has completed;
    /// 3. an event recorded on `stream` since the segment went idle
    ///    (recorded now if there is none), once it has completed.
    ///
    /// `pass` caches the stream's answer and an epoch event found pending
    /// for one pass under one lock (start each pass at its default).
    /// Errors count as "not proven".
    pub fn idle_free_complete(
        &mut self,
        s: u32,
        stream: Stream,
        dev: &DeviceCore,
        pass: &mut ProofPass,
    ) -> bool {
        if self.seg(s).fresh {
            // Never handed out: no work of any stream touched it.
            return true;
        }
        match stream_state(stream, dev, pass) {
            StreamState::Idle => return true,
            StreamState::Capturing => return false,
            StreamState::Busy => {}
        }
        if self.epoch_proves(self.seg(s).idle_epoch, dev, &mut pass.epoch_pending) {
            return true;
        }
        let ev = match self.seg(s).event {
            Some(e) => e,
            None => {
                let Some(e) = dev.record_event(stream) else {
                    return false;
                };
                self.seg_mut(s).event = Some(e);
                e
            }
        };
        matches!(dev.driver.event_query(dev.index, ev), Ok(true))
    }

    /// Whether the frees in a mapping of a virtual segment, last stamped
    /// with idle epoch `epoch`, are proven complete, so that its memory may
    /// be unmapped: the stream, then the epoch events, as for an idle
    /// segment ([`Self::idle_free_complete`]), without an event of its own
    /// (what is not proven yet stays; the OOM ladder synchronises).
    pub fn mapping_free_complete(
        &mut self,
        epoch: u64,
        stream: Stream,
        dev: &DeviceCore,
        pass: &mut ProofPass,
    ) -> bool {
        match stream_state(stream, dev, pass) {
            StreamState::Idle => true,
            StreamState::Capturing => false,
            StreamState::Busy => self.epoch_proves(epoch, dev, &mut pass.epoch_pending),
        }
    }

    /// Give every event this arena holds for proofs (its epoch events) back
    /// to the device's pool: the allocator is going away.
    pub fn return_events(&mut self, dev: &DeviceCore) {
        for (_, e) in self.epochs.drain(..) {
            dev.put_event(e);
        }
    }
}

/// What `stream` is, asked once per pass (see [`ArenaInner::idle_free_complete`]).
fn stream_state(stream: Stream, dev: &DeviceCore, pass: &mut ProofPass) -> StreamState {
    *pass
        .stream
        .get_or_insert_with(|| match dev.driver.stream_is_capturing(dev.index, stream) {
            Ok(false) => {
                if matches!(dev.driver.stream_query(dev.index, stream), Ok(true)) {
                    StreamState::Idle
                } else {
                    StreamState::Busy
                }
            }
            Ok(true) => {
                dev.capture.mark_seen();
                StreamState::Capturing
            }
            Err(_) => StreamState::Capturing,
        })
}
