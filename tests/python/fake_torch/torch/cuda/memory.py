import ctypes

__all__ = [
    "CUDAPluggableAllocator",
    "change_current_allocator",
    "memory_stats",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "max_memory_reserved",
    "reset_peak_memory_stats",
    "memory_summary",
]

_current = None  # the installed _CUDAPluggableAllocator, or None (native)
_native_live = 0
created = []  # every CUDAPluggableAllocator made: (path, alloc name, free name)


class _CUDAPluggableAllocator:
    def __init__(self, alloc_fn, free_fn):
        self._alloc_fn = alloc_fn
        self._free_fn = free_fn
        self._init_fn = self._reset_fn = None
        self._record_stream_fn = self._memory_fraction_fn = None
        self._begin_allocate_to_pool_fn = None
        self._end_allocate_to_pool_fn = self._release_pool_fn = None

    def set_init_fn(self, ptr):
        self._init_fn = int(ptr)

    def set_reset_fn(self, ptr):
        self._reset_fn = int(ptr)

    def set_record_stream_fn(self, ptr):
        self._record_stream_fn = int(ptr)

    def set_memory_fraction_fn(self, ptr):
        self._memory_fraction_fn = int(ptr)

    def set_end_allocate_to_pool_fn(self, ptr):
        self._end_allocate_to_pool_fn = int(ptr)

    def set_release_pool(self, ptr):
        self._release_pool_fn = int(ptr)

    def set_begin_allocate_to_pool(self, ptr):
        # Not called here: it throws a C++ exception, which ctypes cannot
        # carry (tests/cxx_alloc_fn.rs calls it as torch does).
        self._begin_allocate_to_pool_fn = int(ptr)


class CUDAPluggableAllocator:
    def __init__(self, path_to_so_file, alloc_fn_name, free_fn_name):
        lib = ctypes.CDLL(path_to_so_file)
        alloc = ctypes.cast(getattr(lib, alloc_fn_name), ctypes.c_void_p).value
        free = ctypes.cast(getattr(lib, free_fn_name), ctypes.c_void_p).value
        created.append((path_to_so_file, alloc_fn_name, free_fn_name))
        self._allocator = _CUDAPluggableAllocator(alloc, free)
        self._allocator._lib = lib
        # Real torch calls alloc_fn from C++ and turns a C++ exception into
        # RuntimeError. ctypes cannot carry one (cudalloc_malloc_torch throws
        # wherever libstdc++ is loaded), so the fake calls the non-throwing
        # twin and raises what torch would (tests/cxx_alloc_fn.rs covers the
        # throw itself).
        if alloc_fn_name == "cudalloc_malloc_torch":
            self._allocator._alloc_fn = ctypes.cast(lib.cudalloc_malloc, ctypes.c_void_p).value
        self._allocator._throws = alloc_fn_name == "cudalloc_malloc_torch"

    def allocator(self):
        return self._allocator


def change_current_allocator(allocator):
    global _current
    from . import is_initialized

    if is_initialized():
        raise RuntimeError("Can't swap an already initialized allocator")
    _current = allocator.allocator()


def _pluggable_raises(what):
    if _current is not None:
        raise RuntimeError(f"CUDAPluggableAllocator does not yet support {what}. "
                           "If you need it, please file an issue describing your use case.")


def memory_stats(device=None):
    _pluggable_raises("getDeviceStats")
    return {"allocated_bytes.all.current": _native_live}


def memory_allocated(device=None):
    return memory_stats(device).get("allocated_bytes.all.current", 0)


def max_memory_allocated(device=None):
    return memory_stats(device).get("allocated_bytes.all.peak", 0)


def memory_reserved(device=None):
    return memory_stats(device).get("reserved_bytes.all.current", 0)


def max_memory_reserved(device=None):
    return memory_stats(device).get("reserved_bytes.all.peak", 0)


def reset_peak_memory_stats(device=None):
    _pluggable_raises("resetPeakStats")


def memory_summary(device=None, abbreviated=False):
    return str(memory_stats(device))
