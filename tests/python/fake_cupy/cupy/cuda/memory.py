"""cupy/cuda/memory.pyx, as far as cudalloc.cupy uses it (and CuPy's own
allocators, handing out fake addresses without touching cudalloc)."""

import contextlib
import itertools
import threading

from . import device

_fake_addresses = itertools.count(0x10_0000_0000, 1 << 20)  # CuPy's own "cudaMalloc"
raw_live = {}  # ptr -> size of what CuPy's own allocators hold (for the tests)


class OutOfMemoryError(MemoryError):
    def __init__(self, size, total, limit=0):
        self._size = size
        self._total = total
        self._limit = limit
        if limit == 0:
            msg = "Out of memory allocating {:,} bytes".format(size)
            if total != -1:
                msg += " (allocated so far: {:,} bytes).".format(total)
        else:
            msg = (
                "Out of memory allocating {:,} bytes "
                "(allocated so far: {:,} bytes, "
                "limit set to: {:,} bytes).".format(size, total, limit)
            )
        super().__init__(msg)

    def __reduce__(self):
        return (type(self), (self._size, self._total, self._limit))


class BaseMemory:
    ptr = 0
    size = 0
    device_id = -1

    def __int__(self):
        return self.ptr

    @property
    def device(self):
        return device.Device(self.device_id)


class Memory(BaseMemory):
    """CuPy's raw cudaMalloc allocation (fake address, freed on drop)."""

    def __init__(self, size):
        self.size = size
        self.device_id = device.get_device_id()
        self.ptr = 0
        if size > 0:
            self.ptr = next(_fake_addresses)
            raw_live[self.ptr] = size

    def __del__(self):
        if self.ptr:
            raw_live.pop(self.ptr, None)


class UnownedMemory(BaseMemory):
    def __init__(self, ptr, size, owner, device_id=-1):
        if device_id < 0:
            if ptr == 0:
                raise RuntimeError("UnownedMemory requires explicit device ID for a null pointer.")
            # Real CuPy asks cudaPointerGetAttributes here; the fake cannot,
            # and cudalloc.cupy must not need it (it knows the device).
            raise RuntimeError("fake cupy: UnownedMemory without device_id would query the driver")
        self.size = int(size)
        self.device_id = int(device_id)
        self.ptr = int(ptr)
        self._owner = owner


class MemoryPointer:
    def __init__(self, mem, offset):
        if not isinstance(mem, BaseMemory):
            raise TypeError(f"Argument 'mem' has incorrect type (expected BaseMemory, got {type(mem).__name__})")
        assert mem.ptr != 0 or offset == 0
        self.ptr = mem.ptr + offset
        self.device_id = mem.device_id
        self.mem = mem

    def __int__(self):
        return self.ptr

    @property
    def device(self):
        return device.Device(self.device_id)

    def __add__(self, offset):
        return MemoryPointer(self.mem, self.ptr - self.mem.ptr + offset)

    def __repr__(self):
        return "<{} 0x{:x} device={} mem={!r}>".format(
            type(self).__name__, self.ptr, self.device_id, self.mem
        )


def _malloc(size):
    return MemoryPointer(Memory(size), 0)


class MemoryPool:
    """CuPy's default pool, reduced to what the tests observe: bytes in use."""

    def __init__(self):
        self._used = 0

    def malloc(self, size):
        mem = Memory(size)
        self._used += size
        return MemoryPointer(mem, 0)

    def used_bytes(self):
        return self._used

    def free_all_blocks(self, stream=None):
        pass


_current_allocator = _malloc
_thread_local = threading.local()


def alloc(size):
    return get_allocator()(size)


def set_allocator(allocator=None):
    global _current_allocator
    if allocator is None:
        allocator = _malloc
    if getattr(_thread_local, "allocator", None) is not None:
        raise ValueError("Can't change the global allocator inside `using_allocator` context manager")
    _current_allocator = allocator


def get_allocator():
    allocator = getattr(_thread_local, "allocator", None)
    return _current_allocator if allocator is None else allocator


@contextlib.contextmanager
def using_allocator(allocator=None):
    previous = getattr(_thread_local, "allocator", None)
    _thread_local.allocator = allocator if allocator is not None else _malloc
    try:
        yield
    finally:
        _thread_local.allocator = previous
