"""Numba: cudalloc as an External Memory Management (EMM) plugin.

    NUMBA_CUDA_MEMORY_MANAGER=cudalloc.numba python script.py

or, in code, before the first CUDA context is made::

    from numba import cuda
    import cudalloc.numba
    cuda.set_memory_manager(cudalloc.numba.CudallocNumbaManager)

Numba then allocates device memory (``cuda.device_array``, ``cuda.to_device``,
...) through cudalloc, in the same cache and statistics as PyTorch and CuPy
in the process. Pinned and mapped host memory stay Numba's own
(``HostOnlyCUDAMemoryManager``).

Streams. Numba's ``memalloc(size)`` has no stream argument, so cudalloc
serves and frees every Numba allocation on the legacy default stream
(stream 0). A block freed there is reused at once by the next Numba
allocation. Work on other streams is safe when it is done, or when those
streams are blocking ones (``cuda.stream()``): the legacy default stream waits for
them. Before dropping an array still used by work on a non-blocking stream,
synchronise that stream, or keep the array until it is done, as with any
stream-ordered pool.

Not supported: CUDA IPC (``get_ipc_handle`` raises): cudalloc's blocks live
inside larger segments, which it may reuse or release.

This module imports Numba; ``import cudalloc`` does not import it.
"""

import contextlib
import threading
import weakref

from . import _frameworks, _lib

try:
    from numba.cuda.cudadrv import driver as _driver
except ImportError as _e:
    raise ImportError(
        f"cudalloc.numba needs Numba's CUDA target, which cannot be imported here ({_e}). "
        "Install it with `pip install numba-cuda` (or `pip install numba` for the "
        "CUDA target bundled with older Numba)",
        name="numba",
    ) from None

__all__ = ["CudallocNumbaManager", "CudallocIpcError"]

# The version of the EMM plugin interface this implements (numba's
# _SUPPORTED_EMM_INTERFACE_VERSION).
INTERFACE_VERSION = 1


class CudallocIpcError(_lib.CudallocError, NotImplementedError):
    """CUDA IPC is not supported for memory from cudalloc."""


def _nv_binding():
    """Whether Numba talks to CUDA through NVIDIA's cuda-python bindings
    (pointers are ``CUdeviceptr``) rather than its own ctypes ones
    (``c_size_t``). Newer numba-cuda has only the former."""
    return bool(getattr(_driver, "USE_NV_BINDING", True))


def _device_pointer(address):
    """``address`` as the pointer type Numba's MemoryPointer expects (what
    Numba's own ``MemoryPointer.view`` builds)."""
    if _nv_binding():
        binding = getattr(_driver, "binding", None)
        if binding is None:
            from cuda.bindings import driver as binding
        return binding.CUdeviceptr(address)
    from numba.cuda.cudadrv import drvapi

    return drvapi.cu_device_ptr(address)


def _oom_code():
    if _nv_binding():
        return _driver.binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY
    from numba.cuda.cudadrv import enums

    return enums.CUDA_ERROR_OUT_OF_MEMORY


class _Started:
    """cudalloc starts at most once per process from here (the first context)."""

    lock = threading.Lock()
    done = False


