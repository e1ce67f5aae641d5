//! Control exports: initialisation, devices, the memory fraction, the
//! invariant check, the OOM and pressure callbacks, the last error and the
//! version.

use super::boundary;
use super::on_device;
use crate::error::{Error, ErrorCode};
use crate::global;
use libc::{c_char, c_int, c_void};
use std::ffi::CStr;

/// The fraction (0, 1] of `device`'s total memory cudalloc may reserve: 1.0
/// until `cudalloc_set_memory_fraction` (PyTorch's
/// `get_per_process_memory_fraction`). -1.0, with the error set, for a bad
/// device or configuration.
#[no_mangle]
pub extern "C" fn cudalloc_get_memory_fraction(device: c_int) -> f64 {
    crate::export!(cudalloc_get_memory_fraction, -> f64 {
        on_device(device, |a, d| a.memory_fraction(d))
    })
}

/// Limit `device` to `fraction` (0, 1] of its total memory (PyTorch's
/// `memory_fraction_fn`). A bad fraction or device sets an error and changes nothing.
#[no_mangle]
pub extern "C" fn cudalloc_set_memory_fraction(fraction: f64, device: c_int) {
    crate::export!(cudalloc_set_memory_fraction, -> () {
        on_device(device, |a, d| a.set_memory_fraction(fraction, d))
    })
}

/// Initialise cudalloc with the program's configuration string, in
/// `CUDALLOC_CONF` syntax (`key:value,key:value`; NULL: none).
///
/// The string gives the program's defaults: `CUDALLOC_CONF` overrides them
/// key by key, so an operator's setting is never ignored (`cudalloc config`
/// prints where each value comes from). Optional: the first allocation
/// initialises from the environment alone. Returns `CUDALLOC_OK`,
/// `CUDALLOC_ERR_CONFIG` (the message names the key, what it accepts, and
/// whether the string or `CUDALLOC_CONF` had it), or
/// `CUDALLOC_ERR_ALREADY_INITIALIZED` when another configuration is already
/// in force. On error nothing changes.
///
/// # Safety
/// 1. `conf` is NULL or points to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_init(conf: *const c_char) -> c_int {
    crate::export!(cudalloc_init, -> () {
        let conf = if conf.is_null() {
            None
        } else {
            // SAFETY: non-NULL; the caller promises a NUL-terminated string.
            let s = unsafe { CStr::from_ptr(conf) }.to_str();
            Some(s.map_err(|_| Error::config("configuration string is not valid UTF-8"))?)
        };
        global::init(conf).map(|_| ())
    })
}

/// PyTorch's `init_fn(device_count)`: initialises cudalloc from the
/// environment. A device count other than cudalloc's is logged.
#[no_mangle]
pub extern "C" fn cudalloc_init_devices(device_count: c_int) {
    crate::export!(cudalloc_init_devices, -> () {
        let a = global::get()?;
        if device_count >= 0 && device_count as usize != a.device_count() {
            tracing::warn!(
                "caller sees {device_count} devices, cudalloc sees {}",
                a.device_count()
            );
        }
        Ok(())
    })
}

/// Number of devices, or -1 with the last error set when cudalloc cannot start.
#[no_mangle]
pub extern "C" fn cudalloc_device_count() -> c_int {
    crate::export!(cudalloc_device_count, -> c_int {
        Ok(global::get()?.device_count() as c_int)
    })
}

/// Walk every internal structure and check the invariants. Returns
/// `CUDALLOC_OK` or `CUDALLOC_ERR_PANIC` with the broken invariant as the
/// message. Exact only when no other thread is allocating meanwhile.
#[no_mangle]
pub extern "C" fn cudalloc_check_invariants() -> c_int {
    crate::export!(cudalloc_check_invariants, -> () {
        global::get()?.check_invariants().map_err(|m| {
            Error::new(ErrorCode::CUDALLOC_ERR_PANIC, format!("invariant broken: {m}"))
        })
    })
}

/// The calling thread's last result code (`CUDALLOC_OK` after a successful call).
#[no_mangle]
pub extern "C" fn cudalloc_last_error() -> c_int {
    crate::export!(cudalloc_last_error, raw || boundary::last_code() as c_int)
}

