//! The bad-input catalog: one test per row, through the C ABI (the
//! `extern "C"` exports called from Rust). Each row must return a documented
//! error code or do nothing, change no state but the counters it documents,
//! and never crash.
//!
//! The exports share one process-wide allocator, so rows take [`ROW`] (one
//! at a time), compare the stats of every device before and after, and leave
//! nothing live. The row about a bad `CUDALLOC_CONF` runs in a child process;
//! the row about a deinitialised driver uses an [`Allocator`] of its own.

#[allow(dead_code)] // this binary uses part of the shared tree (tests/support/mod.rs)
mod support;

use cudalloc::driver::sim::SimDriver;
use cudalloc::error::ErrorCode;
use cudalloc::ffi::*;
use cudalloc::stats::cudalloc_stats;
use cudalloc::{Allocator, Config};
use libc::{c_int, c_void};
use std::ffi::CStr;
use std::sync::{Arc, Mutex, MutexGuard};

const CONF: &CStr = c"backend:sim,sim_devices:2,sim_memory:1GiB";
const NDEV: c_int = 2;

static ROW: Mutex<()> = Mutex::new(());

/// Take the row lock and make sure the global allocator runs `CONF`.
fn row() -> MutexGuard<'static, ()> {
    let g = ROW.lock().unwrap_or_else(|e| e.into_inner());
    // Invalid frees log warnings by design; keep the test output readable.
    // Set once, under the row lock, before the first init reads it.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::env::set_var("CUDALLOC_LOG", "off"));
    // SAFETY: a NUL-terminated string.
    assert_eq!(unsafe { cudalloc_init(CONF.as_ptr()) }, 0, "{}", msg());
    g
}

fn last() -> ErrorCode {
    ErrorCode::from_i32(cudalloc_last_error()).expect("a documented code")
}

fn msg() -> String {
    let p = cudalloc_last_error_message();
    assert!(!p.is_null(), "the last error message is never NULL");
    // SAFETY: cudalloc returns a NUL-terminated string valid until our next call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn stats(device: c_int) -> cudalloc_stats {
    let mut s = cudalloc_stats::default();
    // SAFETY: `s` is a writable cudalloc_stats.
    assert_eq!(
        unsafe { cudalloc_get_stats(device, &mut s) },
        0,
        "{}",
        msg()
    );
    s
}

fn all_stats() -> Vec<cudalloc_stats> {
    (0..NDEV).map(stats).collect()
}

fn check() {
    assert_eq!(cudalloc_check_invariants(), 0, "{}", msg());
}

fn ptr(v: usize) -> *mut c_void {
    v as *mut c_void
}

/// Stats after a row must equal those before, except the fields `adjust`
/// applies (the documented counters of that row).
fn assert_unchanged(before: &[cudalloc_stats], adjust: impl Fn(usize, &mut cudalloc_stats)) {
    let after = all_stats();
    for (d, (b, a)) in before.iter().zip(&after).enumerate() {
        let mut want = *b;
        adjust(d, &mut want);
        assert_eq!(&want, a, "device {d}: state changed");
    }
    check();
}

fn malloc_ok(size: usize, device: c_int, stream: usize) -> *mut c_void {
    let p = cudalloc_malloc(size, device, ptr(stream));
    assert!(!p.is_null(), "malloc({size}) failed: {}", msg());
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    p
}

const GARBAGE: [usize; 8] = [
    1,
    511,
    0xdead_beef,
    0x1000_0000_0100, // inside the sim's window, but not 512-aligned
    0x0fff_ffff_fe00, // just below device 0's window
    0x3000_0000_0000, // just past device 1's window
    usize::MAX,
    usize::MAX - 511,
];

#[test]
fn row_null_pointers_to_every_export() {
    let _g = row();
    let before = all_stats();
    // SAFETY: NULL is allowed by each signature's contract.
    unsafe {
        assert_eq!(
            cudalloc_get_stats(0, std::ptr::null_mut()),
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as c_int
        );
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT);
        // NULL conf reads CUDALLOC_CONF (unset here: defaults), which is not
        // the configuration in force.
        assert_eq!(
            cudalloc_init(std::ptr::null()),
            ErrorCode::CUDALLOC_ERR_ALREADY_INITIALIZED as c_int
        );
    }
    cudalloc_free(std::ptr::null_mut(), 123, 0, ptr(0x10));
    assert_eq!(last(), ErrorCode::CUDALLOC_OK, "free(NULL) is a no-op");
    cudalloc_free(std::ptr::null_mut(), 0, -7, ptr(usize::MAX));
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    cudalloc_record_stream(std::ptr::null_mut(), ptr(0x10));
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT);
    assert!(!msg().is_empty());
    assert_unchanged(&before, |_, _| {});
}

