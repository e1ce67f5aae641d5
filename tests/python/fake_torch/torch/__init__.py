"""A tiny stand-in for PyTorch (tests only; CI has no torch).

It mirrors what cudalloc touches, with the real behaviour where it matters:
- torch.cuda.memory.CUDAPluggableAllocator(path, alloc, free) loads the .so
  with ctypes and keeps raw function addresses, like the real one;
- .allocator() has set_init_fn / set_reset_fn / set_record_stream_fn /
  set_memory_fraction_fn taking raw addresses (torch/csrc/cuda/Module.cpp);
- change_current_allocator refuses once CUDA is initialised;
- memory_stats() & co. raise under a pluggable allocator;
- a tensor's memory comes from the installed alloc function, and a NULL
  becomes a generic RuntimeError, not an OutOfMemoryError.
"""

import sys

__fake__ = True
IMPORTS = getattr(sys, "_fake_torch_imports", 0) + 1
sys._fake_torch_imports = IMPORTS

from . import cuda  # noqa: E402  (real torch imports torch.cuda at import time)
from . import accelerator  # noqa: E402,F401  (torch >= 2.9)


class device:
    def __init__(self, spec, index=None):
        kind, _, idx = str(spec).partition(":")
        self.type = kind
        self.index = int(idx) if idx else index

    def __repr__(self):
        return f"device(type={self.type!r}, index={self.index})"


class Tensor:
    """Holds `nbytes` of device memory from the current allocator."""

    def __init__(self, nbytes, dev=0, stream=0):
        self.device_index = dev
        self.nbytes = nbytes
        self.stream = stream
        self.ptr = cuda._allocate(nbytes, dev, stream)

    def record_stream(self, stream):
        cuda._record_stream(self.ptr, stream)

    def free(self):
        if self.ptr:
            cuda._deallocate(self.ptr, self.nbytes, self.device_index, self.stream)
            self.ptr = 0

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


def empty(nbytes, device="cuda:0"):
    dev = device if isinstance(device, int) else int(str(device).partition(":")[2] or 0)
    return Tensor(nbytes, dev)
