//! `backend:cuda`: the [`Driver`] over the CUDA driver API, loaded at run
//! time from `libcuda`, with cudarc's raw `sys` layer for the types.
//!
//! - **Loading.** cudarc's own loader panics when libcuda cannot be loaded,
//!   and when a symbol is missing at its first call, and it tries the
//!   unversioned `libcuda.so` (possibly the toolkit's stub) before
//!   `libcuda.so.1`. So this module opens the library itself (`libcuda.so.1`
//!   first, then cudarc's candidate names) and resolves every entry point it
//!   calls ([`ENTRY_POINTS`]) into a table of function pointers before calling
//!   any of them; cudarc supplies the types. A missing driver or symbol is a
//!   clear [`DriverError::NotFound`], never a panic.
//! - **Raw result codes.** cudarc declares `CUresult` and the capture enums as
//!   Rust enums, so a value they do not list (a newer driver's error code)
//!   would be undefined behaviour if it crossed the FFI as that type. The
//!   table's pointers are typed with `u32` results and out-parameters instead
//!   (the same C ABI), and codes are compared as numbers: an unknown code is
//!   an ordinary [`DriverError::Other`] naming the number.
//! - **Contexts.** The primary context of each device is retained once, on
//!   the first call for that device (not at construction: every process that
//!   enables cudalloc would otherwise hold a context, hundreds of MiB, on
//!   every GPU it can see), and made current (`cuCtxSetCurrent`) before every
//!   call on that device: PyTorch's free sets no device guard, so the current
//!   context may belong to another device. The caller's context (or none) is put back
//!   when the call returns ([`CtxGuard`]), so a free of device 1's memory does
//!   not move the host thread's current device, which the CUDA runtime and
//!   torch read from it. Contexts are never released: nothing here runs at
//!   process exit.
//! - **Errors.** `CUDA_ERROR_OUT_OF_MEMORY` is [`DriverError::OutOfMemory`];
//!   `CUDA_ERROR_DEINITIALIZED` and `CUDA_ERROR_NOT_INITIALIZED` (what the
//!   driver says while the process exits) are [`DriverError::Deinitialized`];
//!   anything else is [`DriverError::Other`] with the driver's text.
//! - **Graph capture.** `cuMemAlloc` is illegal while any stream of the
//!   thread is capturing in global mode. [`Driver::mem_alloc`] switches the
//!   thread to relaxed capture mode around the call
//!   (`cuThreadExchangeStreamCaptureMode`), as native torch does; so do
//!   `cuMemCreate`, `cuMemMap` and `cuMemSetAccess` (the engine never
//!   unmaps or releases during a capture).
//! - **Virtual memory** (`expandable_segments:on`): `cuMemAddressReserve`,
//!   `cuMemCreate` (pinned device memory on the device), `cuMemMap`,
//!   `cuMemSetAccess` (read-write for the device itself; peers are not
//!   granted access), `cuMemUnmap`, `cuMemRelease`, `cuMemAddressFree`.
//!   They are optional entry points ([`VMM_ENTRY_POINTS`]): a driver that
//!   lacks one, or a device whose
//!   `CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED` is 0, answers
//!   "not supported" to [`Driver::vmm_granularity`], and the engine keeps
//!   classic segments.

use super::{Driver, DriverError, DriverResult, Event, PhysHandle, Stream};
use cudarc::driver::sys as cu;
use libc::c_void;
use once_cell::sync::OnceCell;
use std::ffi::CStr;

/// Every driver entry point this module calls, checked at construction.
pub const ENTRY_POINTS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDevicePrimaryCtxRetain",
    "cuCtxSetCurrent",
    "cuCtxGetCurrent",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamQuery",
    "cuStreamIsCapturing",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuThreadExchangeStreamCaptureMode",
    "cuGetErrorString",
];

