//! Observability on the sim device: the exit leak report (in a child
//! process), the leak alarms, trace log -> replay, trim and pressure levels,
//! and the C exports' buffer conventions.

use cudalloc::config::Config;
use cudalloc::driver::sim::SimDriver;
use cudalloc::observe::pressure::Level;
use cudalloc::trace::replay::{replay, replay_config};
use cudalloc::Allocator;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn sim(conf: &str) -> (Allocator, Arc<SimDriver>) {
    let c = Config::parse(conf).unwrap();
    let d = Arc::new(SimDriver::new(c.sim_devices, c.sim_memory));
    (Allocator::new(c, d.clone()), d)
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cudalloc-observe-{}-{name}", std::process::id()))
}

/// Enough allocation calls after a pause for the periodic tick to come due.
/// The clock is the coarse one (a tick of 4 to 10 ms), hence the long pause.
fn poke(a: &Allocator) {
    std::thread::sleep(Duration::from_millis(12));
    for _ in 0..200 {
        let p = a.malloc(512, 0, 0).unwrap();
        a.free(p, Some(0), 0).unwrap();
    }
}

// ---- the exit report, in a child process ----------------------------------

const CHILD: &str = "CUDALLOC_OBSERVE_CHILD";
const LEAK_BYTES: usize = 3_000_000;

#[inline(never)]
fn plant_leak_here() -> *mut libc::c_void {
    cudalloc::ffi::cudalloc_malloc(LEAK_BYTES, 0, std::ptr::null_mut())
}

/// Run as a child only: plants one leak and one freed allocation, then exits.
#[test]
fn child_plants_a_leak() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let leak = plant_leak_here();
    assert!(!leak.is_null());
    let freed = cudalloc::ffi::cudalloc_malloc(777_777, 0, std::ptr::null_mut());
    cudalloc::ffi::cudalloc_free(freed, 0, 0, std::ptr::null_mut());
}

fn run_child(conf: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_plants_a_leak",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("CUDALLOC_CONF", conf)
        .env("CUDALLOC_LOG", "off")
        .output()
        .expect("child runs");
    assert!(out.status.success(), "child failed: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn planted_leak_appears_in_the_exit_report() {
    let stats = tmp("stats.json");
    let log = tmp("exit-log.csv");
    let err = run_child(&format!(
        "backend:sim,sim_memory:1GiB,leak_report:exit,backtrace:6,stats_file:{},log_file:{}",
        stats.display(),
        log.display()
    ));
    assert!(err.contains("1 live allocation(s)"), "{err}");
    assert!(
        err.contains(&format!("requested {LEAK_BYTES}")),
        "size missing:\n{err}"
    );
    assert!(
        !err.contains("requested 777777"),
        "a freed block is no leak:\n{err}"
    );
    assert!(err.contains("plant_leak_here"), "call site missing:\n{err}");
    // The exit hook also wrote the stats file and flushed the trace log.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let d0 = &json["devices"][0];
    assert_eq!(d0["active_allocations"], 1);
    assert_eq!(d0["requested_bytes"], LEAK_BYTES as u64);
    let trace = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        trace.lines().filter(|l| l.contains(",allocate,")).count(),
        2,
        "{trace}"
    );
    assert_eq!(
        trace.lines().filter(|l| l.contains(",free,")).count(),
        1,
        "{trace}"
    );

    // Without backtraces: the size, but no call site.
    let err = run_child("backend:sim,sim_memory:1GiB,leak_report:exit");
    assert!(err.contains(&format!("requested {LEAK_BYTES}")), "{err}");
    assert!(
        !err.contains("plant_leak_here") && !err.contains("site #"),
        "{err}"
    );
    // And with the report off, nothing is printed.
    let err = run_child("backend:sim,sim_memory:1GiB");
    assert!(!err.contains("leak report"), "{err}");
    let _ = std::fs::remove_file(stats);
    let _ = std::fs::remove_file(log);
}

// ---- leak alarms -----------------------------------------------------------

/// A steady alloc/free loop of `iters` iterations, each advancing `clock`
/// by 1 ms (periodic work then comes due by counts, not by the machine's
/// speed); `leak_every` > 0 also keeps one block every that many
/// iterations.
fn churn(a: &Allocator, clock: &AtomicU64, iters: u64, leak_every: u64) -> Vec<u64> {
    let mut kept = Vec::new();
    for i in 1..=iters {
        let tmp: Vec<u64> = (0..4).map(|k| a.malloc(4096 << k, 0, 0).unwrap()).collect();
        for p in tmp {
            a.free(p, Some(0), 0).unwrap();
        }
        if leak_every > 0 && i % leak_every == 0 {
            kept.push(a.malloc(256 << 10, 0, 0).unwrap());
        }
        clock.fetch_add(1, Ordering::Relaxed);
    }
    kept
}

