"""The typed OOM: cudalloc_malloc_torch throws c10::OutOfMemoryError where
PyTorch is loaded (torch.OutOfMemoryError in Python), std::runtime_error
elsewhere, checked against the real libc10.so of the real-torch venv.

tests/cxx/catch_torch_oom.cpp, built against the venv's torch headers and
libc10.so, opens libcudalloc.so RTLD_LOCAL (as CUDAPluggableAllocator does)
and calls cudalloc_malloc_torch through a std::function (as torch holds it),
in a child of the real-torch Python: once after `import torch` (which loads
its libraries RTLD_LOCAL), once without (libc10.so alone, linked by the
helper: the class's vtable is not in it, so the fallback is taken). Without a
CPU-only way to reach a pluggable allocator's alloc_fn from Python, the step
from the C++ type to torch.OutOfMemoryError is PyTorch's own
(torch/csrc/Exceptions.h); tests/gpu/test_torch.py checks it on a GPU.
"""

import os
import shutil
import subprocess
import textwrap

import pytest

from cudalloc import _lib
from conftest import REPO

PY = os.environ.get("CUDALLOC_TORCH_PYTHON")
pytestmark = [
    pytest.mark.skipif(
        not PY,
        reason="CUDALLOC_TORCH_PYTHON is unset (.ci/setup.d/torch.sh makes the venv, "
        "scripts/test.d/python.sh finds it)",
    ),
    pytest.mark.skipif(not shutil.which("g++"), reason="no g++ to build the C++ helper"),
]


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    torch_dir = subprocess.run(
        [PY, "-c", "import os, torch; print(os.path.dirname(torch.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out = tmp_path_factory.mktemp("cxx") / "libcatch_torch_oom.so"
    cmd = [
        "g++", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
        "-I", os.path.join(torch_dir, "include"),
        "-o", str(out),
        os.path.join(REPO, "tests", "cxx", "catch_torch_oom.cpp"),
        "-L", os.path.join(torch_dir, "lib"), "-lc10",
        "-Wl,-rpath," + os.path.join(torch_dir, "lib"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(out)


def attempt(helper, import_torch, size):
    code = textwrap.dedent(
        f"""
        import ctypes, sys
        {"import torch" if import_torch else "pass"}
        h = ctypes.CDLL({helper!r})
        buf = ctypes.create_string_buffer(1 << 16)
        r = h.try_torch_alloc({_lib.library_path()!r}.encode(), ctypes.c_size_t({size}), buf, len(buf))
        print(r)
        print(buf.value.decode())
        print("torch" in sys.modules)
        """
    )
    env = dict(os.environ)
    env.update(CUDALLOC_CONF="backend:sim,sim_memory:1GiB", CUDALLOC_LOG="off")
    r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    code_line, *rest = r.stdout.splitlines()
    return int(code_line), "\n".join(rest[:-1]), rest[-1] == "True"


def test_under_torch_an_oom_is_c10_out_of_memory_error(helper):
    kind, message, had_torch = attempt(helper, True, 1 << 40)
    assert had_torch
    assert kind == 1, f"caught as kind {kind} (1: c10::OutOfMemoryError): {message}"
    assert message.startswith("CUDA out of memory. Tried to allocate 1099511627776 bytes"), message
    assert "larger than the device's memory" in message, message
    # And the allocator serves on afterwards.
    assert attempt(helper, True, 4096)[:2] == (0, "served")


def test_without_torch_an_oom_falls_back_to_runtime_error(helper):
    kind, message, had_torch = attempt(helper, False, 1 << 40)
    assert not had_torch
    assert kind == 3, f"caught as kind {kind} (3: std::runtime_error): {message}"
    assert message.startswith("CUDA out of memory."), message
