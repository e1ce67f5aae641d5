"""enable() / patch_torch() against the fake torch in tests/python/fake_torch.

Each test runs in a child process: the allocator swap is once per process,
as in real PyTorch. The fake torch calls cudalloc through the raw function
addresses enable() handed it, so wrong addresses or signatures show up here.
"""

import textwrap

from conftest import SIM_CONF, child_env, run_py

PRELUDE = textwrap.dedent(
    """
    import ctypes, os, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    assert getattr(torch, "__fake__", False), "expected the fake torch"
    import cudalloc
    from cudalloc import _lib
    MiB = 1 << 20
    """
)


def run(body, **env):
    r = run_py(PRELUDE + textwrap.dedent(body), env=child_env(fake_torch=True, **env))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def test_an_older_torch_without_hooks_gets_warnings():
    # A torch without the graph-pool hook cannot have graph capture refused,
    # and one without set_reset_fn never reaches cudalloc's empty_cache: say so.
    run(
        f"""
        del torch.cuda.memory._CUDAPluggableAllocator.set_begin_allocate_to_pool
        del torch.cuda.memory._CUDAPluggableAllocator.set_reset_fn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cudalloc.enable({SIM_CONF!r})
        text = " | ".join(str(w.message) for w in caught)
        assert "lacks set_reset_fn" in text, text
        assert "lacks set_begin_allocate_to_pool" in text, text
        assert "Do not capture CUDA graphs" in text, text
        assert set(cudalloc.enabled_hooks()) == {{"set_init_fn",
            "set_record_stream_fn", "set_memory_fraction_fn",
            "set_end_allocate_to_pool_fn", "set_release_pool"}}
        """
    )


def test_graph_pools_need_the_end_and_release_hooks():
    # A pool that is never ended would hold every release back: refuse.
    run(
        f"""
        del torch.cuda.memory._CUDAPluggableAllocator.set_release_pool
        try:
            cudalloc.enable({SIM_CONF!r} + ",graph_pools:on")
        except cudalloc.CudallocError as e:
            assert "needs PyTorch's set_release_pool" in str(e), e
        else:
            raise AssertionError("enabled without set_release_pool")
        assert not cudalloc.is_enabled()
        """
    )


def test_enable_wires_allocator_and_hooks():
    run(
        f"""
        alloc = cudalloc.enable({SIM_CONF!r})
        assert cudalloc.is_enabled() and cudalloc.is_patched()
        path, a, f = torch.cuda.memory.created[-1]
        assert (a, f) == ("cudalloc_malloc_torch", "cudalloc_free")
        assert os.path.samefile(path, cudalloc.library_path())
        inner = torch.cuda.memory._current
        assert inner is alloc.allocator()
        lib = _lib.lib()
        addr = lambda n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value
        assert inner._alloc_fn in (addr("cudalloc_malloc_torch"), addr("cudalloc_malloc"))
        assert inner._free_fn == addr("cudalloc_free")
        assert inner._init_fn == addr("cudalloc_init_devices")
        assert inner._reset_fn == addr("cudalloc_empty_cache")
        assert inner._record_stream_fn == addr("cudalloc_record_stream")
        assert inner._memory_fraction_fn == addr("cudalloc_set_memory_fraction")
        assert inner._begin_allocate_to_pool_fn == addr("cudalloc_begin_allocate_to_pool")
        assert inner._end_allocate_to_pool_fn == addr("cudalloc_end_allocate_to_pool")
        assert inner._release_pool_fn == addr("cudalloc_release_pool")
        assert set(cudalloc.enabled_hooks()) == {{"set_init_fn", "set_reset_fn",
            "set_record_stream_fn", "set_memory_fraction_fn", "set_begin_allocate_to_pool",
            "set_end_allocate_to_pool_fn", "set_release_pool"}}
        # Calling again with the same configuration is a no-op.
        assert cudalloc.enable({SIM_CONF!r}) is alloc
        try:
            cudalloc.enable("backend:sim,sim_devices:1")
            raise AssertionError("switching configuration must fail")
        except cudalloc.CudallocError as e:
            assert "already enabled" in str(e)
        """
    )


