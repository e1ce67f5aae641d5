"""cudalloc.cupy against the fake CuPy in tests/python/fake_cupy, on the sim device.

Each test runs in a child process: CuPy's allocator and cudalloc are
process-wide. The fake CuPy keeps a block's owner alive exactly as long as
its arrays (UnownedMemory holds it), so the frees tested here are the ones
real CuPy would make.
"""

import textwrap

from conftest import SIM_CONF, child_env, run_py

PRELUDE = textwrap.dedent(
    """
    import gc, json, sys, warnings
    warnings.simplefilter("ignore")
    import cupy
    assert getattr(cupy, "__fake__", False), "expected the fake cupy"
    import cudalloc, cudalloc.cupy
    from cudalloc import _lib
    MiB = 1 << 20

    def live():
        # The live allocations: {ptr: (device, stream, size)}, from cudalloc's own table.
        report = json.loads(cudalloc.leak_report(json=True))
        return {int(a["ptr"], 16): (a["device"], a["stream"], a["requested"])
                for a in report["allocations"]}
    """
)


def run(body, **env):
    env.setdefault("CUDALLOC_CONF", SIM_CONF)
    r = run_py(PRELUDE + textwrap.dedent(body), env=child_env(fake_cupy=True, **env))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def test_import_cudalloc_imports_no_framework():
    run(
        """
        assert "cupy" in sys.modules  # the prelude imported the fake
        del sys.modules["cupy"]
        import importlib
        for name in [m for m in sys.modules if m == "cudalloc" or m.startswith("cudalloc.")]:
            del sys.modules[name]
        import cudalloc, cudalloc.cupy
        assert "cupy" not in sys.modules and "numba" not in sys.modules
        assert "torch" not in sys.modules
        assert not cudalloc.cupy.is_enabled()
        """
    )


def test_without_cupy_the_error_says_what_to_install(tmp_path):
    hide = tmp_path / "hide"
    (hide / "cupy").mkdir(parents=True)
    (hide / "cupy" / "__init__.py").write_text("raise ImportError('No module named cupy (hidden)')\n")
    code = textwrap.dedent(
        """
        import cudalloc, cudalloc.cupy   # importing works without CuPy
        for call in (cudalloc.cupy.enable, lambda: cudalloc.cupy.allocator(512)):
            try:
                call()
            except ImportError as e:
                assert e.name == "cupy", e.name
                print("ERR", e)
            else:
                raise AssertionError("no error without cupy")
        assert not cudalloc.cupy.is_enabled()
        """
    )
    r = run_py(code, env=child_env(extra_path=[str(hide)], CUDALLOC_CONF=SIM_CONF))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("ERR")]
    assert len(lines) == 2, r.stdout
    for line in lines:
        assert "cudalloc.cupy needs CuPy" in line and "pip install cupy-cuda12x" in line, line
        assert "hidden" in line, line  # the import's own reason is kept


def test_enable_installs_and_allocations_go_through_cudalloc():
    run(
        """
        pool = cupy.get_default_memory_pool()
        assert cupy.cuda.get_allocator() == pool.malloc  # CuPy's default, as at import
        assert cudalloc.cupy.enable() is cudalloc.cupy.allocator
        assert cupy.cuda.get_allocator() is cudalloc.cupy.allocator
        assert cudalloc.cupy.is_enabled()
        before = cudalloc.raw_stats(0)
        a = cupy.empty(1000, "float32")        # 4000 bytes
        b = cupy.zeros((3, MiB), "uint8")      # 3 MiB: the large pool
        assert isinstance(a.data, cupy.cuda.MemoryPointer)
        assert isinstance(a.data.mem, cupy.cuda.UnownedMemory)
        assert a.data.device_id == 0 and a.data.mem.size == 4000
        held = live()
        assert held[a.data.ptr] == (0, 0, 4000), held
        assert held[b.data.ptr] == (0, 0, 3 * MiB), held
        s = cudalloc.raw_stats(0)
        assert s["allocated_bytes"] - before["allocated_bytes"] == 4096 + 3 * MiB, s
        assert s["num_allocs"] - before["num_allocs"] == 2
        assert pool.used_bytes() == 0 and not cupy.cuda.memory.raw_live  # CuPy's pool bypassed
        view = a.data + 512                    # a view keeps the memory alive
        del a
        assert view.mem.ptr in live()
        del view, b
        s = cudalloc.raw_stats(0)
        assert s["allocated_bytes"] == before["allocated_bytes"], s
        assert s["num_frees"] - before["num_frees"] == 2
        assert s["num_invalid_frees"] == 0
        assert live() == {}
        cudalloc.check_invariants()
        """
    )


def test_current_device_and_stream_are_served_and_a_block_returns_to_its_stream():
    # sim_events:manual: memory freed on one stream never reaches another
    # (its free is never proven complete), so where a block comes back
    # shows which stream it was freed on: the one it was allocated on,
    # whichever stream is current when CuPy drops it.
    run(
        """
        cudalloc.cupy.enable()
        s = cupy.cuda.Stream()
        assert s.ptr != 0
        with cupy.cuda.Device(1):
            with s:
                a = cupy.empty(4096, "uint8")
        assert (a.data.device_id, live()[a.data.ptr]) == (1, (1, s.ptr, 4096))
        old = a.data.ptr
        del a                                   # dropped with the null stream current
        hits = cudalloc.raw_stats(1)["num_cache_hits"]
        with cupy.cuda.Device(1):
            b = cupy.empty(4096, "uint8")       # null stream: must not get s's block
            assert b.data.ptr != old
            with s:
                c = cupy.empty(4096, "uint8")   # s: its own block back, from the cache
        assert c.data.ptr == old and live()[old] == (1, s.ptr, 4096)
        assert cudalloc.raw_stats(1)["num_cache_hits"] > hits
        assert live()[b.data.ptr] == (1, 0, 4096)
        # An external stream handle is passed as it is.
        ext = cupy.cuda.ExternalStream(0xABC000)
        with ext:
            d = cupy.empty(512, "uint8")
        assert live()[d.data.ptr] == (0, 0xABC000, 512)
        del b, c, d
        assert live() == {} and cudalloc.memory_allocated(1) == 0
        """,
        CUDALLOC_CONF=SIM_CONF + ",sim_events:manual",
    )


