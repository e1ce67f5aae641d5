"""Shared set-up for the Python tests (no GPU, no torch: sim backend + a fake torch).

The library comes from $CUDALLOC_LIBRARY, default target/debug/libcudalloc.so
(scripts/test.d/python.sh builds it with `cargo build --lib`). The package is
imported from python/ unless CUDALLOC_TEST_INSTALLED=1 (then from site-packages).
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_SRC = os.path.join(REPO, "python")
HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_TORCH = os.path.join(HERE, "fake_torch")
FAKE_CUPY = os.path.join(HERE, "fake_cupy")
FAKE_NUMBA = os.path.join(HERE, "fake_numba")
PTH = os.path.join(PYTHON_SRC, "cudalloc-autoenable.pth")
# The configuration every in-process test shares (the library is process-global).
SIM_CONF = "backend:sim,sim_devices:2,sim_memory:1GiB"

INSTALLED = os.environ.get("CUDALLOC_TEST_INSTALLED") == "1"
if INSTALLED:
    os.environ.pop("CUDALLOC_LIBRARY", None)  # use the copy inside the package
else:
    os.environ.setdefault(
        "CUDALLOC_LIBRARY", os.path.join(REPO, "target", "debug", "libcudalloc.so")
    )
    if not os.path.isfile(os.environ["CUDALLOC_LIBRARY"]):
        raise SystemExit(
            f"{os.environ['CUDALLOC_LIBRARY']} is missing: run `cargo build --lib` first "
            "(scripts/test.d/python.sh does)"
        )
    sys.path.insert(0, PYTHON_SRC)
os.environ["CUDALLOC_CONF"] = SIM_CONF
for var in ("CUDALLOC", "CUDALLOC_PATCH_TORCH", "CUDALLOC_LOG"):
    os.environ.pop(var, None)


def child_env(**extra):
    """The environment for a child Python: this package, optionally the fake
    torch, CuPy and Numba (fake_torch=True, fake_cupy=True, fake_numba=True)."""
    env = dict(os.environ)
    fakes = [
        path
        for flag, path in (("fake_torch", FAKE_TORCH), ("fake_cupy", FAKE_CUPY), ("fake_numba", FAKE_NUMBA))
        if extra.pop(flag, False)
    ]
    paths = list(extra.pop("extra_path", []))
    if os.environ.get("CUDALLOC_TEST_INSTALLED") != "1":
        paths.append(PYTHON_SRC)
    paths.extend(fakes)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_py(code=None, args=(), env=None, cwd=None, timeout=120):
    """Run `python -c code` (or python ARGS) in a child; return CompletedProcess."""
    cmd = [sys.executable] + (["-c", code] if code is not None else []) + list(args)
    return subprocess.run(
        cmd,
        env=env if env is not None else child_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def lib():
    import cudalloc
    from cudalloc import _lib

    cudalloc.configure(SIM_CONF)
    return _lib.lib()
