//! The GPU suite: `backend:cuda` on a real device. Every test is `#[ignore]`d
//! so CI (no GPU) lists them without running them; on a GPU machine run
//! `scripts/gpu-check.sh`, which runs this binary with `--ignored`.
//!
//! - the shared behaviour suite on real streams;
//! - allocations are usable: memset on the device, copy back, verify;
//! - cross-stream reuse with real streams keeps data intact;
//! - an idle stream's segment is adopted on the first try (`cuStreamQuery`);
//! - segments freed before an epoch event are released while their stream
//!   is busy again (a training step's growth, with the GPU behind);
//! - `record_stream` delays reuse until the other stream's work is done;
//! - a global-mode graph capture survives growth, OOM and `empty_cache`;
//! - OOM at the real capacity, with the diagnosis, then recovery;
//! - expandable segments: data intact across remaps of the neighbours'
//!   pages, a page moved between streams, growth and trim, a capture.

use cudalloc::conformance::{run_all, STREAMS};
use cudalloc::driver::cuda::driver_symbol;
use cudalloc::driver::cuda::CudaDriver;
use cudalloc::driver::Driver;
use cudalloc::{Allocator, Config, ErrorCode};
use cudarc::driver::sys as cu;
use libc::{c_int, c_void};
use std::ffi::CStr;
use std::mem::size_of;
use std::sync::Arc;

fn gpu() -> (Allocator, Arc<CudaDriver>) {
    gpu_with("backend:cuda")
}

fn gpu_with(conf: &str) -> (Allocator, Arc<CudaDriver>) {
    let d = Arc::new(CudaDriver::new().expect("a CUDA driver and device (run on a GPU machine)"));
    assert!(d.device_count() > 0, "no CUDA device");
    bind_device_0();
    let c = Config::parse(conf).unwrap();
    (Allocator::new(c, d.clone()), d)
}

/// An allocator with expandable segments, which the device must support.
fn gpu_expandable() -> (Allocator, Arc<CudaDriver>) {
    let (a, d) = gpu_with("backend:cuda,expandable_segments:on");
    assert!(
        d.vmm_granularity(0).is_ok(),
        "the GPU has no virtual memory management"
    );
    (a, d)
}

/// Make device 0's primary context current on this thread, as the CUDA
/// runtime does for a program: cudalloc puts the caller's context back after
/// each call, so the test's own driver calls need one of their own.
fn bind_device_0() {
    let device_get: unsafe extern "C" fn(*mut cu::CUdevice, c_int) -> cu::CUresult =
        entry(c"cuDeviceGet");
    let retain: unsafe extern "C" fn(*mut cu::CUcontext, cu::CUdevice) -> cu::CUresult =
        entry(c"cuDevicePrimaryCtxRetain");
    let set_current: unsafe extern "C" fn(cu::CUcontext) -> cu::CUresult =
        entry(c"cuCtxSetCurrent");
    let mut dev: cu::CUdevice = 0;
    let mut ctx: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointers; CudaDriver::new ran cuInit in this library.
    unsafe {
        check(device_get(&mut dev, 0));
        check(retain(&mut ctx, dev));
        check(set_current(ctx));
    }
}

/// A driver entry point, typed as its C prototype `T`, from the library
/// cudalloc loaded (cudarc's own loader may open another file, such as a
/// toolkit stub `libcuda.so` ahead of the driver's `libcuda.so.1`).
fn entry<T: Copy>(name: &CStr) -> T {
    let p = driver_symbol(name).unwrap_or_else(|| panic!("the driver lacks {name:?}"));
    assert_eq!(size_of::<T>(), size_of::<*mut c_void>());
    // SAFETY: `T` is the entry point's C prototype (a function pointer).
    unsafe { std::mem::transmute_copy(&p) }
}

fn check(r: cu::CUresult) {
    assert_eq!(r, cu::CUresult::CUDA_SUCCESS);
}

/// Fill `n` bytes at `p` with `v` on `stream`, asynchronously.
fn memset(p: u64, v: u8, n: usize, stream: u64) {
    let memset_d8_async: unsafe extern "C" fn(
        cu::CUdeviceptr,
        u8,
        usize,
        cu::CUstream,
    ) -> cu::CUresult = entry(c"cuMemsetD8Async");
    // SAFETY: `p` is a live cudalloc allocation of at least `n` bytes of
    // device 0, whose context `gpu()` made current.
    check(unsafe { memset_d8_async(p, v, n, stream as usize as cu::CUstream) });
}

