//! The trace log (`log_file`) under concurrency, and with readers that
//! misbehave:
//! - many threads on many streams and devices: each address's lines come in
//!   the engine's order (the replay meets no free before its allocation and
//!   no allocation of a live pointer), even when every line has the same
//!   time stamp; a free names the block's own stream;
//! - a thread costs the log no memory that outlives it;
//! - a FIFO with no reader, a pipe nobody drains and a reader that went
//!   away: allocation never blocks, and what cannot be written is dropped
//!   and counted.
//!
//! Tests here take [`ONE_AT_A_TIME`]: one measures the process's memory.

use cudalloc::config::Config;
use cudalloc::driver::sim::SimDriver;
use cudalloc::observe::Action;
use cudalloc::trace::replay::{replay, replay_config};
use cudalloc::Allocator;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn sim(conf: &str) -> Arc<Allocator> {
    let c = Config::parse(conf).unwrap();
    let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
    Arc::new(Allocator::new(c, d))
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("cudalloc-tracelog-{}-{name}", std::process::id()))
}

/// Run `f` on a thread of its own; fail if it has not returned within
/// `limit` (a generous bound: what is tested is that it returns at all).
fn returns_within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("blocked: the call did not return")
}

const THREADS: u64 = 8;
const STREAMS: u64 = 4;
const DEVICES: u64 = 2;