#[test]
fn row_garbage_pointers_to_every_export() {
    let _g = row();
    let before = all_stats();
    for (i, &g) in GARBAGE.iter().enumerate() {
        let dev = (i % 2) as c_int;
        cudalloc_free(ptr(g), 4096, dev, ptr(g));
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE, "free({g:#x})");
        assert!(msg().contains("not a live"), "{}", msg());
        cudalloc_record_stream(ptr(g), ptr(g));
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER);
    }
    // Garbage codes still give a static, non-NULL string.
    for code in [-1, 1, 41999, 42014, 42099, c_int::MAX, c_int::MIN] {
        let s = cudalloc_error_string(code);
        assert!(!s.is_null());
        // SAFETY: static NUL-terminated strings.
        let s = unsafe { CStr::from_ptr(s) }.to_str().unwrap();
        assert_eq!(s, "unknown cudalloc result code", "code {code}");
    }
    for c in ErrorCode::ALL {
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(cudalloc_error_string(c as c_int)) };
        assert!(!s.to_bytes().is_empty());
    }
    // The version takes nothing that could be bad: static and never NULL.
    // SAFETY: as above.
    let v = unsafe { CStr::from_ptr(cudalloc_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    let half = GARBAGE.len() as u64 / 2;
    assert_unchanged(&before, |_, s| s.num_invalid_frees += half);
}

#[test]
fn row_unknown_and_double_frees() {
    let _g = row();
    let p = malloc_ok(10_000, 1, 0x10);
    let q = malloc_ok(3 << 20, 1, 0x10);
    let before = all_stats();
    for bad in [p as usize + 512, p as usize + 1, q as usize + (1 << 20)] {
        cudalloc_free(ptr(bad), 0, 1, ptr(0x10));
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE);
    }
    assert_unchanged(&before, |d, s| {
        if d == 1 {
            s.num_invalid_frees += 3
        }
    });
    cudalloc_free(p, 10_000, 1, ptr(0x10));
    cudalloc_free(q, 3 << 20, 1, ptr(0x10));
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    let before = all_stats();
    for _ in 0..3 {
        cudalloc_free(p, 10_000, 1, ptr(0x10));
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE);
        cudalloc_free(q, 3 << 20, 0, ptr(0x20)); // double free, other device hint
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE);
    }
    assert_unchanged(&before, |_, s| s.num_invalid_frees += 3);
}

/// The device of a free is a hint only: an invalid free with a device that
/// does not exist is still counted, where the pointer lies (a double free
/// of device 1's block) or else on device 0.
#[test]
fn row_invalid_frees_with_a_bad_device_hint_are_counted() {
    let _g = row();
    let p = malloc_ok(10_000, 1, 0x10);
    cudalloc_free(p, 10_000, 1, ptr(0x10));
    let before = all_stats();
    for dev in [-1, NDEV, 7, c_int::MIN] {
        cudalloc_free(p, 0, dev, ptr(0x10)); // double free
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE, "device {dev}");
        cudalloc_free(ptr(0xdead_beef), 0, dev, ptr(0)); // garbage
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE, "device {dev}");
    }
    assert_unchanged(&before, |_, s| s.num_invalid_frees += 4);
}

/// Whether libstdc++ is in this test process: then the throwing exports
/// throw, which a Rust caller cannot catch, and tests/cxx_alloc_fn.rs covers
/// them instead.
fn cxx_runtime_loaded() -> bool {
    let loaded = cudalloc::ffi::cxx_throw::available();
    if loaded {
        eprintln!("libstdc++ is loaded in this test process; the C++ test covers it");
    }
    loaded
}

/// `cudalloc_malloc_torch` refuses bad input as `cudalloc_malloc` does. In
/// this Rust process there is no C++ runtime, so it returns NULL instead of
/// throwing (the throwing side: tests/cxx_alloc_fn.rs).
#[test]
fn row_malloc_torch_bad_input_without_a_cxx_runtime() {
    let _g = row();
    if cxx_runtime_loaded() {
        return;
    }
    let before = all_stats();
    let stream = ptr(0x10);
    assert!(cudalloc_malloc_torch(4096, -1, stream).is_null());
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
    assert!(cudalloc_malloc_torch(4096, 1 << 20, stream).is_null());
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
    assert!(cudalloc_malloc_torch(0, 0, stream).is_null());
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    assert_unchanged(&before, |_, _| {});
    check();
}

/// `cudalloc_begin_allocate_to_pool` (PyTorch's graph-pool hook) refuses
/// and changes nothing, whatever the device or pool id. Without a C++
/// runtime it cannot throw, so it sets the error and returns (the throwing
/// side: tests/cxx_alloc_fn.rs).
#[test]
fn row_begin_allocate_to_pool_refuses() {
    let _g = row();
    if cxx_runtime_loaded() {
        return;
    }
    let before = all_stats();
    for (device, first, second, code) in [
        (0, 1, 0, ErrorCode::CUDALLOC_ERR_UNSUPPORTED),
        (1, 2, 3, ErrorCode::CUDALLOC_ERR_UNSUPPORTED),
        // A bad device is that, before anything else.
        (-1, 0, 0, ErrorCode::CUDALLOC_ERR_INVALID_DEVICE),
        (NDEV, 1, 0, ErrorCode::CUDALLOC_ERR_INVALID_DEVICE),
        (1 << 20, u64::MAX, 7, ErrorCode::CUDALLOC_ERR_INVALID_DEVICE),
    ] {
        let pool = cudalloc::ffi::cudalloc_mempool_id { first, second };
        // SAFETY: a NULL filter is allowed (and refused before it is read).
        unsafe {
            cudalloc::ffi::cudalloc_begin_allocate_to_pool(device, pool, std::ptr::null_mut())
        };
        assert_eq!(last(), code, "device {device}");
        assert!(msg().contains(&format!("device {device}")), "{}", msg());
    }
    assert_unchanged(&before, |_, _| {});
    check();
}

