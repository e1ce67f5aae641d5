//! `backend:cuda` against a driver stand-in: `tests/standin/fake_libcuda.c`,
//! compiled here into a fake `libcuda.so`, found through `LD_LIBRARY_PATH`.
//!
//! This runs the real CUDA code path (driver loading, context switching, error
//! mapping, capture mode) in CI with no GPU. **It proves plumbing, not
//! hardware**: the stand-in hands out fake addresses and its events complete
//! at once. The GPU suite is `tests/gpu/` with `scripts/gpu-check.sh`.
//!
//! glibc reads `LD_LIBRARY_PATH` only at process start, so every check runs a
//! child process: the `cudalloc` binary, the C ABI client, or the C scenarios
//! in `tests/standin/scenarios.c`.

#[allow(dead_code)] // this binary uses part of the shared tree (tests/support/mod.rs)
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use support::native;

/// The directory holding the fake `libcuda.so` and the scenario programs.
fn standin() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = native::temp_dir("standin");
        let lib = dir.join("libcuda.so");
        let st = Command::new("gcc")
            .args([
                "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread", "-o",
            ])
            .arg(&lib)
            .arg(native::root().join("tests/standin/fake_libcuda.c"))
            .output()
            .expect("gcc runs");
        assert!(
            st.status.success(),
            "stand-in did not compile:\n{}",
            String::from_utf8_lossy(&st.stderr)
        );
        std::fs::copy(&lib, dir.join("libcuda.so.1")).unwrap();
        for (src, name) in [
            ("tests/standin/scenarios.c", "scenarios"),
            ("tests/c/abi_test.c", "abi_test"),
        ] {
            native::build_c_client(&native::root().join(src), &dir.join(name), &[])
                .unwrap_or_else(|e| panic!("{src} did not compile:\n{e}"));
        }
        dir
    })
}

