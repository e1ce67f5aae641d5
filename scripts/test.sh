#!/usr/bin/env bash
# The test command the README promises: every suite that runs without a GPU.
# Usage: bash scripts/test.sh
# On a fresh machine it needs Rust, python3, gcc and g++; what the suites need
# beyond that (pytest, in a venv under cargo's target directory) it installs
# itself on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Prerequisites first, so that a missing one shows up in seconds rather than
# after the Rust tests.
# gcc and g++: the Rust tests compile C and C++ callers of the library
# (tests/c, the driver stand-in, tests/cxx_alloc_fn.rs).
for tool in gcc g++; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "$tool is missing: the Rust tests compile C and C++ callers (Debian/Ubuntu: apt-get install gcc g++)" >&2
        exit 1
    }
done
# Each further suite checks (and, where it can, installs) what it needs.
for extra in scripts/test.d/*.sh; do
    [ -e "$extra" ] || continue
    bash "$extra" --prepare
done

# Rust unit, behaviour, header-drift and C ABI tests (debug: invariants are checked).
cargo test --all-targets

# Further suites register themselves here (Python package, driver stand-in, ...).
# Each takes --prepare: check or install its prerequisites, run nothing.
for extra in scripts/test.d/*.sh; do
    [ -e "$extra" ] || continue
    echo "== $extra"
    bash "$extra"
done
