//! # cudalloc
//!
//! A drop-in CUDA device-memory caching allocator, shipped as one shared
//! library (`libcudalloc.so`) with a C header (`include/cudalloc.h`).
//! PyTorch loads it through `CUDAPluggableAllocator`; C/C++ programs link it;
//! `CUDALLOC_CONF` configures it. See `README.md` for use and
//! `../shared/DESIGN.md` for the design brief.
//!
//! ## The layers (data flows down once)
//! ```text
//! ffi        extern "C" exports, panic boundary, NULL rules, error codes,    ffi/, global.rs
//!            thread-local last error, the process-wide allocator, exit and
//!            fork-child guards; a C++ exception for PyTorch's alloc_fn and
//!            graph-pool refusal (ffi/cxx_throw.rs); PyTorch's pool filters,
//!            a libstdc++ std::function kept and called (ffi/cxx_function.rs)
//! config     one options table; CUDALLOC_CONF parsing; effective-config print config.rs
//! engine     per device: stream arenas -> segments -> blocks (TLSF free index) engine/
//!            a per-arena stash of freed small blocks (deferred coalescing);
//!            stream-ordered reuse; adoption of idle segments, proven free
//!            by epoch events, stream queries or per-segment events; OOM
//!            ladder; limits; empty_cache; check_invariants()
//!   pools       private pools for PyTorch's CUDA graphs (graph_pools:on)   engine/pools.rs
//!   size_class  pure size -> granule, pool, segment, bin functions           size_class.rs
//!   trim        oldest-first trim and the engine's hooks for observe/        engine/trim.rs
//! tracking   live-allocation records (validate frees, true sizes)            tracking.rs
//! observe    adaptors around the engine: call-site sampling, leak report and  observe/
//!            alarms, pressure levels + trim, RMM-CSV trace log, JSON stats
//! stats      cudalloc_stats snapshot; device gauges and counters             stats.rs
//! driver     trait Driver, the one narrow interface to a device              driver/
//!              cuda: CUDA driver API via cudarc (run-time loaded libcuda,
//!                    raw result codes, primary context per device with
//!                    the caller's restored, relaxed capture mode)
//!              sim: simulated device (capacity, fake addresses, manual
//!                   or lagging events, fault injection)
//!              exit_guard: refuses device calls once the process exits
//! error      Error and the C result codes (base 42000)                       error.rs
//! conformance the shared behaviour suite (tests and `cudalloc selftest`)     conformance.rs
//! bench      the `cudalloc bench` workloads                                  bench.rs
//! trace      RMM-format traces: parse, replay, generate, SVG/HTML timeline    trace/
//! ```
//! Nothing above `driver` names CUDA; nothing below `ffi` knows about C.
//!
//! ## Where to start
//! [`engine::Allocator`] is the whole allocator as a Rust value: tests and
//! benchmarks build one over a [`driver::sim::SimDriver`]. The C ABI in
//! [`ffi`] wraps one process-wide instance ([`global`]).

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
