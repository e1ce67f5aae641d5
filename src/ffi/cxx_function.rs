//! PyTorch's allocation filters, kept and called with no C++ compiler
//! involved, and the routes they define (`graph_pools:on`; see
//! `engine/pools.rs`).
//!
//! `beginAllocateToPool(device, pool, filter)` hands over a
//! `std::function<bool(cudaStream_t)>` by value; under the Itanium C++ ABI
//! that is a pointer to a temporary the caller destroys after the call. The
//! filter answers, for each later allocation's stream, whether the
//! allocation goes to `pool` (CUDA graph capture: "is this stream capturing
//! my graph"; `_cuda_beginAllocateCurrentThreadToPool`: "is this the thread
//! that began"). So cudalloc copies it, and asks the copy in
//! `cudalloc_malloc_torch` until `endAllocateToPool` destroys it.
//!
//! A `std::function` here is libstdc++'s (every PyTorch wheel for Linux is
//! built with it; the C++ test checks the layout with g++): 32 bytes, the
//! functor's storage (`_Any_data`, 16 bytes), `_M_manager` and
//! `_M_invoker`. The manager copies (`__clone_functor`, 2) and destroys
//! (`__destroy_functor`, 3) a functor; the invoker calls it. A filter may
//! throw (PyTorch's checks the CUDA call it makes): the exception passes
//! through `extern "C-unwind"` frames, never a `catch_unwind` (see
//! `cxx_throw`), to `cudalloc_malloc_torch`'s caller.

use crate::engine::PoolId;
use libc::{c_int, c_void};
use parking_lot::RwLock;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

type AnyData = [usize; 2];
type Manager = unsafe extern "C-unwind" fn(*mut AnyData, *const AnyData, c_int) -> bool;
type Invoker = unsafe extern "C-unwind" fn(*const AnyData, *mut *mut c_void) -> bool;

const CLONE_FUNCTOR: c_int = 2;
const DESTROY_FUNCTOR: c_int = 3;

/// libstdc++'s `std::function<bool(cudaStream_t)>`.
#[repr(C)]
struct StdFunction {
    /// Written by the invoker of a `mutable` functor: behind an UnsafeCell.
    functor: UnsafeCell<AnyData>,
    manager: Option<Manager>,
    invoker: Option<Invoker>,
}

/// A copy of a filter, owned by cudalloc.
pub struct Filter(Box<StdFunction>);

// SAFETY: PyTorch calls its filters from whichever thread allocates, and
// they only read what they captured (a graph, a thread id).
unsafe impl Send for Filter {}
// SAFETY: as above; the functor sits behind an UnsafeCell, and only the
// C++ side (which promises thread safety for its filters) touches it.
unsafe impl Sync for Filter {}

impl Filter {
    /// Copy the `std::function<bool(cudaStream_t)>` at `src` (its copy
    /// constructor). `None` for NULL or an empty function. May throw (the
    /// functor's copy constructor): call outside any `catch_unwind`.
    ///
    /// # Safety
    /// `src` is NULL or points to a live libstdc++ `std::function` of that
    /// signature.
    pub unsafe fn copy_from(src: *const c_void) -> Option<Filter> {
        if src.is_null() {
            return None;
        }
        let src = src as *const StdFunction;
        // Read the two pointers only: the functor's bytes may be
        // uninitialised (an empty function), so no reference to the whole.
        // SAFETY: `src` points to a live std::function (the caller's
        // promise), whose manager and invoker fields are initialised.
        let (manager, invoker) = unsafe {
            (
                std::ptr::addr_of!((*src).manager).read()?,
                std::ptr::addr_of!((*src).invoker).read()?,
            )
        };
        let mut f = Box::new(StdFunction {
            functor: UnsafeCell::new([0; 2]),
            manager: None,
            invoker: None,
        });
        // SAFETY: libstdc++'s manager, asked to clone (CLONE_FUNCTOR), copies
        // the live source functor into the fresh, zeroed storage of `f`.
        unsafe {
            manager(
                f.functor.get(),
                std::ptr::addr_of!((*src).functor) as *const AnyData,
                CLONE_FUNCTOR,
            )
        };
        f.manager = Some(manager);
        f.invoker = Some(invoker);
        Some(Filter(f))
    }

    /// Ask the filter about `stream`. May throw (see the module docs).
    pub fn call(&self, stream: *mut c_void) -> bool {
        let mut arg = stream;
        match self.0.invoker {
            // SAFETY: the invoker and functor were copied together from a
            // live std::function; the argument is a `cudaStream_t&&`.
            Some(invoke) => unsafe { invoke(self.0.functor.get(), &mut arg) },
            None => false,
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        if let Some(manager) = self.0.manager {
            let f = self.0.functor.get();
            // SAFETY: the functor was made by this manager's clone and is
            // destroyed once (its destructor does not throw).
            unsafe { manager(f, f, DESTROY_FUNCTOR) };
        }
    }
}

struct Route {
    device: usize,
    pool: PoolId,
    filter: Filter,
}

/// The filters between `beginAllocateToPool` and `endAllocateToPool`, oldest
/// first (PyTorch's allocator asks them in that order too).
static ROUTES: RwLock<Vec<Route>> = RwLock::new(Vec::new());
/// `ROUTES.len()`, read without the lock on every allocation.
static ROUTE_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Start routing to `pool` the allocations on `device` that `filter` accepts.
pub fn add(device: usize, pool: PoolId, filter: Filter) {
    let mut routes = ROUTES.write();
    routes.push(Route {
        device,
        pool,
        filter,
    });
    ROUTE_COUNT.store(routes.len(), Ordering::Release);
}

/// Stop the oldest route of `pool` on `device`; whether there was one. Waits
/// for the filter calls in flight, then destroys the filter.
pub fn remove(device: usize, pool: PoolId) -> bool {
    let mut routes = ROUTES.write();
    let Some(i) = routes
        .iter()
        .position(|r| r.device == device && r.pool == pool)
    else {
        return false;
    };
    let gone = routes.remove(i);
    ROUTE_COUNT.store(routes.len(), Ordering::Release);
    drop(routes);
    drop(gone);
    true
}

/// The pool an allocation on `device` for `stream` goes to: the first route
/// whose filter accepts the stream. May throw (a filter's exception).
#[inline]
pub fn route(device: c_int, stream: *mut c_void) -> Option<PoolId> {
    if ROUTE_COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    route_slow(device, stream)
}

#[cold]
fn route_slow(device: c_int, stream: *mut c_void) -> Option<PoolId> {
    let device = usize::try_from(device).ok()?;
    // Ask under the read lock, as PyTorch's allocator asks under its mutex:
    // `remove` then waits for every call in flight, so a filter is never
    // called once its end hook returned (PyTorch's graph filter reads the
    // CUDAGraph, which may be gone by then). If a filter throws, the guard
    // is released as the exception passes.
    // (PyTorch's filters never call back into cudalloc: a nested read here
    // would wait behind a waiting writer.)
    let routes = ROUTES.read();
    routes
        .iter()
        .find(|r| r.device == device && r.filter.call(stream))
        .map(|r| r.pool)
}
