//! Capacity queries: `cudalloc_can_allocate` and `cudalloc_is_low_memory`,
//! safety checks before a large allocation. Both answer a snapshot: other
//! threads and processes allocate and free meanwhile.

use super::on_device;
use libc::{c_int, c_void};

/// Whether a request of `size` bytes on `device` for `stream` could be
/// served now without running out of memory, counting cudalloc's cache (a
/// free block of the stream's own, or idle segments it would adopt or
/// release), the device's free memory and the limit (`max_memory`,
/// `memory_fraction`). Returns 1 (yes), 0 (no) or -1 with the last error
/// set (`CUDALLOC_ERR_INVALID_DEVICE` for a bad device). Size 0 is 1.
///
/// The cache is per stream, so the answer is for `stream` (a raw
/// `CUstream`; NULL is the legacy default stream), the stream the request
/// would be made on. Allocates nothing and changes no statistic; it may ask
/// the driver for the device's free memory. A snapshot, racing with other
/// threads and processes: 1 is no promise that the allocation that follows
/// succeeds. It counts neither what the OOM callbacks could free nor a
/// private pool's memory; during a graph capture on the device, only the
/// stream's own cached blocks.
#[no_mangle]
pub extern "C" fn cudalloc_can_allocate(size: usize, device: c_int, stream: *mut c_void) -> c_int {
    crate::export!(cudalloc_can_allocate, -> c_int {
        on_device(device, |a, d| a.can_allocate(size as u64, d, stream as u64))
            .map(c_int::from)
    })
}

/// Whether `device`'s memory is low: its pressure level, sampled from the
/// driver now, is HIGH or CRITICAL (80% or more of the device's memory in
/// use, by any process, cudalloc's own idle cache included). Returns 1
/// (yes), 0 (no) or -1 with the last error
/// set (`CUDALLOC_ERR_INVALID_DEVICE` for a bad device). Records no
/// pressure event and runs no pressure callback (the periodic sample
/// does). During a graph capture on the device the driver is not asked:
/// the last periodic sample answers.
#[no_mangle]
pub extern "C" fn cudalloc_is_low_memory(device: c_int) -> c_int {
    crate::export!(cudalloc_is_low_memory, -> c_int {
        on_device(device, |a, d| a.is_low_memory(d)).map(c_int::from)
    })
}