struct Run {
    out: Output,
    log: String,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn assert_ok(&self) {
        assert!(
            self.out.status.success(),
            "failed: {:?}\nstdout:\n{}\nstderr:\n{}\nlog tail:\n{}",
            self.out.status,
            self.stdout(),
            self.stderr(),
            tail(&self.log)
        );
        assert!(
            !self.stderr().contains("panicked"),
            "a panic:\n{}",
            self.stderr()
        );
        for bad in ["WRONG_CTX", "BAD_FREE", "BAD_STREAM"] {
            assert!(
                !self.log.contains(bad),
                "the stand-in saw {bad}:\n{}",
                self.log
            );
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Run `program args` on backend:cuda over the stand-in, with extra env.
fn run(name: &str, program: &Path, args: &[&str], env: &[(&str, String)]) -> Run {
    let dir = standin();
    let log = dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("LD_LIBRARY_PATH", dir)
        .env("CUDALLOC_CONF", "backend:cuda")
        .env("CUDALLOC_LOG", "error")
        .env("FAKE_CUDA_LOG", &log)
        .env("FAKE_CUDA_DEVICES", "2")
        .env("FAKE_CUDA_MEMORY", (1u64 << 30).to_string())
        // The streams the C programs pass stand for streams their host made.
        .env("FAKE_CUDA_HOST_STREAMS", "0x10,0x20,0x1000,0x2000");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("child runs");
    Run {
        out,
        log: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

/// Run scenario `name` of tests/standin/scenarios.c and check it passed
/// (`Run::assert_ok`); the caller checks the rest.
fn scenario(name: &str, env: &[(&str, String)]) -> Run {
    let r = run(name, &standin().join("scenarios"), &[name], env);
    r.assert_ok();
    r
}

fn cli() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cudalloc"))
}

#[test]
fn config_starts_backend_cuda_on_the_standin() {
    let r = run("config", cli(), &["config"], &[]);
    r.assert_ok();
    assert!(
        r.stdout().contains("backend in use: cuda with 2 device(s)"),
        "{}",
        r.stdout()
    );
    // Starting the backend initialises the driver and retains no context
    // (each is retained on first use of its device).
    assert!(r.log.contains("cuInit"), "{}", r.log);
    assert!(!r.log.contains("cuDevicePrimaryCtxRetain"), "{}", r.log);
}

#[test]
fn behaviour_suite_passes_on_backend_cuda() {
    let r = run("selftest", cli(), &["selftest"], &[]);
    r.assert_ok();
    assert!(r.stdout().contains("10 passed, 0 failed"), "{}", r.stdout());
    assert!(
        r.log.contains("cuMemAlloc_v2 ctx=0") && r.log.contains("cuEventRecord"),
        "{}",
        tail(&r.log)
    );
}

#[test]
fn c_client_passes_on_backend_cuda() {
    let r = run("abi", &standin().join("abi_test"), &[], &[]);
    r.assert_ok();
    assert!(r.stdout().contains(" passed, 0 failed"), "{}", r.stdout());
    assert!(
        r.log.contains("cuMemAlloc_v2 ctx=1"),
        "device 1 was used under its own context"
    );
}

/// cudarc declares `CUresult` as a Rust enum: a code it does not list (a
/// newer driver's) would be undefined behaviour if it crossed the FFI as that
/// type. cudalloc's entry points return the raw number instead; here the
/// stand-in returns 4242 from cuMemAlloc and has no text for it.
#[test]
fn unknown_driver_error_codes_are_plain_errors() {
    let r = scenario("unknown_error", &[("FAKE_CUDA_ALLOC_ERROR", "4242".into())]);
    assert!(r.stdout().contains("ok unknown_error"), "{}", r.stdout());
    assert!(
        r.log
            .contains("cuMemAlloc_v2 ctx=0 size=20971520 ERROR=4242"),
        "{}",
        tail(&r.log)
    );
}

#[test]
fn injected_oom_is_flushed_and_retried() {
    let r = scenario("oom", &[("FAKE_CUDA_OOM_AT", "2".into())]);
    assert!(r.stdout().contains("ok oom"), "{}", r.stdout());
    // The failed allocation, then the flush, then the successful retry.
    let oom = r.log.find("OOM").expect("the injected OOM happened");
    let free = r.log[oom..]
        .find("cuMemFree_v2")
        .map(|i| i + oom)
        .expect("the ladder freed a segment");
    assert!(
        r.log[free..].contains("cuMemAlloc_v2 ctx=0 size=104857600"),
        "{}",
        r.log
    );
}

#[test]
fn each_device_is_served_under_its_own_context() {
    let r = scenario("multidev", &[]);
    assert!(
        r.log.contains("cuMemAlloc_v2 ctx=1 size=31457280"),
        "{}",
        r.log
    );
    let frees: Vec<&str> = r
        .log
        .lines()
        .filter(|l| l.starts_with("cuMemFree_v2"))
        .collect();
    assert_eq!(frees.len(), 3, "{}", r.log);
    assert!(
        frees.iter().any(|l| l.contains("ctx=1")),
        "device 1's segment freed under ctx 1: {frees:?}"
    );
}

#[test]
fn the_callers_context_is_current_again_after_every_call() {
    let r = scenario("ctx_restore", &[]);
    // The segment really went through device 1's context.
    assert!(
        r.log.contains("cuMemAlloc_v2 ctx=1 size=31457280"),
        "{}",
        r.log
    );
    assert!(
        r.log
            .lines()
            .any(|l| l.starts_with("cuMemFree_v2") && l.contains("ctx=1")),
        "{}",
        r.log
    );
}

#[test]
fn a_forked_child_is_refused_cleanly_and_the_parent_carries_on() {
    let r = scenario(
        "fork",
        &[("CUDALLOC_CONF", "backend:cuda,leak_report:exit".into())],
    );
    let start = r.log.find("CHILD START").expect("start marker");
    let end = r.log.find("CHILD END").expect("end marker");
    let inside = r.log[start + "CHILD START".len()..end].trim();
    assert!(inside.is_empty(), "the child called the driver:\n{inside}");
    // One exit report, the parent's, with its one live 3 MiB allocation.
    let err = r.stderr();
    assert_eq!(
        err.matches("cudalloc leak report").count(),
        1,
        "exactly one report:\n{err}"
    );
    assert!(err.contains("3145728"), "{err}");
}

/// A context costs hundreds of MiB of device memory: cudalloc retains a
/// device's primary context only when it first works on that device. Its
/// periodic work (pressure samples, alarms) and the statistics of a device
/// it never allocated on ask the driver nothing, `memory_fraction` included
/// (found in review: the growth alarm's stats read device 1's total).
#[test]
fn only_the_devices_in_use_get_a_context() {
    let r = scenario(
        "one_device",
        &[(
            "CUDALLOC_CONF",
            "backend:cuda,pressure_interval:1ms,memory_fraction:0.5".into(),
        )],
    );
    assert!(
        r.log.contains("cuDevicePrimaryCtxRetain dev=0"),
        "{}",
        r.log
    );
    assert!(
        !r.log.contains("dev=1"),
        "device 1 got a context:\n{}",
        tail(&r.log)
    );
    assert!(
        !r.log.contains("ctx=1"),
        "a call on device 1:\n{}",
        tail(&r.log)
    );
    assert!(
        r.log.contains("cuMemGetInfo_v2 ctx=0"),
        "no pressure sample ran:\n{}",
        tail(&r.log)
    );
}

#[test]
fn deinitialised_driver_is_quiet_and_exit_calls_nothing() {
    let flag = standin().join("deinit.flag");
    let _ = std::fs::remove_file(&flag);
    let r = scenario(
        "deinit",
        &[
            ("FAKE_CUDA_DEINIT_FILE", flag.display().to_string()),
            ("CUDALLOC_LOG", "warn".into()),
        ],
    );
    assert!(r.stdout().contains("ok deinit"), "{}", r.stdout());
    assert!(
        r.log.contains("DEINITIALIZED"),
        "the driver was asked after deinit: {}",
        r.log
    );
    let after_exit = r.log.split("EXIT\n").nth(1).expect("exit marker");
    assert!(
        after_exit.trim().is_empty(),
        "driver calls during exit:\n{after_exit}"
    );
    assert!(
        !r.stderr().contains("failed"),
        "deinit frees must be quiet:\n{}",
        r.stderr()
    );
}

#[test]
fn capture_uses_relaxed_mode_and_quarantines_frees() {
    let r = scenario(
        "capture",
        &[
            ("FAKE_CUDA_CAPTURING", "0x7777".into()),
            ("FAKE_CUDA_HOST_STREAMS", "0x7777".into()),
        ],
    );
    assert!(r.stdout().contains("ok capture"), "{}", r.stdout());
    assert!(
        !r.log.contains("CAPTURE_UNSUPPORTED"),
        "cuMemAlloc ran in global capture mode:\n{}",
        r.log
    );
    assert!(
        r.log.contains("mode=2"),
        "allocations ran in relaxed mode:\n{}",
        r.log
    );
    assert!(!r.log.contains("CAPTURE_VIOLATION"), "{}", tail(&r.log));
}

/// During a C/C++ capture nothing goes back to the driver: not the idle
/// segments too small for a growth, not the OOM ladder's. cuMemFree (it
/// synchronises the context) and cuStreamSynchronize would invalidate the
/// capture.
#[test]
fn a_capture_grows_and_ooms_without_freeing_or_synchronising() {
    let r = scenario(
        "capture_release",
        &[("FAKE_CUDA_HOST_STREAMS", "0x10,0x7777".into())],
    );
    assert!(!r.log.contains("CAPTURE_VIOLATION"), "{}", tail(&r.log));
    assert!(r.log.contains("cuMemFree_v2"), "{}", tail(&r.log));
}

/// A first call from a destructor after `main` returned is refused as a
/// call during exit: the driver is never started then.
#[test]
fn a_first_call_during_exit_starts_nothing() {
    let r = scenario("exit_first_call", &[]);
    assert!(
        r.stderr().contains("destructor: malloc (nil), code 42009"),
        "{}",
        r.stderr()
    );
    assert!(!r.log.contains("cuInit"), "{}", tail(&r.log));
}

/// The legacy stream while another stream captures: the driver answers
/// "implicit" to cuStreamIsCapturing, and cudalloc takes it as capturing, so
/// `empty_cache` neither synchronises it nor frees until the capture ends.
#[test]
fn the_legacy_stream_counts_as_capturing_while_another_stream_captures() {
    let r = scenario("capture_legacy", &[]);
    assert!(!r.log.contains("CAPTURE_VIOLATION"), "{}", tail(&r.log));
    assert!(
        r.log
            .contains("cuStreamIsCapturing ctx=0 stream=(nil) IMPLICIT"),
        "{}",
        tail(&r.log)
    );
}

/// On a GPU an event recorded a moment ago is usually not complete yet.
/// cudalloc proves an idle segment's free by the stream's own state first
/// (`cuStreamQuery`), so another stream adopts the segment on its first slow
/// path instead of growing; with work pending on the stream, the event
/// recorded then proves it on a later slow path.
#[test]
fn an_idle_stream_lets_its_segment_be_adopted_at_once() {
    let lag = ("FAKE_CUDA_EVENT_LAG", "1".to_string());
    let r = scenario("adopt", std::slice::from_ref(&lag));
    assert!(
        r.stdout().contains("adopted 1 2 driver_allocs 1"),
        "{}\n{}",
        r.stdout(),
        tail(&r.log)
    );
    assert!(
        r.log.contains("cuStreamQuery ctx=0 stream=0x10 idle"),
        "{}",
        tail(&r.log)
    );
    let r = scenario("adopt", &[lag, ("FAKE_CUDA_STREAM_BUSY", "1".into())]);
    assert!(
        r.stdout().contains("adopted 0 1 driver_allocs 2"),
        "{}\n{}",
        r.stdout(),
        tail(&r.log)
    );
    assert!(
        r.log.contains("cuEventQuery ctx=0 NOT_READY"),
        "{}",
        tail(&r.log)
    );
}

/// A stream capturing a graph is neither queried (`cuStreamQuery` would
/// invalidate its capture) nor recorded on (an event recorded into a
/// capture proves nothing, and querying it fails): its idle segment stays
/// unproven until the capture ends.
#[test]
fn a_capturing_stream_is_never_queried_or_recorded_on() {
    let r = scenario("capture_other", &[]);
    assert!(!r.log.contains("CAPTURE_VIOLATION"), "{}", tail(&r.log));
    assert!(!r.log.contains("CAPTURED_EVENT"), "{}", tail(&r.log));
    assert!(
        r.log.contains("cuStreamIsCapturing ctx=0 stream=0x2000 1"),
        "{}",
        tail(&r.log)
    );
}

/// True when some libcuda is installed on this machine (a GPU machine).
fn system_has_libcuda() -> bool {
    Command::new("sh")
        .args(["-c", "ldconfig -p | grep -q 'libcuda\\.so'"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn missing_libcuda_is_a_clear_error_not_a_panic() {
    if system_has_libcuda() {
        eprintln!("a real libcuda is installed here; the missing-driver case cannot be staged");
        return;
    }
    let empty = native::temp_dir("nolib");
    let out = Command::new(cli())
        .arg("config")
        .env("LD_LIBRARY_PATH", &empty)
        .env("CUDALLOC_CONF", "backend:cuda")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("libcuda.so not found; is the NVIDIA driver installed?"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = Command::new(cli())
        .args(["bench", "--pairs", "1000", "--quick"])
        .env("LD_LIBRARY_PATH", &empty)
        .env("CUDALLOC_CONF", "backend:auto")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("using the simulated device").count(),
        1,
        "exactly one warning:\n{err}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("backend sim"), "{stdout}");
    // The tracking-cost rows ran and compared themselves with backtraces off.
    assert_eq!(stdout.matches("x of backtraces off").count(), 2, "{stdout}");
}

#[test]
fn bench_runs_on_backend_cuda_with_real_streams() {
    // The bench must hand the driver only streams it created: a made-up
    // handle is a wild pointer to a real driver (the stand-in logs BAD_STREAM).
    let r = run(
        "bench",
        cli(),
        &["bench", "--pairs", "2000", "--quick"],
        &[],
    );
    r.assert_ok();
    let out = r.stdout();
    assert!(out.contains("backend cuda"), "{out}");
    assert!(out.contains("hot path, 2 threads"), "{out}");
    assert!(out.contains("hot path via the C ABI"), "{out}");
    assert!(
        out.contains("raw driver alloc+free (cuda)") && out.contains("cache hit is"),
        "{out}"
    );
    // Its streams were created and the 2-thread ones destroyed again.
    assert_eq!(r.log.matches("cuStreamCreate").count(), 3, "{}", r.log);
    assert_eq!(r.log.matches("cuStreamDestroy_v2").count(), 2, "{}", r.log);
    // Each workload gave its memory back; only the C ABI's process-wide
    // allocator keeps its one segment.
    let count = |call: &str| {
        r.log
            .lines()
            .filter(|l| l.starts_with(call) && l.contains(" ptr="))
            .count()
    };
    let (allocs, frees) = (count("cuMemAlloc_v2 "), count("cuMemFree_v2 "));
    assert_eq!(allocs, frees + 1, "{allocs} allocations, {frees} frees");
}

#[test]
fn libcuda_so_1_is_preferred_to_a_stub_libcuda_so() {
    // Some build images put the toolkit's stub libcuda.so (whose cuInit
    // always fails) on LD_LIBRARY_PATH; the CUDA runtime, and so PyTorch,
    // opens libcuda.so.1, the driver. cudalloc must load that one too.
    let stub_dir = native::temp_dir("stub");
    let src = stub_dir.join("stub.c");
    std::fs::write(
        &src,
        "int cuInit(unsigned flags) { (void)flags; return 34; }\n",
    )
    .unwrap();
    native::build(
        "gcc",
        &["-shared", "-fPIC"],
        &[&src],
        &stub_dir.join("libcuda.so"),
        false,
    )
    .unwrap_or_else(|e| panic!("the stub did not compile:\n{e}"));
    let driver_dir = native::temp_dir("driver-only");
    std::fs::copy(
        standin().join("libcuda.so.1"),
        driver_dir.join("libcuda.so.1"),
    )
    .unwrap();
    let path = format!("{}:{}", stub_dir.display(), driver_dir.display());
    let r = run("stub", cli(), &["selftest"], &[("LD_LIBRARY_PATH", path)]);
    r.assert_ok();
    assert!(r.stdout().contains("backend cuda"), "{}", r.stdout());
}

/// `expandable_segments:on` runs the behaviour suite through the driver's
/// virtual-memory calls, breaking none of the stand-in's rules.
#[test]
fn expandable_segments_run_on_backend_cuda() {
    let conf = (
        "CUDALLOC_CONF",
        "backend:cuda,expandable_segments:on".to_string(),
    );
    let r = run(
        "selftest_vmm",
        cli(),
        &["selftest"],
        std::slice::from_ref(&conf),
    );
    r.assert_ok();
    assert!(r.stdout().contains("10 passed, 0 failed"), "{}", r.stdout());
    for call in [
        "cuMemAddressReserve",
        "cuMemCreate",
        "cuMemMap",
        "cuMemSetAccess",
        "cuMemUnmap",
        "cuMemRelease",
    ] {
        assert!(r.log.contains(call), "no {call}:\n{}", tail(&r.log));
    }
    assert!(!r.log.contains("VMM_VIOLATION"), "{}", tail(&r.log));
    assert!(!r.log.contains("cuMemAlloc_v2 ctx"), "no classic segment");
    // The C client too (two devices, each under its own context).
    let r = run("abi_vmm", &standin().join("abi_test"), &[], &[conf]);
    r.assert_ok();
    assert!(!r.log.contains("VMM_VIOLATION"), "{}", tail(&r.log));
    assert!(r.log.contains("cuMemCreate dev=1"), "{}", tail(&r.log));
}

/// A GPU without virtual memory management: classic segments serve.
#[test]
fn without_virtual_memory_the_cuda_backend_keeps_classic_segments() {
    let r = run(
        "selftest_novmm",
        cli(),
        &["selftest"],
        &[
            (
                "CUDALLOC_CONF",
                "backend:cuda,expandable_segments:on".into(),
            ),
            ("FAKE_CUDA_VMM", "0".into()),
        ],
    );
    r.assert_ok();
    assert!(r.stdout().contains("10 passed, 0 failed"), "{}", r.stdout());
    assert!(r.log.contains("cuMemAlloc_v2 ctx=0"), "{}", tail(&r.log));
    assert!(!r.log.contains("cuMemMap"), "{}", tail(&r.log));
}

/// During a capture, expandable segments map new memory in relaxed mode and
/// never unmap or release.
#[test]
fn expandable_segments_in_a_capture_map_in_relaxed_mode() {
    let r = scenario(
        "capture",
        &[
            (
                "CUDALLOC_CONF",
                "backend:cuda,expandable_segments:on".into(),
            ),
            ("FAKE_CUDA_CAPTURING", "0x7777".into()),
            ("FAKE_CUDA_HOST_STREAMS", "0x7777".into()),
        ],
    );
    assert!(r.stdout().contains("ok capture"), "{}", r.stdout());
    assert!(r.log.contains("cuMemMap"), "{}", tail(&r.log));
    assert!(!r.log.contains("CAPTURE_UNSUPPORTED"), "{}", tail(&r.log));
    assert!(!r.log.contains("CAPTURE_VIOLATION"), "{}", tail(&r.log));
    assert!(!r.log.contains("VMM_VIOLATION"), "{}", tail(&r.log));
}
