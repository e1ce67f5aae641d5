//! The two fuzz targets' bodies, shared by `cargo fuzz` (fuzz_targets/) and
//! by the proptest replay in `tests/fuzz_replay.rs`, which runs them in CI
//! where no nightly toolchain is available.
//!
//! - [`c_abi`] decodes bytes into a sequence of C ABI calls on the
//!   process-wide allocator and checks each result against the documented
//!   contract; every input frees what it allocated, so inputs are independent.
//! - [`conf_parser`] feeds bytes to `Config::parse` and checks that it either
//!   returns a configuration satisfying its own rules or a `CUDALLOC_ERR_CONFIG`
//!   error, and that a failed `apply` changes nothing.

#![allow(dead_code)]

use cudalloc::error::ErrorCode;
use cudalloc::ffi::*;
use cudalloc::stats::cudalloc_stats;
use cudalloc::Config;
use libc::{c_int, c_void};
use std::ffi::{CStr, CString};

/// The configuration the C ABI target runs (auto events: no test can
/// complete streams through the C ABI).
pub const CONF: &str = "backend:sim,sim_devices:2,sim_memory:256MiB";

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| acc << 8 | self.u8() as u64)
    }
    fn empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn last() -> ErrorCode {
    ErrorCode::from_i32(cudalloc_last_error()).expect("last error is a documented code")
}

fn message() -> String {
    let p = cudalloc_last_error_message();
    assert!(!p.is_null());
    // SAFETY: NUL-terminated, valid until this thread's next cudalloc call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn ptr(v: u64) -> *mut c_void {
    v as usize as *mut c_void
}

/// Initialise the global allocator with [`CONF`] (idempotent).
pub fn init() {
    static QUIET: std::sync::Once = std::sync::Once::new();
    // Invalid frees and OOMs log by design; fuzzing makes millions of them.
    QUIET.call_once(|| std::env::set_var("CUDALLOC_LOG", "off"));
    let c = CString::new(CONF).unwrap();
    // SAFETY: NUL-terminated.
    assert_eq!(unsafe { cudalloc_init(c.as_ptr()) }, 0, "{}", message());
}

const DEVICES: [c_int; 6] = [0, 1, 0, 1, -1, 2];
const STREAMS: [u64; 4] = [0, 0x10, 0x20, 0xdead_beef];

fn size(b: &mut Bytes) -> usize {
    match b.u8() % 8 {
        0 => 0,
        1..=3 => [1, 512, 513, 4096, 65_536, 1 << 20, (1 << 20) + 1, 3 << 20][b.u8() as usize % 8],
        4 | 5 => (b.u64() % (2 << 20)) as usize,
        6 => (b.u64() % (300 << 20)) as usize,
        _ => b.u64() as usize,
    }
}

