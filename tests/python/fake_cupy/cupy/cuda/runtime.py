"""cupy_backends.cuda.api.runtime, as far as cudalloc.cupy uses it."""

import threading

# cudaStreamLegacy and cudaStreamPerThread, as in the real module.
streamLegacy = 1
streamPerThread = 2
DEVICE_COUNT = 2

_tls = threading.local()


class CUDARuntimeError(RuntimeError):
    def __init__(self, status):
        self.status = status
        super().__init__(f"cudaError {status}")


errorInvalidDevice = 101


def getDeviceCount():
    return DEVICE_COUNT


def getDevice():
    return getattr(_tls, "device", 0)


def setDevice(device):
    if not 0 <= device < DEVICE_COUNT:
        raise CUDARuntimeError(errorInvalidDevice)
    _tls.device = device
