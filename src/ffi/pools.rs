//! PyTorch's graph-pool hooks: `cudalloc_begin_allocate_to_pool`,
//! `cudalloc_end_allocate_to_pool` and `cudalloc_release_pool` (see
//! `engine/pools.rs` for what a private pool is).

use super::boundary::{set_error, set_ok};
use super::{cxx_function, cxx_throw, device_of, on_device};
use crate::error::{Error, ErrorCode};
use crate::global;
use libc::{c_int, c_void};

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
    let (serve, bad_device) = crate::export!(
        cudalloc_begin_allocate_to_pool,
        raw || {
            let a = global::get().ok()?;
            let bad = device_of(a, device, true).err();
            Some((a.config().graph_pools, bad))
        }
    )
    .unwrap_or((false, None));
    let message = if let Some(e) = bad_device {
        crate::export!(
            cudalloc_begin_allocate_to_pool,
            raw || {
                set_error(&e);
                Some(format!(
                    "cudalloc: begin_allocate_to_pool (pool ({}, {})): {}",
                    id.0, id.1, e.message
                ))
            }
        )
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
        crate::export!(cudalloc_begin_allocate_to_pool, raw move || {
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
    crate::export!(
        cudalloc_begin_allocate_to_pool,
        raw || {
            set_error(&Error::new(
                ErrorCode::CUDALLOC_ERR_UNSUPPORTED,
                message.clone(),
            ));
            Some(message)
        }
    )
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
    crate::export!(
        cudalloc_end_allocate_to_pool,
        raw || {
            pool_hook_result(on_device(device, |a, d| {
                a.end_pool(d, id)?;
                cxx_function::remove(d, id);
                Ok(())
            }))
        }
    )
}

/// PyTorch's `release_pool` hook (`set_release_pool`): a graph that used
/// `pool` on `device` is reset or destroyed. When no graph holds the pool
/// any more, its memory goes back to the driver at the next `empty_cache`,
/// once freed. An unknown pool is logged and sets an error; nothing changes.
#[no_mangle]
pub extern "C" fn cudalloc_release_pool(device: c_int, pool: cudalloc_mempool_id) {
    let id = (pool.first, pool.second);
    crate::export!(
        cudalloc_release_pool,
        raw || { pool_hook_result(on_device(device, |a, d| a.release_pool(d, id))) }
    )
}

/// PyTorch cannot take an error from its void pool hooks: log it and set it.
fn pool_hook_result(r: crate::error::Result<()>) {
    if let Err(e) = &r {
        if !global::exiting() {
            tracing::warn!("cudalloc: {}", e.message);
        }
    }
    super::boundary::Finish::<()>::finish(r);
}
