"""Several frameworks in one process on a real GPU, and cudalloc itself
there (scripts/gpu-all.sh, phase frameworks-tests).

    python -m pytest tests/gpu/test_frameworks.py -v

test_cudalloc_serves_the_gpu needs no framework: under
CUDALLOC_REQUIRE_GPU=1 it fails where cudalloc cannot use a GPU, so the
phase cannot pass with every CuPy and Numba test skipped for want of a device.
The others are skipped when a framework they use is not importable.
"""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from childenv import REQUIRE_GPU, env, run  # noqa: E402 (after the path it is found on)


def need(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not importable here: {', '.join(missing)}")


def test_cudalloc_serves_the_gpu():
    import subprocess

    code = """
import cudalloc
from cudalloc import _lib
cudalloc.configure("backend:cuda")
assert cudalloc.device_count() >= 1
lib = _lib.lib()
p = lib.cudalloc_malloc(1 << 20, 0, None)
assert p, _lib.last_message()
lib.cudalloc_free(p, 1 << 20, 0, None)
print("ok", cudalloc.device_count())
"""
    r = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0 and not REQUIRE_GPU:
        pytest.skip(f"cudalloc cannot use a GPU here: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"


def test_torch_and_cupy_share_one_cudalloc():
    need("torch", "cupy")
    run(
        """
import torch, cupy
import cudalloc, cudalloc.cupy
cudalloc.enable()
cudalloc.cupy.enable()                   # joins the cudalloc torch's enable() started
n = 1 << 20
t = torch.arange(n, device="cuda", dtype=torch.int64)
c = cupy.arange(n, dtype=cupy.int64)
assert cudalloc.memory_allocated() == torch.cuda.memory_allocated() >= 16 * n
assert cudalloc.memory_stats()["allocation.all.current"] >= 2
# Each reads the other's memory through DLPack.
assert int(cupy.from_dlpack(t).sum()) == n * (n - 1) // 2
assert int(torch.from_dlpack(c).sum()) == n * (n - 1) // 2
del t, c
torch.cuda.synchronize()
assert cudalloc.memory_allocated() == 0, cudalloc.memory_allocated()
print("ok")
"""
    )


def test_torch_cupy_and_numba_in_one_process():
    need("torch", "cupy", "numba", "numpy")
    run(
        """
import numpy as np
import torch, cupy
import cudalloc, cudalloc.cupy
cudalloc.cupy.enable()                   # CuPy first this time
cudalloc.enable()
from numba import cuda
assert type(cuda.current_context().memory_manager).__name__ == "CudallocNumbaManager"
MiB = 1 << 20
t = torch.empty(MiB, dtype=torch.uint8, device="cuda")
c = cupy.empty(2 * MiB, dtype=cupy.uint8)
d = cuda.to_device(np.zeros(4 * MiB, dtype=np.uint8))
assert cudalloc.memory_allocated() == 7 * MiB, cudalloc.memory_allocated()
del t, c, d
torch.cuda.synchronize()
import gc; gc.collect()
assert cudalloc.memory_allocated() == 0, cudalloc.memory_allocated()
print("ok")
""",
        NUMBA_CUDA_MEMORY_MANAGER="cudalloc.numba",
    )
