"""numba/cuda/cudadrv/driver.py, reduced to the EMM plugin interface (the
class and method names, signatures and the plugin lookup follow the real
module; the fake driver hands out fake addresses and fixed memory figures)."""

import contextlib
import ctypes
import importlib
import itertools
import os
import weakref
from abc import ABCMeta, abstractmethod
from collections import deque, namedtuple
from ctypes import byref

from . import drvapi, enums
from .error import CudaDriverError

USE_NV_BINDING = os.environ.get("FAKE_NUMBA_NV_BINDING") == "1"

if USE_NV_BINDING:
    from . import _fake_binding as binding  # real: from cuda.bindings import driver as binding

    CU_STREAM_DEFAULT = 0

FAKE_TOTAL = 1 << 30
FAKE_FREE = 768 << 20
DEVICE_COUNT = 2
SUPPORTS_IPC = True


class CudaAPIError(CudaDriverError):
    def __init__(self, code, msg):
        self.code = code
        self.msg = msg
        super().__init__(code, msg)

    def __str__(self):
        return "[%s] %s" % (self.code, self.msg)


class _FakeDriver:
    """The driver API calls the EMM code paths make, in both bindings' styles."""

    def __init__(self):
        self.devices = {}
        self.native_live = {}  # what Numba's own manager holds: ptr -> size
        self._addresses = itertools.count(0x30_0000_0000, 1 << 20)
        self.mem_get_info_calls = 0

    def get_device(self, devnum=0):
        if not 0 <= devnum < DEVICE_COUNT:
            raise CudaAPIError(101, "CUDA_ERROR_INVALID_DEVICE")
        dev = self.devices.get(devnum)
        if dev is None:
            dev = self.devices[devnum] = Device(devnum)
        return weakref.proxy(dev)

    def cuMemGetInfo(self, *args):
        self.mem_get_info_calls += 1
        if USE_NV_BINDING:
            assert not args, "cuda.bindings' cuMemGetInfo takes no argument"
            return FAKE_FREE, FAKE_TOTAL
        free, total = args  # byref(c_size_t) each
        free._obj.value = FAKE_FREE
        total._obj.value = FAKE_TOTAL

    def cuMemAlloc(self, *args):
        if USE_NV_BINDING:
            (size,) = args
            ptr = binding.CUdeviceptr(next(self._addresses))
            self.native_live[int(ptr)] = size
            return ptr
        out, size = args
        out._obj.value = next(self._addresses)
        self.native_live[out._obj.value] = size

    def cuMemFree(self, ptr):
        self.native_live.pop(int(ptr) if USE_NV_BINDING else ptr.value, None)


driver = _FakeDriver()


class Device:
    def __init__(self, devnum):
        self.id = binding.CUdevice(devnum) if USE_NV_BINDING else devnum
        self.primary_context = None

    def get_primary_context(self):
        if self.primary_context is None:
            self.primary_context = Context(weakref.proxy(self), handle=object())
        return self.primary_context

    def get_device_identity(self):
        return {"pci_domain_id": 0, "pci_bus_id": int(self.id), "pci_device_id": 0}

    def __repr__(self):
        return "<CUDA device %d 'Fake'>" % int(self.id)


class BaseCUDAMemoryManager(object, metaclass=ABCMeta):
    """Abstract base class for External Memory Management (EMM) Plugins."""

    def __init__(self, *args, **kwargs):
        if "context" not in kwargs:
            raise RuntimeError("Memory manager requires a context")
        self.context = kwargs.pop("context")

    @abstractmethod
    def memalloc(self, size):
        """Allocate on-device memory in the current context."""

    @abstractmethod
    def memhostalloc(self, size, mapped, portable, wc):
        """Allocate pinned host memory."""

    @abstractmethod
    def mempin(self, owner, pointer, size, mapped):
        """Pin a region of host memory that is already allocated."""

    @abstractmethod
    def initialize(self):
        """Perform any initialization required for the EMM plugin instance."""

    @abstractmethod
    def get_ipc_handle(self, memory):
        """Return an IPC handle from a GPU allocation."""

    @abstractmethod
    def get_memory_info(self):
        """Returns ``(free, total)`` memory in bytes in the context."""

    @abstractmethod
    def reset(self):
        """Clears up all memory allocated in this context."""

    @abstractmethod
    def defer_cleanup(self):
        """Returns a context manager that ensures the implementation of
        deferred cleanup whilst it is active."""

    @property
    @abstractmethod
    def interface_version(self):
        """Returns an integer specifying the version of the EMM Plugin interface."""


