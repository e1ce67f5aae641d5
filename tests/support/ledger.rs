//! The stream-safety ledger: what was freed where, on which streams, and
//! when; and the check that a range handed to stream T overlaps no freed
//! range whose free on a stream S != T is not yet proven complete.
//!
//! A test stamps every free with a tick from the spy ([`Spy::stamp`], taken
//! before the engine's free) and records it here with the streams whose work
//! must be complete before another stream may reuse the memory: the stream
//! it was allocated on and those recorded with `record_stream`. When the
//! engine hands out a range, [`Ledger::hand_out`] reports every overlapped
//! free on another stream S that the driver has not proven complete past its
//! tick ([`Spy::complete_since`]), and forgets the parts the new allocation
//! covers. The reference model (`super::model`) and `tests/stress.rs` both
//! keep one.

use super::spy::{Spy, Unmap};
use cudalloc::driver::Stream;
use std::collections::BTreeMap;
use std::fmt;

/// A freed range still waiting for proof that its streams' work is done.
#[derive(Debug, Clone)]
struct Freed {
    end: u64,
    /// Streams whose work must be complete before another stream reuses it.
    streams: Vec<Stream>,
    tick: u64,
}

/// A range handed to `stream` while its free on `waited` (at `tick`) was not
/// proven complete.
#[derive(Debug, Clone, PartialEq)]
pub struct Unproven {
    pub dev: usize,
    pub p: u64,
    pub size: u64,
    pub stream: Stream,
    pub waited: Stream,
    pub tick: u64,
}

impl fmt::Display for Unproven {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Unproven {
            dev,
            p,
            size,
            stream,
            waited,
            tick,
        } = self;
        write!(
            f,
            "{p:#x}+{size} handed to stream {stream:#x} on device {dev} while its free on stream {waited:#x} (tick {tick}) is not proven complete"
        )
    }
}

/// Freed ranges per device, not overlapping, keyed by their start.
#[derive(Debug, Clone)]
pub struct Ledger {
    freed: Vec<BTreeMap<u64, Freed>>,
}

impl Ledger {
    pub fn new(devices: usize) -> Self {
        Ledger {
            freed: vec![BTreeMap::new(); devices],
        }
    }

    /// Whether `[p, end)` overlaps a freed range of `dev` still held (for a
    /// caller's own consistency check before [`Ledger::freed`]).
    pub fn overlaps(&self, dev: usize, p: u64, end: u64) -> bool {
        self.freed[dev]
            .range(..end)
            .next_back()
            .is_some_and(|(_, prev)| prev.end > p)
    }

    /// `[p, p + size)` of `dev` was freed at `tick`; its work is on `streams`.
    pub fn freed(&mut self, dev: usize, p: u64, size: u64, streams: Vec<Stream>, tick: u64) {
        let end = p + size;
        self.freed[dev].insert(p, Freed { end, streams, tick });
    }

    /// `[p, p + size)` of `dev` was handed to `stream`: every overlapped free
    /// on another stream that `spy` has not proven complete past its tick,
    /// highest address first. The parts of the overlapped ranges that this
    /// range covers are forgotten; the parts it does not cover are kept.
    pub fn hand_out(
        &mut self,
        spy: &Spy,
        dev: usize,
        stream: Stream,
        p: u64,
        size: u64,
    ) -> Vec<Unproven> {
        let freed = &mut self.freed[dev];
        let end = p + size;
        let overl: Vec<u64> = freed
            .range(..end)
            .rev()
            .take_while(|(_, f)| f.end > p)
            .map(|(&s, _)| s)
            .collect();
        let mut unproven = Vec::new();
        for s in overl {
            let f = freed.remove(&s).unwrap();
            for &w in &f.streams {
                if w != stream && !spy.complete_since(dev, w, f.tick) {
                    unproven.push(Unproven {
                        dev,
                        p,
                        size,
                        stream,
                        waited: w,
                        tick: f.tick,
                    });
                }
            }
            // Keep the parts this allocation does not cover.
            if s < p {
                freed.insert(
                    s,
                    Freed {
                        end: p,
                        ..f.clone()
                    },
                );
            }
            if f.end > end {
                freed.insert(end, Freed { end: f.end, ..f });
            }
        }
        unproven
    }

    /// `unmap` took memory out of its range: every free still held in the
    /// range must have been proven complete on all its streams by then (the
    /// memory may be mapped for any stream next). The overlapped frees not
    /// proven, reported as handed to stream `u64::MAX`.
    pub fn unmapped(&self, unmap: &Unmap) -> Vec<Unproven> {
        let end = unmap.va + unmap.len;
        let mut out = Vec::new();
        for (_, f) in self.freed[unmap.device]
            .range(..end)
            .rev()
            .take_while(|(_, f)| f.end > unmap.va)
        {
            for &w in &f.streams {
                if !unmap.proven(w, f.tick) {
                    out.push(Unproven {
                        dev: unmap.device,
                        p: unmap.va,
                        size: unmap.len,
                        stream: u64::MAX,
                        waited: w,
                        tick: f.tick,
                    });
                }
            }
        }
        out
    }

    /// Forget freed ranges whose streams are all proven complete (keeps a
    /// long run's memory bounded).
    pub fn prune(&mut self, spy: &Spy) {
        for (d, freed) in self.freed.iter_mut().enumerate() {
            freed.retain(|_, f| !f.streams.iter().all(|&w| spy.complete_since(d, w, f.tick)));
        }
    }
}
