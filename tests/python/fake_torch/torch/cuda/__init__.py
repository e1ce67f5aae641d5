import ctypes

from . import memory
from .memory import *  # noqa: F401,F403  (torch.cuda re-exports torch.cuda.memory)

_initialized = False
DEVICE_COUNT = 2


def is_initialized():
    return _initialized


def is_available():
    return True


def device_count():
    return DEVICE_COUNT


def _lazy_init():
    global _initialized
    if _initialized:
        return
    _initialized = True
    a = memory._current
    if a is not None and a._init_fn:
        ctypes.CFUNCTYPE(None, ctypes.c_int)(a._init_fn)(DEVICE_COUNT)


def init():
    _lazy_init()


def current_device():
    _lazy_init()
    return 0


def _allocate(nbytes, dev, stream):
    _lazy_init()
    a = memory._current
    if a is None:  # "native": hand out fake addresses
        memory._native_live += nbytes
        return 0x1000 + memory._native_live
    f = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
    ptr = f(a._alloc_fn)(nbytes, dev, stream)
    if not ptr and nbytes:
        if getattr(a, "_throws", False):
            # What torch makes of cudalloc_malloc_torch's C++ exception.
            lib = a._lib
            lib.cudalloc_last_error_message.restype = ctypes.c_char_p
            raise RuntimeError("CUDA out of memory. (fake torch) "
                               + lib.cudalloc_last_error_message().decode())
        # What real torch does with a NULL: nothing at once, and this error
        # only from a typed data_ptr<T>() later (kernels may get address 0).
        raise RuntimeError(
            "The tensor has a non-zero number of elements, but its data is not allocated yet."
        )
    return ptr or 0


def _deallocate(ptr, nbytes, dev, stream):
    a = memory._current
    if a is None:
        memory._native_live -= nbytes
        return
    f = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
    f(a._free_fn)(ptr, nbytes, dev, stream)


def _record_stream(ptr, stream):
    a = memory._current
    if a is not None and a._record_stream_fn:
        ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(a._record_stream_fn)(ptr, stream)


def empty_cache():
    a = memory._current
    if a is not None and a._reset_fn:
        ctypes.CFUNCTYPE(None)(a._reset_fn)()


def set_per_process_memory_fraction(fraction, device=None):
    _lazy_init()
    a = memory._current
    if a is not None and a._memory_fraction_fn:
        dev = 0 if device is None else int(device)
        ctypes.CFUNCTYPE(None, ctypes.c_double, ctypes.c_int)(a._memory_fraction_fn)(fraction, dev)