/// An allocator on the sim whose periodic work follows `clock`, which
/// starts at the real clock's now (allocations are stamped by it).
fn sim_clocked(conf: &str, clock: &'static AtomicU64, read: fn() -> u64) -> Allocator {
    clock.store(cudalloc::live::now_ms(), Ordering::Relaxed);
    let (a, _) = sim(conf);
    a.set_clock(read);
    a
}

#[test]
fn age_alarm_fires_on_an_old_allocation_and_not_on_a_steady_loop() {
    static CLOCK: AtomicU64 = AtomicU64::new(0);
    let read = || CLOCK.load(Ordering::Relaxed);
    let conf = "backend:sim,sim_memory:1GiB,leak_age:150ms,leak_growth:off,pressure_interval:5ms";
    let a = sim_clocked(conf, &CLOCK, read);
    churn(&a, &CLOCK, 600, 0);
    assert_eq!(
        a.stats(0).unwrap().num_leak_age_alarms,
        0,
        "steady loop is silent"
    );

    let a = sim_clocked(conf, &CLOCK, read);
    let old = a.malloc(1 << 20, 0, 0).unwrap();
    // The alarm's warning is expected: captured, and checked.
    let logs = captured_logs(|| {
        churn(&a, &CLOCK, 600, 0);
    });
    assert!(logs.contains("leak_age: 1 allocation(s), 1MiB"), "{logs}");
    let st = a.stats(0).unwrap();
    assert_eq!(
        st.num_leak_age_alarms, 1,
        "the old allocation is reported, once"
    );
    a.free(old, Some(0), 0).unwrap();
}

/// Bounded by counts: this used to churn for 1.3 s of wall clock, and on a
/// fast machine filled the 4 GiB device with its kept blocks.
#[test]
fn growth_alarm_fires_on_a_leak_and_not_on_a_steady_loop() {
    static CLOCK: AtomicU64 = AtomicU64::new(0);
    let read = || CLOCK.load(Ordering::Relaxed);
    let conf = "backend:sim,sim_memory:4GiB,leak_age:off,leak_growth:0.2,leak_window:300ms,pressure_interval:2ms";
    let a = sim_clocked(conf, &CLOCK, read);
    let base = a.malloc(8 << 20, 0, 0).unwrap();
    churn(&a, &CLOCK, 1300, 0);
    assert_eq!(
        a.stats(0).unwrap().num_leak_growth_alarms,
        0,
        "steady loop is silent"
    );
    a.free(base, Some(0), 0).unwrap();

    let a = sim_clocked(conf, &CLOCK, read);
    let base = a.malloc(8 << 20, 0, 0).unwrap();
    let mut kept = Vec::new();
    let logs = captured_logs(|| kept = churn(&a, &CLOCK, 1300, 8));
    assert!(
        logs.contains("leak_growth: live bytes rose steadily"),
        "{logs}"
    );
    let st = a.stats(0).unwrap();
    assert!(
        (2..=4).contains(&st.num_leak_growth_alarms),
        "a growing floor is reported once a window over 1.3 s of 300 ms windows: {} ({} kept)",
        st.num_leak_growth_alarms,
        kept.len()
    );
    for p in kept.into_iter().chain([base]) {
        a.free(p, Some(0), 0).unwrap();
    }
}

// ---- trace log -> replay ----------------------------------------------------

