"""The few names of NVIDIA's cuda.bindings.driver that the driver uses."""

import enum


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2


class _Handle:
    def __init__(self, init_value=0):
        self._value = int(init_value)

    def __int__(self):
        return self._value

    def __index__(self):
        return self._value

    def __repr__(self):
        return f"<{type(self).__name__} {self._value}>"

    def getPtr(self):
        return id(self)


class CUdeviceptr(_Handle):
    pass


class CUdevice(_Handle):
    pass
