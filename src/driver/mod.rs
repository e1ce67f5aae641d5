//! The one narrow interface between cudalloc and a device.
//!
//! # Contract
//! Everything above this module talks to a device only through [`Driver`]. An
//! implementation promises:
//!
//! 1. **Devices** are numbered `0..device_count()`. Every method that takes a
//!    `device` may assume the engine validated it; it still returns
//!    [`DriverError::InvalidDevice`] rather than panicking when it is not.
//! 2. **Memory.** [`Driver::mem_alloc`] returns a device address aligned to at
//!    least 512 bytes, not overlapping any other live allocation of this
//!    driver, or [`DriverError::OutOfMemory`] when the device has no room.
//!    Any other failure is a different variant: the engine runs its OOM ladder
//!    only for `OutOfMemory`. [`Driver::mem_free`] takes exactly an address
//!    that `mem_alloc` returned and that was not freed since; it may
//!    synchronise the device (cudaFree does).
//! 3. **Streams** are opaque `u64` handles (a `CUstream` value; 0 is the
//!    legacy default stream). The driver never owns or destroys them.
//! 4. **Events** are created by the driver, recorded on a stream, queried
//!    (`Ok(true)` once all work enqueued on the stream before the record has
//!    completed), synchronised and destroyed. A query of a never-recorded
//!    event is `Ok(true)`, as in CUDA. The engine pools and reuses events.
//! 5. **Threads.** Every method may be called from any thread concurrently.
//!    The implementation makes the device's context current itself: callers
//!    (PyTorch's free in particular) set no device guard.
//! 6. **Exit.** After [`DriverError::Deinitialized`] the engine calls nothing
//!    more that could reach the device; an implementation must tolerate calls
//!    made while the process exits by returning that error, never aborting.
//! 7. **No panics.** A missing driver library is an error at construction,
//!    never a panic later.
//! 8. **Graph capture.** While a stream is captured into a CUDA graph in
//!    global mode, a call that synchronises or queries invalidates the
//!    capture. The engine relies on these being legal during a capture, and
//!    an implementation keeps them so: [`Driver::stream_is_capturing`] (asked
//!    of any stream; the legacy stream answers `true` while another stream
//!    captures, as CUDA's "implicit" status), [`Driver::mem_alloc`] (the CUDA
//!    backend switches the calling thread to relaxed capture mode around
//!    it) and [`Driver::mem_info`] (likewise). Everything else (`mem_free`, `stream_synchronize`, `stream_query`,
//!    `event_record`, `event_query`, `event_synchronize`) the engine calls
//!    only once it has asked whether a capture may be under way, and never
//!    on a capturing stream. [`Driver::stream_is_capturing`] is required, not
//!    defaulted: a wrapping driver that forgot to forward it would switch
//!    that safety off silently.
//! 9. **Virtual memory** (`expandable_segments:on`; optional: the defaults
//!    answer "not supported", and the engine then keeps classic segments).
//!    [`Driver::vmm_granularity`] is the page size every other VMM call
//!    works in: sizes, offsets and addresses are multiples of it.
//!    [`Driver::va_reserve`] gives a virtual range with no memory behind
//!    it (it is not device memory and counts against no capacity);
//!    [`Driver::phys_create`] makes physical memory (a handle; counted
//!    against capacity, [`DriverError::OutOfMemory`] when there is no
//!    room). [`Driver::map`] maps `size` bytes of a handle, from `offset`,
//!    at a virtual address of a reserved range where nothing is mapped;
//!    the mapping is not accessible until [`Driver::set_access`] grants
//!    the device access to a range of whole mappings. [`Driver::unmap`]
//!    takes exactly one earlier mapping, whole: part of one cannot be
//!    unmapped. [`Driver::phys_release`] takes a handle none of whose
//!    memory is mapped; [`Driver::va_free`] a range with nothing mapped.
//!    Map, unmap and release are not stream-ordered: the engine unmaps
//!    only memory whose frees are proven complete. During a capture
//!    `phys_create`, `map` and `set_access` are legal (the CUDA backend
//!    runs them in relaxed capture mode, as `mem_alloc`); `unmap`,
//!    `phys_release` and `va_free` are not called.

pub mod cuda;
pub mod exit_guard;
pub mod sim;

use std::fmt;

/// A raw stream handle (`CUstream` as an integer). 0 is the legacy default stream.
pub type Stream = u64;

/// A driver-side event handle. Opaque to the engine.
pub type Event = u64;

/// A physical-memory handle (`CUmemGenericAllocationHandle`). Opaque to the engine.
pub type PhysHandle = u64;

/// Why a driver call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverError {
    /// The device has no room for this allocation (`CUDA_ERROR_OUT_OF_MEMORY`).
    OutOfMemory,
    /// The driver has shut down, usually because the process is exiting
    /// (`CUDA_ERROR_DEINITIALIZED`). Quietly ignored on free paths.
    Deinitialized,
    /// The device index is not one the driver knows.
    InvalidDevice(usize),
    /// The driver library could not be loaded.
    NotFound(String),
    /// Any other failure, with the driver's numeric code and its text.
    Other { code: i64, message: String },
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::OutOfMemory => write!(f, "device out of memory"),
            DriverError::Deinitialized => write!(f, "driver deinitialised (process exiting?)"),
            DriverError::InvalidDevice(d) => write!(f, "invalid device index {d}"),
            DriverError::NotFound(m) => write!(f, "{m}"),
            DriverError::Other { code, message } => write!(f, "driver error {code}: {message}"),
        }
    }
}

