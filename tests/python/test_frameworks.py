"""Several frameworks in one process (fake torch, CuPy and Numba, sim device):
one cudalloc, one cache, one statistics view, whichever starts first; and
the rule for a second framework's configuration (cudalloc/_frameworks.py).
"""

import textwrap

from conftest import SIM_CONF, child_env, run_py

PRELUDE = textwrap.dedent(
    """
    import json, warnings
    warnings.simplefilter("ignore")
    import torch, cupy
    assert torch.__fake__ and cupy.__fake__
    import cudalloc, cudalloc.cupy
    from cudalloc import _frameworks, _lib
    MiB = 1 << 20

    def streams():
        report = json.loads(cudalloc.leak_report(json=True))
        return sorted((a["device"], a["stream"], a["requested"]) for a in report["allocations"])
    """
)


def run(*body, **env):
    env.setdefault("CUDALLOC_CONF", SIM_CONF)
    r = run_py(
        PRELUDE + "\n".join(textwrap.dedent(part) for part in body),
        env=child_env(fake_torch=True, fake_cupy=True, fake_numba=True, **env),
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


SHARED = """
    # One cache and one statistics view: torch's, CuPy's and the sum agree.
    t = torch.empty(MiB)                       # torch, device 0, stream 0
    s = cupy.cuda.Stream()
    with s:
        c = cupy.empty(2 * MiB, "uint8")       # CuPy, device 0, its stream
    assert streams() == sorted([(0, 0, MiB), (0, s.ptr, 2 * MiB)]), streams()
    assert cudalloc.memory_allocated(0) == 3 * MiB
    assert torch.cuda.memory_allocated(0) == 3 * MiB       # patched: cudalloc's view
    stats = cudalloc.memory_stats(0)
    assert stats["allocation.all.current"] == 2 and stats["allocation.all.allocated"] == 2
    t.free(); del c
    assert cudalloc.memory_allocated(0) == 0
    # A block torch freed on stream 0 serves CuPy on stream 0 from the cache.
    t = torch.empty(MiB); old = t.ptr; t.free()
    hits = cudalloc.raw_stats(0)["num_cache_hits"]
    c = cupy.empty(MiB, "uint8")
    assert c.data.ptr == old and cudalloc.raw_stats(0)["num_cache_hits"] == hits + 1
    del c
    cudalloc.check_invariants()
"""


def test_torch_then_cupy_share_one_cudalloc():
    run(
        f"""
        cudalloc.enable({SIM_CONF!r})
        cudalloc.cupy.enable()                 # joins: no configuration of its own
        assert _frameworks.first_start()[0] == "cudalloc.enable()"
        assert cudalloc.is_enabled() and cudalloc.cupy.is_enabled()
        """,
        SHARED,
    )


def test_cupy_then_torch_share_one_cudalloc():
    run(
        f"""
        cudalloc.cupy.enable({SIM_CONF!r})
        cudalloc.enable()                      # joins
        assert _frameworks.first_start()[0] == "cudalloc.cupy.enable()"
        assert cudalloc.is_enabled() and cudalloc.cupy.is_enabled()
        """,
        SHARED,
    )


def test_the_first_configuration_holds_for_the_frameworks_that_join():
    run(
        f"""
        cudalloc.enable({SIM_CONF!r} + ",max_memory:64MiB")
        cudalloc.cupy.enable()
        assert _lib.config_in_force()["max_memory"] == "64MiB"
        keep = torch.empty(40 * MiB)
        try:
            cupy.empty(40 * MiB, "uint8")      # the limit counts both frameworks
        except cupy.cuda.memory.OutOfMemoryError as e:
            assert "limit" in str(e), e
        else:
            raise AssertionError("the limit did not count torch's memory")
        """
    )


def test_a_second_configuration_is_refused_and_says_who_came_first():
    r = run(
        f"""
        cudalloc.enable({SIM_CONF!r})
        try:
            cudalloc.cupy.enable({SIM_CONF!r} + ",max_memory:1GiB")
        except cudalloc.CudallocError as e:
            assert e.code == _lib.ERR_ALREADY_INITIALIZED
            print("ERR", e)
        else:
            raise AssertionError("two configurations in one process")
        assert not cudalloc.cupy.is_enabled()
        cudalloc.cupy.enable({SIM_CONF!r})     # the same one is fine
        assert cudalloc.cupy.is_enabled()
        """
    )
    assert "already started by cudalloc.enable() with configuration" in r.stdout, r.stdout
    assert "give the configuration once" in r.stdout, r.stdout


def test_cudalloc_started_by_another_call_is_not_joined():
    # memory_stats() starts cudalloc from CUDALLOC_CONF (no backend: auto),
    # which is not a framework start: a framework asking for backend:cuda
    # must not silently run on whatever backend that picked.
    r = run(
        """
        cudalloc.device_count()
        try:
            cudalloc.cupy.enable()
        except cudalloc.CudallocError as e:
            print("ERR", e)
        else:
            raise AssertionError("joined a cudalloc no framework started")
        """,
        CUDALLOC_CONF="sim_devices:1",
    )
    assert "by another cudalloc call" in r.stdout and "cudalloc.cupy.enable()" in r.stdout, r.stdout


def test_numba_torch_and_cupy_in_one_process():
    run(
        f"""
        cudalloc.enable({SIM_CONF!r})
        cudalloc.cupy.enable()
        from numba import cuda             # NUMBA_CUDA_MEMORY_MANAGER=cudalloc.numba
        n = cuda.device_array(MiB, "uint8")
        t = torch.empty(MiB)
        c = cupy.empty(MiB, "uint8")
        assert cudalloc.memory_allocated(0) == 3 * MiB
        assert cudalloc.memory_stats(0)["allocation.all.current"] == 3
        assert _frameworks.first_start()[0] == "cudalloc.enable()"
        del n, c; t.free()
        assert cudalloc.memory_allocated(0) == 0
        """,
        NUMBA_CUDA_MEMORY_MANAGER="cudalloc.numba",
    )
