//! Building native clients: the crate root, a fresh cdylib, temporary
//! directories, and C and C++ programs compiled against the committed header
//! and linked to the cdylib.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The crate root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`, with a fresh `libcudalloc.so` in it. `cargo test`
/// builds the rlib, not the cdylib, so build it here (a no-op when fresh; a
/// stale library from an earlier build is never used).
pub fn lib_dir() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // deps/ -> profile dir
    BUILD.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--lib", "--quiet"])
            .current_dir(root());
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

/// A fresh temporary directory for this test process.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cudalloc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compile `sources` with `compiler -Wall -Wextra -Werror -O1 -g` and
/// `flags` against the committed header; with `link`, link them to the
/// cdylib (rpath included). `Err` carries the compiler's output.
pub fn build(
    compiler: &str,
    flags: &[&str],
    sources: &[&Path],
    out: &Path,
    link: bool,
) -> Result<PathBuf, String> {
    let mut cmd = Command::new(compiler);
    cmd.args(["-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .args(flags)
        .arg("-I")
        .arg(root().join("include"))
        .args(sources);
    if link {
        let lib = lib_dir();
        cmd.arg("-L")
            .arg(&lib)
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-lcudalloc");
    }
    let st = cmd
        .arg("-o")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("{compiler} runs (.ci/run installs it): {e}"));
    if st.status.success() {
        Ok(out.to_path_buf())
    } else {
        Err(String::from_utf8_lossy(&st.stderr).into_owned())
    }
}

/// Compile the C program `source` with gcc (C11) against the committed
/// header, linked to the cdylib; `extra` are further compiler flags.
pub fn build_c_client(source: &Path, out: &Path, extra: &[&str]) -> Result<PathBuf, String> {
    let mut flags = vec!["-std=c11"];
    flags.extend_from_slice(extra);
    build("gcc", &flags, &[source], out, true)
}
