"""Capacity queries (can_allocate, is_low_memory) and the warm-up reservation
(reserve:) through the Python package, on the sim backend."""

import textwrap

import pytest

import cudalloc
from conftest import child_env, run_py

MiB = 1 << 20
GiB = 1 << 30


def test_can_allocate_answers_and_changes_nothing(lib):
    before = cudalloc.raw_stats(1)
    assert cudalloc.can_allocate(100 * MiB, 1)
    assert cudalloc.can_allocate(0, 1), "size 0 is served (as NULL)"
    assert not cudalloc.can_allocate(2 * GiB, 1), "past the 1 GiB device"
    assert not cudalloc.can_allocate(1 << 70, 1), "past size_t"
    assert cudalloc.can_allocate(MiB, "cuda:1", stream=0x10)

    class Stream:  # torch.cuda.Stream's shape
        cuda_stream = 0x20

    assert cudalloc.can_allocate(MiB, 1, stream=Stream())
    assert cudalloc.raw_stats(1) == before, "asking changes nothing"


def test_can_allocate_and_is_low_memory_refuse_bad_input(lib):
    for bad in (2, -1, 2**40):
        with pytest.raises(cudalloc.InvalidDeviceError):
            cudalloc.can_allocate(MiB, bad)
        with pytest.raises(cudalloc.InvalidDeviceError):
            cudalloc.is_low_memory(bad)
    with pytest.raises(cudalloc.InvalidDeviceError):
        cudalloc.can_allocate(1 << 70, 5)  # past size_t, the device still checked
    with pytest.raises(cudalloc.InvalidArgumentError):
        cudalloc.can_allocate(-1, 0)
    for size in (True, 1.5, "1GiB", None):
        with pytest.raises(TypeError):
            cudalloc.can_allocate(size, 0)
    for stream in (True, 1.5, "s", object()):
        with pytest.raises(TypeError):
            cudalloc.can_allocate(MiB, 0, stream=stream)
    with pytest.raises(cudalloc.InvalidArgumentError):
        cudalloc.can_allocate(MiB, 0, stream=-1)


def child(conf, body):
    code = "import ctypes, cudalloc\nfrom cudalloc import _lib\n" + textwrap.dedent(body)
    r = run_py(code, env=child_env(CUDALLOC_CONF=conf))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_is_low_memory_follows_the_device():
    out = child(
        "backend:sim,sim_memory:1GiB",
        """
        MiB = 1 << 20
        lib = _lib.lib()
        assert not cudalloc.is_low_memory(0)
        p = lib.cudalloc_malloc(900 * MiB, 0, None)
        assert p
        assert cudalloc.is_low_memory(0), "88% in use"
        assert not cudalloc.can_allocate(200 * MiB, 0)
        lib.cudalloc_free(p, 0, 0, None)
        assert cudalloc.is_low_memory(0), "the idle cache still holds it"
        assert cudalloc.can_allocate(200 * MiB, 0), "the idle segment serves"
        cudalloc.empty_cache()
        assert not cudalloc.is_low_memory(0)
        print("ok")
        """,
    )
    assert "ok" in out


def test_reserve_serves_without_driver_calls():
    out = child(
        "backend:sim,sim_memory:4GiB,reserve:1GiB",
        """
        MiB = 1 << 20
        lib = _lib.lib()
        assert _lib.config_in_force()["reserve"] == "1GiB"
        ps = [lib.cudalloc_malloc(n * MiB, 0, None) for n in (100, 30, 300, 200)]
        assert all(ps)
        s = cudalloc.raw_stats(0)
        assert s["num_driver_allocs"] == 1, s
        assert s["reserved_bytes"] == 1024 * MiB, s
        for p in ps:
            lib.cudalloc_free(p, 0, 0, None)
        cudalloc.empty_cache()
        assert cudalloc.raw_stats(0)["reserved_bytes"] == 0
        print("ok")
        """,
    )
    assert "ok" in out


@pytest.mark.parametrize("value", ["lots", "1GiB|x", "1GiB||2GiB", "-1", "2GiB,max_memory:1GiB"])
def test_bad_reserve_values_name_the_key(value):
    out = child(
        "backend:sim",
        f"""
        try:
            cudalloc.configure("reserve:{value}")
        except cudalloc.ConfigError as e:
            print("ERR", e)
        """,
    )
    assert "ERR" in out and "'reserve'" in out, out