/// The virtual-memory entry points: optional (see the module docs).
pub const VMM_ENTRY_POINTS: &[&str] = &[
    "cuDeviceGetAttribute",
    "cuMemGetAllocationGranularity",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
];

/// The message for a machine without the NVIDIA driver.
pub const NOT_FOUND: &str = "libcuda.so not found; is the NVIDIA driver installed?";

struct Device {
    dev: cu::CUdevice,
    /// The primary context, retained on the first call for this device
    /// (a context costs hundreds of MiB of device memory, so a process
    /// that never allocates on a GPU must not hold one there).
    ctx: OnceCell<Ctx>,
}

/// A retained primary context (a driver handle, valid on any thread).
#[derive(Clone, Copy)]
struct Ctx(cu::CUcontext);
// SAFETY: a CUcontext is a handle the driver lets any thread make current.
unsafe impl Send for Ctx {}
// SAFETY: as above; it is only passed to the driver.
unsafe impl Sync for Ctx {}

/// A driver result as the number the C function returns (see the module docs).
type Raw = u32;

const SUCCESS: Raw = cu::CUresult::CUDA_SUCCESS as Raw;
const OUT_OF_MEMORY: Raw = cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY as Raw;
const NOT_INITIALIZED: Raw = cu::CUresult::CUDA_ERROR_NOT_INITIALIZED as Raw;
const DEINITIALIZED: Raw = cu::CUresult::CUDA_ERROR_DEINITIALIZED as Raw;
const NOT_READY: Raw = cu::CUresult::CUDA_ERROR_NOT_READY as Raw;
const CAPTURE_IMPLICIT: Raw = cu::CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT as Raw;
const CAPTURE_STATUS_NONE: u32 = cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE as u32;
const CAPTURE_MODE_RELAXED: u32 = cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED as u32;

/// `CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED`.
const ATTR_VMM_SUPPORTED: i32 = 102;
/// `CU_MEM_ALLOCATION_TYPE_PINNED`, `CU_MEM_LOCATION_TYPE_DEVICE`,
/// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE`, `CU_MEM_ALLOC_GRANULARITY_MINIMUM`.
const ALLOCATION_PINNED: u32 = 1;
const LOCATION_DEVICE: u32 = 1;
const ACCESS_READWRITE: u32 = 3;
const GRANULARITY_MINIMUM: u32 = 0;

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy)]
struct MemLocation {
    kind: u32,
    id: libc::c_int,
}

/// `CUmemAllocationProp` (CUDA 11.0 to 12.x: 32 bytes).
#[repr(C)]
struct AllocationProp {
    kind: u32,
    requested_handle_types: u32,
    location: MemLocation,
    win32_handle_meta_data: *mut c_void,
    compression_type: u8,
    gpu_direct_rdma_capable: u8,
    usage: u16,
    reserved: [u8; 4],
}

/// `CUmemAccessDesc`.
#[repr(C)]
struct AccessDesc {
    location: MemLocation,
    flags: u32,
}

/// The virtual-memory entry points, when the driver has them all.
struct VmmApi {
    device_get_attribute: unsafe extern "C" fn(*mut libc::c_int, i32, cu::CUdevice) -> Raw,
    get_granularity: unsafe extern "C" fn(*mut usize, *const AllocationProp, u32) -> Raw,
    address_reserve:
        unsafe extern "C" fn(*mut cu::CUdeviceptr, usize, usize, cu::CUdeviceptr, u64) -> Raw,
    address_free: unsafe extern "C" fn(cu::CUdeviceptr, usize) -> Raw,
    create: unsafe extern "C" fn(*mut u64, usize, *const AllocationProp, u64) -> Raw,
    release: unsafe extern "C" fn(u64) -> Raw,
    map: unsafe extern "C" fn(cu::CUdeviceptr, usize, usize, u64, u64) -> Raw,
    unmap: unsafe extern "C" fn(cu::CUdeviceptr, usize) -> Raw,
    set_access: unsafe extern "C" fn(cu::CUdeviceptr, usize, *const AccessDesc, usize) -> Raw,
}

