//! The process-wide allocator behind the C ABI.
//!
//! It is created on first use from `CUDALLOC_CONF`, or explicitly by
//! `cudalloc_init`, whose string gives the program's defaults:
//! `CUDALLOC_CONF` overrides them key by key, so an operator's setting is
//! never ignored ([`Config::layered`]). A bad configuration in the
//! environment is remembered and reported by every call (and logged once);
//! an explicit init reports it too. At process exit (an `atexit` hook) the allocator
//! stops calling the driver (its driver is wrapped in an `ExitGuard`): frees
//! are ignored quietly, and the exit-time reports of `Allocator::at_exit` run.
//! Nor is it created during exit: a first call from a destructor that runs
//! after `main` returned gets `CUDALLOC_ERR_SHUTTING_DOWN` (the library's
//! constructor marks the loading thread, whose thread-locals `exit()` tears
//! down first).
//!
//! A child process forked after the first call into cudalloc (a `fork` start
//! method of Python's multiprocessing, a DataLoader worker) shares none of
//! the parent's CUDA state, and a lock another parent thread held at the
//! fork stays held forever in the child. A `pthread_atfork` child hook,
//! registered before the start-up lock is first taken, therefore stops the
//! allocator there: every call that needs it returns
//! `CUDALLOC_ERR_SHUTTING_DOWN` at once, without a lock or a driver call,
//! frees are ignored, and the exit-time reports are the parent's alone.

use crate::config::{env_conf, Backend, Config, CONF_ENV};
use crate::driver::cuda::CudaDriver;
use crate::driver::exit_guard::ExitGuard;
use crate::driver::sim::SimDriver;
use crate::driver::{Driver, DriverError};
use crate::error::{Error, ErrorCode, Result};
use crate::Allocator;
use once_cell::sync::OnceCell;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static GLOBAL: OnceCell<Allocator> = OnceCell::new();
static ENV_ERROR: OnceCell<Error> = OnceCell::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());
static EXITING: AtomicBool = AtomicBool::new(false);
static FORKED: AtomicBool = AtomicBool::new(false);

/// Whether the process is exiting (after which the driver is not called).
#[inline]
pub fn exiting() -> bool {
    EXITING.load(Ordering::Relaxed)
}

/// Whether this is a child forked after the allocator started (see the
/// module docs); [`exiting`] is then true too.
#[inline]
pub fn forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}

/// The error every call gets once the allocator has stopped (exit or fork).
pub fn stopped_error() -> Error {
    let why = if forked() {
        "this is a child process forked after cudalloc started: the parent's device memory \
         and CUDA state are not usable here, so the call is ignored (give workers that need \
         the GPU the 'spawn' start method)"
    } else {
        "process is exiting; call ignored"
    };
    Error::new(ErrorCode::CUDALLOC_ERR_SHUTTING_DOWN, why)
}

/// Register [`on_fork_child`] once, before `INIT_LOCK` is first taken: a
/// child forked while another thread starts the allocator (holding that
/// lock, maybe inside CUDA's start-up) must refuse too, not wait on the lock.
fn register_fork_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `on_fork_child` only stores to atomics; no prepare or parent hook.
        unsafe { libc::pthread_atfork(None, None, Some(on_fork_child)) };
    });
}

/// The `pthread_atfork` child hook: only atomic stores, which are
/// async-signal-safe as a fork handler must be.
extern "C" fn on_fork_child() {
    FORKED.store(true, Ordering::SeqCst);
    EXITING.store(true, Ordering::SeqCst);
}

/// Dropped with the thread's other thread-locals: for the thread that
/// calls `exit()`, before the atexit handlers and the `.fini_array`
/// destructors run.
struct Alive;

impl Drop for Alive {
    fn drop(&mut self) {}
}

thread_local! {
    static ALIVE: Alive = const { Alive };
}

/// Whether this thread's thread-locals are torn down: it is exiting (and,
/// for the main thread, so is the process, but for a `pthread_exit`).
/// Only a thread that touched `ALIVE` before can tell: the library's
/// constructor does, on the main thread only (it loads a program's linked
/// libraries; a thread that `dlopen`s the library may exit while the
/// process goes on).
fn thread_torn_down() -> bool {
    ALIVE.try_with(|_| ()).is_err()
}

/// The library's constructor: touches `ALIVE` on the main thread, so that
/// a first call from a destructor after `main` returned (a C or C++
/// library's, or the program's) is refused as a call during exit instead of
/// starting the driver then.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static TOUCH_ALIVE: extern "C" fn() = {
    extern "C" fn touch() {
        // SAFETY: plain system calls without arguments.
        if unsafe { libc::getpid() == libc::gettid() } {
            let _ = ALIVE.try_with(|_| ());
        }
    }
    touch
};

extern "C" fn on_exit() {
    if FORKED.load(Ordering::SeqCst) {
        // The parent writes the reports; locks may be held by threads the
        // child does not have.
        return;
    }
    EXITING.store(true, Ordering::SeqCst);
    // Exit-time reports (trace log flush, stats_file, leak_report:exit). The
    // driver is already fenced off by `ExitGuard`; nothing may unwind into C.
    let _ = std::panic::catch_unwind(|| {
        if let Some(a) = GLOBAL.get() {
            a.at_exit();
        }
    });
}

