"""Wrong arguments at the Python API get a clear TypeError or ValueError (or a
CudallocError naming the problem) at the call: never an AttributeError or a
ctypes error, a silent change of meaning, or a failure deferred to later."""

import os
import re
import textwrap

import pytest

import cudalloc
from cudalloc import _lib
from conftest import SIM_CONF, child_env, run_py


@pytest.mark.parametrize("conf", [b"backend:sim", bytearray(b"backend:sim"), 42])
def test_configure_wants_a_str(lib, conf):
    with pytest.raises(TypeError, match=f"must be a str .*not {type(conf).__name__}"):
        cudalloc.configure(conf)


def test_configure_refuses_a_nul(lib):
    # C would read the string only up to the NUL: the rest would be dropped silently.
    with pytest.raises(ValueError, match="NUL character") as ei:
        cudalloc.configure(SIM_CONF + "\x00,sim_memroy:1GiB")
    assert isinstance(ei.value, cudalloc.ConfigError) and ei.value.code == _lib.ERR_CONFIG


@pytest.mark.parametrize("register", ["on_oom", "on_pressure"])
def test_callbacks_must_be_callable(lib, register):
    with pytest.raises(TypeError, match=f"{register}\\(\\) needs a callable, not int"):
        getattr(cudalloc, register)(123)


def test_enable_checks_its_configuration():
    body = textwrap.dedent(
        """
        import torch, cudalloc
        for conf, kind, text in ((b"backend:sim", TypeError, "must be a str"),
                                 (7, TypeError, "must be a str"),
                                 ("backend:sim\\x00,bogus:1", cudalloc.ConfigError, "NUL")):
            try:
                cudalloc.enable(conf)
            except kind as e:
                assert text in str(e), e
            else:
                raise AssertionError(f"enable({conf!r}) was accepted")
        assert not cudalloc.is_enabled() and not torch.cuda.memory.created
        print("ok")
        """
    )
    r = run_py(body, env=child_env(fake_torch=True))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def loaded_libc():
    """The path of the C library this process has loaded (any ELF that is not cudalloc)."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            path = line.split()[-1]
            if re.search(r"/libc[.-][^/]*\.so|/libc\.so", path) and os.path.isfile(path):
                return path
    pytest.skip("no libc.so in /proc/self/maps")


def test_a_library_that_is_not_cudalloc_is_named():
    libc = loaded_libc()
    code = (
        "import cudalloc\n"
        "try:\n    cudalloc.memory_stats()\n"
        "except cudalloc.CudallocError as e:\n    print('ERR', e)\n"
    )
    r = run_py(code, env=child_env(CUDALLOC_LIBRARY=libc))
    assert r.returncode == 0, r.stderr
    assert f"ERR {libc} is not a cudalloc library (no cudalloc_malloc symbol)" in r.stdout
    r = run_py(args=["-m", "cudalloc", "--version"], env=child_env(CUDALLOC_LIBRARY=libc))
    assert r.returncode == 0, r.stderr
    assert f"library: not loadable: {libc} is not a cudalloc library" in r.stdout


def test_device_arguments(lib):
    class Index:  # an integer of another kind, e.g. numpy.int64
        def __index__(self):
            return 1

    assert cudalloc.memory_reserved(Index()) == cudalloc.memory_reserved(1)
    for bad in ("cuda:x", "cuda:0:1"):
        with pytest.raises(ValueError, match=re.escape(f"invalid device {bad!r}")):
            cudalloc.memory_stats(bad)
    for bad in (1.0, b"cuda:0", [0], True):
        with pytest.raises(TypeError, match="invalid device"):
            cudalloc.memory_stats(bad)


@pytest.mark.parametrize("age", ["5", None, b"1"])
def test_leak_report_wants_a_number(lib, age):
    with pytest.raises(TypeError, match="min_age_s must be a number of seconds"):
        cudalloc.leak_report(min_age_s=age)