/// Copy `n` bytes back (synchronously, after all prior work) and check them.
fn expect(p: u64, v: u8, n: usize) {
    let memcpy_dtoh: unsafe extern "C" fn(*mut c_void, cu::CUdeviceptr, usize) -> cu::CUresult =
        entry(c"cuMemcpyDtoH_v2");
    let mut host = vec![0u8; n];
    // SAFETY: `host` has room for `n` bytes; `p` is live for `n` bytes.
    check(unsafe { memcpy_dtoh(host.as_mut_ptr().cast(), p, n) });
    assert!(host.iter().all(|&b| b == v), "device data is not {v:#x}");
}

/// A global-mode graph capture on a stream: begun, checked still active
/// (a call that invalidates it ends it: status 2), then ended, instantiated
/// and launched once.
struct Capture {
    s: cu::CUstream,
}

/// A captured graph and its launched instance, destroyed on drop.
struct Launched {
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
}

impl Capture {
    fn begin(stream: u64) -> Capture {
        let begin: unsafe extern "C" fn(cu::CUstream, c_int) -> cu::CUresult =
            entry(c"cuStreamBeginCapture_v2");
        let s = stream as usize as cu::CUstream;
        // SAFETY: `s` is a live stream, not capturing; 0 is the global mode.
        check(unsafe { begin(s, 0) });
        Capture { s }
    }

    fn active(&self, after: &str) {
        let status: unsafe extern "C" fn(cu::CUstream, *mut c_int) -> cu::CUresult =
            entry(c"cuStreamIsCapturing");
        let mut st: c_int = -1;
        // SAFETY: `s` is a live stream; `st` is a valid out-pointer.
        check(unsafe { status(self.s, &mut st) });
        assert_eq!(
            st, 1,
            "the capture is not active after {after} (2: invalidated)"
        );
    }