class CudallocNumbaManager(_driver.HostOnlyCUDAMemoryManager):
    """Numba's EMM plugin interface (version 1) served by cudalloc.

    One instance per Numba context (one per device: Numba uses primary
    contexts, as cudalloc does). Device memory comes from cudalloc on the
    context's device and the legacy default stream; host memory is
    ``HostOnlyCUDAMemoryManager``'s.
    """

    def __init__(self, *args, **kwargs):
        # Numba makes one with context=None to read interface_version: this
        # must not touch the context or the device.
        super().__init__(*args, **kwargs)
        # Reentrant: a finalizer may run (from the garbage collector) while
        # this thread holds it.
        self._live_lock = threading.RLock()
        self._live = {}  # address -> (size, device): handed out by this manager, not yet freed
        self._defer_depth = 0
        self._deferred = []  # addresses whose free waits for defer_cleanup to end

    # -- the EMM plugin interface -------------------------------------------

    def initialize(self):
        """Start cudalloc (``backend:cuda`` under ``CUDALLOC_CONF``), or join
        the cudalloc PyTorch's or CuPy's enable() started. Numba calls this
        whenever the context is made current; it starts once."""
        with _Started.lock:
            if not _Started.done:
                _frameworks.start(None, "cudalloc.numba", "Numba", stacklevel=4)
                _Started.done = True

    def memalloc(self, size):
        """``size`` bytes from cudalloc on this context's device, legacy
        default stream; a ``MemoryPointer`` whose finalizer frees them. On
        out-of-memory (after cudalloc has flushed its cache) it runs
        ``gc.collect()`` and, if that found garbage, tries once more; then
        it raises ``CudaAPIError`` with ``CUDA_ERROR_OUT_OF_MEMORY``, as
        Numba's own manager does."""
        if not _Started.done:
            self.initialize()  # Numba pushes the context (and calls it) first
        size = int(size)
        device = self._device()
        ptr, code, message = _lib.malloc_or_collect(size, device, None)
        ctx = weakref.proxy(self.context)
        if not ptr and size == 0 and code == _lib.OK:
            return _driver.MemoryPointer(ctx, _device_pointer(0), 0)
        if not ptr:
            if code == _lib.ERR_OUT_OF_MEMORY:
                # What Numba's own manager raises on OOM (cuMemAlloc's error).
                raise _driver.CudaAPIError(_oom_code(), message)
            raise _lib.error_for(code, message)
        with self._live_lock:
            self._live[ptr] = (size, device)
        finalizer = _finalizer(weakref.ref(self), ptr, size, device, _lib.lib().cudalloc_free)
        return _driver.MemoryPointer(ctx, _device_pointer(ptr), size, finalizer=finalizer)

    def get_memory_info(self):
        """``MemoryInfo(free, total)`` for this context's device: ``total`` is
        the device's memory; ``free`` is what this process could still get:
        the driver's free memory plus cudalloc's cached free bytes, capped by
        cudalloc's limit (``max_memory`` / ``memory_fraction``) when one is set."""
        device = self._device()
        driver_free, total = self._driver_mem_info()
        stats = _lib.raw_stats(device)
        free = driver_free + stats["cached_free_bytes"]
        limit = stats["limit_bytes"]
        if limit:
            held = stats["reserved_bytes"] - stats["cached_free_bytes"]
            free = min(free, max(0, limit - held))
        return _driver.MemoryInfo(free=min(free, total), total=total)

    def get_ipc_handle(self, memory):
        raise CudallocIpcError(
            "cudalloc does not support CUDA IPC: its blocks live inside larger "
            "segments that it reuses and releases, so another process cannot map "
            "one safely. Allocate memory to share with Numba's own manager "
            "(unset NUMBA_CUDA_MEMORY_MANAGER) or with cuMemAlloc",
            _lib.ERR_UNSUPPORTED,
        )

    def reset(self):
        """Free every device allocation this manager made and still holds
        (Numba's context reset: ``cuda.close()``), then release cudalloc's
        unused cached segments (on every device: ``cudalloc_empty_cache``
        releases only what no allocation uses); host memory goes through
        ``super().reset()``."""
        super().reset()
        with self._live_lock:
            live = list(self._live.items())
            self._live.clear()
            self._deferred.clear()
        if _lib.loaded_path() is None:
            return  # cudalloc never started: nothing to free, and nothing to start
        lib = _lib.lib()
        for ptr, (size, device) in live:
            lib.cudalloc_free(ptr, size, device, None)
        lib.cudalloc_empty_cache()

    @contextlib.contextmanager
    def defer_cleanup(self):
        """While active (it nests), device frees wait, and happen when the
        outermost one ends; host frees wait too (``super().defer_cleanup()``)."""
        with super().defer_cleanup():
            with self._live_lock:
                self._defer_depth += 1
            try:
                yield
            finally:
                with self._live_lock:
                    self._defer_depth -= 1
                    due = self._deferred if self._defer_depth == 0 else []
                    if due:
                        self._deferred = []
                for ptr in due:
                    self._free(ptr)

    @property
    def interface_version(self):
        return INTERFACE_VERSION

    # -- helpers -------------------------------------------------------------

    def _device(self):
        # numba's Device.id: an int (ctypes binding) or a CUdevice (NVIDIA binding).
        return int(self.context.device.id)

    def _driver_mem_info(self):
        # As Numba's own manager asks it (the context is current).
        if _nv_binding():
            free, total = _driver.driver.cuMemGetInfo()
            return int(free), int(total)
        import ctypes

        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _driver.driver.cuMemGetInfo(ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def _release(self, ptr):
        """A MemoryPointer died: free now, or later when defer_cleanup ends."""
        with self._live_lock:
            if ptr not in self._live:
                return False  # reset() freed it already
            if self._defer_depth:
                self._deferred.append(ptr)
                return True
        self._free(ptr)
        return True

    def _free(self, ptr):
        with self._live_lock:
            entry = self._live.pop(ptr, None)
        if entry is not None:
            size, device = entry
            _lib.lib().cudalloc_free(ptr, size, device, None)


def _finalizer(manager_ref, ptr, size, device, free):
    """The MemoryPointer's finalizer. It holds the manager weakly (a manager
    must not live on because of its own pointers); if the manager is gone,
    the block goes back to cudalloc directly."""

    def finalize():
        manager = manager_ref()
        if manager is not None:
            manager._release(ptr)
        else:
            free(ptr, size, device, None)

    return finalize


# NUMBA_CUDA_MEMORY_MANAGER=cudalloc.numba: Numba imports this module and
# uses this class.
_numba_memory_manager = CudallocNumbaManager