def test_zero_bytes_is_a_null_pointer_on_the_current_device():
    run(
        """
        cudalloc.cupy.enable()
        with cupy.cuda.Device(1):
            z = cupy.empty(0)
        assert z.data.ptr == 0 and z.data.device_id == 1
        assert cudalloc.raw_stats(1)["num_allocs"] == 0 and live() == {}
        try:
            cudalloc.cupy.allocator(-1)
        except ValueError as e:
            assert "size must be >= 0" in str(e)
        else:
            raise AssertionError("negative size accepted")
        """
    )


def test_out_of_memory_is_cupys_error_with_cudallocs_diagnosis():
    r = run(
        """
        cudalloc.cupy.enable()
        keep = cupy.empty(MiB, "uint8")
        gc.collect()
        try:
            cupy.empty(1 << 40, "uint8")
        except cupy.cuda.memory.OutOfMemoryError as e:
            assert isinstance(e, MemoryError)
            text = str(e)
            print("ERR", text.splitlines()[0])
            assert "Out of memory allocating 1,099,511,627,776 bytes" in text, text
            assert f"allocated so far: {MiB:,} bytes" in text, text
            assert "out of memory on device 0" in text, text   # cudalloc's diagnosis
        else:
            raise AssertionError("1 TiB allocated on a 1 GiB device")
        assert cudalloc.raw_stats(0)["num_ooms"] >= 1
        assert cudalloc.memory_allocated(0) == MiB
        """
    )
    assert "ERR Out of memory" in r.stdout


def test_out_of_memory_collects_garbage_and_tries_again():
    # An array kept only by a reference cycle is freed by gc.collect(), as
    # CuPy's own pool does on OOM; cudalloc's cache flush alone cannot.
    run(
        """
        cudalloc.cupy.enable()
        gc.disable()
        class Holder:
            pass
        h = Holder(); h.self = h; h.array = cupy.empty(24 * MiB, "uint8")
        del h                                        # garbage, not yet collected
        keep = cupy.empty(24 * MiB, "uint8")
        assert cudalloc.memory_allocated(0) == 48 * MiB
        c = cupy.empty(24 * MiB, "uint8")            # over max_memory unless h goes
        assert cudalloc.memory_allocated(0) == 48 * MiB
        assert cudalloc.raw_stats(0)["num_ooms"] == 1
        """,
        CUDALLOC_CONF=SIM_CONF + ",max_memory:64MiB",
    )


def test_disable_puts_back_the_previous_allocator_and_old_arrays_still_free():
    run(
        """
        pool = cupy.get_default_memory_pool()
        cudalloc.cupy.enable()
        cudalloc.cupy.enable()                  # idempotent: still remembers CuPy's pool
        a = cupy.empty(MiB, "uint8")
        cudalloc.cupy.disable()
        assert cupy.cuda.get_allocator() == pool.malloc, cupy.cuda.get_allocator()
        assert not cudalloc.cupy.is_enabled()
        b = cupy.empty(MiB, "uint8")            # CuPy's own pool now
        assert pool.used_bytes() == MiB and cudalloc.memory_allocated(0) == MiB
        del a                                   # still goes back to cudalloc
        assert cudalloc.memory_allocated(0) == 0
        cudalloc.cupy.disable()                 # a second disable changes nothing
        assert cupy.cuda.get_allocator() == pool.malloc
        # set_allocator by hand works too, and None is CuPy's raw allocator.
        cupy.cuda.set_allocator(cudalloc.cupy.allocator)
        assert cudalloc.cupy.is_enabled()
        c = cupy.empty(512, "uint8")
        assert cudalloc.memory_allocated(0) == 512
        cupy.cuda.set_allocator(None)
        cudalloc.cupy.enable()
        cudalloc.cupy.disable()
        assert cupy.cuda.get_allocator() is cupy.cuda.memory._malloc
        """
    )


def test_per_thread_default_stream_is_passed_and_warned_about():
    r = run(
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cudalloc.cupy.enable()
        text = " | ".join(str(w.message) for w in caught)
        print("WARN", text)
        a = cupy.empty(512, "uint8")
        assert live()[a.data.ptr] == (0, cupy.cuda.runtime.streamPerThread, 512)
        """,
        CUPY_CUDA_PER_THREAD_DEFAULT_STREAM="1",
    )
    assert "CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1" in r.stdout
    assert "give each its own cupy.cuda.Stream" in r.stdout


def test_enable_with_a_bad_configuration_names_the_key():
    run(
        """
        try:
            cudalloc.cupy.enable("max_memory:lots")
        except cudalloc.ConfigError as e:
            assert "max_memory" in str(e), e
        else:
            raise AssertionError("bad configuration accepted")
        assert not cudalloc.cupy.is_enabled()
        assert cupy.cuda.get_allocator() == cupy.get_default_memory_pool().malloc
        """
    )


def test_enable_on_the_sim_backend_warns():
    r = run(
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cudalloc.cupy.enable()
        print("WARN", " | ".join(f"{w.filename}: {w.message}" for w in caught))
        """
    )
    assert "backend:sim hands CuPy simulated addresses" in r.stdout, r.stdout
    assert "<string>" in r.stdout, r.stdout  # attributed to the caller of enable()
