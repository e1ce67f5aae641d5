#!/usr/bin/env bash
# Python package tests (no GPU): python/cudalloc against
# target/debug/libcudalloc.so on the sim backend, with a fake torch module
# (and, where .ci/setup.d/torch.sh made its venv, the real torch too).
# In CI (CI=true), or with CUDALLOC_PIP_CHECK=1, also `pip install .` into a
# fresh venv (one release build of the crate) and the same tests against it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import pytest' 2>/dev/null; then
    echo "pytest is missing: $PY -m pip install pytest (.ci/setup.d/python.sh does it)" >&2
    exit 1
fi
# The library for ctypes, and the CLI for test_native_model.py's replays.
cargo build --lib --bin cudalloc
# Where cargo put it (CARGO_TARGET_DIR and .cargo/config are honoured).
target_dir=$(cargo metadata --format-version 1 --no-deps |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
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
export CUDALLOC_BIN="$target_dir/debug/cudalloc"
CUDALLOC_LIBRARY="$target_dir/debug/libcudalloc.so" \
    "$PY" -m pytest tests/python -q -p no:cacheprovider -rs
if [ "${CI:-}" = true ] || [ "${CUDALLOC_PIP_CHECK:-0}" = 1 ]; then
    bash tests/python/pip_install_check.sh
fi