/// Install the `tracing` subscriber (filtered by `CUDALLOC_LOG`, default
/// `warn`, to stderr) unless the host already has one.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CUDALLOC_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Run `f` with everything this thread logs through `tracing` (every level)
/// captured instead of printed; returns `f`'s result and the log. For
/// checks that provoke errors on purpose (`cudalloc selftest`, tests): their
/// expected errors stay quiet.
pub fn capture_logs<R>(f: impl FnOnce() -> R) -> (R, String) {
    use std::sync::{Arc, Mutex as StdMutex};
    #[derive(Clone, Default)]
    struct Sink(Arc<StdMutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let out = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || out.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_target(false)
        .finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    let bytes = std::mem::take(&mut *sink.0.lock().unwrap_or_else(|e| e.into_inner()));
    (r, String::from_utf8_lossy(&bytes).into_owned())
}

/// Build the driver the configuration asks for.
pub fn make_driver(config: &Config) -> Result<Arc<dyn Driver>> {
    let sim = || -> Arc<dyn Driver> {
        let d = SimDriver::new(config.sim_devices, config.sim_memory);
        d.set_manual_events(config.sim_events == crate::config::SimEvents::Manual);
        d.fail_alloc_at(config.sim_fail_alloc);
        Arc::new(d)
    };
    match config.backend {
        Backend::Sim => Ok(sim()),
        Backend::Cuda => Ok(cuda_driver()?),
        Backend::Auto => match cuda_driver() {
            Ok(d) if d.device_count() > 0 => Ok(d),
            other => {
                let why = match other {
                    Ok(_) => "the CUDA driver reports no device".to_string(),
                    Err(e) => e.to_string(),
                };
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!("backend:auto: {why}; using the simulated device (backend:sim)")
                });
                Ok(sim())
            }
        },
    }
}

/// The process's one CUDA driver (contexts are retained once), or why not.
fn cuda_driver() -> Result<Arc<dyn Driver>> {
    static CUDA: OnceCell<std::result::Result<Arc<CudaDriver>, DriverError>> = OnceCell::new();
    match CUDA.get_or_init(|| CudaDriver::new().map(Arc::new)) {
        Ok(d) => Ok(d.clone()),
        Err(e) => Err(e.clone().into()),
    }
}

/// Start the allocator; `origin` says where the configuration's values
/// came from (a debug log line).
fn create(config: Config, origin: &str) -> Result<Allocator> {
    init_logging();
    tracing::debug!("configuration: {origin}");
    let driver: Arc<dyn Driver> = Arc::new(ExitGuard {
        inner: make_driver(&config)?,
        stop: &EXITING,
    });
    // SAFETY: `on_exit` is an `extern "C" fn()` that catches every panic.
    unsafe { libc::atexit(on_exit) };
    Ok(Allocator::new(config, driver))
}

/// The allocator for a call that may reach the driver (allocate, free,
/// empty the cache): refused with `CUDALLOC_ERR_SHUTTING_DOWN` once the
/// process exits, so that nothing reaches the driver then.
#[inline]
pub fn serving() -> Result<&'static Allocator> {
    if exiting() {
        return Err(stopped_error());
    }
    get()
}

/// The allocator, created from `CUDALLOC_CONF` on first use.
#[inline]
pub fn get() -> Result<&'static Allocator> {
    if let Some(a) = GLOBAL.get() {
        if !forked() {
            return Ok(a);
        }
    }
    get_slow()
}

#[cold]
fn get_slow() -> Result<&'static Allocator> {
    if exiting() || thread_torn_down() {
        // Forked, or a first call during exit: starting the driver now
        // could meet it half torn down.
        return Err(stopped_error());
    }
    if let Some(e) = ENV_ERROR.get() {
        return Err(e.clone());
    }
    register_fork_hook();
    let _g = INIT_LOCK.lock();
    if let Some(a) = GLOBAL.get() {
        return Ok(a);
    }
    let layered = env_conf().and_then(|env| Config::layered(None, env.as_deref()));
    match layered.and_then(|l| {
        let origin = l.summary();
        create(l.config, &origin)
    }) {
        Ok(a) => Ok(GLOBAL.get_or_init(|| a)),
        Err(e) => {
            init_logging();
            tracing::error!("cudalloc disabled: {e}");
            Err(ENV_ERROR.get_or_init(|| e).clone())
        }
    }
}

/// Initialise with `conf`, the program's configuration (`None`: none),
/// under `CUDALLOC_CONF`, which overrides it key by key (see
/// [`Config::layered`]: the operator's setting is never ignored). Calling it
/// again with the configuration in force is fine; with another one it is
/// an error.
pub fn init(conf: Option<&str>) -> Result<&'static Allocator> {
    if forked() {
        return Err(stopped_error());
    }
    let l = Config::layered(conf, env_conf()?.as_deref())?;
    let origin = l.summary();
    init_with(l.config, &origin)
}

/// [`init`] with a configuration made already (the environment is not read).
pub fn init_config(config: Config) -> Result<&'static Allocator> {
    init_with(config, "given whole by the caller")
}

fn init_with(config: Config, origin: &str) -> Result<&'static Allocator> {
    let running = |a: &'static Allocator| {
        if *a.config() == config {
            Ok(a)
        } else {
            Err(Error::new(
                ErrorCode::CUDALLOC_ERR_ALREADY_INITIALIZED,
                format!("cudalloc is already initialised with another configuration; call cudalloc_init (or set {CONF_ENV}) before the first allocation"),
            ))
        }
    };
    if forked() {
        return Err(stopped_error());
    }
    if let Some(a) = GLOBAL.get() {
        return running(a);
    }
    if exiting() || thread_torn_down() {
        // Not started during exit (see `get_slow`), nor made to wait for
        // a start-up under way on another thread.
        return Err(stopped_error());
    }
    register_fork_hook();
    let _g = INIT_LOCK.lock();
    if let Some(a) = GLOBAL.get() {
        return running(a);
    }
    let a = create(config, origin)?;
    Ok(GLOBAL.get_or_init(|| a))
}
