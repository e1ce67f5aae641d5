"""cupy.cuda.Device: the current device is per thread (runtime.setDevice)."""

from . import runtime


def get_device_id():
    return runtime.getDevice()


class Device:
    def __init__(self, device=None):
        self.id = runtime.getDevice() if device is None else int(device)
        self._before = []

    def use(self):
        runtime.setDevice(self.id)

    def __enter__(self):
        self._before.append(runtime.getDevice())
        runtime.setDevice(self.id)
        return self

    def __exit__(self, *exc):
        runtime.setDevice(self._before.pop())

    def __int__(self):
        return self.id

    def __repr__(self):
        return f"<CUDA Device {self.id}>"