/// The end and release hooks of a pool nothing began, or of a bad device,
/// set an error and change nothing.
#[test]
fn row_pool_hooks_of_unknown_pools() {
    let _g = row();
    let before = all_stats();
    for (device, first, second) in [(0, 1, 0), (1, u64::MAX, u64::MAX)] {
        let pool = cudalloc::ffi::cudalloc_mempool_id { first, second };
        cudalloc::ffi::cudalloc_end_allocate_to_pool(device, pool);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT);
        assert!(msg().contains("nothing routes to"), "{}", msg());
        cudalloc::ffi::cudalloc_release_pool(device, pool);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT);
        assert!(msg().contains("holds no reference"), "{}", msg());
    }
    for device in [-1, NDEV, c_int::MAX] {
        let pool = cudalloc::ffi::cudalloc_mempool_id {
            first: 1,
            second: 0,
        };
        cudalloc::ffi::cudalloc_end_allocate_to_pool(device, pool);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
        cudalloc::ffi::cudalloc_release_pool(device, pool);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
    }
    assert_unchanged(&before, |_, _| {});
    check();
}

#[test]
fn row_free_with_wrong_device_stream_or_size() {
    let _g = row();
    let before = all_stats();
    let hints: [(c_int, usize, usize); 6] = [
        (1, 0x20, 1),
        (-1, 0, 0),
        (99, 0x30, usize::MAX),
        (c_int::MIN, 0xdead_beef, 12),
        (0, 0x20, 1 << 40),
        (1, 0x10, 0),
    ];
    for (dev, stream, size) in hints {
        let p = malloc_ok(70_000, 0, 0x10);
        let true_size = stats(0).allocated_bytes - before[0].allocated_bytes;
        assert!(true_size >= 70_144);
        cudalloc_free(p, size, dev, ptr(stream));
        assert_eq!(
            last(),
            ErrorCode::CUDALLOC_OK,
            "the table decides, hints ({dev}, {stream:#x}, {size}) are only hints: {}",
            msg()
        );
        assert_eq!(stats(0).allocated_bytes, before[0].allocated_bytes);
        assert_eq!(stats(1).allocated_bytes, before[1].allocated_bytes);
    }
    check();
}

#[test]
fn row_negative_or_huge_device_index() {
    let _g = row();
    let before = all_stats();
    for dev in [-1, -2, NDEV, NDEV + 1, 64, c_int::MAX, c_int::MIN] {
        let p = cudalloc_malloc(4096, dev, ptr(0));
        assert!(p.is_null());
        assert_eq!(
            last(),
            ErrorCode::CUDALLOC_ERR_INVALID_DEVICE,
            "device {dev}"
        );
        assert!(msg().contains("device"), "{}", msg());
        let mut s = cudalloc_stats::default();
        // SAFETY: `s` is writable.
        let rc = unsafe { cudalloc_get_stats(dev, &mut s) };
        assert_eq!(rc, ErrorCode::CUDALLOC_ERR_INVALID_DEVICE as c_int);
        assert_eq!(s, cudalloc_stats::default(), "out untouched on error");
        cudalloc_reset_peak_stats(dev);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
        cudalloc_reset_accumulated_stats(dev);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
        cudalloc_set_memory_fraction(0.5, dev);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
        assert_eq!(cudalloc_get_memory_fraction(dev), -1.0);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
        cudalloc_init_devices(dev); // a mismatch is only logged
        assert_eq!(last(), ErrorCode::CUDALLOC_OK);
        assert_eq!(cudalloc_can_allocate(4096, dev, ptr(0)), -1);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
        assert_eq!(cudalloc_can_allocate(0, dev, ptr(0)), -1, "size 0 too");
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
        assert_eq!(cudalloc_is_low_memory(dev), -1);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
    }
    assert_eq!(cudalloc_device_count(), NDEV);
    assert_unchanged(&before, |_, _| {});
}

#[test]
fn row_size_max_and_overflowing_sizes() {
    let _g = row();
    let before = all_stats();
    let sizes = [usize::MAX, usize::MAX - 510, 1 << 50, (1 << 30) + 1];
    for size in sizes {
        // Asked first: the answer is no, and asking changes nothing.
        assert_eq!(cudalloc_can_allocate(size, 0, ptr(0x10)), 0, "size {size}");
        assert_eq!(last(), ErrorCode::CUDALLOC_OK);
        let p = cudalloc_malloc(size, 0, ptr(0x10));
        assert!(p.is_null(), "size {size}");
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY, "size {size}");
        assert!(msg().contains("out of memory"), "{}", msg());
    }
    let n = sizes.len() as u64;
    assert_unchanged(&before, |d, s| {
        if d == 0 {
            s.num_ooms += n;
        }
    });
}