/// `replay --profiles` replays a trace under the defaults and each README
/// profile, and names the configurations needing the least memory; on the
/// committed KV-cache trace that is not the defaults (BENCHMARKS.md).
#[test]
fn replay_profiles_names_the_least_memory_configuration() {
    let trace = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/kv_cache_seed3.csv");
    // `cudalloc replay TRACE ARGS...`, which must succeed; its stdout.
    let replay = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cudalloc"))
            .args(["replay", trace])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let text = replay(&["--profiles"]);
    let head = text.lines().nth(1).unwrap_or_default();
    for (c, _) in cudalloc::trace::cli::PROFILES.iter().skip(1) {
        assert!(head.contains(c), "column {c} missing: {head}");
    }
    let pick = |label: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no '{label}' line:\n{text}"));
        line[label.len()..]
            .trim()
            .split(',')
            .next()
            .unwrap()
            .to_string()
    };
    let least = pick("least device memory:");
    let reserved = pick("lowest peak reserved:");
    assert!(head.contains(&least) && head.contains(&reserved), "{text}");
    assert_ne!(reserved, "defaults", "{text}");
    // The winner here, expandable segments, maps and unmaps pages: the
    // caution names that cost.
    assert_eq!(least, "expandable_segments:on", "{text}");
    assert!(
        text.contains("but expandable_segments:on makes")
            && text.contains("each cuMemMap, cuMemUnmap or cuMemSetAccess"),
        "{text}"
    );
    // A capacity some configurations do not fit in (huge_split:off needs
    // 428 MiB on this trace): no panic, and a configuration that failed is
    // never named (found in review).
    let text = replay(&["--profiles", "--memory", "420MiB"]);
    assert!(text.contains("n/a"), "{text}");
    let named: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("least device memory:") || l.starts_with("lowest peak reserved:"))
        .collect();
    assert_eq!(named.len(), 2, "{text}");
    assert!(
        named.iter().all(|l| !l.contains("huge_split:off")),
        "{text}"
    );
    // Conflicting options are a clear error, not a silent choice.
    let out = Command::new(env!("CARGO_BIN_EXE_cudalloc"))
        .args(["replay", trace, "--profiles", "--conf", "huge_split:off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A profile that saves memory by calling the driver far more often (each
/// cuMemFree waits for the whole GPU) is named with that cost beside it.
#[test]
fn replay_profiles_names_the_driver_calls_a_leaner_profile_costs() {
    let trace = tmp("training10.csv");
    let bin = env!("CARGO_BIN_EXE_cudalloc");
    let gen = Command::new(bin)
        .args(["trace-gen", "training", "--size", "10", "--seed", "1", "-o"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(gen.status.success());
    let out = Command::new(bin)
        .arg("replay")
        .arg(&trace)
        .arg("--profiles")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("but huge_split:off makes "))
        .unwrap_or_else(|| panic!("no driver-call caution:\n{text}"));
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(nums.len() == 2 && nums[0] > 2 * nums[1], "{line}");
    assert!(
        line.contains("cuMemFree waits for the whole device"),
        "{line}"
    );
}

#[test]
fn a_logged_trace_replays_to_the_same_peak_live_bytes() {
    let path = tmp("replay.csv");
    let (a, _) = sim(&format!(
        "backend:sim,sim_memory:4GiB,log_file:{}",
        path.display()
    ));
    // A deterministic mix over two streams, with a failed allocation.
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut x = 12345u64;
    for i in 0..3000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let stream = (x >> 60) & 1;
        if live.is_empty() || (x >> 33) % 100 < 60 {
            let size = 1 + (x >> 20) % if i % 50 == 0 { 30 << 20 } else { 1 << 20 };
            live.push((a.malloc(size, 0, stream).unwrap(), stream));
        } else {
            let (p, s) = live.swap_remove(((x >> 40) % live.len() as u64) as usize);
            a.free(p, Some(0), s).unwrap();
        }
    }
    let logs = captured_logs(|| assert!(a.malloc(1 << 40, 0, 0).is_err()));
    assert!(logs.contains("out of memory on device 0"), "{logs}");
    let peak = a.stats(0).unwrap().allocated_bytes_peak;
    drop(a); // flushes the log
    let text = std::fs::read_to_string(&path).unwrap();
    let events = cudalloc::trace::parse(&text).unwrap();
    assert_eq!(events.len(), 3001);
    let r = replay(&events, &replay_config("", 4 << 30).unwrap(), false, 0);
    assert_eq!(r.peak_live, peak, "replay reaches the logged peak");
    assert_eq!((r.failures, r.trace_failures, r.unmatched_frees), (0, 1, 0));
    let _ = std::fs::remove_file(path);
}

/// `replay --gpu-lag`: with the GPU behind, a segment freed and wanted
/// again within the lag is not proven free, so growth cannot release it;
/// a `synchronize` line completes the device's work, and the epoch events
/// recorded as the segments went idle prove them.
#[test]
fn a_lagging_gpu_keeps_idle_segments_until_a_synchronize_line() {
    const M: u64 = 1 << 20;
    let trace = |sync: bool| {
        let mut t = String::from("Thread,Time,Action,Pointer,Size,Stream\n");
        let mut us = 0;
        let mut line = |action: &str, ptr: u64, size: u64| {
            us += 1;
            t += &format!("1,00:00:00.{us:06},{action},{ptr:#x},{size},0\n");
        };
        for i in 1..=16 {
            line("allocate", i, 30 * M);
        }
        for i in 1..=16 {
            line("free", i, 30 * M);
        }
        if sync {
            line("synchronize", 0, 0);
        }
        line("allocate", 99, 100 * M);
        cudalloc::trace::parse(&t).unwrap()
    };
    let c = replay_config("", 4 << 30).unwrap();
    let peak = |sync, lag| replay(&trace(sync), &c, false, lag).peak_reserved;
    // Device work done at once: the 30 MiB segments go before growing.
    assert_eq!(peak(false, 0), 480 * M);
    assert_eq!(peak(true, 0), 480 * M);
    // 100 trace events behind: still busy with them, so they stay.
    assert_eq!(peak(false, 100), 580 * M);
    // ... unless the host synchronised after freeing them.
    assert_eq!(peak(true, 100), 480 * M);
    // One event behind: the last epoch event, recorded at the last free,
    // has completed by the next line.
    assert_eq!(peak(false, 1), 480 * M);
}

// ---- pressure and trim ------------------------------------------------------

#[test]
fn trim_at_the_threshold_releases_the_oldest_idle_segment() {
    let (a, d) = sim("backend:sim,sim_memory:100MiB,trim_threshold:0.5,pressure_interval:1ms");
    let seg = 20 << 20; // an own 20 MiB segment each
    let (pa, pb, pc) = (
        a.malloc(seg, 0, 0).unwrap(),
        a.malloc(seg, 0, 0).unwrap(),
        a.malloc(seg, 0, 0).unwrap(),
    );
    a.free(pa, Some(0), 0).unwrap();
    std::thread::sleep(Duration::from_millis(30)); // A has been idle longer than B
    a.free(pb, Some(0), 0).unwrap();
    assert_eq!(a.stats(0).unwrap().reserved_bytes, 60 << 20);
    poke(&a);
    let st = a.stats(0).unwrap();
    assert!(st.num_trims >= 1, "60% in use is above the 50% threshold");
    assert_eq!(st.trimmed_bytes, 20 << 20, "one segment was enough");
    assert!(
        st.reserved_bytes < 50 << 20,
        "reserved {} not lowered",
        st.reserved_bytes
    );
    let allocs = d.counters().mem_allocs;
    assert_eq!(
        a.malloc(seg, 0, 0).unwrap(),
        pb,
        "B, idle for less time, is still cached"
    );
    assert_eq!(d.counters().mem_allocs, allocs);
    a.free(pc, Some(0), 0).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn pressure_levels_rise_as_the_device_fills() {
    let (a, _) = sim("backend:sim,sim_memory:1GiB,trim_threshold:1,pressure_interval:1ms");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    a.observer()
        .register_pressure_callback(Box::new(move |d, l| s2.lock().unwrap().push((d, l))));
    let mut levels = Vec::new();
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(a.malloc(100 << 20, 0, 0).unwrap());
        poke(&a);
        levels.push(a.stats(0).unwrap().pressure_level);
    }
    assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
    assert_eq!((levels[0], levels[9]), (0, 3), "{levels:?}");
    let st = a.stats(0).unwrap();
    assert_eq!(
        (
            st.num_pressure_moderate,
            st.num_pressure_high,
            st.num_pressure_critical
        ),
        (1, 1, 1)
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(0, Level::Moderate), (0, Level::High), (0, Level::Critical)]
    );
    for p in held {
        a.free(p, Some(0), 0).unwrap();
    }
    a.empty_cache(); // freed blocks stay reserved until released
    poke(&a);
    assert_eq!(a.observer().level(0), Level::Low);
    assert_eq!(a.stats(0).unwrap().num_pressure_low, 1);
}

// ---- the C exports -------------------------------------------------------------

static HOG: Mutex<usize> = Mutex::new(0);

unsafe extern "C" fn free_the_hog(_device: libc::c_int, _req: usize, ud: *mut libc::c_void) {
    let p = std::mem::take(&mut *HOG.lock().unwrap());
    cudalloc::ffi::cudalloc_free(p as *mut libc::c_void, 0, 0, std::ptr::null_mut());
    // SAFETY: the test registered a pointer to a live AtomicU32.
    unsafe { &*(ud as *const std::sync::atomic::AtomicU32) }
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn c_exports_follow_the_buffer_and_callback_conventions() {
    use cudalloc::error::ErrorCode;
    use cudalloc::ffi::*;
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    // SAFETY: a NUL-terminated string.
    assert_eq!(
        unsafe { cudalloc_init(c"backend:sim,sim_memory:1GiB,backtrace:4".as_ptr()) },
        0
    );
    let p = cudalloc_malloc(1 << 20, 0, std::ptr::null_mut());
    // SAFETY (all calls below): buffers are NULL or as long as passed.
    let need = unsafe { cudalloc_leak_report(0.0, 1, std::ptr::null_mut(), 0) };
    assert!(need > 1);
    assert_eq!(cudalloc_last_error(), 0);
    let mut small = vec![0 as libc::c_char; 4];
    // Ages move on between calls, so the needed size may differ a little.
    assert!(unsafe { cudalloc_leak_report(0.0, 1, small.as_mut_ptr(), 4) } > 4);
    assert_eq!(
        cudalloc_last_error(),
        ErrorCode::CUDALLOC_ERR_BUFFER_TOO_SMALL as i32
    );
    assert_eq!(small, vec![0; 4], "nothing written");
    assert_eq!(
        unsafe { cudalloc_leak_report(0.0, 1, std::ptr::null_mut(), 9) },
        0
    );
    assert_eq!(
        cudalloc_last_error(),
        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as i32
    );
    assert_eq!(
        unsafe { cudalloc_leak_report(f64::NAN, 0, std::ptr::null_mut(), 0) },
        0
    );
    assert_eq!(
        cudalloc_last_error(),
        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as i32
    );
    let mut buf = vec![0 as libc::c_char; need + 256];
    let n = unsafe { cudalloc_leak_report(0.0, 1, buf.as_mut_ptr(), buf.len()) };
    // SAFETY: the export wrote a NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap();
    assert_eq!(text.len() + 1, n, "{text}");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(v["count"], 1);
    assert_eq!(v["allocations"][0]["requested"], 1 << 20);
    assert!(
        v["sites"][0]["frames"]
            .to_string()
            .contains("c_exports_follow"),
        "{v}"
    );

    let need = unsafe { cudalloc_stats_json(std::ptr::null_mut(), 0) };
    let mut buf = vec![0 as libc::c_char; need + 64];
    unsafe { cudalloc_stats_json(buf.as_mut_ptr(), buf.len()) };
    let text = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(v["devices"][0]["active_allocations"], 1);
    assert_eq!(v["config"]["backtrace"], "4");
    cudalloc_free(p, 0, 0, std::ptr::null_mut());

    // OOM callback: frees a hog at step 3 of the ladder, so the retry succeeds.
    let calls = std::sync::atomic::AtomicU32::new(0);
    assert_eq!(
        unsafe { cudalloc_register_oom_callback(None, std::ptr::null_mut()) },
        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as i32
    );
    assert_eq!(
        unsafe { cudalloc_register_pressure_callback(None, std::ptr::null_mut()) },
        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as i32
    );
    let ud = &calls as *const _ as *mut libc::c_void;
    assert_eq!(
        unsafe { cudalloc_register_oom_callback(Some(free_the_hog), ud) },
        0
    );
    *HOG.lock().unwrap() = cudalloc_malloc(600 << 20, 0, std::ptr::null_mut()) as usize;
    let q = cudalloc_malloc(600 << 20, 0, std::ptr::null_mut());
    assert!(!q.is_null(), "the callback freed the hog");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    cudalloc_free(q, 0, 0, std::ptr::null_mut());
}

// ---- log volume -------------------------------------------------------------

/// What `f` logs through `tracing`, at every level, on this thread.
fn captured_logs(f: impl FnOnce()) -> String {
    cudalloc::global::capture_logs(f).1
}

/// A loop that keeps failing gets its first diagnoses in full, then a
/// line at each power of two: 10,000 failures used to write 5.7 MB.
/// Each error still carries the full diagnosis.
#[test]
fn oom_diagnoses_are_rate_limited() {
    let (a, _) = sim("backend:sim,sim_memory:1GiB,max_memory:64MiB");
    let mut last = String::new();
    let logs = captured_logs(|| {
        for _ in 0..10_000 {
            last = a.malloc(100 << 20, 0, 0).unwrap_err().message;
        }
    });
    assert!(last.contains("largest free block"), "{last}");
    let full = logs.matches("; OOMs so far ").count() as u64;
    assert_eq!(full, cudalloc::engine::OOM_DIAGNOSES_LOGGED, "{logs}");
    // Counts at 8, 16, ..., 8192.
    assert_eq!(
        logs.matches("out-of-memory errors on this device so far")
            .count(),
        11
    );
    assert!(logs.len() < 16 << 10, "{} bytes logged", logs.len());
    assert_eq!(a.stats(0).unwrap().num_ooms, 10_000);
}