impl VmmApi {
    /// Resolve every VMM entry point, or `None` when one is missing.
    // Each transmute's target is the `VmmApi` field it fills.
    #[allow(clippy::missing_transmute_annotations)]
    fn resolve() -> Option<VmmApi> {
        macro_rules! sym {
            ($name:literal) => {{
                let p = CStr::from_bytes_with_nul(concat!($name, "\0").as_bytes())
                    .ok()
                    .and_then(driver_symbol)?;
                // SAFETY: the field's type is the entry point's C prototype
                // (see `VmmApi`), and a function pointer has a data pointer's size.
                unsafe { std::mem::transmute::<*mut c_void, _>(p) }
            }};
        }
        Some(VmmApi {
            device_get_attribute: sym!("cuDeviceGetAttribute"),
            get_granularity: sym!("cuMemGetAllocationGranularity"),
            address_reserve: sym!("cuMemAddressReserve"),
            address_free: sym!("cuMemAddressFree"),
            create: sym!("cuMemCreate"),
            release: sym!("cuMemRelease"),
            map: sym!("cuMemMap"),
            unmap: sym!("cuMemUnmap"),
            set_access: sym!("cuMemSetAccess"),
        })
    }
}

/// The entry points, resolved once from the loaded library. Each type is the
/// driver API's C prototype with `CUresult` and enum out-parameters as `u32`.
struct Api {
    init: unsafe extern "C" fn(u32) -> Raw,
    device_get_count: unsafe extern "C" fn(*mut libc::c_int) -> Raw,
    device_get: unsafe extern "C" fn(*mut cu::CUdevice, libc::c_int) -> Raw,
    primary_ctx_retain: unsafe extern "C" fn(*mut cu::CUcontext, cu::CUdevice) -> Raw,
    ctx_set_current: unsafe extern "C" fn(cu::CUcontext) -> Raw,
    ctx_get_current: unsafe extern "C" fn(*mut cu::CUcontext) -> Raw,
    mem_alloc: unsafe extern "C" fn(*mut cu::CUdeviceptr, usize) -> Raw,
    mem_free: unsafe extern "C" fn(cu::CUdeviceptr) -> Raw,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> Raw,
    event_create: unsafe extern "C" fn(*mut cu::CUevent, u32) -> Raw,
    event_record: unsafe extern "C" fn(cu::CUevent, cu::CUstream) -> Raw,
    event_query: unsafe extern "C" fn(cu::CUevent) -> Raw,
    event_synchronize: unsafe extern "C" fn(cu::CUevent) -> Raw,
    event_destroy: unsafe extern "C" fn(cu::CUevent) -> Raw,
    stream_synchronize: unsafe extern "C" fn(cu::CUstream) -> Raw,
    stream_query: unsafe extern "C" fn(cu::CUstream) -> Raw,
    stream_is_capturing: unsafe extern "C" fn(cu::CUstream, *mut u32) -> Raw,
    stream_create: unsafe extern "C" fn(*mut cu::CUstream, u32) -> Raw,
    stream_destroy: unsafe extern "C" fn(cu::CUstream) -> Raw,
    exchange_capture_mode: unsafe extern "C" fn(*mut u32) -> Raw,
    get_error_string: unsafe extern "C" fn(Raw, *mut *const libc::c_char) -> Raw,
}

