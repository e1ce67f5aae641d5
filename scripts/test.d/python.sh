#!/usr/bin/env bash
# Python package tests (no GPU): python/cudalloc against
# target/debug/libcudalloc.so on the sim backend, with a fake torch module
# (and, where .ci/setup.d/torch.sh made its venv, the real torch too).
# In CI (CI=true), or with CUDALLOC_PIP_CHECK=1, also `pip install .` into a
# fresh venv (one release build of the crate) and the same tests against it.
#
# pytest comes from a venv in cargo's target directory (target/test-venv),
# made from python3 (or $PYTHON) on the first run and reused after; nothing
# is installed into the system's Python. `--prepare` checks and installs the
# prerequisites (that venv; in CI, the real-torch venv too) and runs no test:
# scripts/test.sh calls it before the Rust tests.
# Usage: bash scripts/test.d/python.sh [--prepare]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}

command -v "$PY" >/dev/null 2>&1 || {
    echo "$PY is missing: the Python package tests need it (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
    exit 1
}
# Where cargo puts its output (CARGO_TARGET_DIR and .cargo/config are honoured).
target_dir=$(cargo metadata --format-version 1 --no-deps |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
venv=$target_dir/test-venv
VPY=$venv/bin/python

# The venv, made once: .ready is written last, so an interrupted set-up is redone.
mkdir -p "$target_dir"
exec 9>"$target_dir/test-venv.lock"
command -v flock >/dev/null 2>&1 && flock 9 # two runs at once make it once
if ! [ -e "$venv/.ready" ] || ! "$VPY" -c 'import pytest' 2>/dev/null; then
    t0=$(date +%s)
    rm -rf "$venv"
    log=$target_dir/test-venv.log
    if ! "$PY" -m venv "$venv" >"$log" 2>&1; then
        echo "$PY cannot make a venv ($log): install python3-venv (Debian/Ubuntu: apt-get install python3-venv)" >&2
        rm -rf "$venv"
        exit 1
    fi
    if ! PIP_ROOT_USER_ACTION=ignore "$VPY" -m pip install -q --disable-pip-version-check pytest >>"$log" 2>&1; then
        tail -n 5 "$log" >&2
        echo "could not install pytest into $venv from PyPI (full log: $log)" >&2
        exit 1
    fi
    touch "$venv/.ready"
    echo "test venv: $venv, with $("$VPY" -m pytest --version 2>&1), made in $(($(date +%s) - t0))s"
fi
exec 9>&-

# tests/python/test_real_torch.py runs its children in a real PyTorch
# (.ci/setup.d/torch.sh makes the venv); without one those tests are skipped.
torch_py=${CUDALLOC_TORCH_VENV:-$HOME/.cache/cudalloc/torch-2.11.0}/bin/python
if [ -z "${CUDALLOC_TORCH_PYTHON:-}" ] && [ -x "$torch_py" ] &&
    "$torch_py" -c 'import torch; assert torch.version.cuda' 2>/dev/null; then
    export CUDALLOC_TORCH_PYTHON=$torch_py
fi
if [ "${CI:-}" = true ] && [ -z "${CUDALLOC_TORCH_PYTHON:-}" ]; then
    echo "CI: no real-torch venv (.ci/setup.d/torch.sh makes it)" >&2
    exit 1
fi
[ "${1:-}" = --prepare ] && exit 0

# The library for ctypes, and the CLI for test_native_model.py's replays.
cargo build --lib --bin cudalloc
export CUDALLOC_BIN="$target_dir/debug/cudalloc"
CUDALLOC_LIBRARY="$target_dir/debug/libcudalloc.so" \
    "$VPY" -m pytest tests/python -q -p no:cacheprovider -rs
if [ "${CI:-}" = true ] || [ "${CUDALLOC_PIP_CHECK:-0}" = 1 ]; then
    bash tests/python/pip_install_check.sh
fi
