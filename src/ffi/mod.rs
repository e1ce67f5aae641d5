//! The C ABI: every `extern "C"` export of `libcudalloc.so`.
//!
//! Conventions (also in the header and the README):
//! - Every export runs inside the panic boundary ([`boundary::guard`]).
//! - Every export except `cudalloc_last_error*` and `cudalloc_error_string`
//!   sets the calling thread's last error: `CUDALLOC_OK` on success.
//! - Pointers handed to `cudalloc_free` and `cudalloc_record_stream` are only
//!   looked up, never dereferenced, so garbage is an error, not a crash.
//! - Streams are raw `CUstream` values; NULL is the legacy default stream.
//! - During process exit nothing reaches the driver: frees are ignored quietly.

pub mod boundary;

use crate::error::{Error, ErrorCode};
use crate::global;
use crate::stats::cudalloc_stats;
use boundary::{guard, set_error, set_last, set_ok};
use libc::{c_char, c_int, c_void};
use std::ffi::CStr;

fn device_index(device: c_int) -> Option<usize> {
    usize::try_from(device).ok()
}

fn shutting_down() -> Error {
    Error::new(
        ErrorCode::CUDALLOC_ERR_SHUTTING_DOWN,
        "process is exiting; call ignored",
    )
}

/// Allocate `size` bytes on `device` for use on `stream` (PyTorch's `alloc_fn`).
///
/// Returns a 512-byte-aligned device pointer, or NULL. NULL with last error
/// `CUDALLOC_OK` means `size` was 0. On out-of-memory, cudalloc has already
/// flushed its cache and retried, and logged a diagnosis to stderr.
#[no_mangle]
pub extern "C" fn cudalloc_malloc(size: usize, device: c_int, stream: *mut c_void) -> *mut c_void {
    guard("cudalloc_malloc", || {
        if global::exiting() {
            set_error(&shutting_down());
            return std::ptr::null_mut();
        }
        let r = global::get().and_then(|a| match device_index(device) {
            Some(d) => a.malloc(size as u64, d, stream as u64),
            None => Err(Error::invalid_device(device as i64, a.device_count())),
        });
        match r {
            Ok(p) => {
                set_ok();
                p as *mut c_void
            }
            Err(e) => {
                set_error(&e);
                std::ptr::null_mut()
            }
        }
    })
}

/// Free `ptr` (PyTorch's `free_fn`). `size`, `device` and `stream` are hints
/// only: cudalloc's own table decides. Freeing NULL is a no-op. An unknown or
/// double free changes nothing, counts `num_invalid_frees`, and sets
/// `CUDALLOC_ERR_INVALID_FREE`.
#[no_mangle]
pub extern "C" fn cudalloc_free(ptr: *mut c_void, size: usize, device: c_int, stream: *mut c_void) {
    let _ = size; // never trusted (torch #153109)
    guard("cudalloc_free", || {
        if ptr.is_null() {
            set_ok();
            return;
        }
        if global::exiting() {
            set_error(&shutting_down());
            return;
        }
        match global::get().and_then(|a| a.free(ptr as u64, device_index(device), stream as u64)) {
            Ok(()) => set_ok(),
            Err(e) => {
                set_error(&e);
            }
        }
    })
}

/// Make the free of `ptr` also wait for work enqueued on `stream`
/// (PyTorch's `record_stream_fn`). Unknown pointers set
/// `CUDALLOC_ERR_UNKNOWN_POINTER` and change nothing.
#[no_mangle]
pub extern "C" fn cudalloc_record_stream(ptr: *mut c_void, stream: *mut c_void) {
    guard("cudalloc_record_stream", || {
        if ptr.is_null() {
            set_last(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                "cudalloc_record_stream: ptr is NULL",
            );
            return;
        }
        match global::get().and_then(|a| a.record_stream(ptr as u64, stream as u64)) {
            Ok(()) => set_ok(),
            Err(e) => {
                set_error(&e);
            }
        }
    })
}

/// Release every cached, unused segment on every device to the driver
/// (PyTorch's `reset_fn`, called by `torch.cuda.empty_cache()`).
#[no_mangle]
pub extern "C" fn cudalloc_empty_cache() {
    guard("cudalloc_empty_cache", || {
        if global::exiting() {
            set_error(&shutting_down());
            return;
        }
        match global::get() {
            Ok(a) => {
                a.empty_cache();
                set_ok();
            }
            Err(e) => {
                set_error(&e);
            }
        }
    })
}

/// Fill `*out` with the statistics of `device`. Returns `CUDALLOC_OK` (0) or
/// an error code (`CUDALLOC_ERR_INVALID_ARGUMENT` when `out` is NULL,
/// `CUDALLOC_ERR_INVALID_DEVICE` for a bad index).
///
/// # Safety
/// 1. `out` is NULL or points to writable memory for one `cudalloc_stats`.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_get_stats(device: c_int, out: *mut cudalloc_stats) -> c_int {
    guard("cudalloc_get_stats", || {
        if out.is_null() {
            set_last(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                "cudalloc_get_stats: out is NULL",
            );
            return ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT as c_int;
        }
        let r = global::get().and_then(|a| match device_index(device) {
            Some(d) => a.stats(d),
            None => Err(Error::invalid_device(device as i64, a.device_count())),
        });
        match r {
            Ok(s) => {
                // SAFETY: `out` is non-NULL and the caller promises it points to
                // a writable `cudalloc_stats`.
                unsafe { out.write(s) };
                set_ok();
                0
            }
            Err(e) => set_error(&e),
        }
    })
}

