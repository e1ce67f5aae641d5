//! C callers at the edges (tests/c/exit_and_logging.c): an OOM callback that
//! allocates, calls from atexit handlers and thread-exit destructors (also
//! under LeakSanitizer), and a trace log on a stdout whose reader goes away.

#[allow(dead_code)] // this binary uses part of the shared tree (tests/support/mod.rs)
mod support;

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use support::native;

fn build(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let dir = native::temp_dir(name);
    match native::build_c_client(
        &native::root().join("tests/c/exit_and_logging.c"),
        &dir.join(name),
        &[&["-pthread"], extra].concat(),
    ) {
        Ok(exe) => Some(exe),
        Err(err) if !extra.is_empty() && err.contains("asan") => None, // no sanitizer runtime
        Err(err) => panic!("C test did not compile:\n{err}"),
    }
}

fn run(exe: &PathBuf, scenario: &str, conf: &str) -> Output {
    Command::new(exe)
        .arg(scenario)
        .env("CUDALLOC_CONF", conf)
        .env("CUDALLOC_LOG", "off")
        .env("ASAN_OPTIONS", "detect_leaks=1")
        .output()
        .expect("C test runs")
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "C test failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OOM callback that allocates used to recurse until the stack
/// overflowed (SIGSEGV); now its allocation fails and service resumes.
#[test]
fn an_oom_callback_that_allocates_does_not_crash_a_c_program() {
    let exe = build("edges-oom", &[]).unwrap();
    assert_ok(&run(&exe, "oom-callback", "backend:sim,sim_memory:1GiB"));
}

fn exit_paths(name: &str, extra: &[&str]) -> Option<String> {
    let exe = build(name, extra)?;
    let log = exe.with_extension("csv");
    let out = run(
        &exe,
        "exit-paths",
        &format!("backend:sim,sim_memory:1GiB,log_file:{}", log.display()),
    );
    assert_ok(&out);
    Some(std::fs::read_to_string(&log).unwrap())
}

fn count(log: &str, action: &str, size: u64) -> usize {
    log.lines()
        .filter(|l| l.contains(&format!(",{action},")) && l.ends_with(&format!(",{size},0")))
        .count()
}

/// Calls from an atexit handler and from pthread-key destructors (after
/// the thread's thread-locals are gone) are served, counted and logged.
#[test]
fn calls_during_thread_and_process_exit_are_logged() {
    let log = exit_paths("edges-exit", &[]).unwrap();
    for (size, n) in [(111, 1), (222, 16), (333, 16)] {
        assert_eq!(count(&log, "allocate", size), n, "size {size}:\n{log}");
        assert_eq!(count(&log, "free", size), n, "size {size}:\n{log}");
    }
}

/// The same under ASan with leak detection: thread-exit calls re-create no
/// per-thread state that nothing frees.
#[test]
fn calls_during_thread_exit_leak_nothing() {
    match exit_paths(
        "edges-exit-san",
        &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    ) {
        Some(log) => assert_eq!(count(&log, "allocate", 222), 16),
        None => eprintln!("sanitizer runtime not available; skipped"),
    }
}

/// `log_file:/dev/stdout` read by a reader that stops early (`| head`):
/// the program runs to its end and exits 0, not killed by SIGPIPE.
#[test]
fn a_log_on_a_closed_stdout_does_not_kill_the_program() {
    let exe = build("edges-stdout", &[]).unwrap();
    let mut child = Command::new(&exe)
        .arg("log-stdout")
        .env(
            "CUDALLOC_CONF",
            "backend:sim,sim_memory:1GiB,log_file:/dev/stdout",
        )
        .env("CUDALLOC_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("C test runs");
    let mut head = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // The read end is closed here, as `head -c 100` closes it.
    assert!(head.starts_with(b"Thread,Time,Action,Pointer,Size,Stream\n"));
    let out = child.wait_with_output().unwrap();
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("records dropped"), "{err}");
}
