"""Child processes for the GPU tests of the CuPy and Numba plugins and of
several frameworks in one process (tests/gpu/test_cupy.py, test_numba.py,
test_frameworks.py; scripts/gpu-all.sh runs them in its frameworks-tests phase).

Each scenario runs in a fresh Python: CuPy's allocator, Numba's memory
manager and cudalloc are process-wide. The package comes from python/ and
the library from $CUDALLOC_LIBRARY (gpu-all.sh sets it to the bundle's),
else target/release/libcudalloc.so; an installed cudalloc (pip install .)
is used when neither is there.
"""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRE_GPU = os.environ.get("CUDALLOC_REQUIRE_GPU") == "1"


def env(**extra):
    e = dict(os.environ)
    for var in ("CUDALLOC", "CUDALLOC_CONF", "NUMBA_CUDA_MEMORY_MANAGER",
                "CUPY_CUDA_PER_THREAD_DEFAULT_STREAM", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        e.pop(var, None)
    release = os.path.join(REPO, "target", "release", "libcudalloc.so")
    if "CUDALLOC_LIBRARY" in e or os.path.isfile(release):
        e.setdefault("CUDALLOC_LIBRARY", release)
        e["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(REPO, "python"), e.get("PYTHONPATH")) if p)
    e.update({k: v for k, v in extra.items() if v is not None})
    return e


def run(code, timeout=120, **extra):
    """Run `code` in a child Python; fail with its output unless it exits 0.
    A child that prints a line starting "SKIP:" skips the test (a missing
    compiler, too few devices), whatever else it printed."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env(**extra),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    for line in r.stdout.splitlines():
        if line.startswith("SKIP:"):
            pytest.skip(line[5:].strip())
    return r


def no_device(why):
    """No GPU for this framework: an error under CUDALLOC_REQUIRE_GPU=1
    (gpu-all.sh), else a skip of the whole module."""
    if REQUIRE_GPU:
        raise AssertionError(f"CUDALLOC_REQUIRE_GPU=1 but {why}")
    pytest.skip(why, allow_module_level=True)