def test_tensors_flow_through_cudalloc_and_torch_stats_are_patched():
    run(
        f"""
        cudalloc.enable({SIM_CONF!r})
        t1 = torch.empty(3 * MiB, "cuda:0")
        t2 = torch.empty(1000, "cuda:0")
        live = 3 * MiB + 1024
        assert cudalloc.memory_allocated(0) == live
        # torch's own functions (which raise under a pluggable allocator) now answer.
        for fn in (torch.cuda.memory_stats, torch.cuda.memory.memory_stats):
            s = fn()
            assert s["allocated_bytes.all.current"] == live, s
            assert s["active.all.current"] == 2
            assert s["segment.all.current"] == 2
        assert torch.cuda.memory_allocated() == live
        assert torch.cuda.memory_allocated(torch.device("cuda:0")) == live
        assert torch.cuda.max_memory_allocated(0) == live
        assert torch.cuda.memory_reserved() == cudalloc.memory_reserved(0) > live
        assert torch.cuda.memory_allocated(1) == 0
        assert "cudalloc memory summary" in torch.cuda.memory_summary()
        # torch.accelerator (torch >= 2.9) would describe the idle native
        # allocator; patched, it answers from cudalloc, device_index and all.
        assert torch.accelerator.memory_allocated() == live
        assert torch.accelerator.memory_allocated(device_index=0) == live
        assert torch.accelerator.memory_stats(0)["allocated_bytes.all.current"] == live
        assert torch.accelerator.max_memory_reserved() == cudalloc.max_memory_reserved(0)
        assert torch.accelerator.memory_stats_as_nested_dict()["allocated_bytes"]["all"]["current"] == live
        t1.free(); t2.free()
        assert torch.cuda.memory_allocated() == 0
        assert torch.cuda.max_memory_allocated() == live
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == 0
        # torch.cuda.empty_cache() reaches cudalloc through the reset hook,
        # and torch.accelerator.empty_cache() (which would return early) once patched.
        assert torch.cuda.memory_reserved() > 0
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() == 0
        keep = torch.empty(4096, "cuda:0"); keep.free()
        assert torch.cuda.memory_reserved() > 0
        torch.accelerator.empty_cache()
        assert torch.cuda.memory_reserved() == 0
        # set_per_process_memory_fraction reaches cudalloc too.
        torch.cuda.set_per_process_memory_fraction(0.25, 0)
        assert cudalloc.raw_stats(0)["limit_bytes"] == 256 * MiB
        # record_stream: a live pointer is accepted, an unknown one is an error, not a crash.
        t3 = torch.empty(4096, "cuda:0")
        t3.record_stream(0x1234)
        assert _lib.lib().cudalloc_last_error() == 0
        torch.cuda._record_stream(0xBAD000, 0)
        assert _lib.lib().cudalloc_last_error() == _lib.ERR_UNKNOWN_POINTER
        t3.free()
        cudalloc.check_invariants()
        # unpatch_torch puts torch's functions back (which raise under a pluggable allocator).
        cudalloc.unpatch_torch()
        assert torch.accelerator.memory_allocated() == 0
        try:
            torch.cuda.memory_stats()
            raise AssertionError("expected torch's own memory_stats")
        except RuntimeError as e:
            assert "does not yet support" in str(e)
        """
    )


def test_enable_after_cuda_init_is_a_clear_error():
    r = run(
        f"""
        torch.cuda.init()
        try:
            cudalloc.enable({SIM_CONF!r})
            raise AssertionError("must refuse")
        except cudalloc.CudallocError as e:
            print(e)
        assert not cudalloc.is_enabled() and torch.cuda.memory._current is None
        """
    )
    assert "before the first CUDA tensor" in r.stdout and "CUDALLOC=1" in r.stdout


