"""cupy.cuda.Stream and get_current_stream(): a thread-local current stream,
the null stream (ptr 0) by default, or the per-thread default stream
(runtime.streamPerThread) with CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1."""

import itertools
import os
import threading

from . import runtime

_tls = threading.local()
_handles = itertools.count(0x7F000000, 0x100)  # fake cudaStream_t values


class _BaseStream:
    def __init__(self, ptr, device_id):
        self.ptr = ptr
        self.device_id = device_id
        self._before = []

    def use(self):
        _tls.current = self
        return self

    def __enter__(self):
        self._before.append(getattr(_tls, "current", None))
        _tls.current = self
        return self

    def __exit__(self, *exc):
        _tls.current = self._before.pop()

    def synchronize(self):
        pass

    def __repr__(self):
        return f"<{type(self).__name__} 0x{self.ptr:x} (device {self.device_id})>"


class Stream(_BaseStream):
    def __init__(self, null=False, non_blocking=False, ptds=False):
        if null:
            ptr = 0
        elif ptds:
            ptr = runtime.streamPerThread
        else:
            ptr = next(_handles)
        super().__init__(ptr, runtime.getDevice())
        self.non_blocking = non_blocking


class ExternalStream(_BaseStream):
    def __init__(self, ptr, device_id=-1):
        super().__init__(int(ptr), device_id if device_id >= 0 else runtime.getDevice())


Stream.null = Stream(null=True)
Stream.ptds = Stream(ptds=True)


def get_current_stream(device_id=-1):
    current = getattr(_tls, "current", None)
    if current is not None:
        return current
    if os.environ.get("CUPY_CUDA_PER_THREAD_DEFAULT_STREAM", "0") not in ("", "0"):
        return Stream.ptds
    return Stream.null
