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
//!
//! **A typed OOM for PyTorch.** [`throw_out_of_memory`] throws
//! `c10::OutOfMemoryError` where PyTorch is loaded, which PyTorch's Python
//! bindings turn into `torch.OutOfMemoryError` (a `RuntimeError`), and
//! falls back to `std::runtime_error` elsewhere. The class is header-only
//! (`class OutOfMemoryError : public Error { using Error::Error; }`): its
//! type info and vtable are emitted, weak, into the PyTorch libraries that
//! use it (libtorch_python.so, which catches it, and libc10_cuda.so,
//! libtorch_cuda.so), not into libc10.so; it has no constructor of its own
//! to call. So the object is built as the compiler builds it: libc10.so's
//! `c10::Error(SourceLocation, std::string)` constructor (the string made
//! and destroyed by libstdc++'s own functions), then the vtable pointer set
//! to `OutOfMemoryError`'s. What is checked before, and why it is enough:
//! - each symbol is found by its mangled name, which encodes the
//!   parameter types and the std::string ABI (`__cxx11`): another ABI or
//!   signature is not found, and the fallback is taken;
//! - the type info is read from the vtable found (so the two match), and
//!   must be a single-inheritance class type info
//!   (`__si_class_type_info`, from the same libstdc++) named
//!   `N3c1016OutOfMemoryErrorE` whose base is named `N3c105ErrorE`;
//! - after the constructor, the object's vtable pointer must be
//!   `c10::Error`'s, or the object is destroyed and the fallback taken.
//!
//! What cannot be checked at run time: that `OutOfMemoryError` adds no data
//! member to `c10::Error` (it has none from PyTorch 1.x to 2.11; it then
//! could not inherit `Error`'s constructors unchanged), and the layout of
//! `c10::SourceLocation` (`{const char*, const char*, uint32_t}`, the same
//! over that time). The object's memory is over-allocated, so a larger
//! `c10::Error` costs nothing. The destructor handed to `__cxa_throw` is
//! the class's own, read from its vtable (slot 0, the complete-object
//! destructor, in the Itanium C++ ABI).

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

/// `c10::SourceLocation`, passed by value.
#[repr(C)]
struct SourceLocation {
    function: *const c_char,
    file: *const c_char,
    line: u32,
}

type ErrorCtorFn = unsafe extern "C-unwind" fn(*mut c_void, SourceLocation, *mut c_void);
type StringCtorFn = unsafe extern "C-unwind" fn(*mut c_void, *const c_char, *const c_void);
type FreeExceptionFn = unsafe extern "C" fn(*mut c_void);

/// Bytes asked of `__cxa_allocate_exception` for a `c10::OutOfMemoryError`
/// (about 200 with PyTorch 2.11 on x86-64; the test checks the bound).
const C10_OBJECT_BYTES: usize = 1024;

/// What throwing `c10::OutOfMemoryError` takes (see the module docs).
struct C10 {
    error_ctor: ErrorCtorFn,
    /// `c10::Error`'s vtable pointer, as its constructor leaves it.
    error_vptr: usize,
    /// `c10::OutOfMemoryError`'s vtable pointer, its type info and its
    /// complete-object destructor (vtable slot 0).
    oom_vptr: usize,
    oom_type_info: *const c_void,
    oom_dtor: DtorFn,
    string_ctor: StringCtorFn,
    string_dtor: DtorFn,
    free_exception: FreeExceptionFn,
}

// SAFETY: function pointers and addresses of static data, never written.
unsafe impl Send for C10 {}
// SAFETY: as above.
unsafe impl Sync for C10 {}

/// A library already loaded in the process (in whatever scope), never
/// loading one: `dlopen(RTLD_NOLOAD)`; the handle is kept for good.
fn loaded(name: &std::ffi::CStr) -> Option<*mut c_void> {
    // SAFETY: RTLD_NOLOAD returns a handle only to a library already loaded.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    (!h.is_null()).then_some(h)
}

/// The mangled name a type info object points to, without GCC's leading
/// `*` (a name compared by address).
///
/// # Safety
/// 1. `ti` points to a `std::type_info` (vtable pointer, then `const char*`).
unsafe fn type_name(ti: *const c_void) -> Option<&'static [u8]> {
    // SAFETY: the caller promises a type_info; its name is a static C string.
    let name = unsafe { *(ti as *const *const c_char).add(1) };
    if name.is_null() {
        return None;
    }
    // SAFETY: as above.
    let bytes = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes();
    Some(bytes.strip_prefix(b"*").unwrap_or(bytes))
}