/// The driver library, opened once and never closed: `libcuda.so.1` first,
/// the name the CUDA runtime (and so PyTorch) opens, then the names cudarc
/// knows. cudarc tries the unversioned `libcuda.so` first, which may be the
/// toolkit's stub (`lib64/stubs`, on some build images' `LD_LIBRARY_PATH`),
/// whose `cuInit` always fails, while PyTorch uses the real driver. `None`
/// when no candidate loads.
fn driver_library() -> Option<usize> {
    static HANDLE: OnceCell<Option<usize>> = OnceCell::new();
    *HANDLE.get_or_init(|| {
        std::iter::once("libcuda.so.1".to_string())
            .chain(cudarc::get_lib_name_candidates("cuda"))
            .find_map(|name| {
                let name = std::ffi::CString::new(name).ok()?;
                // SAFETY: dlopen with a NUL-terminated name; the handle is
                // kept for the life of the process.
                let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
                (!h.is_null()).then_some(h as usize)
            })
    })
}

/// The address of the driver entry point `name` in the library this module
/// loaded, for code that calls the driver beside cudalloc (the GPU tests):
/// cudarc's own loader may open another file. `None` without a driver or
/// without that symbol.
pub fn driver_symbol(name: &CStr) -> Option<*mut c_void> {
    let lib = driver_library()? as *mut c_void;
    // SAFETY: looking a symbol up does not call it; the handle is never closed.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

impl Api {
    /// Resolve every entry point of the driver library, or name the first one
    /// missing.
    // Each transmute's target is the `Api` field it fills (one macro for all).
    #[allow(clippy::missing_transmute_annotations)]
    fn load() -> Result<Api, &'static str> {
        driver_library().ok_or("the library itself (loading it failed)")?;
        macro_rules! sym {
            ($name:literal) => {{
                let Some(p) = CStr::from_bytes_with_nul(concat!($name, "\0").as_bytes())
                    .ok()
                    .and_then(driver_symbol)
                else {
                    return Err($name);
                };
                // SAFETY: the field's type is the entry point's C prototype
                // (see `Api`), and a function pointer has a data pointer's size.
                unsafe { std::mem::transmute::<*mut c_void, _>(p) }
            }};
        }
        Ok(Api {
            init: sym!("cuInit"),
            device_get_count: sym!("cuDeviceGetCount"),
            device_get: sym!("cuDeviceGet"),
            primary_ctx_retain: sym!("cuDevicePrimaryCtxRetain"),
            ctx_set_current: sym!("cuCtxSetCurrent"),
            ctx_get_current: sym!("cuCtxGetCurrent"),
            mem_alloc: sym!("cuMemAlloc_v2"),
            mem_free: sym!("cuMemFree_v2"),
            mem_get_info: sym!("cuMemGetInfo_v2"),
            event_create: sym!("cuEventCreate"),
            event_record: sym!("cuEventRecord"),
            event_query: sym!("cuEventQuery"),
            event_synchronize: sym!("cuEventSynchronize"),
            event_destroy: sym!("cuEventDestroy_v2"),
            stream_synchronize: sym!("cuStreamSynchronize"),
            stream_query: sym!("cuStreamQuery"),
            stream_is_capturing: sym!("cuStreamIsCapturing"),
            stream_create: sym!("cuStreamCreate"),
            stream_destroy: sym!("cuStreamDestroy_v2"),
            exchange_capture_mode: sym!("cuThreadExchangeStreamCaptureMode"),
            get_error_string: sym!("cuGetErrorString"),
        })
    }

    fn error_text(&self, r: Raw) -> String {
        let mut p: *const libc::c_char = std::ptr::null();
        // SAFETY: `p` is a valid out-pointer; the driver sets it to a static
        // string, or answers an unknown code with an error (and maybe NULL).
        let ok = unsafe { (self.get_error_string)(r, &mut p) } == SUCCESS;
        if ok && !p.is_null() {
            // SAFETY: the driver returns a NUL-terminated static string.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        } else {
            format!("CUDA error {r}, unknown to this driver's cuGetErrorString")
        }
    }

    /// Turn a raw result into a `DriverResult`.
    fn check(&self, r: Raw) -> DriverResult<()> {
        match r {
            SUCCESS => Ok(()),
            OUT_OF_MEMORY => Err(DriverError::OutOfMemory),
            DEINITIALIZED | NOT_INITIALIZED => Err(DriverError::Deinitialized),
            other => Err(DriverError::Other {
                code: other as i64,
                message: self.error_text(other),
            }),
        }
    }
}