#[test]
fn row_record_stream_on_unknown_pointers() {
    let _g = row();
    let p = malloc_ok(8192, 0, 0x10);
    let before = all_stats();
    cudalloc_record_stream(ptr(p as usize + 512), ptr(0x20));
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER);
    assert_unchanged(&before, |_, _| {});
    cudalloc_free(p, 0, 0, ptr(0x10));
    let before = all_stats();
    cudalloc_record_stream(p, ptr(0x20)); // freed
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER);
    assert!(msg().contains("not a live"), "{}", msg());
    assert_unchanged(&before, |_, _| {});
}

/// Bad `CUDALLOC_CONF` strings of many shapes: `cudalloc_init` refuses each
/// with `CUDALLOC_ERR_CONFIG` and a message naming the problem, and nothing
/// changes. The same strings through `Config::parse` fail the same way.
#[test]
fn row_bad_config_strings() {
    let long_key = "k".repeat(100_000);
    let long_value = format!("sim_memory:{}", "9".repeat(10_000));
    let bad: Vec<&str> = vec![
        "bogus:1",
        "sim_memory",
        ":",
        "::",
        ":1GiB",
        "sim_memory:",
        "sim_memory:-1",
        "sim_memory:0",
        "sim_memory:1XB",
        "sim_memory:1e30",
        "sim_memory:99999999999T",
        "sim_memory:１GiB",
        "sim_memory:nan",
        "sim_memory:1.5.5G",
        "sim_devices:0",
        "sim_devices:65",
        "sim_devices:-1",
        "sim_devices:99999999999999999999999",
        "sim_devices:1.5",
        "memory_fraction:NaN",
        "memory_fraction:inf",
        "memory_fraction:0",
        "memory_fraction:-0.5",
        "memory_fraction:1.0000001",
        "small_max:1000",
        "small_max:0",
        "small_segment:512K",
        "large_segment:1MiB",
        "huge_threshold:512",
        "huge_split:maybe",
        "huge_split:ON",
        "backend:gpu",
        "backend:SIM",
        "sim_events:maybe",
        "sim_fail_alloc:-3",
        "max_memory:lots",
        "reserve:lots",
        "reserve:",
        "reserve:-1GiB",
        "reserve:1GiB|",
        "reserve:1GiB||2GiB",
        "reserve:1GiB|x",
        "reserve:1GiB;2GiB",
        "reserve:1GiB/2GiB",
        "reserve:2GiB,max_memory:1GiB",
        "sim_memory:1GiB,,bogus",
        "sim_memory:1GiB;sim_devices:2",
        "sim_memory=1GiB",
        "\tsim_memory\t:\t1 GiB\t,x",
        &long_key,
        &long_value,
    ];
    let _g = row();
    let before = all_stats();
    for s in &bad {
        let e = Config::parse(s).expect_err(s);
        assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_CONFIG, "{s:?}");
        assert!(e.message.starts_with("configuration: "), "{s:?}: {e}");
        let c = std::ffi::CString::new(s.replace('\0', "")).unwrap();
        // SAFETY: a NUL-terminated string.
        let rc = unsafe { cudalloc_init(c.as_ptr()) };
        assert_eq!(rc, ErrorCode::CUDALLOC_ERR_CONFIG as c_int, "{s:?}");
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_CONFIG);
    }
    // Not valid UTF-8.
    let raw = [b's', b'i', b'm', 0xff, 0xfe, b':', b'1', 0];
    // SAFETY: NUL-terminated.
    let rc = unsafe { cudalloc_init(raw.as_ptr() as *const libc::c_char) };
    assert_eq!(rc, ErrorCode::CUDALLOC_ERR_CONFIG as c_int);
    // Valid strings that differ from the one in force, empty ones included.
    for s in [
        c"",
        c",",
        c" , ",
        c"sim_devices:3",
        c"backend:sim,sim_devices:2",
    ] {
        // SAFETY: NUL-terminated.
        let rc = unsafe { cudalloc_init(s.as_ptr()) };
        assert_eq!(
            rc,
            ErrorCode::CUDALLOC_ERR_ALREADY_INITIALIZED as c_int,
            "{s:?}"
        );
    }
    // The one in force, respelt: fine.
    // SAFETY: NUL-terminated.
    let rc =
        unsafe { cudalloc_init(c" sim_memory : 1024MiB , backend:sim,sim_devices:2 ".as_ptr()) };
    assert_eq!(rc, 0, "{}", msg());
    assert_eq!(cudalloc_device_count(), NDEV);
    assert_unchanged(&before, |_, _| {});
}

