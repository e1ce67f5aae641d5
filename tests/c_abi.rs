//! Builds tests/c/abi_test.c with `gcc -Wall -Wextra -Werror` against the
//! committed header, links it to the cdylib, and runs it on the simulated
//! device. A second build runs it under ASan and UBSan.

#[allow(dead_code)] // this binary uses part of the shared tree (tests/support/mod.rs)
mod support;

use std::process::Command;
use support::native;

fn build_and_run(name: &str, extra: &[&str]) -> Option<String> {
    let dir = native::temp_dir(name);
    let exe = match native::build_c_client(
        &native::root().join("tests/c/abi_test.c"),
        &dir.join(name),
        extra,
    ) {
        Ok(exe) => exe,
        Err(err) if !extra.is_empty() && err.contains("asan") => return None, // no sanitizer runtime
        Err(err) => panic!("C test did not compile:\n{err}"),
    };
    let run = Command::new(&exe)
        .env("CUDALLOC_CONF", "backend:sim,sim_devices:2,sim_memory:1GiB")
        .env("CUDALLOC_LOG", "off")
        .env("ASAN_OPTIONS", "detect_leaks=1")
        .output()
        .expect("C test runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "C test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    Some(stdout)
}

#[test]
fn c_client_sees_the_abi_contract() {
    let out = build_and_run("abi", &[]).unwrap();
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[test]
fn c_client_is_clean_under_asan_and_ubsan() {
    match build_and_run(
        "abi-san",
        &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    ) {
        Some(out) => assert!(out.contains(" passed, 0 failed"), "{out}"),
        None => eprintln!("sanitizer runtime not available; skipped"),
    }
}