/// Run the ops `data` encodes against the C ABI. Panics on a contract breach.
pub fn c_abi(data: &[u8]) {
    init();
    let mut b = Bytes(data);
    let mut live: Vec<u64> = Vec::new();
    let mut freed: Vec<u64> = Vec::new();
    let mut ops = 0;
    while !b.empty() && ops < 2000 {
        ops += 1;
        match b.u8() % 12 {
            0 => {
                let (n, dev) = (size(&mut b), DEVICES[b.u8() as usize % 6]);
                let p = cudalloc_malloc(n, dev, ptr(STREAMS[b.u8() as usize % 4])) as u64;
                let code = last();
                if p != 0 {
                    assert_eq!(code, ErrorCode::CUDALLOC_OK);
                    assert_eq!(p % 512, 0, "unaligned {p:#x}");
                    assert!(!live.contains(&p), "{p:#x} handed out twice");
                    live.push(p);
                    freed.retain(|&q| q != p);
                } else if n == 0 {
                    // Size 0 is NULL and no error; with a bad device it is
                    // INVALID_DEVICE for negative indices (checked in the
                    // ffi layer) but OK past the count (the engine checks
                    // size first). Either is documented; both are accepted.
                    assert!(
                        code == ErrorCode::CUDALLOC_OK
                            || (!(0..2).contains(&dev)
                                && code == ErrorCode::CUDALLOC_ERR_INVALID_DEVICE),
                        "{code:?}"
                    );
                } else if !(0..2).contains(&dev) {
                    assert_eq!(code, ErrorCode::CUDALLOC_ERR_INVALID_DEVICE);
                } else {
                    assert_eq!(code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY, "{}", message());
                }
            }
            1 if !live.is_empty() => {
                let p = live.swap_remove(b.u8() as usize % live.len());
                let dev = DEVICES[b.u8() as usize % 6];
                cudalloc_free(
                    ptr(p),
                    b.u64() as usize,
                    dev,
                    ptr(STREAMS[b.u8() as usize % 4]),
                );
                assert_eq!(last(), ErrorCode::CUDALLOC_OK, "{}", message());
                freed.push(p);
            }
            2 => {
                let g = b.u64();
                cudalloc_free(ptr(g), 0, DEVICES[b.u8() as usize % 6], ptr(0));
                if g == 0 {
                    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
                } else if let Some(i) = live.iter().position(|&q| q == g) {
                    assert_eq!(last(), ErrorCode::CUDALLOC_OK);
                    freed.push(live.swap_remove(i));
                } else {
                    assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE);
                }
            }
            3 if !freed.is_empty() => {
                let p = freed[b.u8() as usize % freed.len()];
                cudalloc_free(ptr(p), 0, DEVICES[b.u8() as usize % 6], ptr(0));
                assert_eq!(last(), ErrorCode::CUDALLOC_ERR_INVALID_FREE);
            }
            4 => {
                let pick = b.u8() as usize;
                let p = if live.is_empty() || pick % 2 == 0 {
                    b.u64()
                } else {
                    live[pick % live.len()]
                };
                cudalloc_record_stream(ptr(p), ptr(STREAMS[b.u8() as usize % 4]));
                let want = if p == 0 {
                    ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
                } else if live.contains(&p) {
                    ErrorCode::CUDALLOC_OK
                } else {
                    ErrorCode::CUDALLOC_ERR_UNKNOWN_POINTER
                };
                assert_eq!(last(), want);
            }
            5 => {
                cudalloc_empty_cache();
                assert_eq!(last(), ErrorCode::CUDALLOC_OK);
            }
            6 => {
                let dev = DEVICES[b.u8() as usize % 6];
                let mut s = cudalloc_stats::default();
                let out = if b.u8() % 4 == 0 {
                    std::ptr::null_mut()
                } else {
                    &mut s as *mut cudalloc_stats
                };
                // SAFETY: `out` is NULL or points to `s`.
                let rc = unsafe { cudalloc_get_stats(dev, out) };
                let want = if out.is_null() {
                    ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
                } else if !(0..2).contains(&dev) {
                    ErrorCode::CUDALLOC_ERR_INVALID_DEVICE
                } else {
                    ErrorCode::CUDALLOC_OK
                };
                assert_eq!(rc, want as c_int);
                if want == ErrorCode::CUDALLOC_OK {
                    assert_eq!(
                        s.reserved_bytes,
                        s.allocated_bytes + s.cached_free_bytes + s.pending_free_bytes
                    );
                    assert!(s.allocated_bytes_peak >= s.allocated_bytes);
                    assert!(s.reserved_bytes_peak >= s.reserved_bytes);
                }
            }
            7 => {
                let dev = DEVICES[b.u8() as usize % 6];
                cudalloc_reset_peak_stats(dev);
                let ok = (0..2).contains(&dev);
                assert_eq!(last() == ErrorCode::CUDALLOC_OK, ok);
            }
            8 => {
                let f = match b.u8() % 3 {
                    0 => f64::from_bits(b.u64()),
                    _ => (b.u8() as f64 + 1.0) / 200.0,
                };
                let dev = DEVICES[b.u8() as usize % 6];
                cudalloc_set_memory_fraction(f, dev);
                let want = if !(0..2).contains(&dev) {
                    ErrorCode::CUDALLOC_ERR_INVALID_DEVICE
                } else if f > 0.0 && f <= 1.0 {
                    ErrorCode::CUDALLOC_OK
                } else {
                    ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT
                };
                assert_eq!(last(), want, "fraction {f}");
            }
            9 => {
                let n = b.u8() as usize % 48;
                let raw: Vec<u8> = (0..n).map(|_| b.u8()).filter(|&c| c != 0).collect();
                let c = CString::new(raw).unwrap();
                // SAFETY: NUL-terminated.
                let rc = unsafe { cudalloc_init(c.as_ptr()) };
                let code = ErrorCode::from_i32(rc).expect("documented code");
                assert!(
                    [
                        ErrorCode::CUDALLOC_OK,
                        ErrorCode::CUDALLOC_ERR_CONFIG,
                        ErrorCode::CUDALLOC_ERR_ALREADY_INITIALIZED
                    ]
                    .contains(&code),
                    "{code:?}"
                );
                if code == ErrorCode::CUDALLOC_OK {
                    assert_eq!(Config::parse(c.to_str().unwrap()), Config::parse(CONF));
                }
            }
            10 => {
                let code = b.u64() as c_int;
                assert!(!cudalloc_error_string(code).is_null());
                let _ = message();
            }
            _ => {
                assert_eq!(cudalloc_check_invariants(), 0, "{}", message());
            }
        }
    }
    for p in live {
        cudalloc_free(ptr(p), 0, 0, ptr(0));
        assert_eq!(last(), ErrorCode::CUDALLOC_OK);
    }
    for dev in 0..2 {
        cudalloc_set_memory_fraction(1.0, dev);
    }
    assert_eq!(cudalloc_check_invariants(), 0, "{}", message());
}

/// Check the configuration parser on arbitrary bytes.
pub fn conf_parser(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    match Config::parse(&s) {
        Ok(c) => {
            assert!((1..=64).contains(&c.sim_devices));
            assert!(c.sim_memory > 0);
            assert!(c.memory_fraction > 0.0 && c.memory_fraction <= 1.0);
            for v in [
                c.small_max,
                c.small_segment,
                c.large_segment,
                c.huge_threshold,
                c.huge_round,
            ] {
                assert!(v > 0 && v % 512 == 0, "{v}");
            }
            assert!(c.small_segment >= c.small_max);
            assert!(c.large_segment > c.small_max && c.huge_threshold > c.small_max);
            assert_eq!(Config::parse(&s).unwrap(), c, "parsing is deterministic");
            let r = c.render();
            assert!(r.lines().count() >= 10);
        }
        Err(e) => {
            assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_CONFIG);
            assert!(e.message.starts_with("configuration: "), "{e}");
            let mut d = Config::parse("sim_devices:3").unwrap();
            let before = d.clone();
            assert!(d.apply(&s).is_err());
            assert_eq!(d, before, "a failed apply changed the configuration");
        }
    }
}