/// Restores the thread's previous context (NULL included) on drop, when
/// [`CudaDriver::enter`] changed it.
struct CtxGuard<'a> {
    api: Option<&'a Api>,
    prev: cu::CUcontext,
}

impl Drop for CtxGuard<'_> {
    fn drop(&mut self) {
        if let Some(api) = self.api {
            // SAFETY: `prev` was current on this thread a moment ago (a
            // context the caller owns, or NULL, which unbinds). A failure
            // (say the driver deinitialised meanwhile) leaves nothing to undo.
            let _ = unsafe { (api.ctx_set_current)(self.prev) };
        }
    }
}

/// The CUDA driver backend.
pub struct CudaDriver {
    api: Api,
    /// The virtual-memory entry points, when the driver has them.
    vmm: Option<VmmApi>,
    devices: Vec<Device>,
}

// SAFETY: device ordinals, context handles (which the driver lets any thread
// make current) and function pointers into the driver; nothing else.
unsafe impl Send for CudaDriver {}
// SAFETY: as above; every method only passes the handles to the driver,
// which is thread-safe.
unsafe impl Sync for CudaDriver {}

impl CudaDriver {
    /// Load libcuda, initialise the driver and list the devices (their
    /// primary contexts are retained on first use, in `enter`). Never panics.
    pub fn new() -> DriverResult<Self> {
        if driver_library().is_none() {
            return Err(DriverError::NotFound(NOT_FOUND.into()));
        }
        let api = Api::load().map_err(|name| {
            DriverError::NotFound(format!(
                "the CUDA driver library lacks {name}; is the NVIDIA driver too old?"
            ))
        })?;
        Self::init(api)
    }

    fn init(api: Api) -> DriverResult<Self> {
        // SAFETY: cuInit takes flags 0 and has no other preconditions.
        api.check(unsafe { (api.init)(0) })?;
        let mut count: libc::c_int = 0;
        // SAFETY: `count` is a valid out-pointer.
        api.check(unsafe { (api.device_get_count)(&mut count) })?;
        let mut devices = Vec::with_capacity(count.max(0) as usize);
        for ordinal in 0..count {
            let mut dev: cu::CUdevice = 0;
            // SAFETY: `ordinal` is below the device count; `dev` is a valid out-pointer.
            api.check(unsafe { (api.device_get)(&mut dev, ordinal) })?;
            devices.push(Device {
                dev,
                ctx: OnceCell::new(),
            });
        }
        Ok(CudaDriver {
            api,
            vmm: VmmApi::resolve(),
            devices,
        })
    }

    /// Run the driver call `f` with this thread in relaxed capture mode,
    /// then restore its mode. cuMemAlloc and cuMemGetInfo are "potentially
    /// unsafe" calls: in global mode, during a capture, they would fail and
    /// invalidate it. Relaxed mode permits them (PyTorch's allocator does the
    /// same for cudaMalloc).
    fn relaxed(&self, f: impl FnOnce() -> Raw) -> DriverResult<()> {
        let mut mode = CAPTURE_MODE_RELAXED;
        // SAFETY: `mode` is a valid in/out pointer; the old mode comes back in it.
        let swapped = unsafe { (self.api.exchange_capture_mode)(&mut mode) } == SUCCESS;
        let r = self.api.check(f());
        if swapped {
            // SAFETY: restores the mode this thread had before.
            unsafe { (self.api.exchange_capture_mode)(&mut mode) };
        }
        r
    }

