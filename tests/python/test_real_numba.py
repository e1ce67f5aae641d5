"""cudalloc.numba against a real Numba CUDA target (numba-cuda), with no GPU.

tests/python/test_numba.py uses the fake Numba in tests/python/fake_numba,
which can drift from the real API. This runs the plugin class in a real
numba-cuda: Numba's set_memory_manager accepts it (its interface version, no
abstract method left), and memalloc returns Numba's own MemoryPointer whose
views, finalizer, defer_cleanup (with the real HostOnlyCUDAMemoryManager's
part), reset and OOM error behave as Numba expects. A Numba context needs a
GPU, so the manager gets a stand-in context naming a device, and cudalloc
runs on the sim backend; tests/gpu/test_numba.py does the rest on a GPU.

The interpreter is $CUDALLOC_NUMBA_PYTHON, a Python with numba-cuda (whose
import needs the CUDA runtime library: pip install numba-cuda
nvidia-cuda-runtime-cu12 gives both, no GPU needed). Skipped when it is unset.
"""

import os
import subprocess
import textwrap

import pytest

from conftest import SIM_CONF, child_env

PY = os.environ.get("CUDALLOC_NUMBA_PYTHON")
pytestmark = pytest.mark.skipif(
    not PY, reason="CUDALLOC_NUMBA_PYTHON is unset (a Python with numba-cuda)"
)

CODE = textwrap.dedent(
    """
    import gc, warnings
    warnings.simplefilter("ignore")
    import numba
    from numba import cuda
    from numba.cuda.cudadrv import driver as drv
    assert not getattr(numba, "__fake__", False), numba.__file__
    import cudalloc
    import cudalloc.numba as plugin

    cuda.set_memory_manager(plugin.CudallocNumbaManager)   # Numba checks the version here
    assert not plugin.CudallocNumbaManager.__abstractmethods__

    class Context:          # what the manager reads of Numba's Context
        pass
    ctx = Context()
    ctx.device = type("Device", (), {"id": 1})()
    mm = plugin.CudallocNumbaManager(context=ctx)
    mm.initialize()
    p = mm.memalloc(4000)
    assert type(p) is drv.MemoryPointer and p.size == 4000
    assert p.device_pointer_value and cudalloc.memory_allocated(1) == 4096
    v = p.view(512)                         # Numba's own view code on our pointer
    assert v.device_pointer_value - p.device_pointer_value == 512 and v.size == 3488
    with mm.defer_cleanup():
        assert mm.deallocations.is_disabled # the host part deferred too
        del p, v
        gc.collect()
        assert cudalloc.memory_allocated(1) == 4096
    assert cudalloc.memory_allocated(1) == 0
    q = mm.memalloc(1 << 20)
    try:
        mm.get_ipc_handle(q)
    except NotImplementedError as e:
        assert "does not support CUDA IPC" in str(e)
    else:
        raise AssertionError("IPC handle")
    z = mm.memalloc(0)
    assert not z.device_pointer_value and z.size == 0
    try:
        mm.memalloc(1 << 40)
    except drv.CudaAPIError as e:
        assert int(e.code) == 2, e.code        # CUDA_ERROR_OUT_OF_MEMORY
    else:
        raise AssertionError("1 TiB on the sim's 1 GiB")
    mm.reset()
    assert cudalloc.memory_allocated(1) == 0 and cudalloc.memory_reserved(1) == 0
    del q
    gc.collect()
    assert cudalloc.raw_stats(1)["num_invalid_frees"] == 0
    print("ok", numba.__version__)
    """
)


def test_the_plugin_in_a_real_numba():
    r = subprocess.run(
        [PY, "-c", CODE],
        env=child_env(CUDALLOC_CONF=SIM_CONF),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout.startswith("ok"), r.stdout