/// `THREADS` threads, each making `pairs` allocations and as many frees of
/// mixed sizes on `STREAMS` streams of `DEVICES` devices, freeing with a
/// wrong stream hint. Every free must succeed. Returns the lines logged.
fn concurrent_run(a: &Arc<Allocator>, pairs: u64) -> u64 {
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut live: Vec<(u64, usize, u64)> = Vec::new();
                for _ in 0..pairs {
                    let r = next();
                    let (d, s) = ((r % DEVICES) as usize, (r >> 8) % STREAMS);
                    let size = match (r >> 16) % 16 {
                        0 => 3 << 20,
                        1 => 12 << 20,
                        n => 512 * n * (1 + (r >> 24) % 64),
                    };
                    live.push((a.malloc(size, d, s).unwrap(), d, s));
                    if live.len() > 6 || next() % 3 == 0 {
                        let (p, d, s) = live.swap_remove((next() % live.len() as u64) as usize);
                        a.free(p, Some(d), (s + 1) % STREAMS).unwrap();
                    }
                }
                for (p, d, _) in live {
                    a.free(p, Some(d), 0).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    THREADS * pairs * 2
}

/// Parse the log, check each address's lines alternate allocate / free on
/// one stream, and replay it.
fn check_log(path: &PathBuf, lines: u64) {
    let text = std::fs::read_to_string(path).unwrap();
    let events = cudalloc::trace::parse(&text).unwrap();
    assert_eq!(events.len() as u64, lines, "a line per call, none dropped");
    let mut live = std::collections::HashMap::new();
    for (i, e) in events.iter().enumerate() {
        match e.action {
            Action::Allocate => {
                assert!(
                    live.insert(e.ptr, e.stream).is_none(),
                    "line {i}: {:#x} allocated while live",
                    e.ptr
                );
            }
            Action::Free => {
                let s = live.remove(&e.ptr);
                assert!(
                    s.is_some(),
                    "line {i}: free of {:#x} before its allocation",
                    e.ptr
                );
                assert_eq!(
                    s,
                    Some(e.stream),
                    "line {i}: a free names the block's stream"
                );
            }
            other => panic!("line {i}: unexpected {other:?}"),
        }
    }
    assert!(live.is_empty(), "every allocation was freed");
    let r = replay(&events, &replay_config("", 64 << 30).unwrap(), false, 0);
    assert_eq!(
        (r.unmatched_frees, r.allocs_of_live, r.failures),
        (0, 0, 0),
        "the replay matches every line"
    );
}

fn logged_concurrent_run(name: &str, clock: Option<fn() -> u64>) {
    let path = tmp(name);
    let a = sim(&format!(
        "backend:sim,sim_devices:{DEVICES},sim_memory:8GiB,log_file:{}",
        path.display()
    ));
    if let Some(c) = clock {
        a.observer().set_log_clock(c);
    }
    // Under the log's capacity, so nothing may be dropped.
    let lines = concurrent_run(&a, 6000);
    assert!(lines < cudalloc::observe::tracelog::CAPACITY as u64);
    assert_eq!(a.stats(0).unwrap().log_records_dropped, 0);
    a.check_invariants().unwrap();
    drop(Arc::into_inner(a).expect("the workers are done"));
    check_log(&path, lines);
    let _ = std::fs::remove_file(path);
}

/// Each address's lines come in the engine's order when threads race on
/// shared streams, blocks move between streams, and frees give wrong hints.
#[test]
fn a_concurrent_logged_run_replays_with_every_free_matched() {
    let _g = serial();
    logged_concurrent_run("concurrent.csv", None);
}

/// The same with every line stamped with the same time: the order comes
/// from the file, not from the clock (a log whose threads kept buffers of
/// their own interleaved them in any order).
#[test]
fn the_order_holds_with_a_clock_that_never_moves() {
    let _g = serial();
    logged_concurrent_run("frozen.csv", Some(|| 12 * 3_600_000_000));
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Short-lived threads that log leave nothing behind (a buffer per thread
/// that ever logged used to stay: +84 MB after 20,000 threads).
#[test]
fn threads_that_log_leave_no_memory_behind() {
    let _g = serial();
    let path = tmp("threads.csv");
    let a = sim(&format!(
        "backend:sim,sim_memory:1GiB,log_file:{}",
        path.display()
    ));
    let churn = |n: usize| {
        for _ in 0..n {
            let a = a.clone();
            std::thread::spawn(move || {
                let p = a.malloc(4096, 0, 0).unwrap();
                a.free(p, Some(0), 0).unwrap();
            })
            .join()
            .unwrap();
        }
    };
    churn(200); // warm up: the thread stack cache, the queue's buffers
    a.observer().flush_log();
    let before = rss_bytes();
    churn(5000);
    a.observer().flush_log();
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 8 << 20,
        "5000 threads grew the process by {grown} bytes"
    );
    drop(a);
    let lines = std::fs::read_to_string(&path).unwrap().lines().count();
    assert_eq!(lines, 1 + 2 * 5200);
    let _ = std::fs::remove_file(path);
}

/// A pipe's two ends (close-on-exec).
fn pipe() -> (libc::c_int, libc::c_int) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

fn close(fd: libc::c_int) {
    // SAFETY: the test owns `fd`.
    unsafe { libc::close(fd) };
}

fn pairs(a: &Allocator, n: u64) {
    for i in 0..n {
        let p = a.malloc(512 * (1 + i % 8), 0, 0).unwrap();
        a.free(p, Some(0), 0).unwrap();
    }
}

/// A FIFO with no reader: opening the log does not block, allocation goes
/// on, and a reader that comes later gets every line.
#[test]
fn a_fifo_without_a_reader_blocks_nothing_and_gets_the_lines_later() {
    let _g = serial();
    let fifo = tmp("fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let conf = format!("backend:sim,sim_memory:1GiB,log_file:{}", fifo.display());
    let a = returns_within(Duration::from_secs(60), move || {
        let a = sim(&conf);
        pairs(&a, 1000);
        a
    });
    let f = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::read_to_string(f).unwrap());
    // The writer opens the FIFO once the reader is there; the lines queued
    // meanwhile follow. Dropping the allocator closes the log: EOF.
    pairs(&a, 1000);
    drop(a);
    let text = reader.join().unwrap();
    assert_eq!(text.lines().count(), 1 + 4000, "header and every line");
    assert!(text.starts_with("Thread,Time,Action,Pointer,Size,Stream\n"));
    let _ = std::fs::remove_file(fifo);
}

/// A pipe whose reader never reads: allocation never waits for it; what
/// does not fit is dropped and counted.
#[test]
fn a_pipe_nobody_drains_drops_lines_instead_of_blocking() {
    let _g = serial();
    let (r, w) = pipe();
    let conf = format!("backend:sim,sim_memory:1GiB,log_file:/proc/self/fd/{w}");
    let a = sim(&conf);
    close(w); // the log opened the pipe anew
    let n = 200_000;
    let a = returns_within(Duration::from_secs(300), move || {
        pairs(&a, n);
        a
    });
    // More lines than the queue and the pipe hold: some were dropped.
    let dropped = returns_within(Duration::from_secs(60), move || {
        a.observer().flush_log();
        let d = a.stats(0).unwrap().log_records_dropped;
        drop(a);
        d
    });
    assert!(dropped > 0 && dropped < 2 * n, "{dropped} dropped");
    close(r);
}

/// A reader that goes away ends the log: no SIGPIPE, no error for the
/// allocations, and the rest of the lines are counted as dropped.
#[test]
fn a_reader_that_goes_away_ends_the_log_quietly() {
    let _g = serial();
    let (r, w) = pipe();
    let a = sim(&format!(
        "backend:sim,sim_memory:1GiB,log_file:/proc/self/fd/{w}"
    ));
    close(w);
    close(r);
    pairs(&a, 1000);
    a.observer().flush_log();
    pairs(&a, 1000);
    a.observer().flush_log();
    assert_eq!(a.stats(0).unwrap().log_records_dropped, 4000);
}
