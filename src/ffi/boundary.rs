//! The panic boundary and the thread-local last error.
//!
//! Every export's body runs inside [`guard`]: a panic is caught, recorded as
//! `CUDALLOC_ERR_PANIC`, and turned into the return type's
//! [`PanicDefault`] (NULL, an error code, or nothing). Nothing unwinds into C.

use crate::error::{Error, ErrorCode};
use std::cell::{Cell, RefCell};
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

/// Room for the thread's last error message, NUL included; a longer one is
/// cut (at a character boundary, marked with "...").
pub const MESSAGE_CAP: usize = 4096;

thread_local! {
    /// The code of the thread's last call. No destructor, so it works during
    /// the thread's exit and the process's (glibc tears the main thread's
    /// thread-locals down before the atexit handlers run) too.
    static CODE: Cell<ErrorCode> = const { Cell::new(ErrorCode::CUDALLOC_OK) };
    /// Its message, NUL-terminated (empty: the code's description). Inline
    /// storage without a destructor, for the same reason: a heap string
    /// first made in a thread-exit destructor (a pthread key's) would be
    /// registered for a destructor that never runs, and leak.
    static MESSAGE: RefCell<[u8; MESSAGE_CAP]> = const { RefCell::new([0; MESSAGE_CAP]) };
}

/// Record the outcome of the current call for `cudalloc_last_error*`.
/// Safe to call during thread exit.
pub fn set_last(code: ErrorCode, message: &str) {
    CODE.set(code);
    let _ = MESSAGE.try_with(|m| {
        if let Ok(mut m) = m.try_borrow_mut() {
            store(&mut m, message);
        }
    });
}

/// Copy `message` into `buf`, NUL-terminated: NULs inside become spaces,
/// and a message too long is cut at a character boundary, ending "...".
fn store(buf: &mut [u8; MESSAGE_CAP], message: &str) {
    let mut n = message.len();
    let cut = n >= MESSAGE_CAP;
    if cut {
        n = MESSAGE_CAP - 4;
        while !message.is_char_boundary(n) {
            n -= 1;
        }
    }
    buf[..n].copy_from_slice(&message.as_bytes()[..n]);
    for b in &mut buf[..n] {
        if *b == 0 {
            *b = b' ';
        }
    }
    if cut {
        buf[n..n + 3].copy_from_slice(b"...");
        n += 3;
    }
    buf[n] = 0;
}

pub fn set_ok() {
    if CODE.replace(ErrorCode::CUDALLOC_OK) != ErrorCode::CUDALLOC_OK {
        let _ = MESSAGE.try_with(|m| {
            if let Ok(mut m) = m.try_borrow_mut() {
                m[0] = 0;
            }
        });
    }
}

pub fn set_error(e: &Error) -> i32 {
    set_last(e.code, &e.message);
    e.code as i32
}

pub fn last_code() -> ErrorCode {
    CODE.get()
}

/// The thread's last error message, copied (empty when none).
pub fn last_message() -> String {
    MESSAGE
        .try_with(|m| {
            m.try_borrow()
                .map(|m| {
                    let n = m.iter().position(|&b| b == 0).unwrap_or(0);
                    String::from_utf8_lossy(&m[..n]).into_owned()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// Pointer to the thread's last message, or the last code's description
/// when it has none; valid until the thread's next cudalloc call.
pub fn last_message_ptr() -> *const libc::c_char {
    let own = MESSAGE.try_with(|m| match m.try_borrow() {
        Ok(m) if m[0] != 0 => Some(m.as_ptr() as *const libc::c_char),
        _ => None,
    });
    match own {
        Ok(Some(p)) => p,
        _ => CODE.get().description().as_ptr() as *const libc::c_char,
    }
}

/// How an export's Rust result becomes its C return value, setting the
/// thread's last error on the way: `CUDALLOC_OK`, or the error's code and
/// message. One rule for every export (see [`export!`](crate::export)).
pub trait Finish<R> {
    fn finish(self) -> R;
}

/// A void export.
impl Finish<()> for Result<(), Error> {
    fn finish(self) {
        match self {
            Ok(()) => set_ok(),
            Err(e) => {
                set_error(&e);
            }
        }
    }
}

/// An export returning a result code: 0 or the error's code.
impl Finish<i32> for Result<(), Error> {
    fn finish(self) -> i32 {
        match self {
            Ok(()) => {
                set_ok();
                0
            }
            Err(e) => set_error(&e),
        }
    }
}

/// An export returning a count: -1 on error.
impl Finish<i32> for Result<i32, Error> {
    fn finish(self) -> i32 {
        match self {
            Ok(n) => {
                set_ok();
                n
            }
            Err(e) => {
                set_error(&e);
                -1
            }
        }
    }
}

/// An export returning a pointer: NULL on error.
impl<T> Finish<*mut T> for Result<*mut T, Error> {
    fn finish(self) -> *mut T {
        match self {
            Ok(p) => {
                set_ok();
                p
            }
            Err(e) => {
                set_error(&e);
                std::ptr::null_mut()
            }
        }
    }
}

/// An export returning a fraction: -1.0 on error (a value no getter returns).
impl Finish<f64> for Result<f64, Error> {
    fn finish(self) -> f64 {
        match self {
            Ok(f) => {
                set_ok();
                f
            }
            Err(e) => {
                set_error(&e);
                -1.0
            }
        }
    }
}

/// What a buffer-filling export did (`cudalloc_leak_report`'s convention):
/// the bytes needed, and the error when nothing was written.
pub struct Written {
    pub needed: usize,
    pub error: Option<Error>,
}

/// A buffer-filling export returns the bytes needed (0 when it failed
/// before knowing), with the error, if any, as the last error.
impl Finish<usize> for Result<Written, Error> {
    fn finish(self) -> usize {
        match self {
            Ok(Written {
                needed,
                error: None,
            }) => {
                set_ok();
                needed
            }
            Ok(Written {
                needed,
                error: Some(e),
            }) => {
                set_error(&e);
                needed
            }
            Err(e) => {
                set_error(&e);
                0
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_kept_whole_or_cut_at_a_character() {
        set_last(ErrorCode::CUDALLOC_ERR_CONFIG, "a\0b");
        assert_eq!(last_message(), "a b");
        let long = "é".repeat(MESSAGE_CAP);
        set_last(ErrorCode::CUDALLOC_ERR_CONFIG, &long);
        let m = last_message();
        assert!(m.ends_with("...") && m.len() < MESSAGE_CAP, "{}", m.len());
        assert!(m.trim_end_matches("...").chars().all(|c| c == 'é'));
        set_ok();
        assert_eq!(last_message(), "");
        assert_eq!(last_code(), ErrorCode::CUDALLOC_OK);
    }
}
