#!/usr/bin/env bash
# Install what the Python package tests need (scripts/test.d/python.sh):
# python3 with its venv module, then the same venv holding pytest that the
# README's test command makes and reuses (target/test-venv; nothing goes into
# the system's Python). The tests use a fake torch module and the sim backend
# (the real torch, for test_real_torch.py, is torch.sh's). The fresh-venv
# `pip install .` check fetches setuptools/wheel itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
"$PY" -c 'import venv, ensurepip' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv; }
# torch.sh runs after this one; the real-torch check waits for scripts/test.sh.
CI='' bash scripts/test.d/python.sh --prepare
