//! Errors: the Rust [`Error`] type used inside the crate, and the numeric
//! [`cudalloc_result`] codes the C ABI returns.
//!
//! The codes start at a distinctive base (42000) so nobody mistakes them for
//! errno or a CUDA error. Retired values are never reused; new ones are added
//! at the end.

use crate::driver::DriverError;
use std::fmt;

/// Result codes of the C ABI. `CUDALLOC_OK` is 0; every error is distinct.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum cudalloc_result {
    /// Success.
    CUDALLOC_OK = 0,
    /// A required pointer argument was NULL, or an argument is out of range.
    CUDALLOC_ERR_INVALID_ARGUMENT = 42001,
    /// The device index is negative or not below the device count.
    CUDALLOC_ERR_INVALID_DEVICE = 42002,
    /// The request could not be served even after flushing the cache and retrying.
    CUDALLOC_ERR_OUT_OF_MEMORY = 42003,
    /// Free of a pointer cudalloc does not hold live (unknown or double free).
    CUDALLOC_ERR_INVALID_FREE = 42004,
    /// A `CUDALLOC_CONF` key or value is not valid; the message names it.
    CUDALLOC_ERR_CONFIG = 42005,
    /// `cudalloc_init` was called with a configuration other than the one in force.
    CUDALLOC_ERR_ALREADY_INITIALIZED = 42006,
    /// The device driver reported a failure other than out-of-memory.
    CUDALLOC_ERR_DRIVER = 42007,
    /// The CUDA driver library (libcuda.so) could not be loaded.
    CUDALLOC_ERR_DRIVER_NOT_FOUND = 42008,
    /// The process is exiting, the driver has deinitialised, or this is a child
    /// forked after cudalloc started; the call did nothing.
    CUDALLOC_ERR_SHUTTING_DOWN = 42009,
    /// An internal panic was caught at the C boundary. Please report it.
    CUDALLOC_ERR_PANIC = 42010,
    /// The caller's buffer is too small; the needed size was reported.
    CUDALLOC_ERR_BUFFER_TOO_SMALL = 42011,
    /// The pointer is not a live cudalloc allocation (e.g. in `record_stream`).
    CUDALLOC_ERR_UNKNOWN_POINTER = 42012,
    /// Something cudalloc does not do, or was configured not to (PyTorch's
    /// private memory pools, which CUDA graph capture needs, unless
    /// `graph_pools:on`); refused, nothing changed.
    CUDALLOC_ERR_UNSUPPORTED = 42013,
}

pub use cudalloc_result as ErrorCode;

impl cudalloc_result {
    /// Every code, in numeric order.
    pub const ALL: [cudalloc_result; 14] = [
        Self::CUDALLOC_OK,
        Self::CUDALLOC_ERR_INVALID_ARGUMENT,
        Self::CUDALLOC_ERR_INVALID_DEVICE,
        Self::CUDALLOC_ERR_OUT_OF_MEMORY,
        Self::CUDALLOC_ERR_INVALID_FREE,
        Self::CUDALLOC_ERR_CONFIG,
        Self::CUDALLOC_ERR_ALREADY_INITIALIZED,
        Self::CUDALLOC_ERR_DRIVER,
        Self::CUDALLOC_ERR_DRIVER_NOT_FOUND,
        Self::CUDALLOC_ERR_SHUTTING_DOWN,
        Self::CUDALLOC_ERR_PANIC,
        Self::CUDALLOC_ERR_BUFFER_TOO_SMALL,
        Self::CUDALLOC_ERR_UNKNOWN_POINTER,
        Self::CUDALLOC_ERR_UNSUPPORTED,
    ];

    /// A static, NUL-terminated description of the code.
    pub fn description(self) -> &'static str {
        use cudalloc_result::*;
        match self {
            CUDALLOC_OK => "ok\0",
            CUDALLOC_ERR_INVALID_ARGUMENT => "invalid argument\0",
            CUDALLOC_ERR_INVALID_DEVICE => "invalid device index\0",
            CUDALLOC_ERR_OUT_OF_MEMORY => {
                "out of device memory after flushing the cache and retrying\0"
            }
            CUDALLOC_ERR_INVALID_FREE => {
                "free of a pointer that is not live (unknown or double free)\0"
            }
            CUDALLOC_ERR_CONFIG => "invalid configuration\0",
            CUDALLOC_ERR_ALREADY_INITIALIZED => {
                "already initialised with a different configuration\0"
            }
            CUDALLOC_ERR_DRIVER => "device driver error\0",
            CUDALLOC_ERR_DRIVER_NOT_FOUND => {
                "libcuda.so not found; is the NVIDIA driver installed?\0"
            }
            CUDALLOC_ERR_SHUTTING_DOWN => {
                "process exiting, driver deinitialised, or a forked child; call ignored\0"
            }
            CUDALLOC_ERR_PANIC => "internal panic caught at the C boundary (a cudalloc bug)\0",
            CUDALLOC_ERR_BUFFER_TOO_SMALL => "buffer too small\0",
            CUDALLOC_ERR_UNKNOWN_POINTER => "pointer is not a live cudalloc allocation\0",
            CUDALLOC_ERR_UNSUPPORTED => "not supported by cudalloc (yet); nothing changed\0",
        }
    }

    /// The code for a raw integer, if it is one.
    pub fn from_i32(v: i32) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as i32 == v)
    }
}

/// The crate's error type: a code plus a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::CUDALLOC_ERR_CONFIG, message)
    }
    pub fn invalid_device(device: i64, count: usize) -> Self {
        Self::new(
            ErrorCode::CUDALLOC_ERR_INVALID_DEVICE,
            match count {
                0 => format!("device {device} is not valid: no CUDA device is visible"),
                1 => format!("device {device} is not valid: 1 device, index 0"),
                n => format!(
                    "device {device} is not valid: {n} devices, indices 0 to {}",
                    n - 1
                ),
            },
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        let code = match &e {
            DriverError::OutOfMemory => ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY,
            DriverError::Deinitialized => ErrorCode::CUDALLOC_ERR_SHUTTING_DOWN,
            DriverError::InvalidDevice(_) => ErrorCode::CUDALLOC_ERR_INVALID_DEVICE,
            DriverError::NotFound(_) => ErrorCode::CUDALLOC_ERR_DRIVER_NOT_FOUND,
            DriverError::Other { .. } => ErrorCode::CUDALLOC_ERR_DRIVER,
        };
        Error::new(code, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_device_message_names_the_valid_indices() {
        let msg = |d, n| Error::invalid_device(d, n).message;
        assert_eq!(
            msg(2, 2),
            "device 2 is not valid: 2 devices, indices 0 to 1"
        );
        assert_eq!(msg(-1, 1), "device -1 is not valid: 1 device, index 0");
        assert_eq!(
            msg(0, 0),
            "device 0 is not valid: no CUDA device is visible"
        );
    }

    #[test]
    fn codes_are_distinct_and_described() {
        let mut seen = std::collections::HashSet::new();
        for c in cudalloc_result::ALL {
            assert!(seen.insert(c as i32));
            assert!(c.description().ends_with('\0'));
            assert_eq!(cudalloc_result::from_i32(c as i32), Some(c));
        }
        assert_eq!(cudalloc_result::from_i32(7), None);
    }
}