    /// Make `device`'s primary context current on this thread until the
    /// returned guard drops, which puts the caller's context back.
    fn enter(&self, device: usize) -> DriverResult<CtxGuard<'_>> {
        let d = self
            .devices
            .get(device)
            .ok_or(DriverError::InvalidDevice(device))?;
        let ctx = d
            .ctx
            .get_or_try_init(|| {
                let mut ctx: cu::CUcontext = std::ptr::null_mut();
                // SAFETY: `dev` came from cuDeviceGet; `ctx` is a valid out-pointer.
                self.api
                    .check(unsafe { (self.api.primary_ctx_retain)(&mut ctx, d.dev) })
                    .map(|()| Ctx(ctx))
            })?
            .0;
        let mut prev: cu::CUcontext = std::ptr::null_mut();
        // SAFETY: `prev` is a valid out-pointer.
        let r = unsafe { (self.api.ctx_get_current)(&mut prev) };
        self.api.check(r)?;
        if prev == ctx {
            return Ok(CtxGuard { api: None, prev });
        }
        // SAFETY: `ctx` is a primary context retained once and never released.
        self.api.check(unsafe { (self.api.ctx_set_current)(ctx) })?;
        Ok(CtxGuard {
            api: Some(&self.api),
            prev,
        })
    }
}

impl CudaDriver {
    /// The VMM entry points, or "not supported".
    fn vmm_api(&self) -> DriverResult<&VmmApi> {
        self.vmm
            .as_ref()
            .ok_or_else(|| DriverError::not_supported("virtual memory management (cuMemMap)"))
    }

    /// Pinned device memory on `device` (a `cuMemCreate` property).
    fn allocation_prop(&self, device: usize) -> DriverResult<AllocationProp> {
        let d = self
            .devices
            .get(device)
            .ok_or(DriverError::InvalidDevice(device))?;
        Ok(AllocationProp {
            kind: ALLOCATION_PINNED,
            requested_handle_types: 0,
            location: MemLocation {
                kind: LOCATION_DEVICE,
                id: d.dev,
            },
            win32_handle_meta_data: std::ptr::null_mut(),
            compression_type: 0,
            gpu_direct_rdma_capable: 0,
            usage: 0,
            reserved: [0; 4],
        })
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
        let _ctx = self.enter(device)?;
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; the context is current.
        self.relaxed(|| unsafe { (self.api.mem_alloc)(&mut ptr, size as usize) })
            .map(|()| ptr)
    }

    fn mem_free(&self, device: usize, ptr: u64, _size: u64) -> DriverResult<()> {
        let _ctx = self.enter(device)?;
        // SAFETY: the engine frees only addresses mem_alloc returned, once.
        self.api.check(unsafe { (self.api.mem_free)(ptr) })
    }

    fn mem_info(&self, device: usize) -> DriverResult<(u64, u64)> {
        let _ctx = self.enter(device)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both are valid out-pointers; the context is current.
        self.relaxed(|| unsafe { (self.api.mem_get_info)(&mut free, &mut total) })?;
        Ok((free as u64, total as u64))
    }

    fn event_create(&self, device: usize) -> DriverResult<Event> {
        let _ctx = self.enter(device)?;
        let mut e: cu::CUevent = std::ptr::null_mut();
        let flags = cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: `e` is a valid out-pointer.
        let r = unsafe { (self.api.event_create)(&mut e, flags) };
        self.api.check(r)?;
        Ok(e as usize as u64)
    }

    fn event_record(&self, device: usize, e: Event, s: Stream) -> DriverResult<()> {
        let _ctx = self.enter(device)?;
        // SAFETY: `e` came from event_create on this device; `s` is a stream of
        // this device that the caller keeps valid (see the README).
        self.api
            .check(unsafe { (self.api.event_record)(event(e), stream(s)) })
    }

    fn event_query(&self, device: usize, e: Event) -> DriverResult<bool> {
        let _ctx = self.enter(device)?;
        // SAFETY: `e` came from event_create.
        match unsafe { (self.api.event_query)(event(e)) } {
            NOT_READY => Ok(false),
            r => self.api.check(r).map(|()| true),
        }
    }

