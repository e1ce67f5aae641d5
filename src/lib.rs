//! # cudalloc
//!
//! A drop-in CUDA device-memory caching allocator, shipped as one shared
//! library (`libcudalloc.so`) with a C header (`include/cudalloc.h`).
//! PyTorch loads it through `CUDAPluggableAllocator`; C/C++ programs link it;
//! `CUDALLOC_CONF` configures it. See `README.md` for use and
//! `../shared/DESIGN.md` for the design brief.
//!
//! ## The layers (data flows down once; no module imports one above it)
//! ```text
//! ffi        extern "C" exports by family (alloc, pools, stats, control),  ffi/, global.rs
//!            each inside the panic boundary (export!); thread-local last
//!            error; the process-wide allocator, exit and fork-child guards;
//!            C++ exceptions and std::function for PyTorch's hooks
//! config     one options table; CUDALLOC_CONF over a program's defaults;     config.rs
//!            effective-config print with each value's source
//! allocator  Allocator = the engine + the observability adaptors around it  allocator.rs
//! observe    adaptors: call-site sampling, leak report and alarms,          observe/
//!            pressure levels + trim, the RMM-CSV trace log (the engine's
//!            Journal), JSON stats and snapshots (PyTorch's format)
//! engine     per device: stream arenas -> segments -> blocks (TLSF); the    engine/
//!            stash; stream-ordered reuse; adoption of idle segments proven
//!            free (epoch events, stream queries, per-segment events); the
//!            OOM ladder; limits; graph captures; private pools; reclaim;
//!            the warm-up reservation; can_allocate; diagnosis; snapshots
//!            and their history; expandable segments (virtual ranges,
//!            pages mapped on demand and moved once proven free);
//!            check_invariants (engine/mod.rs maps its files)
//!   size_class  pure size -> granule, pool, segment, bin functions          size_class.rs
//! live       live-allocation records and their stamps (time, thread)       live.rs
//! stats      cudalloc_stats snapshot; device gauges and counters             stats.rs
//! driver     trait Driver, the one narrow interface to a device, with its   driver/
//!            contract (which calls are legal during a graph capture; the
//!            virtual-memory calls and their rules)
//!              cuda: CUDA driver API via cudarc (run-time loaded libcuda,
//!                    raw result codes, primary context per device with
//!                    the caller's restored, relaxed capture mode,
//!                    optional cuMemMap family)
//!              sim: simulated device (capacity, fake addresses, manual
//!                   or lagging events, fault injection, virtual memory
//!                   with every rule checked)
//!              exit_guard: refuses device calls once the process exits
//! error      Error and the C result codes (base 42000)                       error.rs
//! conformance the shared behaviour suite (tests and `cudalloc selftest`)     conformance.rs
//! bench      the `cudalloc bench` workloads                                  bench.rs
//! trace      RMM-format traces: parse, replay, generate, SVG/HTML timeline    trace/
//! ```
//! Nothing above `driver` names CUDA; nothing below `ffi` knows about C;
//! the engine knows nothing of observe.
//!
//! ## Where to start
//! [`Allocator`] is the whole allocator as a Rust value: tests and
//! benchmarks build one over a [`driver::sim::SimDriver`]. The C ABI in
//! [`ffi`] wraps one process-wide instance ([`global`]). [`engine::Engine`]
//! is the caching allocator alone.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod allocator;
pub mod bench;
pub mod config;
pub mod conformance;
pub mod driver;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod global;
pub mod live;
pub mod observe;
pub mod size_class;
pub mod stats;
pub mod trace;

pub use allocator::Allocator;
pub use config::Config;
pub use error::{Error, ErrorCode, Result};