class HostOnlyCUDAMemoryManager(BaseCUDAMemoryManager):
    """Base class for EMM Plugins that only implement on-device allocation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.allocations = {}
        self.deallocations = _PendingDeallocs()

    def memhostalloc(self, size, mapped=False, portable=False, wc=False):
        raise NotImplementedError("fake numba: no host memory")

    def mempin(self, owner, pointer, size, mapped=False):
        raise NotImplementedError("fake numba: no host memory")

    def reset(self):
        self.allocations.clear()
        self.deallocations.clear()

    @contextlib.contextmanager
    def defer_cleanup(self):
        with self.deallocations.disable():
            yield


class GetIpcHandleMixin:
    def get_ipc_handle(self, memory):
        return IpcHandle(memory, b"fake-ipc-handle", memory.size, None)


class NumbaCUDAMemoryManager(GetIpcHandleMixin, HostOnlyCUDAMemoryManager):
    """Numba's own manager: cuMemAlloc, frees deferred through the context."""

    def initialize(self):
        pass

    def memalloc(self, size):
        if USE_NV_BINDING:
            ptr = driver.cuMemAlloc(size)
            alloc_key = int(ptr)
        else:
            ptr = drvapi.cu_device_ptr()
            driver.cuMemAlloc(byref(ptr), size)
            alloc_key = ptr.value

        def finalizer():
            self.allocations.pop(alloc_key, None)
            driver.cuMemFree(ptr)

        mem = MemoryPointer(weakref.proxy(self.context), ptr, size, finalizer=finalizer)
        self.allocations[alloc_key] = mem
        return mem.own()

    def get_memory_info(self):
        if USE_NV_BINDING:
            free, total = driver.cuMemGetInfo()
        else:
            free = ctypes.c_size_t()
            total = ctypes.c_size_t()
            driver.cuMemGetInfo(byref(free), byref(total))
            free = free.value
            total = total.value
        return MemoryInfo(free=free, total=total)

    @property
    def interface_version(self):
        return _SUPPORTED_EMM_INTERFACE_VERSION


_SUPPORTED_EMM_INTERFACE_VERSION = 1

_memory_manager = None


def _ensure_memory_manager():
    global _memory_manager

    if _memory_manager:
        return

    manager = os.environ.get("NUMBA_CUDA_MEMORY_MANAGER", "default")
    if manager == "default":
        _memory_manager = NumbaCUDAMemoryManager
        return

    try:
        mgr_module = importlib.import_module(manager)
        set_memory_manager(mgr_module._numba_memory_manager)
    except Exception:
        raise RuntimeError("Failed to use memory manager from %s" % manager)


def set_memory_manager(mm_plugin):
    global _memory_manager

    dummy = mm_plugin(context=None)
    iv = dummy.interface_version
    if iv != _SUPPORTED_EMM_INTERFACE_VERSION:
        err = "EMM Plugin interface has version %d - version %d required" % (
            iv,
            _SUPPORTED_EMM_INTERFACE_VERSION,
        )
        raise RuntimeError(err)

    _memory_manager = mm_plugin


