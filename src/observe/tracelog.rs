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
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allocate => "allocate",
            Action::AllocateFailure => "allocate failure",
            Action::Free => "free",
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
            let mut v = buf.lock();
            let _ = writeln!(
                v,
                "{},{},{},{ptr:#x},{size},{stream}",
                thread_id(),
                time_of_day(),
                action.as_str()
            );
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

/// UTC time of day with microseconds, `HH:MM:SS.ffffff`.
fn time_of_day() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    let us = (ts.tv_sec as u64 % 86_400) * 1_000_000 + ts.tv_nsec as u64 / 1000;
    format_time_us(us)
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