    fn end_and_launch(self) -> Launched {
        let end: unsafe extern "C" fn(cu::CUstream, *mut cu::CUgraph) -> cu::CUresult =
            entry(c"cuStreamEndCapture");
        let instantiate: unsafe extern "C" fn(
            *mut cu::CUgraphExec,
            cu::CUgraph,
            u64,
        ) -> cu::CUresult = entry(c"cuGraphInstantiateWithFlags");
        let launch: unsafe extern "C" fn(cu::CUgraphExec, cu::CUstream) -> cu::CUresult =
            entry(c"cuGraphLaunch");
        let mut graph: cu::CUgraph = std::ptr::null_mut();
        let mut exec: cu::CUgraphExec = std::ptr::null_mut();
        // SAFETY: valid out-pointers; `s` is capturing; the graph is live
        // until `Launched` drops.
        unsafe {
            check(end(self.s, &mut graph));
            check(instantiate(&mut exec, graph, 0));
            check(launch(exec, self.s));
        }
        Launched { graph, exec }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let exec_destroy: unsafe extern "C" fn(cu::CUgraphExec) -> cu::CUresult =
            entry(c"cuGraphExecDestroy");
        let graph_destroy: unsafe extern "C" fn(cu::CUgraph) -> cu::CUresult =
            entry(c"cuGraphDestroy");
        // SAFETY: both were made by `end_and_launch` and are not used again.
        unsafe {
            check(exec_destroy(self.exec));
            check(graph_destroy(self.graph));
        }
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn behaviour_suite_on_cuda() {
    let (_, d) = gpu();
    let mut streams = vec![0u64];
    for _ in 1..STREAMS {
        streams.push(d.stream_create(0).unwrap());
    }
    let make = || Allocator::new(Config::parse("backend:cuda").unwrap(), d.clone());
    let failures: Vec<String> = run_all(&make, &streams)
        .into_iter()
        .filter_map(|(n, r)| r.err().map(|e| format!("{n}: {e}")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn allocations_hold_data() {
    let (a, _) = gpu();
    for size in [1usize, 4096, 1 << 20, 3 << 20, 64 << 20] {
        let p = a.malloc(size as u64, 0, 0).unwrap();
        memset(p, 0x5a, size, 0);
        expect(p, 0x5a, size);
        a.free(p, Some(0), 0).unwrap();
    }
    a.check_invariants().unwrap();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn cross_stream_reuse_keeps_data_intact() {
    let (a, d) = gpu();
    let (s1, s2) = (d.stream_create(0).unwrap(), d.stream_create(0).unwrap());
    let n = 256usize << 20;
    // Work on s1, free on s1, then s2 asks for the same size: it may get the
    // segment only after s1's work completed, so s2's write lands last.
    let p = a.malloc(n as u64, 0, s1).unwrap();
    for _ in 0..20 {
        memset(p, 0x11, n, s1);
    }
    a.free(p, Some(0), s1).unwrap();
    let q = a.malloc(n as u64, 0, s2).unwrap();
    memset(q, 0x22, n, s2);
    d.stream_synchronize(0, s2).unwrap();
    d.stream_synchronize(0, s1).unwrap();
    expect(q, 0x22, n);
    a.free(q, Some(0), s2).unwrap();
    a.check_invariants().unwrap();
}

/// A stream whose work has all completed gives its idle segment to another
/// stream on that stream's first slow path: proven by `cuStreamQuery`, not by
/// an event recorded a moment ago (rarely complete yet on a GPU).
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn an_idle_streams_segment_is_adopted_on_the_first_try() {
    let (a, d) = gpu();
    let (s1, s2) = (d.stream_create(0).unwrap(), d.stream_create(0).unwrap());
    let n = 256usize << 20;
    let p = a.malloc(n as u64, 0, s1).unwrap();
    memset(p, 0x11, n, s1);
    a.free(p, Some(0), s1).unwrap();
    d.stream_synchronize(0, s1).unwrap();
    let before = a.stats(0).unwrap();
    let q = a.malloc(n as u64, 0, s2).unwrap();
    let after = a.stats(0).unwrap();
    assert_eq!(q, p, "the idle segment was not reused");
    assert_eq!(after.num_segments_adopted, before.num_segments_adopted + 1);
    assert_eq!(after.num_driver_allocs, before.num_driver_allocs);
    a.free(q, Some(0), s2).unwrap();
    a.empty_cache();
    a.check_invariants().unwrap();
}

/// A training step's pattern: a step frees its activations (16 segments, a
/// multiple of the epoch spacing, so epoch events follow them), the host
/// waits for the device (`loss.item()`), the next step queues work and
/// grows for a longer sequence. The stream is busy then, so neither
/// `cuStreamQuery` nor an event recorded now proves anything; the epoch
/// events recorded at the frees do, and the idle segments too small for the
/// request go back to the driver before it grows.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn segments_freed_before_an_epoch_event_are_released_while_the_stream_is_busy() {
    let (a, d) = gpu();
    let s = d.stream_create(0).unwrap();
    // A buffer the next step keeps writing, so that its stream stays busy
    // (allocated first: growing for it later would release the segments).
    let work = a.malloc(1 << 30, 0, s).unwrap();
    let seg = 32usize << 20;
    let ps: Vec<u64> = (0..16)
        .map(|_| a.malloc(seg as u64, 0, s).unwrap())
        .collect();
    for &p in &ps {
        memset(p, 0x55, seg, s);
    }
    for &p in &ps {
        a.free(p, Some(0), s).unwrap();
    }
    d.stream_synchronize(0, s).unwrap(); // the step's loss.item()
    for _ in 0..64 {
        memset(work, 0x66, 1 << 30, s);
    }
    // (Asked before the malloc: its cuMemFree calls wait for the device.)
    assert!(
        matches!(d.stream_query(0, s), Ok(false)),
        "the stream should be busy: make the queued work longer"
    );
    let before = a.stats(0).unwrap();
    let big = a.malloc(64 << 20, 0, s).unwrap();
    let after = a.stats(0).unwrap();
    assert_eq!(
        after.num_driver_frees - before.num_driver_frees,
        16,
        "the 32 MiB segments are proven free by the epoch events"
    );
    memset(big, 0x77, 64 << 20, s);
    a.free(big, Some(0), s).unwrap();
    a.free(work, Some(0), s).unwrap();
    d.stream_synchronize(0, s).unwrap();
    a.empty_cache();
    a.check_invariants().unwrap();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn record_stream_delays_reuse() {
    let (a, d) = gpu();
    let (s1, s2) = (d.stream_create(0).unwrap(), d.stream_create(0).unwrap());
    let n = 64usize << 20;
    let p = a.malloc(n as u64, 0, s1).unwrap();
    for _ in 0..50 {
        memset(p, 0x33, n, s2); // used on s2
    }
    a.record_stream(p, s2).unwrap();
    a.free(p, Some(0), s1).unwrap();
    let q = a.malloc(n as u64, 0, s1).unwrap();
    memset(q, 0x44, n, s1);
    d.stream_synchronize(0, s1).unwrap();
    d.stream_synchronize(0, s2).unwrap();
    expect(q, 0x44, n);
    a.free(q, Some(0), s1).unwrap();
    a.check_invariants().unwrap();
}

/// A C/C++ graph capture in global mode grows past another stream's idle
/// segment too small for it, runs out of memory and calls `empty_cache`,
/// and stays valid: no cuMemFree or synchronisation reaches the driver
/// meanwhile (each would invalidate it). The graph then replays and writes
/// the memory the capture got.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn a_global_capture_survives_growth_oom_and_empty_cache() {
    let (a, d) = gpu();
    let (_, total) = d.mem_info(0).unwrap();
    let (s, c) = (d.stream_create(0).unwrap(), d.stream_create(0).unwrap());
    let p = a.malloc(30 << 20, 0, s).unwrap();
    memset(p, 0x11, 30 << 20, s);
    a.free(p, Some(0), s).unwrap();
    d.stream_synchronize(0, s).unwrap(); // s's segment is proven idle
    let cap = Capture::begin(c);
    let q = a.malloc(100 << 20, 0, c).unwrap();
    cap.active("a growth past an idle segment too small for it");
    memset(q, 0x22, 100 << 20, c);
    let e = a.malloc(total - (256 << 20), 0, c).unwrap_err();
    assert_eq!(e.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
    cap.active("an OOM");
    a.empty_cache();
    cap.active("empty_cache");
    assert_eq!(a.stats(0).unwrap().reserved_bytes, 130 << 20);
    let graph = cap.end_and_launch();
    d.stream_synchronize(0, c).unwrap();
    expect(q, 0x22, 100 << 20);
    drop(graph);
    a.free(q, Some(0), c).unwrap();
    a.empty_cache();
    assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
    a.check_invariants().unwrap();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn oom_at_real_capacity_then_recovery() {
    let (a, d) = gpu();
    let (_, total) = d.mem_info(0).unwrap();
    let chunk = 1u64 << 30;
    let mut held = Vec::new();
    let err = loop {
        match a.malloc(chunk, 0, 0) {
            Ok(p) => held.push(p),
            Err(e) => break e,
        }
        assert!(
            (held.len() as u64) * chunk <= total,
            "allocated more than the device has"
        );
    };
    assert_eq!(err.code, ErrorCode::CUDALLOC_ERR_OUT_OF_MEMORY);
    assert!(err.message.contains("largest live allocations"), "{err}");
    assert!(
        held.len() as u64 * chunk > total / 2,
        "filled only {} GiB of {}",
        held.len(),
        total >> 30
    );
    for p in held.drain(..) {
        a.free(p, Some(0), 0).unwrap();
    }
    let p = a.malloc(chunk, 0, 0).expect("service after OOM");
    memset(p, 1, chunk as usize, 0);
    expect(p, 1, 4096);
    a.free(p, Some(0), 0).unwrap();
    a.empty_cache();
    assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
}

const MIB: u64 = 1 << 20;

/// Expandable segments: blocks keep their data while the pages of the free
/// blocks around them are unmapped and mapped again elsewhere.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn expandable_data_survives_remaps() {
    let (a, d) = gpu_expandable();
    let s = d.stream_create(0).unwrap();
    let ps: Vec<u64> = (0..3).map(|_| a.malloc(10 * MIB, 0, s).unwrap()).collect();
    for (i, &p) in ps.iter().enumerate() {
        memset(p, 0x11 * (i as u8 + 1), (10 * MIB) as usize, s);
    }
    a.free(ps[0], Some(0), s).unwrap();
    a.free(ps[2], Some(0), s).unwrap();
    d.stream_synchronize(0, s).unwrap(); // the frees are proven complete
    let before = a.stats(0).unwrap();
    // 24 MiB fits neither hole: it takes their pages.
    let q = a.malloc(24 * MIB, 0, s).unwrap();
    let after = a.stats(0).unwrap();
    assert!(after.num_vmm_unmaps > before.num_vmm_unmaps, "{after:?}");
    memset(q, 0x44, (24 * MIB) as usize, s);
    d.stream_synchronize(0, s).unwrap();
    expect(ps[1], 0x22, (10 * MIB) as usize);
    expect(q, 0x44, (24 * MIB) as usize);
    a.free(ps[1], Some(0), s).unwrap();
    a.free(q, Some(0), s).unwrap();
    a.empty_cache();
    assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
    a.check_invariants().unwrap();
}

/// A page freed on one stream serves another once the free is proven
/// complete, with no new memory, and holds the new stream's data.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn expandable_pages_move_between_streams() {
    let (a, d) = gpu_expandable();
    let (s1, s2) = (d.stream_create(0).unwrap(), d.stream_create(0).unwrap());
    let p = a.malloc(40 * MIB, 0, s1).unwrap();
    memset(p, 0x55, (40 * MIB) as usize, s1);
    a.free(p, Some(0), s1).unwrap();
    d.stream_synchronize(0, s1).unwrap();
    let before = a.stats(0).unwrap();
    let q = a.malloc(40 * MIB, 0, s2).unwrap();
    let after = a.stats(0).unwrap();
    assert_eq!(
        after.num_vmm_creates, before.num_vmm_creates,
        "no new memory"
    );
    assert!(after.num_vmm_unmaps > before.num_vmm_unmaps, "pages moved");
    memset(q, 0x66, (40 * MIB) as usize, s2);
    d.stream_synchronize(0, s2).unwrap();
    expect(q, 0x66, (40 * MIB) as usize);
    a.free(q, Some(0), s2).unwrap();
    a.empty_cache();
    a.check_invariants().unwrap();
}

/// Growth maps pages as requests need them; trim gives back what is proven
/// free without waiting; empty_cache the rest.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn expandable_growth_and_trim() {
    let (a, d) = gpu_expandable();
    let s = d.stream_create(0).unwrap();
    let ps: Vec<u64> = (1..=16)
        .map(|i| a.malloc(i * 3 * MIB, 0, s).unwrap())
        .collect();
    for &p in &ps {
        memset(p, 0x77, (3 * MIB) as usize, s);
    }
    let st = a.stats(0).unwrap();
    assert!(
        st.mapped_bytes >= 408 * MIB && st.mapped_bytes <= 440 * MIB,
        "{st:?}"
    );
    for &p in &ps {
        a.free(p, Some(0), s).unwrap();
    }
    d.stream_synchronize(0, s).unwrap();
    let released = a.trim(0, u64::MAX);
    assert!(released > 0, "trim released nothing");
    a.empty_cache();
    assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
    a.check_invariants().unwrap();
}

/// A global-mode capture with expandable segments: growth creates and maps
/// pages in relaxed mode, `empty_cache` unmaps nothing, and the graph then
/// replays into the memory it got.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh"]
fn expandable_capture_survives_growth_and_empty_cache() {
    let (a, d) = gpu_expandable();
    let (s, c) = (d.stream_create(0).unwrap(), d.stream_create(0).unwrap());
    let p = a.malloc(30 * MIB, 0, s).unwrap();
    a.free(p, Some(0), s).unwrap();
    d.stream_synchronize(0, s).unwrap();
    let cap = Capture::begin(c);
    let q = a.malloc(100 * MIB, 0, c).unwrap();
    cap.active("a growth (create and map)");
    memset(q, 0x22, (100 * MIB) as usize, c);
    a.empty_cache();
    cap.active("empty_cache");
    let graph = cap.end_and_launch();
    d.stream_synchronize(0, c).unwrap();
    expect(q, 0x22, (100 * MIB) as usize);
    drop(graph);
    a.free(q, Some(0), c).unwrap();
    a.empty_cache();
    assert_eq!(a.stats(0).unwrap().reserved_bytes, 0);
    a.check_invariants().unwrap();
}