#[test]
fn row_bad_memory_fractions() {
    let _g = row();
    let before = all_stats();
    for f in [
        0.0,
        -0.0,
        -1.0,
        1.0 + 1e-9,
        2.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        cudalloc_set_memory_fraction(f, 0);
        assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT, "{f}");
        assert_eq!(
            cudalloc_get_memory_fraction(0),
            1.0,
            "{f} changed the fraction"
        );
        assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    }
    assert_unchanged(&before, |_, _| {});
}

#[test]
fn row_calls_after_empty_cache() {
    let _g = row();
    let keep = malloc_ok(300_000, 0, 0x10);
    let gone = malloc_ok(300_000, 0, 0x10);
    cudalloc_free(gone, 0, 0, ptr(0x10));
    cudalloc_empty_cache();
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    cudalloc_empty_cache();
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    check();
    let before = all_stats();
    assert_eq!(before[0].pending_free_bytes, 0);
    cudalloc_free(gone, 0, 0, ptr(0x10));
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE);
    cudalloc_record_stream(gone, ptr(0x20));
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER);
    assert_unchanged(&before, |d, s| {
        if d == 0 {
            s.num_invalid_frees += 1
        }
    });
    // The live allocation survived the flush and still frees.
    cudalloc_record_stream(keep, ptr(0x20));
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    cudalloc_free(keep, 0, 0, ptr(0x10));
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    let p = malloc_ok(300_000, 0, 0x10);
    cudalloc_free(p, 0, 0, ptr(0x10));
    cudalloc_empty_cache();
    check();
}

