"""CuPy: cudalloc as CuPy's device-memory allocator.

    import cupy
    import cudalloc.cupy
    cudalloc.cupy.enable()       # cupy.cuda.set_allocator(cudalloc.cupy.allocator)
    x = cupy.zeros(1 << 20)      # served by cudalloc
    cudalloc.memory_stats()      # the same figures as for PyTorch

:func:`allocator` serves CuPy's current device and current stream
(``cupy.cuda.get_current_stream()``), stream-ordered as for PyTorch: a block
CuPy drops goes back to cudalloc's cache on the stream it was allocated on,
is reused there at once, and reaches other streams only once its free is
known complete. CuPy's own memory pool is bypassed (``cupy.get_default_memory_pool()``
stays empty); :func:`disable` puts back the allocator that was there before.

Importing this module does not import CuPy: without CuPy, :func:`enable`
and :func:`allocator` raise ImportError saying what to install.
"""

import operator
import os
import threading
import warnings

from . import _frameworks, _lib

__all__ = ["allocator", "disable", "enable", "is_enabled"]

_PTDS_ENV = "CUPY_CUDA_PER_THREAD_DEFAULT_STREAM"

_lock = threading.Lock()
_enabled = False
_previous = None  # CuPy's allocator before enable(), put back by disable()


def _cupy():
    """The ``cupy`` module, or ImportError saying what to install."""
    try:
        import cupy
    except ImportError as e:
        raise ImportError(
            f"cudalloc.cupy needs CuPy, which cannot be imported here ({e}). "
            "Install the CuPy wheel for your CUDA version, e.g. "
            "`pip install cupy-cuda12x` (CUDA 12) or `pip install cupy-cuda11x` (CUDA 11)",
            name="cupy",
        ) from None
    return cupy


class _Block:
    """The owner of one cudalloc allocation behind a ``cupy.cuda.UnownedMemory``.

    CuPy keeps the owner alive as long as any array uses the memory; when
    the last reference goes, the block goes back to cudalloc with the device
    and stream it was allocated on (its stream-ordered free).
    """

    __slots__ = ("ptr", "size", "device", "stream", "_free")

    def __init__(self, ptr, size, device, stream, free):
        self.ptr = ptr
        self.size = size
        self.device = device
        self.stream = stream
        self._free = free  # cudalloc_free, held so a free at exit needs no module global

    def free(self):
        """Give the block back now (idempotent)."""
        ptr, self.ptr = self.ptr, 0
        if ptr:
            self._free(ptr, self.size, self.device, self.stream)

    def __del__(self):
        try:
            self.free()
        except Exception:  # a destructor must not raise (e.g. during interpreter exit)
            pass

    def __repr__(self):
        return (
            f"<cudalloc block 0x{self.ptr:x} size={self.size} device={self.device} "
            f"stream=0x{self.stream:x}>"
        )


def allocator(size):
    """CuPy allocator: ``size`` bytes from cudalloc on CuPy's current device
    and current stream, as a ``cupy.cuda.MemoryPointer`` over a
    ``cupy.cuda.UnownedMemory`` whose owner frees it through cudalloc.

    Use it with ``cupy.cuda.set_allocator(cudalloc.cupy.allocator)``, or call
    :func:`enable`. On out-of-memory (after cudalloc has flushed its cache),
    it runs ``gc.collect()`` and, if that found garbage (arrays in reference
    cycles), tries once more, as CuPy's own pool does; then it raises
    ``cupy.cuda.memory.OutOfMemoryError`` with cudalloc's diagnosis.
    """
    cupy = _cupy()
    size = operator.index(size)
    if size < 0:
        raise ValueError(f"cudalloc.cupy.allocator: size must be >= 0, not {size}")
    device = int(cupy.cuda.runtime.getDevice())
    stream = int(cupy.cuda.get_current_stream().ptr)
    ptr, code, message = _lib.malloc_or_collect(size, device, stream)
    if not ptr and size > 0:
        raise _error(cupy, code, message, size, device)
    if not ptr:
        # size 0: CuPy's own allocators give a null pointer too. UnownedMemory
        # needs the device named, since a null pointer cannot be looked up.
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device), 0)
    owner = _Block(ptr, size, device, stream, _lib.lib().cudalloc_free)
    mem = cupy.cuda.UnownedMemory(ptr, size, owner, device)
    return cupy.cuda.MemoryPointer(mem, 0)


def _error(cupy, code, message, size, device):
    if code != _lib.ERR_OUT_OF_MEMORY:
        return _lib.error_for(code, message)
    try:
        stats = _lib.raw_stats(device)
        total, limit = stats["allocated_bytes"], stats["limit_bytes"]
    except _lib.CudallocError:
        total, limit = -1, 0
    err = cupy.cuda.memory.OutOfMemoryError(size, total, limit)
    err.args = (f"{err.args[0] if err.args else ''}\n{message}".strip(),)
    return err


def enable(conf=None):
    """Make cudalloc CuPy's allocator (``cupy.cuda.set_allocator``).

    ``conf``: a ``CUDALLOC_CONF``-style string (default: the environment's).
    cudalloc is one allocator per process: when PyTorch's
    :func:`cudalloc.enable` (or Numba's plugin) started it already, this
    joins it with ``conf=None``; a ``conf`` other than the one in force is
    refused (:class:`cudalloc.CudallocError`). Raises ImportError without
    CuPy, :class:`cudalloc.ConfigError` naming a bad key. Idempotent.
    Returns :func:`allocator`.
    """
    global _enabled, _previous
    cupy = _cupy()
    with _lock:
        _frameworks.start(conf, "cudalloc.cupy.enable()", "CuPy")
        get = getattr(cupy.cuda, "get_allocator", None)  # CuPy >= 8
        current = get() if get is not None else None
        if current is not allocator:
            _previous = current
        cupy.cuda.set_allocator(allocator)
        _enabled = True
    if os.environ.get(_PTDS_ENV, "0") not in ("", "0"):
        warnings.warn(
            f"cudalloc: with {_PTDS_ENV}=1 every thread's default stream has the same "
            "handle, so cudalloc cannot tell them apart: memory one thread frees on its "
            "default stream may be handed to another thread's before the first thread's "
            "work is done. With several threads, give each its own cupy.cuda.Stream",
            stacklevel=2,
        )
    return allocator


def disable():
    """Put back CuPy's allocator from before :func:`enable` (CuPy's default
    memory pool when there was none to remember). Arrays already allocated
    stay cudalloc's and go back to it when dropped."""
    global _enabled, _previous
    cupy = _cupy()
    with _lock:
        if not _enabled:
            return
        previous = _previous
        if previous is None:
            previous = cupy.get_default_memory_pool().malloc
        cupy.cuda.set_allocator(previous)
        _enabled, _previous = False, None


def is_enabled():
    """Whether :func:`allocator` is CuPy's allocator now (False without CuPy imported)."""
    import sys

    cupy = sys.modules.get("cupy")
    if cupy is None:
        return False
    get = getattr(cupy.cuda, "get_allocator", None)
    return get() is allocator if get is not None else _enabled
