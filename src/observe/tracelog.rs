//! The trace log (`log_file:PATH`): every allocate, free and failed allocate
//! as a line of RMM's logging-adaptor CSV, `Thread,Time,Action,Pointer,Size,Stream`,
//! so traces replay with `cudalloc replay` and with RMM's replay benchmark.
//! Time is UTC time of day, `HH:MM:SS.ffffff`, as RMM writes it.
//!
//! **Order.** The engine logs an allocation or a free while it holds the
//! lock under which the block's fate is decided (its arena's), into one
//! queue, stamping the time as it queues. So for every address the file's
//! order is the engine's (a free comes before the allocation that reuses
//! its block, whatever the threads), and times never fall back from one
//! line to the next (but at midnight): readers that sort by time, stably,
//! as `cudalloc replay` does, keep that order. A free line names the
//! block's own stream, not the caller's hint.
//!
//! **Never in the host's way.** The queue is bounded ([`CAPACITY`] records,
//! a few MB at most, however many threads log) and a background thread
//! formats and writes it. The file is opened without blocking: a FIFO with
//! no reader yet is opened later, when one comes. A write that would block
//! waits at most [`STALL`], then its batch is dropped; a reader that went
//! away ends the log, without SIGPIPE. Records that find the queue full,
//! or that could not be written, are counted (`log_records_dropped` in the
//! stats) and reported at exit. Nothing here keeps per-thread state, so
//! calls from `atexit` handlers and thread-exit destructors are logged too.

use crate::driver::Stream;
use crate::engine::Journal;
use crate::live::thread_id;
use parking_lot::{Condvar, Mutex};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The CSV header line.
pub const HEADER: &str = "Thread,Time,Action,Pointer,Size,Stream";

/// Records the queue holds at most (about 40 bytes each).
pub const CAPACITY: usize = 1 << 17;

/// Queued records at which the writer is woken before its next round.
const WAKE_AT: usize = CAPACITY / 8;

/// How often the writer looks at the queue when nobody wakes it.
const ROUND: Duration = Duration::from_millis(50);

/// The longest a write that would block waits before its batch is dropped.
pub const STALL: Duration = Duration::from_secs(1);

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

/// One queued line.
#[derive(Clone, Copy)]
struct Record {
    time_us: u64,
    ptr: u64,
    size: u64,
    stream: Stream,
    thread: u32,
    action: Action,
}

struct Queue {
    records: Vec<Record>,
    /// The last stamp: the next is never earlier (but at midnight).
    last_us: u64,
    /// Microseconds since midnight (UTC); a test may fix it.
    clock: fn() -> u64,
    closed: bool,
}

/// Where the lines go.
enum Output {
    /// A FIFO with no reader yet: opened when one comes.
    Waiting,
    Open(File),
    /// The reader went away, or writing failed: the log is over.
    Ended,
}

/// The writing side, held by whoever writes (the writer thread, or a flush).
struct Writer {
    output: Output,
    header_done: bool,
    /// The batch taken from the queue (kept to reuse its allocation).
    batch: Vec<Record>,
    text: Vec<u8>,
}

struct Shared {
    path: String,
    queue: Mutex<Queue>,
    wake: Condvar,
    writer: Mutex<Writer>,
    ended: AtomicBool,
    dropped: AtomicU64,
}