/// Many threads race every export: their own allocations, frees of the
/// others' pointers (exactly one free of a pointer wins), record_stream on
/// pointers that may be freed meanwhile, stats, empty_cache. The counters add
/// up exactly at the end.
#[test]
fn row_calls_racing_from_many_threads() {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let _g = row();
    let before = all_stats();
    // The live pointers as the test knows them, and "debts": an address freed
    // (by a thread holding an old copy of it) after another thread's malloc
    // returned it but before that thread recorded it. The recording then
    // settles the debt instead of leaving a stale entry.
    let shared: Arc<Mutex<Vec<usize>>> = Arc::default();
    let debts: Arc<Mutex<std::collections::HashMap<usize, u32>>> = Arc::default();
    let (oks, invalid) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mallocs = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (shared, oks, invalid, mallocs, debts) = (
                shared.clone(),
                oks.clone(),
                invalid.clone(),
                mallocs.clone(),
                debts.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = support::ops::Mix(t);
                let dev = (t % 2) as c_int;
                for i in 0..2000 {
                    let r = rng.next();
                    match r % 10 {
                        0..=2 => {
                            let size = [512, 4096, 100_000, 3 << 20][(r >> 8) as usize % 4];
                            let p = cudalloc_malloc(size, dev, ptr(0x10 * (t as usize % 4)));
                            if p.is_null() {
                                // Possible in principle (8 threads, 1 GiB): an OOM, never another error.
                                assert_eq!(last(), ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
                            } else {
                                mallocs.fetch_add(1, Relaxed);
                                let mut s = shared.lock().unwrap();
                                let mut d = debts.lock().unwrap();
                                match d.get_mut(&(p as usize)) {
                                    Some(n) if *n > 0 => *n -= 1,
                                    _ => s.push(p as usize),
                                }
                            }
                        }
                        3..=6 => {
                            // Two threads may pick the same pointer: one wins.
                            let p = {
                                let s = shared.lock().unwrap();
                                s.get((r >> 16) as usize % s.len().max(1)).copied()
                            };
                            if let Some(p) = p {
                                cudalloc_free(ptr(p), 0, dev, ptr(0));
                                match last() {
                                    ErrorCode::CUDALLOC_OK => {
                                        oks.fetch_add(1, Relaxed);
                                        // One entry only: once freed, p may already be
                                        // another thread's new allocation, pushed again.
                                        let mut s = shared.lock().unwrap();
                                        if let Some(i) = s.iter().position(|&x| x == p) {
                                            s.swap_remove(i);
                                        } else {
                                            // Its malloc has not recorded it yet.
                                            *debts.lock().unwrap().entry(p).or_default() += 1;
                                        }
                                    }
                                    ErrorCode::CUDALLOC_ERR_INVALID_FREE => {
                                        invalid.fetch_add(1, Relaxed);
                                    }
                                    c => panic!("free: {c:?}"),
                                }
                            }
                        }
                        7 => {
                            let p = shared.lock().unwrap().last().copied().unwrap_or(1);
                            cudalloc_record_stream(ptr(p), ptr(0x40));
                            let c = last();
                            assert!(
                                c == ErrorCode::CUDALLOC_OK
                                    || c == ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER,
                                "{c:?}"
                            );
                        }
                        8 => {
                            let s = stats(dev);
                            assert!(s.reserved_bytes >= s.allocated_bytes);
                        }
                        _ if i % 100 == 9 => cudalloc_empty_cache(),
                        _ => {
                            cudalloc_free(
                                ptr(GARBAGE[(r >> 8) as usize % GARBAGE.len()]),
                                0,
                                dev,
                                ptr(0),
                            );
                            assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE);
                            invalid.fetch_add(1, Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no thread panicked");
    }
    for p in shared.lock().unwrap().drain(..) {
        cudalloc_free(ptr(p), 0, 0, ptr(0));
        assert_eq!(last(), ErrorCode::CUDALLOC_OK);
        oks.fetch_add(1, Relaxed);
    }
    check();
    let after = all_stats();
    let sum = |f: fn(&cudalloc_stats) -> u64, v: &[cudalloc_stats]| v.iter().map(f).sum::<u64>();
    assert_eq!(
        sum(|s| s.num_allocs, &after) - sum(|s| s.num_allocs, &before),
        mallocs.load(Relaxed)
    );
    assert_eq!(
        sum(|s| s.num_frees, &after) - sum(|s| s.num_frees, &before),
        oks.load(Relaxed)
    );
    assert_eq!(mallocs.load(Relaxed), oks.load(Relaxed));
    assert_eq!(
        sum(|s| s.num_invalid_frees, &after) - sum(|s| s.num_invalid_frees, &before),
        invalid.load(Relaxed)
    );
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (a.allocated_bytes, a.active_allocations, a.requested_bytes),
            (b.allocated_bytes, b.active_allocations, b.requested_bytes)
        );
    }
}

/// After the driver reports itself deinitialised (process exit), every call
/// returns an error or does its cache-only work; nothing panics and the
/// structures stay whole. The C ABI's global cannot be deinitialised from a
/// test, so this row drives an `Allocator` over its own sim device.
#[test]
fn row_calls_after_the_driver_deinitialised() {
    let c = Config::parse("sim_devices:2,sim_memory:1GiB").unwrap();
    let d = Arc::new(SimDriver::new(2, 1 << 30));
    let a = Allocator::new(c, d.clone());
    let live = a.malloc(4096, 0, 0x10).unwrap();
    let cached = a.malloc(4096, 0, 0x10).unwrap();
    let big = a.malloc(30 << 20, 1, 0x20).unwrap();
    a.record_stream(big, 0x30).unwrap();
    a.free(cached, Some(0), 0x10).unwrap();
    d.set_deinitialized(true);
    // Cache hit: no driver call needed.
    let again = a.malloc(4096, 0, 0x10).unwrap();
    assert_eq!(again, cached);
    // A miss needs the driver: a clean error, not a panic.
    let e = a.malloc(64 << 20, 0, 0x10).unwrap_err();
    assert!(
        [
            ErrorCode::CUDALLOC_ERR_SHUTTING_DOWN,
            ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY
        ]
        .contains(&e.code),
        "{e:?}"
    );
    // Frees work (the record_stream event cannot be recorded: it syncs, which
    // fails quietly), and so does releasing the cache.
    a.free(big, Some(1), 0x20).unwrap();
    a.free(again, Some(0), 0x10).unwrap();
    a.free(live, Some(0), 0x10).unwrap();
    assert!(a.free(live, Some(0), 0x10).is_err());
    a.empty_cache();
    a.reset_peak(0).unwrap();
    a.set_memory_fraction(0.5, 1).unwrap();
    assert!(a.stats(0).is_ok() && a.stats(1).is_ok());
    a.check_invariants().unwrap();
    for dev in 0..2 {
        let s = a.stats(dev).unwrap();
        assert_eq!((s.active_allocations, s.allocated_bytes), (0, 0));
        assert_eq!(s.reserved_bytes, 0, "released segments are forgotten");
    }
}

/// A bad `CUDALLOC_CONF` in the environment: every export fails cleanly with
/// `CUDALLOC_ERR_CONFIG` (or does nothing), an explicit `cudalloc_init` too
/// (the operator's setting overrides the program's, and is never ignored).
/// Runs in a child process with that environment.
#[test]
fn row_every_export_with_a_bad_environment() {
    if std::env::var_os("CUDALLOC_CATALOG_CHILD").is_none() {
        // Under the row lock: `row()` may set CUDALLOC_LOG meanwhile, and
        // spawning reads the environment.
        let _g = ROW.lock().unwrap_or_else(|e| e.into_inner());
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "row_every_export_with_a_bad_environment",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CUDALLOC_CATALOG_CHILD", "1")
            .env("CUDALLOC_CONF", "sim_memory:lots,bogus")
            .env("CUDALLOC_LOG", "off")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "child failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let cfg = ErrorCode::CUDALLOC_ERR_CONFIG;
    assert!(cudalloc_malloc(4096, 0, ptr(0)).is_null());
    assert_eq!(last(), cfg);
    assert!(msg().contains("sim_memory"), "{}", msg());
    cudalloc_free(ptr(0x1000_0000_0000), 0, 0, ptr(0));
    assert_eq!(last(), cfg);
    cudalloc_free(std::ptr::null_mut(), 0, 0, ptr(0));
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    cudalloc_record_stream(ptr(0x1000), ptr(0));
    assert_eq!(last(), cfg);
    cudalloc_empty_cache();
    assert_eq!(last(), cfg);
    let mut s = cudalloc_stats::default();
    // SAFETY: `s` is writable.
    assert_eq!(unsafe { cudalloc_get_stats(0, &mut s) }, cfg as c_int);
    cudalloc_reset_peak_stats(0);
    assert_eq!(last(), cfg);
    cudalloc_reset_accumulated_stats(0);
    assert_eq!(last(), cfg);
    cudalloc_set_memory_fraction(0.5, 0);
    assert_eq!(last(), cfg);
    assert_eq!(cudalloc_get_memory_fraction(0), -1.0);
    assert_eq!(last(), cfg);
    let pool = cudalloc_mempool_id {
        first: 1,
        second: 0,
    };
    cudalloc_end_allocate_to_pool(0, pool);
    assert_eq!(last(), cfg);
    cudalloc_release_pool(0, pool);
    assert_eq!(last(), cfg);
    cudalloc_init_devices(1);
    assert_eq!(last(), cfg);
    assert_eq!(cudalloc_can_allocate(4096, 0, ptr(0)), -1);
    assert_eq!(last(), cfg);
    assert_eq!(cudalloc_is_low_memory(0), -1);
    assert_eq!(last(), cfg);
    assert_eq!(cudalloc_device_count(), -1);
    assert_eq!(cudalloc_check_invariants(), cfg as c_int);
    // SAFETY: NULL reads the (bad) environment.
    assert_eq!(unsafe { cudalloc_init(std::ptr::null()) }, cfg as c_int);
    // SAFETY: NUL-terminated.
    assert_eq!(unsafe { cudalloc_init(CONF.as_ptr()) }, cfg as c_int);
    assert!(
        msg().starts_with("CUDALLOC_CONF: key 'sim_memory'"),
        "{}",
        msg()
    );
    // With the operator's setting gone, the program's string is used.
    std::env::remove_var("CUDALLOC_CONF");
    // SAFETY: NUL-terminated.
    assert_eq!(unsafe { cudalloc_init(CONF.as_ptr()) }, 0, "{}", msg());
    let p = malloc_ok(4096, 1, 0);
    cudalloc_free(p, 0, 1, ptr(0));
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    check();
}

/// The snapshot's text: a size query, then the text.
fn snapshot_text() -> serde_json::Value {
    // SAFETY (both calls): NULL with length 0 is the size query; `buf` holds `len` bytes.
    let need = unsafe { cudalloc_snapshot_json(std::ptr::null_mut(), 0) };
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    let mut buf = vec![0 as libc::c_char; need + 4096];
    let n = unsafe { cudalloc_snapshot_json(buf.as_mut_ptr(), buf.len()) };
    assert_eq!(last(), ErrorCode::CUDALLOC_OK, "{}", msg());
    // SAFETY: the export wrote a NUL-terminated string of n - 1 bytes.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
    assert_eq!(text.len() + 1, n);
    serde_json::from_str(text).unwrap()
}

#[test]
fn row_snapshot_exports_refuse_bad_buffers_and_an_empty_history() {
    let _g = row();
    let before = all_stats();
    let mut buf = [0x55 as libc::c_char; 8];
    // SAFETY: a NULL buffer with a nonzero length must be refused, not written.
    assert_eq!(
        unsafe { cudalloc_snapshot_json(std::ptr::null_mut(), 64) },
        0
    );
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT);
    // SAFETY: `buf` holds 8 writable bytes.
    let need = unsafe { cudalloc_snapshot_json(buf.as_mut_ptr(), buf.len()) };
    assert!(need > buf.len());
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_BUFFER_TOO_SMALL);
    assert!(
        buf.iter().all(|&b| b == 0x55),
        "a too-small buffer was written"
    );
    // Switching on with room for nothing is refused and changes nothing.
    assert_eq!(
        cudalloc_record_memory_history(1, 0, 0),
        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as c_int
    );
    assert!(msg().contains("max_entries"), "{}", msg());
    let p = malloc_ok(4096, 1, 0x10);
    cudalloc_free(p, 0, 1, ptr(0x10));
    let v = snapshot_text();
    assert_eq!(v["device_traces"], serde_json::json!([[], []]), "still off");
    // On, the same pair is recorded; off again drops it.
    assert_eq!(cudalloc_record_memory_history(1, 16, 1), 0);
    let p = malloc_ok(4096, 1, 0x10);
    cudalloc_free(p, 0, 1, ptr(0x10));
    let v = snapshot_text();
    let actions: Vec<&str> = v["device_traces"][1]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["alloc", "free_requested", "free_completed"]);
    let v = snapshot_text();
    assert_eq!(
        v["device_traces"][1][3]["action"], "snapshot",
        "the last one's mark"
    );
    assert_eq!(
        v["device_traces"][1].as_array().unwrap().len(),
        4,
        "a size query marks nothing"
    );
    assert_eq!(v["device_traces"][1][0]["addr"], p as u64);
    assert_eq!(
        cudalloc_record_memory_history(0, 0, 0),
        0,
        "off needs no size"
    );
    assert_eq!(
        snapshot_text()["device_traces"],
        serde_json::json!([[], []])
    );
    for (b, a) in before.iter().zip(&all_stats()) {
        assert_eq!(
            (a.allocated_bytes, a.active_allocations, a.num_invalid_frees),
            (b.allocated_bytes, b.active_allocations, b.num_invalid_frees)
        );
    }
    check();
}