    fn event_synchronize(&self, device: usize, e: Event) -> DriverResult<()> {
        let _ctx = self.enter(device)?;
        // SAFETY: `e` came from event_create.
        self.api
            .check(unsafe { (self.api.event_synchronize)(event(e)) })
    }

    fn event_destroy(&self, device: usize, e: Event) -> DriverResult<()> {
        let _ctx = self.enter(device)?;
        // SAFETY: `e` came from event_create and is not used after this.
        self.api
            .check(unsafe { (self.api.event_destroy)(event(e)) })
    }

    fn stream_synchronize(&self, device: usize, s: Stream) -> DriverResult<()> {
        let _ctx = self.enter(device)?;
        // SAFETY: `s` is a valid stream of this device (or 0, the default stream).
        self.api
            .check(unsafe { (self.api.stream_synchronize)(stream(s)) })
    }

    fn stream_query(&self, device: usize, s: Stream) -> DriverResult<bool> {
        let _ctx = self.enter(device)?;
        // SAFETY: `s` is a valid stream of this device (or 0, the default stream).
        match unsafe { (self.api.stream_query)(stream(s)) } {
            NOT_READY => Ok(false),
            r => self.api.check(r).map(|()| true),
        }
    }

    fn stream_is_capturing(&self, device: usize, s: Stream) -> DriverResult<bool> {
        let _ctx = self.enter(device)?;
        let mut status = CAPTURE_STATUS_NONE;
        // SAFETY: `status` is a valid out-pointer; `s` is a valid stream.
        let r = unsafe { (self.api.stream_is_capturing)(stream(s), &mut status) };
        if r == CAPTURE_IMPLICIT {
            // The legacy stream while a blocking stream captures: using it now
            // would join that capture, so it counts as capturing.
            return Ok(true);
        }
        self.api.check(r)?;
        // Active or invalidated, or a status this build does not know: capturing
        // (the cautious answer: frees are quarantined, nothing is reused).
        Ok(status != CAPTURE_STATUS_NONE)
    }

    fn stream_create(&self, device: usize) -> DriverResult<Stream> {
        let _ctx = self.enter(device)?;
        let mut s: cu::CUstream = std::ptr::null_mut();
        let flags = cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: `s` is a valid out-pointer.
        let r = unsafe { (self.api.stream_create)(&mut s, flags) };
        self.api.check(r)?;
        Ok(s as usize as u64)
    }

    fn stream_destroy(&self, device: usize, s: Stream) -> DriverResult<()> {
        let _ctx = self.enter(device)?;
        // SAFETY: `s` came from stream_create and is not used after this.
        self.api
            .check(unsafe { (self.api.stream_destroy)(stream(s)) })
    }

    fn vmm_granularity(&self, device: usize) -> DriverResult<u64> {
        let vmm = self.vmm_api()?;
        let prop = self.allocation_prop(device)?;
        let _ctx = self.enter(device)?;
        let mut supported: libc::c_int = 0;
        // SAFETY: `supported` is a valid out-pointer; the device came from cuDeviceGet.
        self.api.check(unsafe {
            (vmm.device_get_attribute)(&mut supported, ATTR_VMM_SUPPORTED, prop.location.id)
        })?;
        if supported == 0 {
            return Err(DriverError::not_supported(
                "virtual memory management on this device",
            ));
        }
        let mut g: usize = 0;
        // SAFETY: `g` is a valid out-pointer and `prop` a valid property.
        let r = unsafe { (vmm.get_granularity)(&mut g, &prop, GRANULARITY_MINIMUM) };
        self.api.check(r)?;
        Ok(g as u64)
    }

