//! The C ABI: every `extern "C"` export of `libcudalloc.so`, by family:
//!
//! ```text
//! alloc.rs    malloc, PyTorch's throwing alloc_fn, free, record_stream, empty_cache
//! pools.rs    PyTorch's graph-pool hooks (begin/end allocate to pool, release)
//! capacity.rs capacity queries: can_allocate, is_low_memory
//! stats.rs    statistics, their resets, the JSON stats and the leak report
//! control.rs  init, devices, memory fraction, invariants, callbacks, the last
//!             error and the version
//! boundary.rs the panic boundary, the last error, and how a Rust result
//!             becomes a C return value (Finish)
//! cxx_*.rs    C++ exceptions and std::function, for PyTorch's hooks
//! ```
//!
//! Conventions (also in the header and the README):
//! - Every export runs inside the panic boundary, named after itself
//!   ([`export!`](crate::export)), and turns its result into its return
//!   value one way ([`boundary::Finish`]).
//! - Every export except `cudalloc_last_error*`, `cudalloc_error_string`
//!   and `cudalloc_version` sets the calling thread's last error:
//!   `CUDALLOC_OK` on success.
//! - A NULL out-parameter is `CUDALLOC_ERR_INVALID_ARGUMENT` ([`non_null`]).
//! - Pointers handed to `cudalloc_free` and `cudalloc_record_stream` are only
//!   looked up, never dereferenced, so garbage is an error, not a crash.
//! - Streams are raw `CUstream` values; NULL is the legacy default stream.
//! - During process exit nothing reaches the driver: frees are ignored
//!   quietly ([`global::serving`]).

/// The body of export `$name`: `$body` (a block evaluating to a
/// `crate::error::Result<$t>`, where `?` works) runs inside the panic
/// boundary named after the export, and its result becomes the export's
/// return value, setting the thread's last error ([`boundary::Finish`]).
#[macro_export]
#[doc(hidden)]
macro_rules! export {
    // The body's value is the return value as it is (an export that must
    // not touch the last error, or sets it itself).
    ($name:ident, raw $body:expr) => {
        $crate::ffi::boundary::guard(stringify!($name), $body)
    };
    ($name:ident, -> $t:ty $body:block) => {
        $crate::ffi::boundary::guard(stringify!($name), || {
            // A closure of its own, so that `?` in the body returns here.
            #[allow(clippy::redundant_closure_call)]
            let r: $crate::error::Result<$t> = (|| $body)();
            $crate::ffi::boundary::Finish::finish(r)
        })
    };
}

pub mod alloc;
pub mod boundary;
pub mod capacity;
pub mod control;
pub mod cxx_function;
pub mod cxx_throw;
pub mod pools;
pub mod stats;

pub use alloc::*;
pub use capacity::*;
pub use control::*;
pub use pools::*;
pub use stats::*;

use crate::error::{Error, ErrorCode, Result};
use crate::global;
use crate::Allocator;
use libc::c_int;

/// A C device index as an index (negative: none).
fn device_index(device: c_int) -> Option<usize> {
    usize::try_from(device).ok()
}

/// `device` as an index of `a`'s devices: a negative one is
/// `CUDALLOC_ERR_INVALID_DEVICE`; with `checked`, one past the last too
/// (otherwise the engine checks the upper bound).
#[inline(always)]
fn device_of(a: &Allocator, device: c_int, checked: bool) -> Result<usize> {
    device_index(device)
        .filter(|&d| !checked || d < a.device_count())
        .ok_or_else(|| Error::invalid_device(device as i64, a.device_count()))
}

/// `f` on the process-wide allocator with `device` as an index (see
/// [`device_of`]).
fn on_device<T>(
    device: c_int,
    f: impl FnOnce(&'static Allocator, usize) -> Result<T>,
) -> Result<T> {
    let a = global::get()?;
    f(a, device_of(a, device, false)?)
}

/// `p`, unless it is NULL: then `CUDALLOC_ERR_INVALID_ARGUMENT` naming
/// the export and the argument (`what`, as "cudalloc_get_stats: out").
fn non_null<T>(p: *mut T, what: &str) -> Result<*mut T> {
    if p.is_null() {
        Err(Error::new(
            ErrorCode::CUDALLOC_ERR_INVALID_ARGUMENT,
            format!("{what} is NULL"),
        ))
    } else {
        Ok(p)
    }
}
