#!/usr/bin/env bash
# Install what the Python package tests need (scripts/test.d/python.sh):
# pytest. The tests use a fake torch module and the sim backend (the real
# torch, for test_real_torch.py, is torch.sh's).
# The fresh-venv `pip install .` check fetches setuptools/wheel itself.
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -m pip --version >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-pip python3-venv; }
"$PY" -c 'import venv, ensurepip' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv; }
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore pytest