/// The calling thread's last error message, never NULL. Owned by cudalloc;
/// valid until this thread's next cudalloc call. (Once the thread's exit has
/// torn down its thread-locals, as at process exit, it is the code's
/// description.)
#[no_mangle]
pub extern "C" fn cudalloc_last_error_message() -> *const c_char {
    crate::export!(cudalloc_last_error_message, raw boundary::last_message_ptr)
}

/// A static description of any result code, never NULL.
#[no_mangle]
pub extern "C" fn cudalloc_error_string(code: c_int) -> *const c_char {
    crate::export!(
        cudalloc_error_string,
        raw || {
            let s = ErrorCode::from_i32(code)
                .map_or("unknown cudalloc result code\0", |c| c.description());
            s.as_ptr() as *const c_char
        }
    )
}

/// The library's version (`"0.1.0"`), static, never NULL. It takes no
/// argument and starts nothing, so it is safe to call at any time.
#[no_mangle]
pub extern "C" fn cudalloc_version() -> *const c_char {
    crate::export!(
        cudalloc_version,
        raw || { concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char }
    )
}

/// Called at step 3 of the OOM ladder with `(device, requested bytes, user_data)`,
/// from the allocating thread, with no cudalloc lock held: it may free memory.
#[allow(non_camel_case_types)]
pub type cudalloc_oom_fn =
    Option<unsafe extern "C" fn(device: c_int, requested: usize, user_data: *mut c_void)>;

/// Called when a device's pressure level changes with `(device, level,
/// user_data)`; level is 0 LOW, 1 MODERATE, 2 HIGH, 3 CRITICAL. Runs on an
/// allocating thread after its allocation, with no cudalloc lock held.
#[allow(non_camel_case_types)]
pub type cudalloc_pressure_fn =
    Option<unsafe extern "C" fn(device: c_int, level: c_int, user_data: *mut c_void)>;

/// A caller's opaque pointer, handed back to its callback.
#[derive(Clone, Copy)]
struct UserData(*mut c_void);
// SAFETY: cudalloc never dereferences it; the caller registering a callback
// promises that it and its data may be used from any thread.
unsafe impl Send for UserData {}
// SAFETY: as above.
unsafe impl Sync for UserData {}

/// Register `callback(device, requested, user_data)` for step 3 of the OOM ladder:
/// after the cache is flushed and before the last retry. Callbacks run in
/// registration order and cannot be removed. Returns `CUDALLOC_OK`, or
/// `CUDALLOC_ERR_INVALID_ARGUMENT` when `callback` is NULL.
///
/// # Safety
/// 1. `callback` is NULL or a function callable from any thread with `user_data`
///    for as long as the process uses cudalloc.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_register_oom_callback(
    callback: cudalloc_oom_fn,
    user_data: *mut c_void,
) -> c_int {
    crate::export!(cudalloc_register_oom_callback, -> () {
        let f = callback.ok_or_else(|| null_callback("cudalloc_register_oom_callback"))?;
        let ud = UserData(user_data);
        global::get()?.register_oom_callback(Box::new(move |device, requested| {
            let ud = ud;
            // SAFETY: the caller promised `f` may be called with `ud` from any thread.
            unsafe { f(device as c_int, requested as usize, ud.0) }
        }));
        Ok(())
    })
}

/// Register `callback(device, level, user_data)`, run when a device's pressure level
/// changes (sampled every `pressure_interval` on allocation calls). Returns
/// `CUDALLOC_OK`, or `CUDALLOC_ERR_INVALID_ARGUMENT` when `callback` is NULL.
///
/// # Safety
/// 1. `callback` is NULL or a function callable from any thread with `user_data`
///    for as long as the process uses cudalloc.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_register_pressure_callback(
    callback: cudalloc_pressure_fn,
    user_data: *mut c_void,
) -> c_int {
    crate::export!(cudalloc_register_pressure_callback, -> () {
        let f = callback.ok_or_else(|| null_callback("cudalloc_register_pressure_callback"))?;
        let ud = UserData(user_data);
        global::get()?
            .observer()
            .register_pressure_callback(Box::new(move |device, level| {
                let ud = ud;
                // SAFETY: the caller promised `f` may be called with `ud` from any thread.
                unsafe { f(device as c_int, level as c_int, ud.0) }
            }));
        Ok(())
    })
}

fn null_callback(export: &str) -> Error {
    Error::new(
        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
        format!("{export}: callback is NULL"),
    )
}
