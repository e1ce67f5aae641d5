from . import device, memory, runtime, stream  # noqa: F401
from .device import Device  # noqa: F401
from .memory import (  # noqa: F401
    BaseMemory,
    Memory,
    MemoryPointer,
    MemoryPool,
    OutOfMemoryError,
    UnownedMemory,
    alloc,
    get_allocator,
    set_allocator,
    using_allocator,
)
from .stream import ExternalStream, Stream, get_current_stream  # noqa: F401
