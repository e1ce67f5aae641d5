"""cudalloc.numba (NUMBA_CUDA_MEMORY_MANAGER=cudalloc.numba) on a real GPU
(scripts/gpu-all.sh, phase frameworks-tests).

    python -m pytest tests/gpu/test_numba.py -v

Skipped when Numba's CUDA target cannot be imported. With it there but no
device, it is skipped too, unless CUDALLOC_REQUIRE_GPU=1 (gpu-all.sh sets
it): then that is an error. A test that compiles a kernel is skipped where
Numba finds no NVVM.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from childenv import no_device, run  # noqa: E402 (after the path it is found on)

pytest.importorskip("numpy", reason="NumPy is not importable here")
numba_cuda = pytest.importorskip("numba.cuda", reason="Numba's CUDA target is not importable here")
try:
    AVAILABLE = numba_cuda.is_available()
except Exception:
    AVAILABLE = False
if not AVAILABLE:
    no_device("numba.cuda.is_available() is False")

PRELUDE = """
import gc, json
import numpy as np
from numba import cuda
import cudalloc
MiB = 1 << 20
mm = cuda.current_context().memory_manager
assert type(mm).__name__ == "CudallocNumbaManager", type(mm)

def live():
    report = json.loads(cudalloc.leak_report(json=True))
    return {int(a["ptr"], 16): (a["device"], a["stream"], a["requested"]) for a in report["allocations"]}

def address(arr):
    return int(arr.__cuda_array_interface__["data"][0])
"""
PLUGIN = {"NUMBA_CUDA_MEMORY_MANAGER": "cudalloc.numba"}


def test_device_arrays_round_trip_through_cudalloc_memory():
    run(
        PRELUDE
        + """
host = np.arange(MiB, dtype=np.int64)
d = cuda.to_device(host)
assert live()[address(d)] == (0, 0, host.nbytes)     # the legacy default stream
assert cudalloc.memory_allocated() == host.nbytes
e = cuda.device_array_like(d)
e.copy_to_device(d)                                  # device to device
assert (e.copy_to_host() == host).all()
stream = cuda.stream()
f = cuda.to_device(host, stream=stream)
back = f.copy_to_host(stream=stream)
stream.synchronize()
assert (back == host).all()
del d, e, f
gc.collect()
assert cudalloc.memory_allocated() == 0, cudalloc.memory_allocated()
cudalloc.check_invariants()
print("ok")
""",
        **PLUGIN,
    )


def test_a_kernel_writes_cudalloc_memory():
    run(
        PRELUDE
        + """
try:
    @cuda.jit
    def twice_plus_one(a, out):
        i = cuda.grid(1)
        if i < a.size:
            out[i] = 2 * a[i] + 1
    host = np.arange(MiB, dtype=np.int64)
    d = cuda.to_device(host)
    out = cuda.device_array_like(d)
    twice_plus_one[(host.size + 255) // 256, 256](d, out)
except Exception as e:
    if "nvvm" in f"{type(e).__name__} {e}".lower():
        print(f"SKIP: Numba cannot compile a kernel here: {type(e).__name__}: {e}")
        raise SystemExit(0)
    raise
assert (out.copy_to_host() == 2 * host + 1).all()
print("ok")
""",
        timeout=180,
        **PLUGIN,
    )


def test_memory_info_ipc_defer_cleanup_and_close():
    run(
        PRELUDE
        + """
import ctypes
from numba.cuda.cudadrv import driver as drv
ctx = cuda.current_context()
d = cuda.device_array(MiB, dtype=np.uint8)
info = ctx.get_memory_info()
if getattr(drv, "USE_NV_BINDING", True):            # NVIDIA's bindings (newer numba-cuda)
    free, total = (int(v) for v in drv.driver.cuMemGetInfo())
else:                                                # Numba's ctypes binding
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    drv.driver.cuMemGetInfo(ctypes.byref(f), ctypes.byref(t))
    free, total = f.value, t.value
assert info.total == total and free <= info.free <= total, (info, free, total)
try:
    d.get_ipc_handle()
except NotImplementedError as e:
    assert "does not support CUDA IPC" in str(e), e
else:
    raise AssertionError("an IPC handle for cudalloc memory")
with cuda.defer_cleanup():
    del d
    gc.collect()
    assert cudalloc.memory_allocated() == MiB
assert cudalloc.memory_allocated() == 0
keep = cuda.device_array(4 * MiB, dtype=np.uint8)
cuda.close()                                         # the context's reset
assert cudalloc.memory_allocated() == 0 and cudalloc.memory_reserved() == 0
del keep
gc.collect()
assert cudalloc.raw_stats()["num_invalid_frees"] == 0
print("ok")
""",
        **PLUGIN,
    )
