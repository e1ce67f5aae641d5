"""A tiny stand-in for Numba's CUDA target (tests only; CI has no Numba and no GPU).

numba/cuda/cudadrv/driver.py here follows the real module's External Memory
Management (EMM) plugin interface (numba-cuda's numba_cuda/numba/cuda/cudadrv/driver.py):
BaseCUDAMemoryManager (abstract: memalloc, memhostalloc, mempin, initialize,
get_ipc_handle, get_memory_info, reset, defer_cleanup, interface_version),
HostOnlyCUDAMemoryManager (allocations, deallocations, reset, defer_cleanup),
MemoryPointer (context, pointer, size, owner, finalizer via weakref.finalize),
MemoryInfo(free, total), set_memory_manager (checks interface_version on an
instance made with context=None), and the NUMBA_CUDA_MEMORY_MANAGER lookup
(the module's _numba_memory_manager; any failure becomes RuntimeError, as in
the real one). Pointers are ctypes c_size_t (drvapi.cu_device_ptr), or, with
FAKE_NUMBA_NV_BINDING=1, CUdeviceptr objects as with NVIDIA's bindings (the
default of newer numba-cuda). The fake driver reports FAKE_FREE of
FAKE_TOTAL bytes from cuMemGetInfo.
"""

__fake__ = True
