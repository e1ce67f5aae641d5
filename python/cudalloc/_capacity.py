"""Capacity queries: safety checks before a large allocation.

Both answer a snapshot: other threads and processes allocate and free
meanwhile, so the answer is a good guess, not a promise.
"""

import numbers
import operator
import sys

from . import _lib
from ._stats import device_index

_SIZE_MAX = 2**64 - 1


def _stream(stream, device):
    """A raw ``CUstream`` value from None / int / an object with ``cuda_stream``
    (``torch.cuda.Stream``). None is torch's current stream on ``device`` when
    torch has initialised CUDA, else 0 (the legacy default stream)."""
    if stream is None:
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                return int(torch.cuda.current_stream(device).cuda_stream)
        except Exception:  # a torch without CUDA support: fall through
            pass
        return 0
    if isinstance(stream, bool):
        raise TypeError(f"invalid stream {stream!r}")
    handle = getattr(stream, "cuda_stream", stream)
    if not hasattr(type(handle), "__index__"):
        raise TypeError(
            f"invalid stream {stream!r}: expected a CUstream value (int) or a torch.cuda.Stream"
        )
    value = operator.index(handle)
    if not 0 <= value <= _SIZE_MAX:
        raise _lib.InvalidArgumentError(f"invalid stream {stream!r}", _lib.ERR_INVALID_ARGUMENT)
    return value


def can_allocate(size, device=None, stream=None):
    """Whether a request of ``size`` bytes on ``device`` (for ``stream``) could
    be served now without running out of memory, counting cudalloc's cache (a
    free block of the stream's own, or idle segments it would adopt or
    release), the device's free memory and the limit (``max_memory``,
    ``memory_fraction``). Size 0 is True.

    The cache is per stream, so the answer is for ``stream``: a
    ``torch.cuda.Stream``, a raw ``CUstream`` int, or None for torch's current
    stream (0, the legacy default stream, without torch). It allocates
    nothing and changes no statistic. A snapshot: True is no promise that the
    allocation that follows succeeds (another thread or process may take the
    memory first). Raises :class:`InvalidDeviceError` for a bad device."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(f"can_allocate(): size must be an int, not {type(size).__name__}")
    size = int(size)
    if size < 0:
        raise _lib.InvalidArgumentError(
            f"can_allocate(): size {size} is negative", _lib.ERR_INVALID_ARGUMENT
        )
    index = device_index(device)
    handle = _stream(stream, index)
    fn = _export("cudalloc_can_allocate")
    # Past size_t: never served, but the device is still checked.
    r = fn(min(size, _SIZE_MAX), index, handle)
    if r < 0:
        _lib.check_last()
    return r == 1 and size <= _SIZE_MAX


def is_low_memory(device=None):
    """Whether ``device``'s memory is low: its pressure level, sampled from the
    driver now, is HIGH or CRITICAL (80% or more of the device's memory in
    use, by any process, cudalloc's own idle cache included). Records no
    pressure event (``memory_stats()['cudalloc.pressure_level']`` is the last
    periodic sample). Raises :class:`InvalidDeviceError` for a bad device."""
    r = _export("cudalloc_is_low_memory")(device_index(device))
    if r < 0:
        _lib.check_last()
    return r == 1


def _export(name):
    if not _lib.has(name):
        raise _lib.CudallocError(f"this libcudalloc.so ({_lib.loaded_path()}) has no {name}")
    return getattr(_lib.lib(), name)