/// Every function in the committed header has a row above: when an export
/// is added, add it to a row and to this list.
#[test]
fn row_observability_exports_with_bad_buffers_and_callbacks() {
    let _g = row();
    let before = all_stats();
    let p = malloc_ok(3000, 0, 0x10); // something for the reports to list
    let with_p = all_stats();
    let mut buf = [0x55 as libc::c_char; 8];
    for age in [f64::NAN, -1.0, f64::NEG_INFINITY] {
        // SAFETY: NULL buffer with length 0 is the documented size query.
        assert_eq!(
            unsafe { cudalloc_leak_report(age, 0, std::ptr::null_mut(), 0) },
            0
        );
        assert_eq!(
            last(),
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
            "age {age}"
        );
    }
    // SAFETY: a NULL buffer with a nonzero length must be refused, not written.
    assert_eq!(
        unsafe { cudalloc_leak_report(0.0, 1, std::ptr::null_mut(), 64) },
        0
    );
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT);
    // SAFETY: a NULL buffer with a nonzero length must be refused, not written.
    assert_eq!(unsafe { cudalloc_stats_json(std::ptr::null_mut(), 64) }, 0);
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT);
    // Too small: the size needed comes back, nothing is written.
    // SAFETY: `buf` holds 1 writable byte at least.
    let need = unsafe { cudalloc_leak_report(0.0, 0, buf.as_mut_ptr(), 1) };
    assert!(need > 1);
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_BUFFER_TOO_SMALL);
    // SAFETY: `buf` holds 8 writable bytes.
    let need_json = unsafe { cudalloc_stats_json(buf.as_mut_ptr(), buf.len()) };
    assert!(need_json > buf.len());
    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_BUFFER_TOO_SMALL);
    assert!(
        buf.iter().all(|&b| b == 0x55),
        "a too-small buffer was written"
    );
    // A right-sized buffer works.
    let mut big = vec![0 as libc::c_char; need_json];
    // SAFETY: `big` holds `need_json` writable bytes.
    assert_eq!(
        unsafe { cudalloc_stats_json(big.as_mut_ptr(), big.len()) },
        need_json
    );
    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    // NULL callbacks are refused.
    // SAFETY: a NULL callback with a NULL user pointer.
    assert_eq!(
        unsafe { cudalloc_register_oom_callback(None, std::ptr::null_mut()) },
        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as c_int
    );
    // SAFETY: as above.
    assert_eq!(
        unsafe { cudalloc_register_pressure_callback(None, std::ptr::null_mut()) },
        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as c_int
    );
    assert_unchanged(&with_p, |_, _| {});
    cudalloc_free(p, 0, 0, ptr(0x10));
    let after = all_stats();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (a.allocated_bytes, a.active_allocations, a.requested_bytes),
            (b.allocated_bytes, b.active_allocations, b.requested_bytes)
        );
        assert_eq!(a.num_invalid_frees, b.num_invalid_frees);
    }
    check();
}

