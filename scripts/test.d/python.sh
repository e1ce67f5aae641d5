#!/usr/bin/env bash
# The Python package: pytest against the debug cdylib on the sim device, then
# `pip install .` into a fresh venv and a check of what it installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --lib --quiet
export CUDALLOC_LIBRARY="$PWD/target/debug/libcudalloc.so"
python3 -m pytest -q tests/python

echo "== pip install . into a fresh venv"
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
start=$(date +%s)
CARGO_TARGET_DIR="$PWD/target/pip" "$venv/bin/pip" install -q --disable-pip-version-check .
echo "pip install took $(( $(date +%s) - start )) s"
( cd / && env -u CUDALLOC_LIBRARY -u CUDALLOC CUDALLOC_CONF=backend:sim CUDALLOC_LOG=error "$venv/bin/python" - <<'PY'
import glob, os, sys, sysconfig
import cudalloc
site = sysconfig.get_paths()["purelib"]
assert os.path.exists(os.path.join(site, "cudalloc.pth")), "cudalloc.pth not installed"
lib = cudalloc.library_path()
assert lib.startswith(site), lib
assert "torch" not in sys.modules
p = cudalloc._lib.lib().cudalloc_malloc(4096, 0, None)
assert p and cudalloc.memory_allocated(0) == 4096
print("installed package works:", os.path.basename(lib))
PY
)
rm -rf "$(dirname "$venv")"