def test_bad_conf_is_value_error_naming_key():
    r = run(
        """
        try:
            cudalloc.enable("backend:sim,no_such_key:3")
            raise AssertionError("must refuse")
        except ValueError as e:
            print("ERR", e)
        assert not cudalloc.is_enabled() and torch.cuda.memory._current is None
        """
    )
    assert "ERR configuration: unknown key 'no_such_key'" in r.stdout


def test_conf_from_environment_and_no_silent_sim():
    # No backend named: enable() asks for real device memory (backend:cuda),
    # never the sim fallback; without a usable driver that is an error.
    r = run(
        """
        # The program's default; CUDALLOC_CONF's keys override it in the library.
        assert cudalloc._torch.effective_conf() == "backend:cuda"
        try:
            cudalloc.enable()
            raise AssertionError("there is no CUDA here")
        except cudalloc.CudallocError as e:
            assert e.code in (_lib.ERR_DRIVER_NOT_FOUND, _lib.ERR_DRIVER), e.code
        assert not cudalloc.is_enabled() and torch.cuda.memory._current is None
        """,
        CUDALLOC_CONF="sim_devices:1",
    )
    run(
        """
        cudalloc.enable()
        assert cudalloc.device_count() == 3
        """,
        CUDALLOC_CONF="backend:sim,sim_devices:3",
    )


def test_enable_after_another_cudalloc_call_says_what_started_it():
    # memory_stats() starts cudalloc from CUDALLOC_CONF (no backend: auto);
    # enable() asks for backend:cuda, so the two differ: the error says which
    # call started cudalloc and how to make them agree.
    r = run(
        """
        cudalloc.device_count()
        try:
            cudalloc.enable()
            raise AssertionError("must refuse")
        except cudalloc.CudallocError as e:
            assert e.code == _lib.ERR_ALREADY_INITIALIZED, e.code
            print("ERR", e)
        assert not cudalloc.is_enabled() and torch.cuda.memory._current is None
        """,
        CUDALLOC_CONF="sim_devices:1",
    )
    assert "by another cudalloc call" in r.stdout, r.stdout
    assert "'sim_devices:1'" in r.stdout and "backend:cuda" in r.stdout, r.stdout


def test_patching_can_be_turned_off():
    body = f"""
        cudalloc.enable({SIM_CONF!r}{{kw}})
        assert cudalloc.is_enabled() and not cudalloc.is_patched()
        try:
            torch.cuda.memory_stats()
            raise AssertionError("torch's function must be untouched")
        except RuntimeError:
            pass
        cudalloc.patch_torch()
        assert torch.cuda.memory_stats()["num_ooms"] == 0
        """
    run(body.replace("{kw}", ", patch_torch=False"))
    run(body.replace("{kw}", ""), CUDALLOC_PATCH_TORCH="0")


def test_patch_needs_enable():
    run(
        """
        try:
            cudalloc.patch_torch()
            raise AssertionError("must refuse")
        except cudalloc.CudallocError as e:
            assert "enable()" in str(e)
        """
    )


def test_torch_oom_shows_diagnosis_then_continues():
    r = run(
        f"""
        cudalloc.enable({SIM_CONF!r})
        keep = torch.empty(100 * MiB, "cuda:0")
        try:
            torch.empty(4 << 30, "cuda:0")
            raise AssertionError("must fail")
        except RuntimeError as e:
            sys.stderr.flush()
            print("torch said:", e, file=sys.stderr)
        keep.free()
        ok = torch.empty(900 * MiB, "cuda:0")
        assert torch.cuda.memory_stats()["num_ooms"] == 1
        print("continued", ok.ptr != 0)
        """
    )
    assert "continued True" in r.stdout
    diag = r.stderr.find("cudalloc: out of memory on device 0")
    said = r.stderr.find("torch said:")
    assert 0 <= diag < said, r.stderr  # the diagnosis comes first
    assert "4.0GiB" in r.stderr or "4294967296 bytes" in r.stderr
