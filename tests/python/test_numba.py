"""cudalloc.numba (Numba's EMM plugin) against the fake Numba in
tests/python/fake_numba, on the sim device.

Each test runs in a child process started with
NUMBA_CUDA_MEMORY_MANAGER=cudalloc.numba, so the plugin is found the way
Numba finds it (importlib, then the module's _numba_memory_manager), and
with both of Numba's driver bindings: its ctypes one (pointers are
c_size_t) and NVIDIA's cuda.bindings (CUdeviceptr), the default of newer
numba-cuda.
"""

import textwrap

import pytest

from conftest import SIM_CONF, child_env, run_py

PRELUDE = textwrap.dedent(
    """
    import gc, json, sys, warnings
    warnings.simplefilter("ignore")
    from numba import cuda
    from numba.cuda.cudadrv import driver as drv
    assert getattr(sys.modules["numba"], "__fake__", False), "expected the fake numba"
    import cudalloc
    from cudalloc import _lib
    MiB = 1 << 20

    def live():
        # The live allocations: {ptr: (device, stream, size)}, from cudalloc's own table.
        report = json.loads(cudalloc.leak_report(json=True))
        return {int(a["ptr"], 16): (a["device"], a["stream"], a["requested"])
                for a in report["allocations"]}

    def address(arr):
        return arr.gpu_data.device_pointer_value or 0
    """
)

BINDINGS = pytest.mark.parametrize("nv", ["0", "1"], ids=["ctypes-binding", "nv-binding"])


