//! The panic boundary and the thread-local last error.
//!
//! Every export's body runs inside [`guard`]: a panic is caught, recorded as
//! `CUDALLOC_ERR_PANIC`, and turned into the return type's
//! [`PanicDefault`] (NULL, an error code, or nothing). Nothing unwinds into C.

use crate::error::{Error, ErrorCode};
use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What an export returns when its body panicked.
pub trait PanicDefault {
    fn panic_default() -> Self;
}

impl PanicDefault for () {
    fn panic_default() -> Self {}
}

impl<T> PanicDefault for *mut T {
    fn panic_default() -> Self {
        std::ptr::null_mut()
    }
}

impl<T> PanicDefault for *const T {
    fn panic_default() -> Self {
        std::ptr::null()
    }
}

impl<T> PanicDefault for Option<T> {
    fn panic_default() -> Self {
        None
    }
}

/// A value no getter returns (`cudalloc_get_memory_fraction`: -1.0).
impl PanicDefault for f64 {
    fn panic_default() -> Self {
        -1.0
    }
}

impl PanicDefault for i32 {
    fn panic_default() -> Self {
        ErrorCode::CUDALLOC_ERR_PANIC as i32
    }
}

impl PanicDefault for usize {
    fn panic_default() -> Self {
        0
    }
}

struct LastError {
    code: ErrorCode,
    message: CString,
}

thread_local! {
    static LAST: RefCell<LastError> = RefCell::new(LastError { code: ErrorCode::CUDALLOC_OK, message: CString::default() });
}

/// Record the outcome of the current call for `cudalloc_last_error*`.
/// Safe to call during thread exit (it then does nothing).
pub fn set_last(code: ErrorCode, message: &str) {
    let _ = LAST.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.code = code;
            l.message = CString::new(message.replace('\0', " ")).unwrap_or_default();
        }
    });
}

pub fn set_ok() {
    let _ = LAST.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            if l.code != ErrorCode::CUDALLOC_OK {
                l.code = ErrorCode::CUDALLOC_OK;
                l.message = CString::default();
            }
        }
    });
}

pub fn set_error(e: &Error) -> i32 {
    set_last(e.code, &e.message);
    e.code as i32
}

pub fn last_code() -> ErrorCode {
    LAST.try_with(|l| {
        l.try_borrow()
            .map(|l| l.code)
            .unwrap_or(ErrorCode::CUDALLOC_OK)
    })
    .unwrap_or(ErrorCode::CUDALLOC_OK)
}

/// The thread's last error message, copied (empty when none).
pub fn last_message() -> String {
    LAST.try_with(|l| {
        l.try_borrow()
            .map(|l| l.message.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
    .unwrap_or_default()
}

/// Pointer to the thread's last message; valid until the thread's next cudalloc call.
pub fn last_message_ptr() -> *const libc::c_char {
    LAST.try_with(|l| match l.try_borrow() {
        Ok(l) if !l.message.as_bytes().is_empty() => l.message.as_ptr(),
        _ => l
            .try_borrow()
            .map(|l| l.code.description().as_ptr() as *const libc::c_char)
            .unwrap_or(std::ptr::null()),
    })
    .unwrap_or(c"".as_ptr())
}

/// Run an export's body, catching any panic.
#[inline]
pub fn guard<R: PanicDefault>(name: &'static str, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last(
                ErrorCode::CUDALLOC_ERR_PANIC,
                &format!("internal panic in {name}: {what}"),
            );
            R::panic_default()
        }
    }
}
