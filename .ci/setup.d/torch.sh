#!/usr/bin/env bash
# A venv holding the real PyTorch (the PyPI wheel, built with CUDA; it imports
# on a machine without a GPU), for tests/python/test_real_torch.py: enable(),
# the statistics patch and CUDALLOC=1 against torch's actual API rather than
# the fake one. torch is pinned to the version on the GPU machines the GPU
# checks run on (2.11.0). About 4.6 GB; kept in ~/.cache between runs.
# scripts/test.d/python.sh finds it (or $CUDALLOC_TORCH_PYTHON).
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${CUDALLOC_TORCH_VENV:-$HOME/.cache/cudalloc/torch-2.11.0}
if "$VENV/bin/python" -c 'import torch; assert torch.version.cuda' 2>/dev/null; then
    echo "real torch venv: $VENV (kept)"
    exit 0
fi
t0=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
    torch==2.11.0 numpy
"$VENV/bin/python" -c 'import torch; assert torch.version.cuda; print("real torch", torch.__version__)' \
    2>&1 | grep -v NumPy || true
"$VENV/bin/python" -c 'import torch; assert torch.version.cuda'
echo "real torch venv: $VENV, made in $(( $(date +%s) - t0 ))s"