def run(body, nv="0", **env):
    env.setdefault("CUDALLOC_CONF", SIM_CONF)
    env.setdefault("NUMBA_CUDA_MEMORY_MANAGER", "cudalloc.numba")
    r = run_py(
        PRELUDE + textwrap.dedent(body),
        env=child_env(fake_numba=True, FAKE_NUMBA_NV_BINDING=nv, **env),
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


@BINDINGS
def test_the_environment_variable_installs_the_plugin_and_allocations_go_through_cudalloc(nv):
    run(
        """
        import cudalloc.numba as plugin
        ctx = cuda.current_context()
        assert type(ctx.memory_manager) is plugin.CudallocNumbaManager
        assert plugin._numba_memory_manager is plugin.CudallocNumbaManager
        assert isinstance(ctx.memory_manager, drv.HostOnlyCUDAMemoryManager)
        assert ctx.memory_manager.interface_version == 1
        from cudalloc import _frameworks
        assert _frameworks.first_start()[0] == "cudalloc.numba"
        a = cuda.device_array(1000, "float32")           # 4000 bytes
        ptr_type = drv.binding.CUdeviceptr if drv.USE_NV_BINDING else drv.drvapi.cu_device_ptr
        assert type(a.gpu_data.device_pointer) is ptr_type, type(a.gpu_data.device_pointer)
        assert isinstance(a.gpu_data, drv.MemoryPointer) and a.gpu_data.size == 4000
        assert live() == {address(a): (0, 0, 4000)}      # legacy default stream
        assert cudalloc.memory_allocated(0) == 4096
        cuda.select_device(1)
        b = cuda.device_array((3, MiB), "uint8")
        assert live()[address(b)] == (1, 0, 3 * MiB)
        assert cudalloc.memory_allocated(1) == 3 * MiB
        view = a.gpu_data.view(512)                      # a view keeps the memory alive
        del a
        assert cudalloc.memory_allocated(0) == 4096
        del view
        assert cudalloc.memory_allocated(0) == 0
        del b
        s = cudalloc.raw_stats(1)
        assert s["allocated_bytes"] == 0 and s["num_frees"] == 1, s
        assert drv.driver.native_live == {}               # Numba's own manager unused
        assert cudalloc.raw_stats(0)["num_invalid_frees"] == 0
        cudalloc.check_invariants()
        """,
        nv=nv,
    )


def test_set_memory_manager_accepts_it_and_the_interface_version_is_1():
    run(
        """
        import cudalloc.numba as plugin
        cuda.set_memory_manager(plugin.CudallocNumbaManager)   # version checked there
        dummy = plugin.CudallocNumbaManager(context=None)      # as Numba makes one
        assert dummy.interface_version == 1 == drv._SUPPORTED_EMM_INTERFACE_VERSION
        assert issubclass(plugin.CudallocNumbaManager, drv.BaseCUDAMemoryManager)
        assert not plugin.CudallocNumbaManager.__abstractmethods__
        # Making the dummy started nothing.
        assert _lib.loaded_path() is None
        """,
        NUMBA_CUDA_MEMORY_MANAGER="default",
    )


@BINDINGS
def test_get_ipc_handle_raises_clearly_and_changes_nothing(nv):
    r = run(
        """
        import cudalloc.numba as plugin
        a = cuda.device_array(1024, "uint8")
        before = live()
        try:
            a.get_ipc_handle()
        except NotImplementedError as e:
            assert isinstance(e, cudalloc.CudallocError) and isinstance(e, plugin.CudallocIpcError)
            assert e.code == _lib.ERR_UNSUPPORTED
            print("ERR", e)
        else:
            raise AssertionError("an IPC handle for cudalloc memory")
        assert live() == before
        """,
        nv=nv,
    )
    assert "cudalloc does not support CUDA IPC" in r.stdout


@BINDINGS
def test_get_memory_info_is_the_drivers_free_memory_plus_cudallocs_cache(nv):
    run(
        """
        ctx = cuda.current_context()
        a = cuda.device_array(MiB, "uint8")
        s = cudalloc.raw_stats(0)
        assert s["cached_free_bytes"] > 0, s   # the rest of a's 2 MiB segment
        info = ctx.get_memory_info()
        assert isinstance(info, drv.MemoryInfo)
        assert info.total == drv.FAKE_TOTAL
        assert info.free == drv.FAKE_FREE + s["cached_free_bytes"], (info, s)
        assert 0 < info.free <= info.total
        assert drv.driver.mem_get_info_calls == 1
        """,
        nv=nv,
    )


def test_get_memory_info_is_capped_by_cudallocs_limit():
    run(
        """
        ctx = cuda.current_context()
        a = cuda.device_array(24 * MiB, "uint8")
        s = cudalloc.raw_stats(0)
        assert s["limit_bytes"] == 32 * MiB, s
        held = s["reserved_bytes"] - s["cached_free_bytes"]
        assert ctx.get_memory_info() == drv.MemoryInfo(32 * MiB - held, drv.FAKE_TOTAL)
        """,
        CUDALLOC_CONF=SIM_CONF + ",max_memory:32MiB",
    )


@BINDINGS
def test_defer_cleanup_holds_frees_until_the_outermost_ends(nv):
    run(
        """
        a = cuda.device_array(MiB, "uint8")
        b = cuda.device_array(MiB, "uint8")
        c = cuda.device_array(MiB, "uint8")
        with cuda.defer_cleanup():
            del a
            assert cudalloc.memory_allocated(0) == 3 * MiB
            with cuda.defer_cleanup():          # nested
                del b
            assert cudalloc.memory_allocated(0) == 3 * MiB
        assert cudalloc.memory_allocated(0) == MiB
        try:
            with cuda.current_context().defer_cleanup():
                del c
                raise KeyError("inside")
        except KeyError:
            pass
        assert cudalloc.memory_allocated(0) == 0   # flushed on the way out
        assert cudalloc.raw_stats(0)["num_invalid_frees"] == 0
        # Host deallocations were deferred too (HostOnlyCUDAMemoryManager's part).
        mm = cuda.current_context().memory_manager
        with mm.defer_cleanup():
            assert mm.deallocations.is_disabled
        assert not mm.deallocations.is_disabled
        """,
        nv=nv,
    )


def test_reset_frees_what_the_context_holds_and_empties_the_cache():
    run(
        """
        a = cuda.device_array(MiB, "uint8")
        b = cuda.device_array(4 * MiB, "uint8")
        assert cudalloc.memory_reserved(0) > 0
        cuda.close()                              # Numba's context reset
        s = cudalloc.raw_stats(0)
        assert s["allocated_bytes"] == 0 and s["reserved_bytes"] == 0, s
        del a, b                                  # their finalizers find nothing to free
        gc.collect()
        assert cudalloc.raw_stats(0)["num_invalid_frees"] == 0
        c = cuda.device_array(MiB, "uint8")      # a fresh context allocates again
        assert cudalloc.memory_allocated(0) == MiB
        """
    )


@BINDINGS
def test_out_of_memory_is_numbas_cuda_api_error(nv):
    run(
        """
        gc.collect()
        try:
            cuda.device_array(1 << 40, "uint8")
        except drv.CudaAPIError as e:
            oom = (drv.binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY if drv.USE_NV_BINDING
                   else drv.enums.CUDA_ERROR_OUT_OF_MEMORY)
            assert e.code == oom, e.code
            assert "out of memory on device 0" in e.msg, e.msg
        else:
            raise AssertionError("1 TiB on a 1 GiB device")
        assert cudalloc.memory_allocated(0) == 0
        """,
        nv=nv,
    )


@BINDINGS
def test_zero_bytes_is_a_null_pointer(nv):
    run(
        """
        z = cuda.device_array(0)
        assert address(z) == 0 and z.gpu_data.size == 0
        assert live() == {} and cudalloc.raw_stats(0)["num_allocs"] == 0
        """,
        nv=nv,
    )


def test_a_finalizer_after_the_manager_is_gone_still_frees():
    run(
        """
        import cudalloc.numba as plugin
        ctx = cuda.current_context()
        mm = plugin.CudallocNumbaManager(context=ctx)
        p = mm.memalloc(4096)
        assert cudalloc.memory_allocated(0) == 4096
        del mm
        gc.collect()
        del p
        assert cudalloc.memory_allocated(0) == 0
        assert cudalloc.raw_stats(0)["num_invalid_frees"] == 0
        """
    )


def test_without_numba_the_error_says_what_to_install(tmp_path):
    hide = tmp_path / "hide"
    (hide / "numba").mkdir(parents=True)
    (hide / "numba" / "__init__.py").write_text("raise ImportError('numba hidden by the test')\n")
    code = textwrap.dedent(
        """
        import sys
        import cudalloc                      # works without Numba
        try:
            import cudalloc.numba
        except ImportError as e:
            assert e.name == "numba", e.name
            print("ERR", e)
        assert "numba" not in sys.modules
        """
    )
    r = run_py(code, env=child_env(extra_path=[str(hide)], CUDALLOC_CONF=SIM_CONF))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ERR cudalloc.numba needs Numba's CUDA target" in r.stdout, r.stdout
    assert "pip install numba-cuda" in r.stdout and "numba hidden by the test" in r.stdout