fn resolve_c10() -> Option<C10> {
    let std = scope()?;
    let c10 = loaded(c"libc10.so")
        .or_else(|| lookup(libc::RTLD_DEFAULT, c"_ZTVN3c105ErrorE").map(|_| libc::RTLD_DEFAULT))?;
    let error_ctor = lookup(
        c10,
        c"_ZN3c105ErrorC1ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE",
    )?;
    let error_vtable = lookup(c10, c"_ZTVN3c105ErrorE")? as usize;
    // The class's vtable, from the global scope or a PyTorch library that
    // has it (libtorch_python.so catches the class, so it has it).
    let oom_vtable = [
        None,
        loaded(c"libtorch_python.so"),
        loaded(c"libc10_cuda.so"),
        loaded(c"libtorch_cuda.so"),
    ]
    .into_iter()
    .find_map(|h| {
        lookup(
            h.unwrap_or(libc::RTLD_DEFAULT),
            c"_ZTVN3c1016OutOfMemoryErrorE",
        )
    })? as usize;
    let si_vtable = lookup(std, c"_ZTVN10__cxxabiv120__si_class_type_infoE")? as usize;
    let string_ctor = lookup(
        std,
        c"_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEC1EPKcRKS3_",
    )?;
    let string_dtor = lookup(
        std,
        c"_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEED1Ev",
    )?;
    let free_exception = lookup(std, c"__cxa_free_exception")?;
    let word = std::mem::size_of::<usize>();
    // SAFETY: an Itanium vtable symbol starts with the offset to top and
    // the type info pointer, then the virtual function pointers; a class
    // type info is a vtable pointer, the name, then (single inheritance)
    // the base's type info. Each read is of a symbol just found by its
    // mangled name, so of the object that name promises.
    unsafe {
        let top = *(oom_vtable as *const isize);
        let ti = *((oom_vtable + word) as *const *const c_void);
        if top != 0 || ti.is_null() {
            return None;
        }
        if *(ti as *const usize) != si_vtable + 2 * word {
            return None;
        }
        let base = *(ti as *const *const c_void).add(2);
        if type_name(ti)? != b"N3c1016OutOfMemoryErrorE" || type_name(base)? != b"N3c105ErrorE" {
            return None;
        }
        let oom_dtor = *((oom_vtable + 2 * word) as *const *mut c_void);
        if oom_dtor.is_null() {
            return None;
        }
        Some(C10 {
            error_ctor: std::mem::transmute::<*mut c_void, ErrorCtorFn>(error_ctor),
            error_vptr: error_vtable + 2 * word,
            oom_vptr: oom_vtable + 2 * word,
            oom_type_info: ti,
            oom_dtor: std::mem::transmute::<*mut c_void, DtorFn>(oom_dtor),
            string_ctor: std::mem::transmute::<*mut c_void, StringCtorFn>(string_ctor),
            string_dtor: std::mem::transmute::<*mut c_void, DtorFn>(string_dtor),
            free_exception: std::mem::transmute::<*mut c_void, FreeExceptionFn>(free_exception),
        })
    }
}

/// PyTorch's c10, once found (as [`cxx`]: not finding it is not remembered).
fn c10() -> Option<&'static C10> {
    static C10_FOUND: OnceCell<C10> = OnceCell::new();
    if let Some(c) = C10_FOUND.get() {
        return Some(c);
    }
    let c = resolve_c10()?;
    Some(C10_FOUND.get_or_init(|| c))
}

/// Whether [`throw_out_of_memory`] throws `c10::OutOfMemoryError` in this
/// process (PyTorch's c10 is loaded and passes the checks of the module
/// docs), rather than `std::runtime_error`.
pub fn typed_oom_available() -> bool {
    cxx().is_some() && c10().is_some()
}

/// Throw `c10::OutOfMemoryError(message)` where PyTorch is loaded, else
/// `std::runtime_error(message)` ([`throw_runtime_error`]); returns only
/// when the C++ runtime is not in the process. Call it as
/// [`throw_runtime_error`].
pub fn throw_out_of_memory(message: String) {
    let (Some(cxx), Some(c10)) = (cxx(), c10()) else {
        return throw_runtime_error(message);
    };
    let Ok(text) = CString::new(message.replace('\0', " ")) else {
        return;
    };
    drop(message);
    let mut string = [0u64; 8]; // a std::string (32 bytes), with room to spare
    let allocator = 0u8; // std::allocator<char>: empty, passed by reference
    let location = SourceLocation {
        function: c"cudalloc_malloc_torch".as_ptr(),
        file: c"cudalloc".as_ptr(),
        line: 0,
    };
    // SAFETY: the functions are libstdc++'s and libc10's, checked as the
    // module docs say. The string is built in `string` and destroyed after
    // the constructor took a copy (a by-value argument is passed by
    // reference and destroyed by the caller, in the Itanium C++ ABI); the
    // object is C10_OBJECT_BYTES from the C++ runtime. Nothing of ours is
    // live at the throw: `text` is dropped before, `string` and `allocator`
    // are plain bytes.
    unsafe {
        let obj = (cxx.allocate)(C10_OBJECT_BYTES);
        let s = string.as_mut_ptr() as *mut c_void;
        (c10.string_ctor)(s, text.as_ptr(), &allocator as *const u8 as *const c_void);
        (c10.error_ctor)(obj, location, s);
        (c10.string_dtor)(s);
        let vptr = obj as *mut usize;
        if *vptr != c10.error_vptr {
            // Not the object this code knows: undo, and throw the plain one.
            let dtor = *(*vptr as *const DtorFn);
            dtor(obj);
            (c10.free_exception)(obj);
            return throw_runtime_error(text.into_string().unwrap_or_default());
        }
        *vptr = c10.oom_vptr;
        drop(text);
        (cxx.throw)(obj, c10.oom_type_info, Some(c10.oom_dtor))
    }
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
