//! The README's C example, as a newcomer would use it: the ```c block of
//! "Using it from C/C++" saved as app.c, built and run with the README's own
//! commands (the ```sh block after it), verbatim, on the simulated device.
//! The commands name target/release; here that path leads to the profile
//! directory this test was built in (a symlink), and include/ to the repo's.
//! Also: the example compiles cleanly with -Wall -Wextra -Werror, and the
//! operator's CUDALLOC_CONF is honoured next to the program's cudalloc_init
//! string.

#[allow(dead_code)] // this binary uses part of the shared tree (tests/support/mod.rs)
mod support;

use std::path::Path;
use std::process::Command;
use support::native;

/// The first fenced block of `lang` after `heading` in README.md.
fn block(readme: &str, heading: &str, lang: &str) -> String {
    let from = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no '{heading}'"));
    let fence = format!("```{lang}\n");
    let start = from
        + readme[from..]
            .find(&fence)
            .unwrap_or_else(|| panic!("no ```{lang} block after '{heading}'"))
        + fence.len();
    let len = readme[start..].find("```").expect("the block ends");
    readme[start..start + len].to_string()
}

fn sh(dir: &Path, line: &str, conf: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(dir)
        .env("PWD", dir)
        .env("CUDALLOC_CONF", conf)
        .env("CUDALLOC_LOG", "off")
        .output()
        .expect("sh runs")
}

#[test]
fn the_readme_c_example_builds_and_runs_with_the_readme_commands() {
    let readme = std::fs::read_to_string(native::root().join("README.md")).unwrap();
    let heading = "## Using it from C/C++";
    let code = block(&readme, heading, "c");
    let commands = block(&readme, heading, "sh");
    let lines: Vec<&str> = commands.lines().filter(|l| !l.trim().is_empty()).collect();
    let build = lines
        .iter()
        .find(|l| l.starts_with("cc "))
        .expect("a cc line");
    let run = lines
        .iter()
        .find(|l| l.contains("./app"))
        .expect("a line running ./app");
    let run = run.split('#').next().unwrap().trim();

    let dir = native::temp_dir("readme");
    std::fs::write(dir.join("app.c"), &code).unwrap();
    std::os::unix::fs::symlink(native::root().join("include"), dir.join("include")).unwrap();
    std::fs::create_dir(dir.join("target")).unwrap();
    std::os::unix::fs::symlink(native::lib_dir(), dir.join("target/release")).unwrap();

    let out = sh(&dir, build, "");
    assert!(
        out.status.success(),
        "the README's build command failed: {build}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `CUDALLOC_CONF=backend:sim ./app`, as written (its CUDALLOC_CONF wins).
    let out = sh(&dir, run, "");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{run}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 1 MiB, freed: a small-pool segment of 2 MiB stays cached.
    assert_eq!(stdout, "live 0 B, reserved 2097152 B\n");

    // The operator's settings reach the program beside its own string.
    let log = dir.join("app.csv");
    let out = sh(
        &dir,
        "./app",
        &format!("backend:sim,log_file:{}", log.display()),
    );
    assert!(out.status.success(), "{out:?}");
    let trace = std::fs::read_to_string(&log).expect("CUDALLOC_CONF's log_file is honoured");
    assert_eq!(trace.lines().count(), 3, "header, allocate, free:\n{trace}");

    // And the example is clean C11 under -Wall -Wextra -Werror.
    native::build_c_client(&dir.join("app.c"), &dir.join("app-strict"), &[])
        .unwrap_or_else(|e| panic!("the README's C example has warnings:\n{e}"));
    let _ = std::fs::remove_dir_all(&dir);
}
