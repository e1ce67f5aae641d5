//! `cudalloc_malloc_torch` as PyTorch calls it: tests/cxx/torch_alloc_fn.cpp,
//! built with `g++ -Wall -Wextra -Werror` against the committed header and
//! linked to the cdylib, calls it through a `std::function` and catches the
//! C++ exception a failed allocation throws. Twice: as a program, and as a
//! shared library that a C program opens with RTLD_LOCAL beside a separate
//! RTLD_LOCAL load of libcudalloc.so (as Python opens PyTorch and PyTorch's
//! `CUDAPluggableAllocator` opens cudalloc), so that libstdc++ is in neither
//! the global scope nor cudalloc's.

#[allow(dead_code)] // this binary uses part of the shared tree (tests/support/mod.rs)
mod support;

use std::process::Command;
use support::native;

/// Build with `native::build`, or fail the test with the compiler's output.
fn compile(compiler: &str, flags: &[&str], source: &str, out: &std::path::Path, link: bool) {
    if let Err(e) = native::build(compiler, flags, &[&native::root().join(source)], out, link) {
        panic!("{compiler} failed on {source}:\n{e}");
    }
}

/// Run `program` twice: graph pools refused (the default), then served.
fn run_ok(program: &std::path::Path, args: &[&std::path::Path]) {
    for conf in [
        "backend:sim,sim_memory:1GiB",
        "backend:sim,sim_memory:1GiB,graph_pools:on",
    ] {
        run_conf(program, args, conf);
    }
}

fn run_conf(program: &std::path::Path, args: &[&std::path::Path], conf: &str) {
    let run = Command::new(program)
        .args(args)
        .env("CUDALLOC_CONF", conf)
        .env("CUDALLOC_LOG", "off")
        .output()
        .expect("test program runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("ok"),
        "{} failed ({}, {conf}):\n{stdout}\n{}",
        program.display(),
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn a_failed_torch_allocation_is_a_cxx_exception() {
    let dir = native::temp_dir("cxx");
    let exe = dir.join("torch_alloc_fn");
    compile(
        "g++",
        &["-std=c++17"],
        "tests/cxx/torch_alloc_fn.cpp",
        &exe,
        true,
    );
    run_ok(&exe, &[]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn it_throws_when_libstdcxx_is_loaded_locally_as_under_python() {
    let dir = native::temp_dir("cxx-local");
    let shim = dir.join("libtorch_like.so");
    compile(
        "g++",
        &["-std=c++17", "-shared", "-fPIC", "-DCUDALLOC_CXX_LIBRARY"],
        "tests/cxx/torch_alloc_fn.cpp",
        &shim,
        false,
    );
    let loader = dir.join("load_local");
    compile(
        "gcc",
        &["-std=c11"],
        "tests/cxx/load_local.c",
        &loader,
        false,
    );
    run_ok(&loader, &[&native::lib_dir().join("libcudalloc.so"), &shim]);
    let _ = std::fs::remove_dir_all(&dir);
}