/// Reset the peak statistics of `device` to the current values.
#[no_mangle]
pub extern "C" fn cudalloc_reset_peak_stats(device: c_int) {
    guard("cudalloc_reset_peak_stats", || {
        let r = global::get().and_then(|a| match device_index(device) {
            Some(d) => a.reset_peak(d),
            None => Err(Error::invalid_device(device as i64, a.device_count())),
        });
        match r {
            Ok(()) => set_ok(),
            Err(e) => {
                set_error(&e);
            }
        }
    })
}

/// Limit `device` to `fraction` (0, 1] of its total memory (PyTorch's
/// `memory_fraction_fn`). A bad fraction or device sets an error and changes nothing.
#[no_mangle]
pub extern "C" fn cudalloc_set_memory_fraction(fraction: f64, device: c_int) {
    guard("cudalloc_set_memory_fraction", || {
        let r = global::get().and_then(|a| match device_index(device) {
            Some(d) => a.set_memory_fraction(fraction, d),
            None => Err(Error::invalid_device(device as i64, a.device_count())),
        });
        match r {
            Ok(()) => set_ok(),
            Err(e) => {
                set_error(&e);
            }
        }
    })
}

/// Initialise cudalloc with a configuration string in `CUDALLOC_CONF` syntax
/// (`key:value,key:value`), or from `CUDALLOC_CONF` when `conf` is NULL.
///
/// Optional: the first allocation initialises from the environment. Returns
/// `CUDALLOC_OK`, `CUDALLOC_ERR_CONFIG` (the message names the key and what
/// it accepts), or `CUDALLOC_ERR_ALREADY_INITIALIZED` when another
/// configuration is already in force. On error nothing changes.
///
/// # Safety
/// 1. `conf` is NULL or points to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_init(conf: *const c_char) -> c_int {
    guard("cudalloc_init", || {
        let conf = if conf.is_null() {
            None
        } else {
            // SAFETY: non-NULL; the caller promises a NUL-terminated string.
            match unsafe { CStr::from_ptr(conf) }.to_str() {
                Ok(s) => Some(s),
                Err(_) => {
                    return set_error(&Error::config("configuration string is not valid UTF-8"))
                }
            }
        };
        match global::init(conf) {
            Ok(_) => {
                set_ok();
                0
            }
            Err(e) => set_error(&e),
        }
    })
}

/// PyTorch's `init_fn(device_count)`: initialises cudalloc from the
/// environment. A device count other than cudalloc's is logged.
#[no_mangle]
pub extern "C" fn cudalloc_init_devices(device_count: c_int) {
    guard("cudalloc_init_devices", || match global::get() {
        Ok(a) => {
            if device_count >= 0 && device_count as usize != a.device_count() {
                tracing::warn!(
                    "caller sees {device_count} devices, cudalloc sees {}",
                    a.device_count()
                );
            }
            set_ok();
        }
        Err(e) => {
            set_error(&e);
        }
    })
}

/// Number of devices, or -1 with the last error set when cudalloc cannot start.
#[no_mangle]
pub extern "C" fn cudalloc_device_count() -> c_int {
    guard("cudalloc_device_count", || match global::get() {
        Ok(a) => {
            set_ok();
            a.device_count() as c_int
        }
        Err(e) => {
            set_error(&e);
            -1
        }
    })
}

/// Walk every internal structure and check the invariants. Returns
/// `CUDALLOC_OK` or `CUDALLOC_ERR_PANIC` with the broken invariant as the
/// message. Exact only when no other thread is allocating meanwhile.
#[no_mangle]
pub extern "C" fn cudalloc_check_invariants() -> c_int {
    guard("cudalloc_check_invariants", || match global::get() {
        Ok(a) => match a.check_invariants() {
            Ok(()) => {
                set_ok();
                0
            }
            Err(m) => set_error(&Error::new(
                ErrorCode::CUDALLOC_ERR_PANIC,
                format!("invariant broken: {m}"),
            )),
        },
        Err(e) => set_error(&e),
    })
}

/// The calling thread's last result code (`CUDALLOC_OK` after a successful call).
#[no_mangle]
pub extern "C" fn cudalloc_last_error() -> c_int {
    guard("cudalloc_last_error", || boundary::last_code() as c_int)
}

/// The calling thread's last error message, never NULL. Owned by cudalloc;
/// valid until this thread's next cudalloc call.
#[no_mangle]
pub extern "C" fn cudalloc_last_error_message() -> *const c_char {
    guard("cudalloc_last_error_message", boundary::last_message_ptr)
}

/// A static description of any result code, never NULL.
#[no_mangle]
pub extern "C" fn cudalloc_error_string(code: c_int) -> *const c_char {
    guard("cudalloc_error_string", || {
        let s =
            ErrorCode::from_i32(code).map_or("unknown cudalloc result code\0", |c| c.description());
        s.as_ptr() as *const c_char
    })
}