impl std::error::Error for DriverError {}

impl DriverError {
    /// `CUDA_ERROR_NOT_SUPPORTED`: this driver or device cannot do `what`.
    pub fn not_supported(what: &str) -> Self {
        DriverError::Other {
            code: 801,
            message: format!("{what} not supported by this driver"),
        }
    }
}

pub type DriverResult<T> = Result<T, DriverError>;

/// The device interface. See the module docs for the contract.
pub trait Driver: Send + Sync {
    /// A short name for logs and the effective-config print ("sim", "cuda").
    fn name(&self) -> &'static str;
    /// Number of devices this driver exposes.
    fn device_count(&self) -> usize;
    /// Allocate `size` bytes (a multiple of 512) on `device`.
    fn mem_alloc(&self, device: usize, size: u64) -> DriverResult<u64>;
    /// Free an address returned by [`Driver::mem_alloc`]. `size` is the size it
    /// was allocated with (the sim device checks it).
    fn mem_free(&self, device: usize, ptr: u64, size: u64) -> DriverResult<()>;
    /// `(free, total)` bytes of device memory, as `cuMemGetInfo` reports them.
    fn mem_info(&self, device: usize) -> DriverResult<(u64, u64)>;
    /// Create an event (timing disabled).
    fn event_create(&self, device: usize) -> DriverResult<Event>;
    /// Record `event` on `stream`.
    fn event_record(&self, device: usize, event: Event, stream: Stream) -> DriverResult<()>;
    /// `Ok(true)` when the work before the last record has completed.
    fn event_query(&self, device: usize, event: Event) -> DriverResult<bool>;
    /// Block until the event completes.
    fn event_synchronize(&self, device: usize, event: Event) -> DriverResult<()>;
    /// Destroy an event.
    fn event_destroy(&self, device: usize, event: Event) -> DriverResult<()>;
    /// Block until all work on `stream` completes.
    fn stream_synchronize(&self, device: usize, stream: Stream) -> DriverResult<()>;
    /// `Ok(true)` when all work enqueued on `stream` so far has completed
    /// (`cuStreamQuery`), without blocking. `Ok(false)` means "not proven":
    /// work is pending, or this driver cannot tell. Never called on a stream
    /// that may be capturing a graph (that would invalidate the capture).
    /// Required, not defaulted, so that a wrapping driver cannot forget to
    /// forward it.
    fn stream_query(&self, device: usize, stream: Stream) -> DriverResult<bool>;
    /// Whether `stream` is being captured into a CUDA graph (for the legacy
    /// stream: or another stream captures). Legal during a capture. While
    /// it is, the engine calls nothing that would invalidate the capture
    /// (see the contract, 8) and does not reuse blocks freed during it.
    /// Required, not defaulted, as `stream_query` is.
    fn stream_is_capturing(&self, device: usize, stream: Stream) -> DriverResult<bool>;
    /// Create a stream (for self-tests and benchmarks; the engine never does).
    fn stream_create(&self, _device: usize) -> DriverResult<Stream> {
        Err(DriverError::not_supported("stream creation"))
    }
    /// Destroy a stream made by [`Driver::stream_create`].
    fn stream_destroy(&self, _device: usize, _stream: Stream) -> DriverResult<()> {
        Ok(())
    }

    /// The page size of virtual-memory mappings on `device`
    /// (`cuMemGetAllocationGranularity`, 2 MiB on current GPUs), or an
    /// error when the driver or device has no virtual memory management:
    /// then the engine never calls the VMM methods below (contract, 9).
    fn vmm_granularity(&self, _device: usize) -> DriverResult<u64> {
        Err(DriverError::not_supported("virtual memory management"))
    }
    /// Reserve a virtual address range of `size` bytes (`cuMemAddressReserve`).
    fn va_reserve(&self, _device: usize, _size: u64) -> DriverResult<u64> {
        Err(DriverError::not_supported("cuMemAddressReserve"))
    }
    /// Give back a range from [`Driver::va_reserve`] with nothing mapped in it
    /// (`cuMemAddressFree`).
    fn va_free(&self, _device: usize, _base: u64, _size: u64) -> DriverResult<()> {
        Err(DriverError::not_supported("cuMemAddressFree"))
    }
    /// Create `size` bytes of physical device memory (`cuMemCreate`, pinned
    /// device memory).
    fn phys_create(&self, _device: usize, _size: u64) -> DriverResult<PhysHandle> {
        Err(DriverError::not_supported("cuMemCreate"))
    }
    /// Release a handle none of whose memory is mapped (`cuMemRelease`).
    fn phys_release(&self, _device: usize, _handle: PhysHandle) -> DriverResult<()> {
        Err(DriverError::not_supported("cuMemRelease"))
    }
    /// Map `size` bytes of `handle`, from `offset`, at `va` (`cuMemMap`).
    fn map(
        &self,
        _device: usize,
        _va: u64,
        _size: u64,
        _handle: PhysHandle,
        _offset: u64,
    ) -> DriverResult<()> {
        Err(DriverError::not_supported("cuMemMap"))
    }
    /// Unmap exactly one earlier mapping (`cuMemUnmap`).
    fn unmap(&self, _device: usize, _va: u64, _size: u64) -> DriverResult<()> {
        Err(DriverError::not_supported("cuMemUnmap"))
    }
    /// Grant `device` read-write access to a mapped range (`cuMemSetAccess`).
    fn set_access(&self, _device: usize, _va: u64, _size: u64) -> DriverResult<()> {
        Err(DriverError::not_supported("cuMemSetAccess"))
    }
}
