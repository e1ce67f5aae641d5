"""cudalloc.cupy on a real GPU (scripts/gpu-all.sh, phase frameworks-tests).

    python -m pytest tests/gpu/test_cupy.py -v

Skipped when CuPy cannot be imported. With CuPy there but no device, it is
skipped too, unless CUDALLOC_REQUIRE_GPU=1 (gpu-all.sh sets it): then that is
an error, not a pass with every test skipped.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from childenv import no_device, run  # noqa: E402 (after the path it is found on)

cupy = pytest.importorskip("cupy", reason="CuPy is not importable here")
try:
    DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver, no device
    DEVICES = 0
if DEVICES == 0:
    no_device("CuPy sees no CUDA device")

PRELUDE = """
import json
import cupy, numpy
import cudalloc, cudalloc.cupy
MiB = 1 << 20

def live():
    report = json.loads(cudalloc.leak_report(json=True))
    return {int(a["ptr"], 16): (a["device"], a["stream"], a["requested"]) for a in report["allocations"]}
"""


def test_arrays_and_kernels_use_cudalloc_memory():
    run(
        PRELUDE
        + """
cudalloc.cupy.enable()
pool = cupy.get_default_memory_pool()
n = 1 << 20
x = cupy.arange(n, dtype=cupy.int64)
y = x * 2 + 1
assert int(y.sum()) == n * n            # the sum of the first n odd numbers
assert live()[x.data.ptr] == (0, 0, 8 * n) and live()[y.data.ptr][0] == 0
assert cudalloc.memory_allocated() >= 16 * n
assert pool.used_bytes() == 0           # CuPy's own pool bypassed
host = numpy.arange(n, dtype=numpy.float32)
d = cupy.asarray(host)                  # host -> device -> host through cudalloc memory
assert (cupy.asnumpy(d) == host).all()
del x, y, d
cupy.cuda.Device().synchronize()
assert cudalloc.memory_allocated() == 0, cudalloc.memory_allocated()
cudalloc.check_invariants()
print("ok")
"""
    )


def test_a_stream_gets_its_own_blocks_back():
    run(
        PRELUDE
        + """
cudalloc.cupy.enable()
s = cupy.cuda.Stream(non_blocking=True)
with s:
    a = cupy.ones(4 * MiB, dtype=cupy.float32)
    b = a * 3
    assert float(b.sum()) == 12 * MiB
assert live()[a.data.ptr] == (0, s.ptr, 16 * MiB)
del a
hits = cudalloc.raw_stats()["num_cache_hits"]
with s:
    c = cupy.empty(4 * MiB, dtype=cupy.float32)
assert live()[c.data.ptr][1] == s.ptr
assert cudalloc.raw_stats()["num_cache_hits"] > hits
print("ok")
"""
    )


SPIN = r"""
extern "C" __global__ void spin_then_fill(unsigned char* p, unsigned long long n,
                                          long long cycles, unsigned char v) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        p[i] = v;
}
"""


def test_memory_freed_while_a_stream_uses_it_is_not_handed_to_another_stream_early():
    # x is dropped while a kernel on s1 will still write it; z, allocated
    # and zeroed on s2 meanwhile, must not be x's memory until that is done.
    run(
        PRELUDE
        + f"SPIN = {SPIN!r}\n"
        + """
try:
    kernel = cupy.RawKernel(SPIN, "spin_then_fill")
    kernel.kernel                           # compiles it (NVRTC)
except Exception as e:
    print(f"SKIP: cannot compile a CuPy RawKernel here: {type(e).__name__}: {e}")
    raise SystemExit(0)
cudalloc.cupy.enable()
s1 = cupy.cuda.Stream(non_blocking=True)
s2 = cupy.cuda.Stream(non_blocking=True)
n = 64 * MiB
for trial in range(3):
    with s1:
        x = cupy.empty(n, dtype=cupy.uint8)
        kernel((128,), (256,), (x, numpy.uint64(n), numpy.int64(200_000_000), numpy.uint8(7)))
    del x                                   # freed while s1 still runs the kernel
    with s2:
        z = cupy.zeros(n, dtype=cupy.uint8)
    s1.synchronize(); s2.synchronize()
    assert int(z.max()) == 0, f"trial {trial}: memory reused before s1 finished"
    del z
print("ok")
""",
        timeout=180,
    )


def test_out_of_memory_under_a_limit_is_cupys_error_and_the_process_goes_on():
    r = run(
        PRELUDE
        + """
cudalloc.cupy.enable("max_memory:256MiB")
keep = cupy.empty(200 * MiB, dtype=cupy.uint8)
try:
    cupy.empty(100 * MiB, dtype=cupy.uint8)
except cupy.cuda.memory.OutOfMemoryError as e:
    print("OOM", str(e).splitlines()[0])
else:
    raise AssertionError("over max_memory")
del keep
ok = cupy.empty(100 * MiB, dtype=cupy.uint8)
ok.fill(1)
assert int(ok.sum()) == 100 * MiB
print("ok")
"""
    )
    assert "OOM Out of memory allocating 104,857,600 bytes" in r.stdout, r.stdout


def test_the_current_device_is_served():
    if DEVICES < 2:
        pytest.skip("one CUDA device")
    run(
        PRELUDE
        + """
cudalloc.cupy.enable()
with cupy.cuda.Device(1):
    a = cupy.arange(MiB, dtype=cupy.int32)
    assert a.device.id == 1 and int(a[-1]) == MiB - 1
assert live()[a.data.ptr][0] == 1
assert cudalloc.memory_allocated(1) >= 4 * MiB and cudalloc.memory_allocated(0) == 0
del a
print("ok")
"""
    )
