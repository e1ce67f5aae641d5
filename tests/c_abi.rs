//! Builds tests/c/abi_test.c with `gcc -Wall -Wextra -Werror` against the
//! committed header, links it to the cdylib cargo built, and runs it on the
//! simulated device. A second build runs it under ASan and UBSan.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>`, with a fresh `libcudalloc.so` in it. `cargo test`
/// builds the rlib, not the cdylib, so build it here (a no-op when fresh; a
/// stale library from an earlier build is never used).
fn lib_dir() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // deps/ -> profile dir
    BUILD.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--lib", "--quiet"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let st = cargo.status().expect("cargo runs");
        assert!(st.success(), "building the cdylib failed");
    });
    assert!(
        dir.join("libcudalloc.so").exists(),
        "libcudalloc.so not built in {}",
        dir.display()
    );
    dir
}

fn build_and_run(name: &str, extra: &[&str]) -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let out = std::env::temp_dir().join(format!("cudalloc-{name}-{}", std::process::id()));
    let mut cc = Command::new("gcc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .args(extra)
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/abi_test.c"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lcudalloc", "-o"])
        .arg(&out);
    let st = cc.output().expect("gcc runs");
    if !st.status.success() {
        let err = String::from_utf8_lossy(&st.stderr);
        if !extra.is_empty() && err.contains("asan") {
            return None; // sanitizer runtime not installed
        }
        panic!("C test did not compile:\n{err}");
    }
    let run = Command::new(&out)
        .env("CUDALLOC_CONF", "backend:sim,sim_devices:2,sim_memory:1GiB")
        .env("CUDALLOC_LOG", "off")
        .env("ASAN_OPTIONS", "detect_leaks=1")
        .output()
        .expect("C test runs");
    let _ = std::fs::remove_file(&out);
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