#[test]
fn every_export_in_the_header_is_in_the_catalog() {
    const COVERED: &[&str] = &[
        "cudalloc_malloc",
        "cudalloc_malloc_torch",
        "cudalloc_begin_allocate_to_pool",
        "cudalloc_end_allocate_to_pool",
        "cudalloc_release_pool",
        "cudalloc_free",
        "cudalloc_record_stream",
        "cudalloc_empty_cache",
        "cudalloc_get_stats",
        "cudalloc_reset_peak_stats",
        "cudalloc_reset_accumulated_stats",
        "cudalloc_set_memory_fraction",
        "cudalloc_get_memory_fraction",
        "cudalloc_init",
        "cudalloc_init_devices",
        "cudalloc_device_count",
        "cudalloc_check_invariants",
        "cudalloc_last_error",
        "cudalloc_last_error_message",
        "cudalloc_error_string",
        "cudalloc_version",
        "cudalloc_leak_report",
        "cudalloc_stats_json",
        "cudalloc_snapshot_json",
        "cudalloc_record_memory_history",
        "cudalloc_register_oom_callback",
        "cudalloc_register_pressure_callback",
        "cudalloc_can_allocate",
        "cudalloc_is_low_memory",
    ];
    let header =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/cudalloc.h"))
            .unwrap();
    let missing: Vec<&str> = header
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('*') && l.contains('('))
        .filter_map(|l| {
            let name = l.split('(').next()?.split_whitespace().last()?;
            let name = name.trim_start_matches('*');
            name.starts_with("cudalloc_").then_some(name)
        })
        .filter(|n| !COVERED.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "exports without a bad-input row: {missing:?}"
    );
}
