//! `backend:cuda`: the [`Driver`] over the CUDA driver API, through cudarc's
//! raw `sys` layer with run-time loading of `libcuda`.
//!
//! - **Loading.** cudarc panics when libcuda cannot be loaded, and when a
//!   symbol is missing at its first call. [`CudaDriver::new`] therefore checks
//!   `is_culib_present()` first, then looks up every entry point this module
//!   calls ([`ENTRY_POINTS`]) before calling any of them. A missing driver or
//!   symbol is a clear [`DriverError::NotFound`], never a panic.
//! - **Contexts.** The primary context of each device is retained once, at
//!   construction, and made current (`cuCtxSetCurrent`) before every call on
//!   that device: PyTorch's free sets no device guard, so the current context
//!   may belong to another device. Contexts are never released: nothing here
//!   runs at process exit.
//! - **Errors.** `CUDA_ERROR_OUT_OF_MEMORY` is [`DriverError::OutOfMemory`];
//!   `CUDA_ERROR_DEINITIALIZED` and `CUDA_ERROR_NOT_INITIALIZED` (what the
//!   driver says while the process exits) are [`DriverError::Deinitialized`];
//!   anything else is [`DriverError::Other`] with the driver's text.
//! - **Graph capture.** `cuMemAlloc` is illegal while any stream of the
//!   thread is capturing in global mode. [`Driver::mem_alloc`] switches the
//!   thread to relaxed capture mode around the call
//!   (`cuThreadExchangeStreamCaptureMode`), as native torch does.

use super::{Driver, DriverError, DriverResult, Event, Stream};
use cudarc::driver::sys as cu;
use std::ffi::CStr;

/// Every driver entry point this module calls, checked at construction.
pub const ENTRY_POINTS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDevicePrimaryCtxRetain",
    "cuCtxSetCurrent",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamIsCapturing",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuThreadExchangeStreamCaptureMode",
    "cuGetErrorString",
];

/// The message for a machine without the NVIDIA driver.
pub const NOT_FOUND: &str = "libcuda.so not found; is the NVIDIA driver installed?";

struct Device {
    ctx: cu::CUcontext,
}

/// The CUDA driver backend.
pub struct CudaDriver {
    devices: Vec<Device>,
}

// SAFETY: a CUcontext is a handle the driver lets any thread make current;
// the struct holds nothing else.
unsafe impl Send for CudaDriver {}
// SAFETY: as above; every method only passes the handles to the driver,
// which is thread-safe.
unsafe impl Sync for CudaDriver {}

fn error_text(r: cu::CUresult) -> String {
    let mut p: *const libc::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString was checked present at construction; it writes
    // a pointer to a static string (or leaves NULL for an unknown code).
    let ok = unsafe { cu::cuGetErrorString(r, &mut p) } == cu::CUresult::CUDA_SUCCESS;
    if ok && !p.is_null() {
        // SAFETY: the driver returns a NUL-terminated static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        format!("{r:?}")
    }
}

/// Turn a `CUresult` into a `DriverResult`.
fn check(r: cu::CUresult) -> DriverResult<()> {
    use cu::CUresult::*;
    match r {
        CUDA_SUCCESS => Ok(()),
        CUDA_ERROR_OUT_OF_MEMORY => Err(DriverError::OutOfMemory),
        CUDA_ERROR_DEINITIALIZED | CUDA_ERROR_NOT_INITIALIZED => Err(DriverError::Deinitialized),
        other => Err(DriverError::Other {
            code: other as i64,
            message: error_text(other),
        }),
    }
}

impl CudaDriver {
    /// Load libcuda, initialise the driver and retain every device's primary
    /// context. Never panics.
    pub fn new() -> DriverResult<Self> {
        // SAFETY: is_culib_present only tries to dlopen the candidate names.
        if !unsafe { cu::is_culib_present() } {
            return Err(DriverError::NotFound(NOT_FOUND.into()));
        }
        // SAFETY: the library is present, so culib() loads it instead of
        // panicking; `get` only looks a symbol up.
        let lib = unsafe { cu::culib() };
        for name in ENTRY_POINTS {
            // SAFETY: looking up a symbol's address does not call it.
            if unsafe { lib.get::<*const ()>(name.as_bytes()) }.is_err() {
                return Err(DriverError::NotFound(format!(
                    "the CUDA driver library lacks {name}; is the NVIDIA driver too old?"
                )));
            }
        }
        // Every symbol exists, so cudarc's lazy loading cannot panic; guard anyway.
        std::panic::catch_unwind(Self::init).unwrap_or_else(|_| {
            Err(DriverError::NotFound(
                "loading the CUDA driver failed".into(),
            ))
        })
    }