    fn va_reserve(&self, device: usize, size: u64) -> DriverResult<u64> {
        let vmm = self.vmm_api()?;
        let _ctx = self.enter(device)?;
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; alignment 0 and address 0
        // let the driver choose; flags must be 0.
        let r = unsafe { (vmm.address_reserve)(&mut ptr, size as usize, 0, 0, 0) };
        self.api.check(r)?;
        Ok(ptr)
    }

    fn va_free(&self, device: usize, base: u64, size: u64) -> DriverResult<()> {
        let vmm = self.vmm_api()?;
        let _ctx = self.enter(device)?;
        // SAFETY: a range from va_reserve with nothing mapped in it (the
        // engine's contract, 9).
        self.api
            .check(unsafe { (vmm.address_free)(base, size as usize) })
    }

    fn phys_create(&self, device: usize, size: u64) -> DriverResult<PhysHandle> {
        let vmm = self.vmm_api()?;
        let prop = self.allocation_prop(device)?;
        let _ctx = self.enter(device)?;
        let mut h: u64 = 0;
        // SAFETY: `h` is a valid out-pointer and `prop` a valid property;
        // flags must be 0.
        self.relaxed(|| unsafe { (vmm.create)(&mut h, size as usize, &prop, 0) })?;
        Ok(h)
    }

    fn phys_release(&self, device: usize, handle: PhysHandle) -> DriverResult<()> {
        let vmm = self.vmm_api()?;
        let _ctx = self.enter(device)?;
        // SAFETY: a handle from phys_create, mapped nowhere (contract, 9).
        self.api.check(unsafe { (vmm.release)(handle) })
    }

    fn map(
        &self,
        device: usize,
        va: u64,
        size: u64,
        handle: PhysHandle,
        offset: u64,
    ) -> DriverResult<()> {
        let vmm = self.vmm_api()?;
        let _ctx = self.enter(device)?;
        // SAFETY: `va..va+size` lies in a reserved range with nothing mapped
        // there, and `offset..offset+size` in the handle (contract, 9);
        // flags must be 0.
        self.relaxed(|| unsafe { (vmm.map)(va, size as usize, offset as usize, handle, 0) })
    }

    fn unmap(&self, device: usize, va: u64, size: u64) -> DriverResult<()> {
        let vmm = self.vmm_api()?;
        let _ctx = self.enter(device)?;
        // SAFETY: exactly one earlier mapping, whose frees are proven
        // complete (contract, 9).
        self.api.check(unsafe { (vmm.unmap)(va, size as usize) })
    }

    fn set_access(&self, device: usize, va: u64, size: u64) -> DriverResult<()> {
        let vmm = self.vmm_api()?;
        let location = self.allocation_prop(device)?.location;
        let _ctx = self.enter(device)?;
        let desc = AccessDesc {
            location,
            flags: ACCESS_READWRITE,
        };
        // SAFETY: a mapped range of whole mappings; one valid descriptor.
        self.relaxed(|| unsafe { (vmm.set_access)(va, size as usize, &desc, 1) })
    }
}

#[cfg(test)]
mod tests {
    use super::{ENTRY_POINTS, VMM_ENTRY_POINTS};

    /// `Api::load` resolves exactly [`ENTRY_POINTS`] (the list the stand-in
    /// and the docs go by).
    #[test]
    fn api_table_matches_entry_points() {
        let src = include_str!("cuda.rs");
        let body = &src[src.find("fn load()").unwrap()..src.find("fn error_text").unwrap()];
        let names: Vec<&str> = body
            .split("sym!(\"")
            .skip(1)
            .map(|s| &s[..s.find('"').unwrap()])
            .collect();
        assert_eq!(names, ENTRY_POINTS);
        let body = &src[src.find("fn resolve()").unwrap()
            ..src.find("/// The entry points, resolved").unwrap()];
        let names: Vec<&str> = body
            .split("sym!(\"")
            .skip(1)
            .map(|s| &s[..s.find('"').unwrap()])
            .collect();
        assert_eq!(names, VMM_ENTRY_POINTS);
    }
}