/// An open trace log.
pub struct TraceLog {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TraceLog {
    /// Create (truncate) `path`, without blocking, and start the writer.
    /// A FIFO with no reader yet is not an error: records wait for one.
    pub fn create(path: &str) -> std::io::Result<TraceLog> {
        let output = match open(path)? {
            Some(f) => Output::Open(f),
            None => {
                tracing::warn!(
                    "log_file: '{path}' has no reader yet; records wait for one \
                     (and are dropped, counted, beyond {CAPACITY})"
                );
                Output::Waiting
            }
        };
        let shared = Arc::new(Shared {
            path: path.to_string(),
            queue: Mutex::new(Queue {
                records: Vec::new(),
                last_us: 0,
                clock: time_of_day_us,
                closed: false,
            }),
            wake: Condvar::new(),
            writer: Mutex::new(Writer {
                output,
                header_done: false,
                batch: Vec::new(),
                text: Vec::new(),
            }),
            ended: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cudalloc-log".into())
            .spawn(move || s.run())
            .map_err(|e| {
                tracing::warn!("log_file: no writer thread ({e}); lines are written at exit")
            })
            .ok();
        Ok(TraceLog { shared, thread })
    }

    /// Log one event. Call it where the engine decides the block's fate
    /// (under its arena's lock), so that the file keeps the engine's order.
    /// Never blocks on the file.
    #[inline]
    pub fn record(&self, action: Action, ptr: u64, size: u64, stream: Stream) {
        let sh = &*self.shared;
        if sh.ended.load(Ordering::Relaxed) {
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let thread = thread_id();
        let mut q = sh.queue.lock();
        if q.records.len() >= CAPACITY {
            drop(q);
            sh.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = (q.clock)();
        // Never earlier than the line before, but for a new day.
        let time_us = if now >= q.last_us || now + 43_200_000_000 < q.last_us {
            now
        } else {
            q.last_us
        };
        q.last_us = time_us;
        q.records.push(Record {
            time_us,
            ptr,
            size,
            stream,
            thread,
            action,
        });
        if q.records.len() == WAKE_AT {
            sh.wake.notify_one();
        }
    }

    /// Write every queued line now (waiting at most [`STALL`] on a stuck
    /// reader). At exit and when the log is dropped.
    pub fn flush(&self) {
        self.shared.drain(true);
    }

    /// Stamp lines with `clock` (microseconds since midnight) from now on:
    /// tests fix the time to show that the file's order, not the clock's
    /// resolution, keeps each address's order.
    pub fn set_clock(&self, clock: fn() -> u64) {
        self.shared.queue.lock().clock = clock;
    }

    /// Records dropped so far: the queue was full, or the reader stalled,
    /// went away or never came.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The log's path.
    pub fn path(&self) -> &str {
        &self.shared.path
    }
}

/// The trace log is the engine's journal: told of each allocation and free
/// under the block's arena's lock, so the file keeps the engine's order.
impl Journal for TraceLog {
    #[inline]
    fn allocated(&self, ptr: u64, requested: u64, stream: Stream) {
        self.record(Action::Allocate, ptr, requested, stream);
    }

    #[inline]
    fn freed(&self, ptr: u64, requested: u64, stream: Stream) {
        self.record(Action::Free, ptr, requested, stream);
    }
}

impl Drop for TraceLog {
    fn drop(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.flush();
    }
}

impl Shared {
    /// The writer thread: a batch at least every [`ROUND`], sooner when
    /// the queue fills; ends when the log is closed and drained.
    fn run(&self) {
        loop {
            {
                let mut q = self.queue.lock();
                if q.records.len() < WAKE_AT && !q.closed {
                    self.wake.wait_for(&mut q, ROUND);
                }
                if q.closed {
                    return;
                }
            }
            self.drain(false);
        }
    }

    /// Take the queue and write it. With `all`, a FIFO that still has no
    /// reader gives up its records (counted as dropped): the log is ending.
    fn drain(&self, all: bool) {
        let mut w = self.writer.lock();
        let w = &mut *w;
        if matches!(w.output, Output::Waiting) {
            match open(&self.path) {
                Ok(Some(f)) => w.output = Output::Open(f),
                Ok(None) if !all => return, // still no reader: keep waiting
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("log_file: '{}': {e}; no trace log", self.path);
                    self.end(&mut w.output);
                }
            }
        }
        {
            let mut q = self.queue.lock();
            std::mem::swap(&mut q.records, &mut w.batch);
        }
        if w.batch.is_empty() {
            return;
        }
        let n = w.batch.len() as u64;
        let Output::Open(file) = &w.output else {
            self.dropped.fetch_add(n, Ordering::Relaxed);
            w.batch.clear();
            return;
        };
        w.text.clear();
        if !w.header_done {
            w.text.extend_from_slice(HEADER.as_bytes());
            w.text.push(b'\n');
        }
        let header = w.text.len();
        for r in &w.batch {
            format_line(&mut w.text, r);
        }
        w.batch.clear();
        match write_all(file, &w.text, Instant::now() + STALL) {
            Ok(()) => w.header_done = true,
            Err((written, e)) => {
                // The lines not (fully) written are lost.
                let lost = w.text[written.max(header)..]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count() as u64;
                self.dropped.fetch_add(lost.min(n), Ordering::Relaxed);
                w.header_done |= written >= header;
                match e {
                    WriteStop::Stalled => {
                        static WARNED: std::sync::Once = std::sync::Once::new();
                        WARNED.call_once(|| {
                            tracing::warn!(
                                "log_file: '{}': the reader is not keeping up; records are dropped (counted in log_records_dropped)",
                                self.path
                            )
                        });
                    }
                    WriteStop::Failed(e) => {
                        tracing::warn!("log_file: '{}': {e}; the trace log ends here", self.path);
                        self.end(&mut w.output);
                    }
                }
            }
        }
    }

    fn end(&self, output: &mut Output) {
        *output = Output::Ended;
        self.ended.store(true, Ordering::Relaxed);
    }
}

/// Open `path` for the log without blocking: create or truncate a file;
/// `None` for a FIFO that has no reader yet.
fn open(path: &str) -> std::io::Result<Option<File>> {
    match OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why a write stopped short.
enum WriteStop {
    /// It would have blocked past the deadline.
    Stalled,
    /// An error: EPIPE (the reader went away), a full disk, ...
    Failed(std::io::Error),
}

/// Write all of `bytes` to the non-blocking `file`, waiting for room until
/// `deadline`, without raising SIGPIPE. On failure, how much was written.
fn write_all(file: &File, bytes: &[u8], deadline: Instant) -> Result<(), (usize, WriteStop)> {
    let fd = file.as_raw_fd();
    let mut done = 0;
    while done < bytes.len() {
        let rest = &bytes[done..];
        // SAFETY: `rest` is a valid buffer of `rest.len()` bytes; `fd` is open.
        let n = without_sigpipe(|| unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) });
        if n > 0 {
            done += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err((done, WriteStop::Stalled));
                }
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as libc::c_int) };
            }
            _ if n == 0 => {
                return Err((
                    done,
                    WriteStop::Failed(std::io::ErrorKind::WriteZero.into()),
                ))
            }
            _ => return Err((done, WriteStop::Failed(e))),
        }
    }
    Ok(())
}

