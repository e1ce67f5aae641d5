//! Throwing a C++ `std::runtime_error` from Rust, for PyTorch's `alloc_fn`
//! (`cudalloc_malloc_torch`) and its graph-pool hook
//! (`cudalloc_begin_allocate_to_pool`, which always refuses).
//!
//! PyTorch's `CUDAPluggableAllocator` does not check its allocator's NULL: it
//! wraps the pointer in a `DataPtr`, `torch.empty` succeeds, and the first
//! kernel given the untyped data pointer writes to address 0 (an illegal
//! address that ruins the CUDA context). What PyTorch does handle is a C++
//! exception from `alloc_fn`: it reaches Python as a `RuntimeError`.
//!
//! So [`throw_runtime_error`] throws one, with no C++ compiler involved: the
//! C++ runtime's own entry points are looked up in the process, in the
//! global scope or else in the libstdc++ already loaded with local scope
//! (`dlopen(RTLD_NOLOAD)`; PyTorch's comes in through Python extension
//! modules, which are loaded RTLD_LOCAL):
//! `__cxa_allocate_exception`, the `std::runtime_error(const char*)`
//! constructor, its type info and destructor, and `__cxa_throw`. When any is
//! missing (a process without libstdc++, such as a C program), it returns:
//! `alloc_fn` then falls back to NULL, the pool hook logs its refusal.
//!
//! The exception unwinds through the `extern "C-unwind"` export that calls
//! this, which holds nothing to drop at that point, and never through a
//! `catch_unwind` (Rust aborts on a foreign exception there).

use libc::{c_char, c_void};
use once_cell::sync::OnceCell;
use std::ffi::CString;

type AllocateFn = unsafe extern "C" fn(usize) -> *mut c_void;
type CtorFn = unsafe extern "C-unwind" fn(*mut c_void, *const c_char);
type DtorFn = unsafe extern "C" fn(*mut c_void);
type ThrowFn = unsafe extern "C-unwind" fn(*mut c_void, *const c_void, Option<DtorFn>) -> !;

/// Bytes asked of `__cxa_allocate_exception` for the object: more than
/// `sizeof(std::runtime_error)` (16 with libstdc++ on x86-64; the C++ test
/// checks the bound), which costs nothing.
const OBJECT_BYTES: usize = 64;

struct Cxx {
    allocate: AllocateFn,
    ctor: CtorFn,
    dtor: DtorFn,
    type_info: *const c_void,
    throw: ThrowFn,
}

// SAFETY: function pointers and a pointer to static type info, never written.
unsafe impl Send for Cxx {}
// SAFETY: as above.
unsafe impl Sync for Cxx {}

/// Where to look the C++ runtime up: the libstdc++ already loaded into the
/// process, in whatever scope (Python loads extension modules, PyTorch's
/// among them, with RTLD_LOCAL, so it need not be in the global scope), or
/// else the global scope (a C++ runtime under another name). All five
/// symbols come from the one place. Never loads a new library.
fn scope() -> Option<*mut c_void> {
    // SAFETY: RTLD_NOLOAD returns a handle only to a library already loaded;
    // the handle is kept for the life of the process (never dlclose'd).
    let h = unsafe {
        libc::dlopen(
            c"libstdc++.so.6".as_ptr(),
            libc::RTLD_LAZY | libc::RTLD_NOLOAD,
        )
    };
    if !h.is_null() {
        return Some(h);
    }
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads.
    let global = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__cxa_throw".as_ptr()) };
    (!global.is_null()).then_some(libc::RTLD_DEFAULT)
}

fn lookup(scope: *mut c_void, name: &std::ffi::CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with a valid handle (or RTLD_DEFAULT) and a
    // NUL-terminated name only reads.
    let p = unsafe { libc::dlsym(scope, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn resolve() -> Option<Cxx> {
    let h = scope()?;
    let allocate = lookup(h, c"__cxa_allocate_exception")?;
    let ctor = lookup(h, c"_ZNSt13runtime_errorC1EPKc")?;
    let dtor = lookup(h, c"_ZNSt13runtime_errorD1Ev")?;
    let type_info = lookup(h, c"_ZTISt13runtime_error")?;
    let throw = lookup(h, c"__cxa_throw")?;
    // SAFETY: each symbol is the C++ runtime's entry point of that name,
    // whose C ABI is the type given (Itanium C++ ABI; the constructor and
    // destructor take `this` first).
    unsafe {
        Some(Cxx {
            allocate: std::mem::transmute::<*mut c_void, AllocateFn>(allocate),
            ctor: std::mem::transmute::<*mut c_void, CtorFn>(ctor),
            dtor: std::mem::transmute::<*mut c_void, DtorFn>(dtor),
            type_info,
            throw: std::mem::transmute::<*mut c_void, ThrowFn>(throw),
        })
    }
}

/// The C++ runtime, once found. Not finding it is not remembered: the next
/// failed allocation looks again (the runtime may be loaded later).
fn cxx() -> Option<&'static Cxx> {
    static CXX: OnceCell<Cxx> = OnceCell::new();
    if let Some(c) = CXX.get() {
        return Some(c);
    }
    let c = resolve()?;
    Some(CXX.get_or_init(|| c))
}

/// Whether [`throw_runtime_error`] can throw in this process.
pub fn available() -> bool {
    cxx().is_some()
}

/// Throw `std::runtime_error(message)`; returns only when the C++ runtime is
/// not in the process. Call it outside any `catch_unwind`, from an
/// `extern "C-unwind"` function.
pub fn throw_runtime_error(message: String) {
    let Some(c) = cxx() else {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "cudalloc: no C++ runtime (libstdc++) in this process to throw with; \
                 cudalloc_malloc_torch returns NULL, which PyTorch does not check"
            )
        });
        return;
    };
    let text = CString::new(message.replace('\0', " "));
    // Nothing owned may be live at the throw (see the module docs).
    drop(message);
    let Ok(text) = text else {
        return;
    };
    // SAFETY: the object buffer is OBJECT_BYTES >= sizeof(std::runtime_error)
    // bytes from the C++ runtime; the constructor copies `text` (a
    // NUL-terminated string), which is freed before the throw, so nothing of
    // ours is live while the exception unwinds.
    unsafe {
        let obj = (c.allocate)(OBJECT_BYTES);
        (c.ctor)(obj, text.as_ptr());
        drop(text);
        (c.throw)(obj, c.type_info, Some(c.dtor))
    }
}
