//! The C ABI: every `extern "C"` export of `libcudalloc.so`.
//!
//! Conventions (also in the header and the README):
//! - Every export runs inside the panic boundary ([`boundary::guard`]).
//! - Every export except `cudalloc_last_error*`, `cudalloc_error_string`
//!   and `cudalloc_version` sets the calling thread's last error:
//!   `CUDALLOC_OK` on success.
//! - Pointers handed to `cudalloc_free` and `cudalloc_record_stream` are only
//!   looked up, never dereferenced, so garbage is an error, not a crash.
//! - Streams are raw `CUstream` values; NULL is the legacy default stream.
//! - During process exit nothing reaches the driver: frees are ignored quietly.

pub mod boundary;
pub mod cxx_function;
pub mod cxx_throw;

use crate::error::{Error, ErrorCode};
use crate::global;
use crate::stats::cudalloc_stats;
use boundary::{guard, set_error, set_last, set_ok};
use libc::{c_char, c_int, c_void};
use std::ffi::CStr;

fn device_index(device: c_int) -> Option<usize> {
    usize::try_from(device).ok()
}

/// `f` on the process-wide allocator with `device` as an index: a negative
/// one is `CUDALLOC_ERR_INVALID_DEVICE` (the engine checks the upper bound).
fn on_device<T>(
    device: c_int,
    f: impl FnOnce(&'static crate::Allocator, usize) -> crate::error::Result<T>,
) -> crate::error::Result<T> {
    global::get().and_then(|a| match device_index(device) {
        Some(d) => f(a, d),
        None => Err(Error::invalid_device(device as i64, a.device_count())),
    })
}

/// A void export's result as the thread's last error.
fn set_result(r: crate::error::Result<()>) {
    match r {
        Ok(()) => set_ok(),
        Err(e) => {
            set_error(&e);
        }
    }
}

/// Allocate `size` bytes on `device` for use on `stream` (PyTorch's `alloc_fn`).
///
/// Returns a 512-byte-aligned device pointer, or NULL. NULL with last error
/// `CUDALLOC_OK` means `size` was 0. On out-of-memory, cudalloc has already
/// flushed its cache and retried, and logged a diagnosis to stderr.
#[no_mangle]
pub extern "C" fn cudalloc_malloc(size: usize, device: c_int, stream: *mut c_void) -> *mut c_void {
    malloc_in("cudalloc_malloc", size, device, stream, None)
}

/// `cudalloc_malloc`, from private pool `pool` when given.
#[inline(always)]
fn malloc_in(
    name: &'static str,
    size: usize,
    device: c_int,
    stream: *mut c_void,
    pool: Option<crate::engine::PoolId>,
) -> *mut c_void {
    guard(name, || {
        if global::exiting() {
            set_error(&global::stopped_error());
            return std::ptr::null_mut();
        }
        let r = on_device(device, |a, d| match pool {
            None => a.malloc(size as u64, d, stream as u64),
            Some(id) => a.malloc_pool(size as u64, d, stream as u64, id),
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

/// PyTorch's `alloc_fn` (what the Python package's `enable()` installs):
/// [`cudalloc_malloc`], except that a failure with `size` > 0 throws a C++
/// `std::runtime_error` instead of returning NULL. PyTorch does not check
/// its pluggable allocator's NULL (a tensor with no memory behind it would
/// reach kernels); it does turn a C++ exception into a Python
/// `RuntimeError`. The message starts "CUDA out of memory." on an OOM (what
/// Lightning and accelerate look for), followed by cudalloc's diagnosis.
/// In a process without the C++ runtime (libstdc++), and while the process
/// exits (a C++ destructor may be the caller), it returns NULL as
/// `cudalloc_malloc` does. Not for C callers: wherever libstdc++ is loaded
/// (a C++ library, a sanitizer runtime) it throws, and a C frame cannot
/// pass a C++ exception on; C code uses `cudalloc_malloc`.
///
/// While PyTorch routes allocations to a private pool
/// (`cudalloc_begin_allocate_to_pool`, with `graph_pools:on`), the pool's
/// filters decide which allocations go there; an exception a filter throws
/// passes on to the caller.
#[no_mangle]
pub extern "C-unwind" fn cudalloc_malloc_torch(
    size: usize,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    // Outside the panic boundary: a filter is C++ and may throw.
    let pool = cxx_function::route(device, stream);
    let p = malloc_in("cudalloc_malloc_torch", size, device, stream, pool);
    if p.is_null() && size > 0 {
        if let Some(message) = torch_failure(size, device) {
            // Outside the panic boundary, on purpose, and with nothing of
            // ours left to drop in this frame (see cxx_throw).
            cxx_throw::throw_runtime_error(message);
        }
    }
    p
}

/// PyTorch's memory-pool id (`c10::cuda::MempoolId_t`, a
/// `std::pair<unsigned long long, unsigned long long>`), which PyTorch
/// passes by value: in two registers, as this struct.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct cudalloc_mempool_id {
    pub first: u64,
    pub second: u64,
}

/// PyTorch's `begin_allocate_to_pool` hook (`enable()` installs it with
/// `set_begin_allocate_to_pool`). PyTorch calls it when CUDA graph capture
/// (`torch.cuda.graph`, `make_graphed_callables`, `torch.compile`'s
/// cudagraphs) starts sending allocations to a private pool, before the
/// capture begins; `filter` (a `std::function<bool(cudaStream_t)>*` that
/// PyTorch owns) says which allocations.
///
/// With `graph_pools:on`, cudalloc copies the filter and serves those
/// allocations from pool-private memory until
/// `cudalloc_end_allocate_to_pool`; the memory stays the pool's until
/// `cudalloc_release_pool` (see the README). With `graph_pools:off` (the
/// default) it refuses: without a pool the memory a graph replays into could
/// be handed out again. Refusals and errors (a bad device, an empty filter)
/// throw a C++ `std::runtime_error`, which PyTorch turns into a
/// `RuntimeError` before any capture starts, and set the last error
/// (`CUDALLOC_ERR_UNSUPPORTED` for the refusal). Without a C++ runtime in
/// the process, or while the process exits, it logs instead. Only for
/// PyTorch: like `cudalloc_malloc_torch` it throws, and C code cannot pass
/// an exception on.
///
/// # Safety
/// `filter` is NULL or points to a live libstdc++
/// `std::function<bool(cudaStream_t)>` (with `graph_pools:on` it is read).
#[no_mangle]
pub unsafe extern "C-unwind" fn cudalloc_begin_allocate_to_pool(
    device: c_int,
    pool: cudalloc_mempool_id,
    filter: *mut c_void,
) {
    let id = (pool.first, pool.second);
    // A bad device is said first, whatever else is wrong.
    let (serve, bad_device) = guard("cudalloc_begin_allocate_to_pool", || {
        let a = global::get().ok()?;
        let bad = match device_index(device) {
            Some(d) if d < a.device_count() => None,
            _ => Some(Error::invalid_device(device as i64, a.device_count())),
        };
        Some((a.config().graph_pools, bad))
    })
    .unwrap_or((false, None));
    let message = if let Some(e) = bad_device {
        guard("cudalloc_begin_allocate_to_pool", || {
            set_error(&e);
            Some(format!(
                "cudalloc: begin_allocate_to_pool (pool ({}, {})): {}",
                id.0, id.1, e.message
            ))
        })
    } else if !serve {
        refuse_pool(format!(
            "cudalloc does not serve PyTorch's private memory pools unless asked (device {device}, \
             pool ({}, {})). CUDA graph capture (torch.cuda.graph, make_graphed_callables, \
             torch.compile's cudagraphs) needs one, so that memory a graph replays into is never \
             handed out again. Turn them on with CUDALLOC_CONF=graph_pools:on (experimental), or \
             run this code with PyTorch's own allocator (without CUDALLOC=1 or cudalloc.enable()).",
            id.0, id.1
        ))
    } else if !cxx_throw::available() {
        // The filter is a libstdc++ std::function: without libstdc++ in the
        // process it is not one cudalloc can read.
        refuse_pool(format!(
            "graph_pools:on: no libstdc++ in this process to read PyTorch's filter with \
             (device {device}, pool ({}, {})); the pool is refused",
            id.0, id.1
        ))
    } else {
        // The copy constructor may throw: before anything changes, outside
        // the panic boundary.
        // SAFETY: PyTorch passes its std::function<bool(cudaStream_t)> by
        // value, i.e. a pointer to a live temporary (or NULL from a C caller).
        let copy = unsafe { cxx_function::Filter::copy_from(filter) };
        guard("cudalloc_begin_allocate_to_pool", move || {
            let r = on_device(device, |a, d| {
                let f = copy.ok_or_else(|| {
                    Error::new(
                        ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                        format!("begin_allocate_to_pool on device {device}, pool ({}, {}): no filter (NULL or an empty std::function)", id.0, id.1),
                    )
                })?;
                // Routings of this pool that outlived their failed captures
                // ended: their filters go.
                for _ in 0..a.begin_pool(d, id)? {
                    cxx_function::remove(d, id);
                }
                cxx_function::add(d, id, f);
                Ok(())
            });
            // Some(None): served; None: a panic (an error all the same).
            Some(match r {
                Ok(()) => {
                    set_ok();
                    None
                }
                Err(e) => {
                    set_error(&e);
                    Some(format!("cudalloc: {}", e.message))
                }
            })
        })
        .unwrap_or_else(|| Some("cudalloc: begin_allocate_to_pool failed".into()))
    };
    let Some(message) = message else { return };
    if (global::exiting() && !global::forked()) || !cxx_throw::available() {
        // The caller may be a C++ destructor (no exception now), or there is
        // no C++ runtime to throw with: say it, at least.
        tracing::error!("{message}");
        return;
    }
    // Outside the panic boundary, with nothing of ours left to drop.
    cxx_throw::throw_runtime_error(message);
}

/// Refuse a pool: set the last error (`CUDALLOC_ERR_UNSUPPORTED`) and
/// return the exception's text.
fn refuse_pool(message: String) -> Option<String> {
    guard("cudalloc_begin_allocate_to_pool", || {
        set_error(&Error::new(
            ErrorCode::CUDALLOC_ERR_UNSUPPORTED,
            message.clone(),
        ));
        Some(message)
    })
    // Even a panic above refuses.
    .or_else(|| Some("cudalloc: PyTorch's private memory pool is refused".into()))
}

/// PyTorch's `end_allocate_to_pool` hook (`set_end_allocate_to_pool_fn`):
/// the capture into `pool` on `device` is over; its allocations stop going
/// to the pool (the oldest route of that pool ends), and the pool keeps its
/// memory. An unknown pool is logged and sets an error; nothing changes.
#[no_mangle]
pub extern "C" fn cudalloc_end_allocate_to_pool(device: c_int, pool: cudalloc_mempool_id) {
    let id = (pool.first, pool.second);
    guard("cudalloc_end_allocate_to_pool", || {
        let r = on_device(device, |a, d| {
            a.end_pool(d, id)?;
            cxx_function::remove(d, id);
            Ok(())
        });
        pool_hook_result(r);
    })
}

/// PyTorch's `release_pool` hook (`set_release_pool`): a graph that used
/// `pool` on `device` is reset or destroyed. When no graph holds the pool
/// any more, its memory goes back to the driver at the next `empty_cache`,
/// once freed. An unknown pool is logged and sets an error; nothing changes.
#[no_mangle]
pub extern "C" fn cudalloc_release_pool(device: c_int, pool: cudalloc_mempool_id) {
    let id = (pool.first, pool.second);
    guard("cudalloc_release_pool", || {
        let r = on_device(device, |a, d| a.release_pool(d, id));
        pool_hook_result(r);
    })
}

/// PyTorch cannot take an error from its void pool hooks: log it and set it.
fn pool_hook_result(r: crate::error::Result<()>) {
    if let Err(e) = &r {
        if !global::exiting() {
            tracing::warn!("cudalloc: {}", e.message);
        }
    }
    set_result(r);
}

/// The exception text for a failed `cudalloc_malloc_torch`, from the
/// thread's last error; `None` when there is no error (size 0).
fn torch_failure(size: usize, device: c_int) -> Option<String> {
    let code = boundary::last_code();
    if code == ErrorCode::CUDALLOC_OK || (global::exiting() && !global::forked()) {
        // No error; or the process is exiting, where the caller may be a
        // C++ destructor and an exception would end in std::terminate.
        return None;
    }
    let detail = boundary::last_message();
    Some(if code == ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY {
        format!("CUDA out of memory. Tried to allocate {size} bytes on device {device} (cudalloc).\n{detail}")
    } else {
        format!("cudalloc: allocation of {size} bytes on device {device} failed: {detail}")
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
            set_error(&global::stopped_error());
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
            set_error(&global::stopped_error());
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
        let r = on_device(device, |a, d| a.stats(d));
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
        let r = on_device(device, |a, d| a.reset_peak(d));
        set_result(r);
    })
}

/// Restart the accumulated counters of `device` from zero: the `num_*`
/// counts and `trimmed_bytes` (PyTorch's `reset_accumulated_memory_stats`).
/// Current values and peaks stay. A bad device sets an error and changes
/// nothing.
#[no_mangle]
pub extern "C" fn cudalloc_reset_accumulated_stats(device: c_int) {
    guard("cudalloc_reset_accumulated_stats", || {
        let r = on_device(device, |a, d| a.reset_accumulated(d));
        set_result(r);
    })
}

/// The fraction (0, 1] of `device`'s total memory cudalloc may reserve: 1.0
/// until `cudalloc_set_memory_fraction` (PyTorch's
/// `get_per_process_memory_fraction`). -1.0, with the error set, for a bad
/// device or configuration.
#[no_mangle]
pub extern "C" fn cudalloc_get_memory_fraction(device: c_int) -> f64 {
    guard("cudalloc_get_memory_fraction", || {
        let r = on_device(device, |a, d| a.memory_fraction(d));
        match r {
            Ok(f) => {
                set_ok();
                f
            }
            Err(e) => {
                set_error(&e);
                -1.0
            }
        }
    })
}

/// Limit `device` to `fraction` (0, 1] of its total memory (PyTorch's
/// `memory_fraction_fn`). A bad fraction or device sets an error and changes nothing.
#[no_mangle]
pub extern "C" fn cudalloc_set_memory_fraction(fraction: f64, device: c_int) {
    guard("cudalloc_set_memory_fraction", || {
        let r = on_device(device, |a, d| a.set_memory_fraction(fraction, d));
        set_result(r);
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
/// valid until this thread's next cudalloc call. (Once the thread's exit has
/// torn down its thread-locals, as at process exit, it is the code's
/// description.)
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

/// The library's version (`"0.1.0"`), static, never NULL. It takes no
/// argument and starts nothing, so it is safe to call at any time.
#[no_mangle]
pub extern "C" fn cudalloc_version() -> *const c_char {
    guard("cudalloc_version", || {
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
    })
}

// ---------------------------------------------------------------------------
// Observability exports (src/observe/): leak report, JSON stats, callbacks.
// ---------------------------------------------------------------------------

/// Copy `text` into the caller's buffer by the size-query convention of
/// `cudalloc_leak_report` and `cudalloc_stats_json` (see their docs).
fn write_text(name: &str, text: &str, buf: *mut c_char, len: usize) -> usize {
    let needed = text.len() + 1;
    if buf.is_null() {
        if len == 0 {
            set_ok();
            return needed;
        }
        set_last(
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
            &format!("{name}: buf is NULL but len is {len}"),
        );
        return 0;
    }
    if len < needed {
        set_last(
            ErrorCode::CUDALLOC_ERR_BUFFER_TOO_SMALL,
            &format!("{name}: needs {needed} bytes, buffer has {len}"),
        );
        return needed;
    }
    // SAFETY: `buf` is non-NULL and the caller promises `len >= needed`
    // writable bytes; the source is a distinct Rust string.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
        *buf.add(text.len()) = 0;
    }
    set_ok();
    needed
}

/// Write the leak report into `buf`: every live allocation at least
/// `min_age_s` seconds old, on every device, as text (`json` == 0) or JSON,
/// grouped by call site when `backtrace:N` is on.
///
/// Returns the bytes the report needs, terminating NUL included (like
/// `snprintf`, plus one). Query the size with `buf` NULL and `len` 0. When
/// `len` is smaller than needed, nothing is written, the last error is
/// `CUDALLOC_ERR_BUFFER_TOO_SMALL`, and the needed size is returned: allocate
/// and call again (allocations may change in between; allow some slack).
/// `buf` NULL with `len` > 0, or a negative or NaN `min_age_s`, is
/// `CUDALLOC_ERR_INVALID_ARGUMENT` and returns 0. Never calls the driver.
///
/// # Safety
/// 1. `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_leak_report(
    min_age_s: f64,
    json: c_int,
    buf: *mut c_char,
    len: usize,
) -> usize {
    guard("cudalloc_leak_report", || {
        if !(min_age_s >= 0.0 && min_age_s.is_finite()) {
            set_last(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                &format!("cudalloc_leak_report: min_age_s {min_age_s} is not a finite number >= 0"),
            );
            return 0;
        }
        match global::get() {
            Ok(a) => {
                let text =
                    crate::observe::leak::report(a.engine(), (min_age_s * 1e3) as u64, json != 0);
                write_text("cudalloc_leak_report", &text, buf, len)
            }
            Err(e) => {
                set_error(&e);
                0
            }
        }
    })
}

/// Write the statistics of every device, and the effective configuration, as
/// JSON into `buf`: `{"devices":[{"device":0,<every cudalloc_stats field>}],
/// "config":{...}}`. The same text `stats_file:PATH` writes at exit.
/// Buffer convention and errors as for `cudalloc_leak_report`.
///
/// # Safety
/// 1. `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn cudalloc_stats_json(buf: *mut c_char, len: usize) -> usize {
    guard("cudalloc_stats_json", || match global::get() {
        Ok(a) => {
            let text = a.stats_json();
            write_text("cudalloc_stats_json", &text, buf, len)
        }
        Err(e) => {
            set_error(&e);
            0
        }
    })
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
    guard("cudalloc_register_oom_callback", || {
        let Some(f) = callback else {
            return set_error(&Error::new(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                "cudalloc_register_oom_callback: callback is NULL",
            ));
        };
        let ud = UserData(user_data);
        match global::get() {
            Ok(a) => {
                a.register_oom_callback(Box::new(move |device, requested| {
                    let ud = ud;
                    // SAFETY: the caller promised `f` may be called with `ud` from any thread.
                    unsafe { f(device as c_int, requested as usize, ud.0) }
                }));
                set_ok();
                0
            }
            Err(e) => set_error(&e),
        }
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
    guard("cudalloc_register_pressure_callback", || {
        let Some(f) = callback else {
            return set_error(&Error::new(
                ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
                "cudalloc_register_pressure_callback: callback is NULL",
            ));
        };
        let ud = UserData(user_data);
        match global::get() {
            Ok(a) => {
                a.observer()
                    .register_pressure_callback(Box::new(move |device, level| {
                        let ud = ud;
                        // SAFETY: the caller promised `f` may be called with `ud` from any thread.
                        unsafe { f(device as c_int, level as c_int, ud.0) }
                    }));
                set_ok();
                0
            }
            Err(e) => set_error(&e),
        }
    })
}
