#!/usr/bin/env bash
# Python test dependencies (the package itself needs none at run time).
set -euo pipefail
python3 -m pip install -q --disable-pip-version-check pytest 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import pytest, venv" 
