//! `cudalloc_malloc_torch` as PyTorch calls it: tests/cxx/torch_alloc_fn.cpp,
//! built with `g++ -Wall -Wextra -Werror` against the committed header and
//! linked to the cdylib, calls it through a `std::function` and catches the
//! C++ exception a failed allocation throws. A C client (no libstdc++ in the
//! process) gets NULL instead: tests/c/abi_test.c checks that side.

mod common;

use std::process::Command;

#[test]
fn a_failed_torch_allocation_is_a_cxx_exception() {
    let dir = common::temp_dir("cxx");
    let exe = dir.join("torch_alloc_fn");
    let lib = common::lib_dir();
    let out = Command::new("g++")
        .args([
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-O1",
            "-g",
            "-I",
        ])
        .arg(common::root().join("include"))
        .arg(common::root().join("tests/cxx/torch_alloc_fn.cpp"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lcudalloc", "-o"])
        .arg(&exe)
        .output()
        .expect("g++ runs (.ci/run installs it)");
    assert!(
        out.status.success(),
        "C++ test did not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .env("CUDALLOC_CONF", "backend:sim,sim_memory:1GiB")
        .env("CUDALLOC_LOG", "off")
        .output()
        .expect("C++ test runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("ok"),
        "C++ test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
