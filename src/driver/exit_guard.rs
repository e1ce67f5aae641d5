//! A driver adaptor that refuses every device call once a flag is set: the
//! process-wide allocator wraps its driver in one, set by the exit hook, so
//! nothing that runs while the process exits (leak report, stats file, late
//! frees, a pressure sample) can reach the device.

use super::{Driver, DriverError, DriverResult, Event, PhysHandle, Stream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `inner`, until `stop` is set; then [`DriverError::Deinitialized`].
pub struct ExitGuard {
    pub inner: Arc<dyn Driver>,
    pub stop: &'static AtomicBool,
}

impl ExitGuard {
    #[inline]
    fn check(&self) -> DriverResult<&dyn Driver> {
        if self.stop.load(Ordering::Relaxed) {
            Err(DriverError::Deinitialized)
        } else {
            Ok(&*self.inner)
        }
    }
}

impl Driver for ExitGuard {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn device_count(&self) -> usize {
        self.inner.device_count()
    }
    fn mem_alloc(&self, device: usize, size: u64) -> DriverResult<u64> {
        self.check()?.mem_alloc(device, size)
    }
    fn mem_free(&self, device: usize, ptr: u64, size: u64) -> DriverResult<()> {
        self.check()?.mem_free(device, ptr, size)
    }
    fn mem_info(&self, device: usize) -> DriverResult<(u64, u64)> {
        self.check()?.mem_info(device)
    }
    fn event_create(&self, device: usize) -> DriverResult<Event> {
        self.check()?.event_create(device)
    }
    fn event_record(&self, device: usize, event: Event, stream: Stream) -> DriverResult<()> {
        self.check()?.event_record(device, event, stream)
    }
    fn event_query(&self, device: usize, event: Event) -> DriverResult<bool> {
        self.check()?.event_query(device, event)
    }
    fn event_synchronize(&self, device: usize, event: Event) -> DriverResult<()> {
        self.check()?.event_synchronize(device, event)
    }
    fn event_destroy(&self, device: usize, event: Event) -> DriverResult<()> {
        self.check()?.event_destroy(device, event)
    }
    fn stream_synchronize(&self, device: usize, stream: Stream) -> DriverResult<()> {
        self.check()?.stream_synchronize(device, stream)
    }
    fn stream_query(&self, device: usize, stream: Stream) -> DriverResult<bool> {
        self.check()?.stream_query(device, stream)
    }
    fn stream_is_capturing(&self, device: usize, stream: Stream) -> DriverResult<bool> {
        self.check()?.stream_is_capturing(device, stream)
    }
    fn stream_create(&self, device: usize) -> DriverResult<Stream> {
        self.check()?.stream_create(device)
    }
    fn stream_destroy(&self, device: usize, stream: Stream) -> DriverResult<()> {
        self.check()?.stream_destroy(device, stream)
    }
    fn vmm_granularity(&self, device: usize) -> DriverResult<u64> {
        self.check()?.vmm_granularity(device)
    }
    fn va_reserve(&self, device: usize, size: u64) -> DriverResult<u64> {
        self.check()?.va_reserve(device, size)
    }
    fn va_free(&self, device: usize, base: u64, size: u64) -> DriverResult<()> {
        self.check()?.va_free(device, base, size)
    }
    fn phys_create(&self, device: usize, size: u64) -> DriverResult<PhysHandle> {
        self.check()?.phys_create(device, size)
    }
    fn phys_release(&self, device: usize, handle: PhysHandle) -> DriverResult<()> {
        self.check()?.phys_release(device, handle)
    }
    fn map(
        &self,
        device: usize,
        va: u64,
        size: u64,
        handle: PhysHandle,
        offset: u64,
    ) -> DriverResult<()> {
        self.check()?.map(device, va, size, handle, offset)
    }
    fn unmap(&self, device: usize, va: u64, size: u64) -> DriverResult<()> {
        self.check()?.unmap(device, va, size)
    }
    fn set_access(&self, device: usize, va: u64, size: u64) -> DriverResult<()> {
        self.check()?.set_access(device, va, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sim::SimDriver;

    #[test]
    fn refuses_everything_once_stopped() {
        static STOP: AtomicBool = AtomicBool::new(false);
        let sim = Arc::new(SimDriver::new(1, 1 << 30));
        let g = ExitGuard {
            inner: sim.clone(),
            stop: &STOP,
        };
        let p = g.mem_alloc(0, 1 << 20).unwrap();
        STOP.store(true, Ordering::Relaxed);
        assert_eq!(g.mem_free(0, p, 1 << 20), Err(DriverError::Deinitialized));
        assert_eq!(g.mem_info(0), Err(DriverError::Deinitialized));
        assert_eq!(sim.counters().mem_frees, 0, "nothing reached the device");
        assert_eq!(g.device_count(), 1);
    }
}
