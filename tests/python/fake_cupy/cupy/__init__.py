"""A tiny stand-in for CuPy (tests only; CI has no CuPy and no GPU).

It mirrors the parts of CuPy's API that cudalloc.cupy touches, with the
names, signatures and behaviour of the real ones (cupy/cuda/memory.pyx,
stream.pyx, device.pyx, cupy_backends/cuda/api/runtime.pyx):
- cupy.cuda.set_allocator(allocator=None) / get_allocator() / alloc(size);
  set_allocator refuses inside using_allocator; None means raw cudaMalloc;
- at import, CuPy's default memory pool is the allocator (as in real CuPy);
- cupy.cuda.UnownedMemory(ptr, size, owner, device_id=-1) keeps `owner`
  alive, and cannot look a null pointer's device up;
- cupy.cuda.MemoryPointer(mem, offset) with .ptr, .device_id, .mem;
- cupy.cuda.get_current_stream() is the null stream (ptr 0), the stream of
  a `with stream:` block, or the per-thread default stream (ptr 2) when
  CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1;
- cupy.cuda.runtime.getDevice() is the current device, set by
  cupy.cuda.Device(i).use() or `with cupy.cuda.Device(i):`;
- cupy.cuda.memory.OutOfMemoryError(size, total, limit) is a MemoryError.
Arrays hold their memory as real CuPy's do (ndarray.data, a MemoryPointer),
so dropping the last reference frees it through its owner.
"""

__fake__ = True

from . import cuda  # noqa: E402
from .cuda import memory as _memory  # noqa: E402

_ITEMSIZE = {"uint8": 1, "int8": 1, "float16": 2, "int32": 4, "float32": 4, "int64": 8, "float64": 8}


class ndarray:
    """Only what the tests need: memory from the current allocator."""

    def __init__(self, shape, dtype="float64", memptr=None):
        n = shape if isinstance(shape, int) else _prod(shape)
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.dtype = dtype
        self.itemsize = _ITEMSIZE[str(dtype)]
        self.nbytes = n * self.itemsize
        self.data = memptr if memptr is not None else cuda.alloc(self.nbytes)

    @property
    def device(self):
        return self.data.device


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def empty(shape, dtype="float64"):
    return ndarray(shape, dtype)


def zeros(shape, dtype="float64"):
    return ndarray(shape, dtype)  # no kernels here: the memory is what matters


_default_memory_pool = _memory.MemoryPool()


def get_default_memory_pool():
    return _default_memory_pool


cuda.set_allocator(_default_memory_pool.malloc)
