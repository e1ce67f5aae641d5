#!/usr/bin/env bash
# The test command the README promises: every suite that runs without a GPU.
# Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Rust unit, behaviour, header-drift and C ABI tests (debug: invariants are checked).
cargo test --all-targets

# Further suites register themselves here (Python package, driver stand-in, ...).
for extra in scripts/test.d/*.sh; do
    [ -e "$extra" ] || continue
    echo "== $extra"
    bash "$extra"
done