    fn init() -> DriverResult<Self> {
        // SAFETY: cuInit takes flags 0 and has no other preconditions.
        check(unsafe { cu::cuInit(0) })?;
        let mut count = 0;
        // SAFETY: `count` is a valid out-pointer.
        check(unsafe { cu::cuDeviceGetCount(&mut count) })?;
        let mut devices = Vec::with_capacity(count.max(0) as usize);
        for ordinal in 0..count {
            let mut dev: cu::CUdevice = 0;
            // SAFETY: `ordinal` is below the device count; `dev` is a valid out-pointer.
            check(unsafe { cu::cuDeviceGet(&mut dev, ordinal) })?;
            let mut ctx: cu::CUcontext = std::ptr::null_mut();
            // SAFETY: `dev` came from cuDeviceGet; `ctx` is a valid out-pointer.
            check(unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
            devices.push(Device { ctx });
        }
        Ok(CudaDriver { devices })
    }

    /// Make `device`'s primary context current on this thread.
    fn enter(&self, device: usize) -> DriverResult<()> {
        let d = self
            .devices
            .get(device)
            .ok_or(DriverError::InvalidDevice(device))?;
        // SAFETY: `ctx` is a primary context retained at construction and never released.
        check(unsafe { cu::cuCtxSetCurrent(d.ctx) })
    }
}

fn stream(s: Stream) -> cu::CUstream {
    s as usize as cu::CUstream
}

fn event(e: Event) -> cu::CUevent {
    e as usize as cu::CUevent
}

impl Driver for CudaDriver {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device_count(&self) -> usize {
        self.devices.len()
    }

    fn mem_alloc(&self, device: usize, size: u64) -> DriverResult<u64> {
        self.enter(device)?;
        let mut mode = cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        // SAFETY: `mode` is a valid in/out pointer; the old mode comes back in it.
        let swapped = unsafe { cu::cuThreadExchangeStreamCaptureMode(&mut mode) }
            == cu::CUresult::CUDA_SUCCESS;
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; the context is current.
        let r = check(unsafe { cu::cuMemAlloc_v2(&mut ptr, size as usize) });
        if swapped {
            // SAFETY: restores the mode this thread had before.
            unsafe { cu::cuThreadExchangeStreamCaptureMode(&mut mode) };
        }
        r.map(|()| ptr)
    }

    fn mem_free(&self, device: usize, ptr: u64, _size: u64) -> DriverResult<()> {
        self.enter(device)?;
        // SAFETY: the engine frees only addresses mem_alloc returned, once.
        check(unsafe { cu::cuMemFree_v2(ptr) })
    }

    fn mem_info(&self, device: usize) -> DriverResult<(u64, u64)> {
        self.enter(device)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both are valid out-pointers; the context is current.
        check(unsafe { cu::cuMemGetInfo_v2(&mut free, &mut total) })?;
        Ok((free as u64, total as u64))
    }

    fn event_create(&self, device: usize) -> DriverResult<Event> {
        self.enter(device)?;
        let mut e: cu::CUevent = std::ptr::null_mut();
        let flags = cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: `e` is a valid out-pointer.
        check(unsafe { cu::cuEventCreate(&mut e, flags) })?;
        Ok(e as usize as u64)
    }

    fn event_record(&self, device: usize, e: Event, s: Stream) -> DriverResult<()> {
        self.enter(device)?;
        // SAFETY: `e` came from event_create on this device; `s` is a stream of
        // this device that the caller keeps valid (see the README).
        check(unsafe { cu::cuEventRecord(event(e), stream(s)) })
    }

    fn event_query(&self, device: usize, e: Event) -> DriverResult<bool> {
        self.enter(device)?;
        // SAFETY: `e` came from event_create.
        match unsafe { cu::cuEventQuery(event(e)) } {
            cu::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => check(r).map(|()| true),
        }
    }

    fn event_synchronize(&self, device: usize, e: Event) -> DriverResult<()> {
        self.enter(device)?;
        // SAFETY: `e` came from event_create.
        check(unsafe { cu::cuEventSynchronize(event(e)) })
    }

    fn event_destroy(&self, device: usize, e: Event) -> DriverResult<()> {
        self.enter(device)?;
        // SAFETY: `e` came from event_create and is not used after this.
        check(unsafe { cu::cuEventDestroy_v2(event(e)) })
    }

    fn stream_synchronize(&self, device: usize, s: Stream) -> DriverResult<()> {
        self.enter(device)?;
        // SAFETY: `s` is a valid stream of this device (or 0, the default stream).
        check(unsafe { cu::cuStreamSynchronize(stream(s)) })
    }

    fn stream_is_capturing(&self, device: usize, s: Stream) -> DriverResult<bool> {
        self.enter(device)?;
        let mut status = cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: `status` is a valid out-pointer; `s` is a valid stream.
        check(unsafe { cu::cuStreamIsCapturing(stream(s), &mut status) })?;
        Ok(status != cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    fn stream_create(&self, device: usize) -> DriverResult<Stream> {
        self.enter(device)?;
        let mut s: cu::CUstream = std::ptr::null_mut();
        let flags = cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: `s` is a valid out-pointer.
        check(unsafe { cu::cuStreamCreate(&mut s, flags) })?;
        Ok(s as usize as u64)
    }

    fn stream_destroy(&self, device: usize, s: Stream) -> DriverResult<()> {
        self.enter(device)?;
        // SAFETY: `s` came from stream_create and is not used after this.
        check(unsafe { cu::cuStreamDestroy_v2(stream(s)) })
    }
}