class _PendingDeallocs(object):
    def __init__(self, capacity=0):
        self._cons = deque()
        self._disable_count = 0
        self._size = 0
        self.memory_capacity = capacity

    def add_item(self, dtor, handle, size=0):
        self._cons.append((dtor, handle, size))
        self._size += int(size)
        self.clear()

    def clear(self):
        if not self.is_disabled:
            while self._cons:
                [dtor, handle, size] = self._cons.popleft()
                dtor(handle)
            self._size = 0

    @contextlib.contextmanager
    def disable(self):
        self._disable_count += 1
        try:
            yield
        finally:
            self._disable_count -= 1
            assert self._disable_count >= 0

    @property
    def is_disabled(self):
        return self._disable_count > 0

    def __len__(self):
        return len(self._cons)


MemoryInfo = namedtuple("MemoryInfo", "free,total")


class Context(object):
    def __init__(self, device, handle):
        self.device = device
        self.handle = handle
        self.allocations = {}
        self.deallocations = _PendingDeallocs()
        _ensure_memory_manager()
        self.memory_manager = _memory_manager(context=self)
        self.extras = {}

    def reset(self):
        self.memory_manager.reset()
        self.deallocations.clear()

    def get_memory_info(self):
        return self.memory_manager.get_memory_info()

    def prepare_for_use(self):
        self.memory_manager.initialize()

    def push(self):
        self.prepare_for_use()

    def memalloc(self, bytesize):
        return self.memory_manager.memalloc(bytesize)

    def get_ipc_handle(self, memory):
        if not SUPPORTS_IPC:
            raise OSError("OS does not support CUDA IPC")
        return self.memory_manager.get_ipc_handle(memory)

    @contextlib.contextmanager
    def defer_cleanup(self):
        with self.memory_manager.defer_cleanup():
            with self.deallocations.disable():
                yield

    def __repr__(self):
        return "<CUDA context %s of device %d>" % (self.handle, int(self.device.id))


class IpcHandle(object):
    def __init__(self, base, handle, size, source_info=None, offset=0):
        self.base = base
        self.handle = handle
        self.size = size
        self.source_info = source_info
        self.offset = offset


class MemoryPointer(object):
    __cuda_memory__ = True

    def __init__(self, context, pointer, size, owner=None, finalizer=None):
        self.context = context
        self.device_pointer = pointer
        self.size = size
        self._cuda_memsize_ = size
        self.is_managed = finalizer is not None
        self.refct = 1
        self.handle = self.device_pointer
        self._owner = owner

        if finalizer is not None:
            self._finalizer = weakref.finalize(self, finalizer)

    @property
    def owner(self):
        return self if self._owner is None else self._owner

    def own(self):
        return OwnedPointer(weakref.proxy(self))

    def free(self):
        if self.is_managed:
            if not self._finalizer.alive:
                raise RuntimeError("Freeing dead memory")
            self._finalizer()
            assert not self._finalizer.alive

    def view(self, start, stop=None):
        size = self.size - start if stop is None else stop - start
        if not self.device_pointer_value:
            if size != 0:
                raise RuntimeError("non-empty slice into empty slice")
            return self
        base = self.device_pointer_value + start
        if USE_NV_BINDING:
            pointer = binding.CUdeviceptr(base)
        else:
            pointer = drvapi.cu_device_ptr(base)
        view = MemoryPointer(self.context, pointer, size, owner=self.owner)
        if isinstance(self.owner, (MemoryPointer, OwnedPointer)):
            return OwnedPointer(weakref.proxy(self.owner), view)
        return view

    @property
    def device_ctypes_pointer(self):
        return self.device_pointer

    @property
    def device_pointer_value(self):
        if USE_NV_BINDING:
            return int(self.device_pointer) or None
        return self.device_pointer.value


class OwnedPointer(object):
    def __init__(self, memptr, view=None):
        self._mem = memptr
        self._view = self._mem if view is None else view
        mem = self._mem

        def deref():
            try:
                mem.refct -= 1
                assert mem.refct >= 0
                if mem.refct == 0:
                    mem.free()
            except ReferenceError:
                pass

        self._mem.refct += 1
        weakref.finalize(self, deref)

    def __getattr__(self, fname):
        return getattr(self._view, fname)


def device_extents(devmem):
    base = devmem.device_pointer_value
    return base, base + devmem.size
