"""numba.cuda, as far as the tests use it."""

import contextlib

from .cudadrv import devices
from .cudadrv.driver import (  # noqa: F401
    BaseCUDAMemoryManager,
    GetIpcHandleMixin,
    HostOnlyCUDAMemoryManager,
    IpcHandle,
    MemoryInfo,
    MemoryPointer,
    set_memory_manager,
)

_ITEMSIZE = {"uint8": 1, "int8": 1, "float16": 2, "int32": 4, "float32": 4, "int64": 8, "float64": 8}


def current_context(devnum=None):
    return devices.get_context(devnum)


def select_device(device_id):
    devices.select(device_id)
    return devices.get_context().device


def get_current_device():
    return devices.get_context().device


def close():
    devices.reset()


@contextlib.contextmanager
def defer_cleanup():
    with current_context().defer_cleanup():
        yield


class DeviceNDArray:
    """Holds gpu_data from the context's memalloc, as numba's device arrays do."""

    def __init__(self, shape, dtype="float64"):
        n = shape if isinstance(shape, int) else _prod(shape)
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.dtype = dtype
        self.alloc_size = n * _ITEMSIZE[str(dtype)]
        ctx = devices.get_context()
        if self.alloc_size > 0:
            self.gpu_data = ctx.memalloc(self.alloc_size)
        else:
            self.gpu_data = ctx.memalloc(0)

    @property
    def device_ctypes_pointer(self):
        return self.gpu_data.device_ctypes_pointer

    def get_ipc_handle(self):
        return devices.get_context().get_ipc_handle(self.gpu_data)


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def device_array(shape, dtype="float64", strides=None, order="C", stream=0):
    return DeviceNDArray(shape, dtype)
