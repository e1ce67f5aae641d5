//! Allocation exports: `cudalloc_malloc`, PyTorch's throwing `alloc_fn`
//! (`cudalloc_malloc_torch`), `cudalloc_free`, `cudalloc_record_stream`
//! and `cudalloc_empty_cache`.

use super::{cxx_function, cxx_throw, device_index, device_of, non_null};
use crate::error::ErrorCode;
use crate::ffi::boundary;
use crate::global;
use libc::{c_int, c_void};

/// Allocate `size` bytes on `device` for use on `stream` (PyTorch's `alloc_fn`).
///
/// Returns a 512-byte-aligned device pointer, or NULL. NULL with last error
/// `CUDALLOC_OK` means `size` was 0. On out-of-memory, cudalloc has already
/// flushed its cache and retried, and logged a diagnosis to stderr.
#[no_mangle]
pub extern "C" fn cudalloc_malloc(size: usize, device: c_int, stream: *mut c_void) -> *mut c_void {
    export_malloc(size, device, stream, None)
}

/// `cudalloc_malloc`, from private pool `pool` when given (the shared body
/// of the two allocating exports).
#[inline(always)]
fn export_malloc(
    size: usize,
    device: c_int,
    stream: *mut c_void,
    pool: Option<crate::engine::PoolId>,
) -> *mut c_void {
    crate::export!(cudalloc_malloc, -> *mut c_void {
        let a = global::serving()?;
        let d = device_of(a, device, false)?;
        let p = match pool {
            None => a.malloc(size as u64, d, stream as u64),
            Some(id) => a.malloc_pool(size as u64, d, stream as u64, id),
        }?;
        Ok(p as *mut c_void)
    })
}

/// PyTorch's `alloc_fn` (what the Python package's `enable()` installs):
/// [`cudalloc_malloc`], except that a failure with `size` > 0 throws a C++
/// exception instead of returning NULL. PyTorch does not check its
/// pluggable allocator's NULL (a tensor with no memory behind it would
/// reach kernels); it does turn a C++ exception into a Python exception.
/// An out-of-memory throws `c10::OutOfMemoryError` when PyTorch's c10 is
/// in the process (Python sees `torch.OutOfMemoryError`, a `RuntimeError`),
/// else `std::runtime_error`; other failures throw `std::runtime_error`.
/// The message starts "CUDA out of memory." on an OOM (what Lightning and
/// accelerate look for), followed by cudalloc's diagnosis.
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
    let p = export_malloc(size, device, stream, pool);
    if p.is_null() && size > 0 {
        if let Some((message, oom)) = torch_failure(size, device) {
            // Outside the panic boundary, on purpose, and with nothing of
            // ours left to drop in this frame (see cxx_throw).
            if oom {
                cxx_throw::throw_out_of_memory(message);
            } else {
                cxx_throw::throw_runtime_error(message);
            }
        }
    }
    p
}

/// The exception text for a failed `cudalloc_malloc_torch`, from the
/// thread's last error, and whether it is an out-of-memory; `None` when
/// there is no error (size 0).
fn torch_failure(size: usize, device: c_int) -> Option<(String, bool)> {
    let code = boundary::last_code();
    if code == ErrorCode::CUDALLOC_OK || (global::exiting() && !global::forked()) {
        // No error; or the process is exiting, where the caller may be a
        // C++ destructor and an exception would end in std::terminate.
        return None;
    }
    let detail = boundary::last_message();
    Some(if code == ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY {
        (format!("CUDA out of memory. Tried to allocate {size} bytes on device {device} (cudalloc).\n{detail}"), true)
    } else {
        (
            format!("cudalloc: allocation of {size} bytes on device {device} failed: {detail}"),
            false,
        )
    })
}

/// Free `ptr` (PyTorch's `free_fn`). `size`, `device` and `stream` are hints
/// only: cudalloc's own table decides. Freeing NULL is a no-op. An unknown or
/// double free changes nothing, counts `num_invalid_frees`, and sets
/// `CUDALLOC_ERR_INVALID_FREE`.
#[no_mangle]
pub extern "C" fn cudalloc_free(ptr: *mut c_void, size: usize, device: c_int, stream: *mut c_void) {
    let _ = size; // never trusted (torch #153109)
    crate::export!(cudalloc_free, -> () {
        if ptr.is_null() {
            return Ok(());
        }
        global::serving()?.free(ptr as u64, device_index(device), stream as u64)
    })
}

/// Make the free of `ptr` also wait for work enqueued on `stream`
/// (PyTorch's `record_stream_fn`). Unknown pointers set
/// `CUDALLOC_ERR_UNKNOWN_POINTER` and change nothing.
#[no_mangle]
pub extern "C" fn cudalloc_record_stream(ptr: *mut c_void, stream: *mut c_void) {
    crate::export!(cudalloc_record_stream, -> () {
        let ptr = non_null(ptr, "cudalloc_record_stream: ptr")?;
        global::get()?.record_stream(ptr as u64, stream as u64)
    })
}

/// Release every cached, unused segment on every device to the driver
/// (PyTorch's `reset_fn`, called by `torch.cuda.empty_cache()`).
#[no_mangle]
pub extern "C" fn cudalloc_empty_cache() {
    crate::export!(cudalloc_empty_cache, -> () {
        global::serving()?.empty_cache();
        Ok(())
    })
}
