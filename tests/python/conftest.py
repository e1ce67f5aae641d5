"""Shared fixtures: the debug cdylib (CUDALLOC_LIBRARY), the sim device, and
a runner for fresh Python processes (cudalloc's allocator is process-wide)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_DIR = os.path.join(ROOT, "python")
PTH = os.path.join(PYTHON_DIR, "cudalloc.pth")


def _library():
    lib = os.environ.get("CUDALLOC_LIBRARY") or os.path.join(ROOT, "target", "debug", "libcudalloc.so")
    if not os.path.exists(lib):
        subprocess.run(["cargo", "build", "--lib", "--quiet"], cwd=ROOT, check=True)
    return lib


def env(**extra):
    e = dict(os.environ)
    e.update(
        CUDALLOC_LIBRARY=_library(),
        CUDALLOC_CONF="backend:sim,sim_devices:2,sim_memory:1GiB",
        CUDALLOC_LOG="error",
        PYTHONPATH=PYTHON_DIR,
    )
    e.pop("CUDALLOC", None)
    for k, v in extra.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def run_py(code, *args, **extra):
    """Run `code` in a fresh interpreter; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def fake_torch(tmp_path):
    """A directory with a minimal fake `torch` package, prepended to PYTHONPATH.
    It records what cudalloc does to torch's allocator API."""
    pkg = tmp_path / "torch"
    (pkg / "cuda").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import cuda\n")
    (pkg / "cuda" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from . import memory
            _initialized = False
            def is_initialized():
                return _initialized
            def current_device():
                return 0
            def memory_stats(device=None):
                raise RuntimeError("torch's own stats raise under a pluggable allocator")
            memory_allocated = max_memory_allocated = memory_reserved = max_memory_reserved = memory_stats
            reset_peak_memory_stats = memory_stats
            """
        )
    )
    (pkg / "cuda" / "memory.py").write_text(
        textwrap.dedent(
            """
            current = None
            class _Raw:
                def __init__(self):
                    self.hooks = {}
                def set_init_fn(self, p): self.hooks["init"] = p
                def set_reset_fn(self, p): self.hooks["reset"] = p
                def set_memory_fraction_fn(self, p): self.hooks["fraction"] = p
                def set_record_stream_fn(self, p): self.hooks["record_stream"] = p
            class CUDAPluggableAllocator:
                def __init__(self, path, alloc_fn, free_fn):
                    self.args = (path, alloc_fn, free_fn)
                    self._raw = _Raw()
                def allocator(self):
                    return self._raw
            def change_current_allocator(a):
                global current
                current = a
            def memory_stats(device=None):
                raise RuntimeError("torch's own stats raise under a pluggable allocator")
            """
        )
    )
    return str(tmp_path)