/// Run `f` (a write) with SIGPIPE blocked on this thread, and take back a
/// SIGPIPE it raised: a reader that went away must not kill the host.
fn without_sigpipe<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain signal-mask calls on valid, initialised sets; only
    // SIGPIPE is blocked, and only on this thread, for the duration.
    unsafe {
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut old);
        libc::sigpending(&mut pending);
        let was_pending = libc::sigismember(&pending, libc::SIGPIPE) == 1;
        let r = f();
        if !was_pending {
            libc::sigpending(&mut pending);
            if libc::sigismember(&pending, libc::SIGPIPE) == 1 {
                let zero = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                libc::sigtimedwait(&pipe, std::ptr::null_mut(), &zero);
            }
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// Append one CSV line. Hand-formatted: core::fmt was most of the cost.
fn format_line(v: &mut Vec<u8>, r: &Record) {
    let us = r.time_us;
    let s = us / 1_000_000;
    dec(v, r.thread as u64, 1);
    v.push(b',');
    dec(v, (s / 3600) % 24, 2);
    v.push(b':');
    dec(v, (s / 60) % 60, 2);
    v.push(b':');
    dec(v, s % 60, 2);
    v.push(b'.');
    dec(v, us % 1_000_000, 6);
    v.push(b',');
    v.extend_from_slice(r.action.as_str().as_bytes());
    v.extend_from_slice(b",0x");
    hex(v, r.ptr);
    v.push(b',');
    dec(v, r.size, 1);
    v.push(b',');
    dec(v, r.stream, 1);
    v.push(b'\n');
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
