//! The trace log (`log_file:PATH`): every allocate, free and failed allocate
//! as a line of RMM's logging-adaptor CSV, `Thread,Time,Action,Pointer,Size,Stream`,
//! so traces replay with `cudalloc replay` and with RMM's replay benchmark.
//!
//! Each thread formats into a buffer of its own (no lock shared with other
//! threads on the way) and appends it to the file in 64 KiB batches; every
//! buffer is flushed when the log is dropped and at process exit. Batches of
//! different threads interleave, so the file is in time order per thread, not
//! globally: readers sort by the Time column (stable), as `cudalloc replay`
//! does. Time is UTC time of day, `HH:MM:SS.ffffff`, as RMM writes it.

use crate::driver::Stream;
use crate::tracking::thread_id;
use parking_lot::Mutex;
use std::cell::RefCell;
use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The CSV header line.
pub const HEADER: &str = "Thread,Time,Action,Pointer,Size,Stream";

/// Buffered bytes after which a thread appends its batch to the file.
const BATCH: usize = 64 << 10;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allocate,
    AllocateFailure,
    Free,
    /// The host waited for all device work here (a training step's
    /// `loss.item()`): cudalloc's extension of RMM's format, written by
    /// scripts/torch_trace.py, never by the log. Only `replay --gpu-lag`
    /// acts on it.
    Synchronize,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allocate => "allocate",
            Action::AllocateFailure => "allocate failure",
            Action::Free => "free",
            Action::Synchronize => "synchronize",
        }
    }
}

type Buffer = Arc<Mutex<Vec<u8>>>;

struct Sink {
    file: Mutex<File>,
    buffers: Mutex<Vec<Buffer>>,
}

impl Sink {
    fn append(&self, bytes: &[u8]) {
        // A failing disk must not fail allocations: drop the batch, warn once.
        if let Err(e) = self.file.lock().write_all(bytes) {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!("log_file: write failed: {e}"));
        }
    }
}

/// An open trace log.
pub struct TraceLog {
    id: u64,
    sink: Arc<Sink>,
}

static NEXT_LOG: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static LOCAL: RefCell<Option<(u64, Buffer)>> = const { RefCell::new(None) };
}

impl TraceLog {
    /// Create (truncate) `path` and write the header.
    pub fn create(path: &str) -> std::io::Result<TraceLog> {
        let mut file = File::create(path)?;
        writeln!(file, "{HEADER}")?;
        Ok(TraceLog {
            id: NEXT_LOG.fetch_add(1, Ordering::Relaxed),
            sink: Arc::new(Sink {
                file: Mutex::new(file),
                buffers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Log one event of the calling thread.
    pub fn record(&self, action: Action, ptr: u64, size: u64, stream: Stream) {
        let _ = LOCAL.try_with(|l| {
            let Ok(mut l) = l.try_borrow_mut() else {
                return;
            };
            let buf = match &*l {
                Some((id, b)) if *id == self.id => b.clone(),
                _ => {
                    let b: Buffer = Arc::new(Mutex::new(Vec::with_capacity(BATCH + 256)));
                    self.sink.buffers.lock().push(b.clone());
                    *l = Some((self.id, b.clone()));
                    b
                }
            };
            let us = time_of_day_us();
            let s = us / 1_000_000;
            let mut v = buf.lock();
            // Hand-formatted: core::fmt was most of the cost of a logged call.
            dec(&mut v, thread_id() as u64, 1);
            v.push(b',');
            dec(&mut v, (s / 3600) % 24, 2);
            v.push(b':');
            dec(&mut v, (s / 60) % 60, 2);
            v.push(b':');
            dec(&mut v, s % 60, 2);
            v.push(b'.');
            dec(&mut v, us % 1_000_000, 6);
            v.push(b',');
            v.extend_from_slice(action.as_str().as_bytes());
            v.extend_from_slice(b",0x");
            hex(&mut v, ptr);
            v.push(b',');
            dec(&mut v, size, 1);
            v.push(b',');
            dec(&mut v, stream, 1);
            v.push(b'\n');
            if v.len() >= BATCH {
                self.sink.append(&v);
                v.clear();
            }
        });
    }

    /// Append every thread's buffered lines to the file.
    pub fn flush(&self) {
        let buffers = self.sink.buffers.lock().clone();
        for b in buffers {
            let mut v = b.lock();
            if !v.is_empty() {
                self.sink.append(&v);
                v.clear();
            }
        }
        let _ = self.sink.file.lock().flush();
    }
}

impl Drop for TraceLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Append `n` in decimal, zero-padded to at least `width` digits.
fn dec(v: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut b = [b'0'; 20];
    let mut i = 20;
    while n > 0 || 20 - i < width {
        i -= 1;
        b[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    v.extend_from_slice(&b[i..]);
}

/// Append `n` in lowercase hex, no prefix.
fn hex(v: &mut Vec<u8>, mut n: u64) {
    let mut b = [b'0'; 16];
    let mut i = 16;
    loop {
        i -= 1;
        b[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    v.extend_from_slice(&b[i..]);
}

/// UTC time of day in microseconds since midnight.
fn time_of_day_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64 % 86_400) * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Render microseconds since midnight as `HH:MM:SS.ffffff`.
pub fn format_time_us(us: u64) -> String {
    let s = us / 1_000_000;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        us % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn hand_formatting_matches_core_fmt() {
        for n in [0u64, 1, 9, 10, 255, 4096, 123_456_789, u64::MAX] {
            let (mut d, mut h) = (Vec::new(), Vec::new());
            super::dec(&mut d, n, 1);
            super::hex(&mut h, n);
            assert_eq!(String::from_utf8(d).unwrap(), n.to_string());
            assert_eq!(String::from_utf8(h).unwrap(), format!("{n:x}"));
        }
        let mut d = Vec::new();
        super::dec(&mut d, 7, 6);
        assert_eq!(d, b"000007");
    }
}
