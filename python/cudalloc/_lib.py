"""ctypes binding of libcudalloc.so: loading, signatures, errors, the stats struct.

Nothing here imports torch. The library is loaded on first use, not at
``import cudalloc``, so importing the package is cheap and works on machines
with no CUDA at all.
"""

import ctypes
import os
import threading

LIBRARY_ENV = "CUDALLOC_LIBRARY"
LIBRARY_NAME = "libcudalloc.so"

# Result codes (include/cudalloc.h, cudalloc_result). Base 42000; never reused.
OK = 0
ERR_INVALID_ARGUMENT = 42001
ERR_INVALID_DEVICE = 42002
ERR_OUT_OF_MEMORY = 42003
ERR_INVALID_FREE = 42004
ERR_CONFIG = 42005
ERR_ALREADY_INITIALIZED = 42006
ERR_DRIVER = 42007
ERR_DRIVER_NOT_FOUND = 42008
ERR_SHUTTING_DOWN = 42009
ERR_PANIC = 42010
ERR_BUFFER_TOO_SMALL = 42011
ERR_UNKNOWN_POINTER = 42012
ERR_UNSUPPORTED = 42013


class CudallocError(RuntimeError):
    """A cudalloc call failed. ``code`` is the cudalloc_result value."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class ConfigError(CudallocError, ValueError):
    """A ``CUDALLOC_CONF`` key or value is not valid; the message names the key."""


class InvalidDeviceError(CudallocError, ValueError):
    """The device index is not one cudalloc manages."""


class InvalidArgumentError(CudallocError, ValueError):
    """An argument is out of range (e.g. a negative age)."""


# The fields of cudalloc_stats, in declaration order (src/stats.rs). Fields are
# only ever appended on the Rust side, so a newer library fills a longer
# struct: reads go through a buffer with room to spare (_STATS_SLOTS).
STATS_FIELDS = (
    "allocated_bytes",
    "allocated_bytes_peak",
    "reserved_bytes",
    "reserved_bytes_peak",
    "requested_bytes",
    "active_allocations",
    "num_allocs",
    "num_frees",
    "num_cache_hits",
    "num_driver_allocs",
    "num_driver_frees",
    "num_ooms",
    "num_alloc_retries",
    "num_invalid_frees",
    "num_segments_adopted",
    "segments",
    "cached_free_bytes",
    "largest_free_block",
    "pending_free_bytes",
    "limit_bytes",
    "pressure_level",
    "num_pressure_low",
    "num_pressure_moderate",
    "num_pressure_high",
    "num_pressure_critical",
    "num_trims",
    "trimmed_bytes",
    "num_leak_age_alarms",
    "num_leak_growth_alarms",
    "log_records_dropped",
    "mapped_bytes",
    "virtual_bytes",
    "num_vmm_creates",
    "num_vmm_releases",
    "num_vmm_maps",
    "num_vmm_unmaps",
    "num_vmm_set_access",
)
_STATS_SLOTS = 512  # uint64 slots handed to cudalloc_get_stats: 4 KiB of headroom

_c = ctypes
_SIGNATURES = {
    # name: (restype, argtypes)
    "cudalloc_malloc": (_c.c_void_p, [_c.c_size_t, _c.c_int, _c.c_void_p]),
    "cudalloc_free": (None, [_c.c_void_p, _c.c_size_t, _c.c_int, _c.c_void_p]),
    "cudalloc_record_stream": (None, [_c.c_void_p, _c.c_void_p]),
    "cudalloc_empty_cache": (None, []),
    "cudalloc_get_stats": (_c.c_int, [_c.c_int, _c.c_void_p]),
    "cudalloc_reset_peak_stats": (None, [_c.c_int]),
    "cudalloc_set_memory_fraction": (None, [_c.c_double, _c.c_int]),
    "cudalloc_init": (_c.c_int, [_c.c_char_p]),
    "cudalloc_init_devices": (None, [_c.c_int]),
    "cudalloc_device_count": (_c.c_int, []),
    "cudalloc_check_invariants": (_c.c_int, []),
    "cudalloc_last_error": (_c.c_int, []),
    "cudalloc_last_error_message": (_c.c_char_p, []),
    "cudalloc_error_string": (_c.c_char_p, [_c.c_int]),
}

# Exports added after the first release: used only when the library has them.
OOM_CALLBACK = _c.CFUNCTYPE(None, _c.c_int, _c.c_size_t, _c.c_void_p)
PRESSURE_CALLBACK = _c.CFUNCTYPE(None, _c.c_int, _c.c_int, _c.c_void_p)
_OPTIONAL_SIGNATURES = {
    "cudalloc_version": (_c.c_char_p, []),
    "cudalloc_stats_json": (_c.c_size_t, [_c.c_void_p, _c.c_size_t]),
    "cudalloc_leak_report": (_c.c_size_t, [_c.c_double, _c.c_int, _c.c_void_p, _c.c_size_t]),
    "cudalloc_register_oom_callback": (_c.c_int, [OOM_CALLBACK, _c.c_void_p]),
    "cudalloc_register_pressure_callback": (_c.c_int, [PRESSURE_CALLBACK, _c.c_void_p]),
    "cudalloc_reset_accumulated_stats": (None, [_c.c_int]),
    "cudalloc_get_memory_fraction": (_c.c_double, [_c.c_int]),
    "cudalloc_snapshot_json": (_c.c_size_t, [_c.c_void_p, _c.c_size_t]),
    "cudalloc_record_memory_history": (_c.c_int, [_c.c_int, _c.c_size_t, _c.c_int]),
    "cudalloc_can_allocate": (_c.c_int, [_c.c_size_t, _c.c_int, _c.c_void_p]),
    "cudalloc_is_low_memory": (_c.c_int, [_c.c_int]),
}

_lock = threading.Lock()
_lib = None
_path = None


def library_path():
    """The libcudalloc.so this process uses: ``$CUDALLOC_LIBRARY`` when set
    (development: e.g. ``target/debug/libcudalloc.so``), else the copy
    installed inside the package."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = os.path.abspath(override)
        if not os.path.isfile(path):
            raise CudallocError(f"{LIBRARY_ENV}={override}: no such file")
        return path
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)
    if not os.path.isfile(path):
        raise CudallocError(
            f"{LIBRARY_NAME} is not installed next to the cudalloc package ({path}); "
            f"install with `pip install .` from the cudalloc repository, or point "
            f"{LIBRARY_ENV} at a built library (cargo build --lib)"
        )
    return path


def lib():
    """The loaded library (loaded on first call), with signatures set."""
    global _lib, _path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            path = library_path()
            try:
                handle = ctypes.CDLL(path)
            except OSError as e:
                raise CudallocError(f"cannot load {path}: {e}") from None
            if not hasattr(handle, "cudalloc_malloc"):
                raise CudallocError(
                    f"{path} is not a cudalloc library (no cudalloc_malloc symbol)"
                    + (f"; {LIBRARY_ENV} names it" if os.environ.get(LIBRARY_ENV) else "")
                )
            missing = [name for name in _SIGNATURES if not hasattr(handle, name)]
            if missing:
                raise CudallocError(
                    f"{path} lacks {', '.join(missing)}: it is not a complete "
                    "cudalloc library (rebuild it with cargo build --lib)"
                )
            for name, (res, args) in _SIGNATURES.items():
                fn = getattr(handle, name)
                fn.restype, fn.argtypes = res, args
            for name, (res, args) in _OPTIONAL_SIGNATURES.items():
                if hasattr(handle, name):
                    fn = getattr(handle, name)
                    fn.restype, fn.argtypes = res, args
            _path = path
            _lib = handle
    return _lib


def loaded_path():
    """The path of the loaded library, or None before the first call."""
    return _path


def has(name):
    """Whether the library exports ``name`` (for exports added later)."""
    return hasattr(lib(), name)


def address(name):
    """The raw address of an exported function, for torch's ``set_*_fn`` hooks."""
    return ctypes.cast(getattr(lib(), name), ctypes.c_void_p).value


def last_message():
    msg = lib().cudalloc_last_error_message()
    return msg.decode("utf-8", "replace") if msg else ""


def error_string(code):
    s = lib().cudalloc_error_string(int(code))
    return s.decode("utf-8", "replace") if s else ""


def malloc_or_collect(size, device, stream):
    """``cudalloc_malloc(size, device, stream)`` for the array libraries'
    plugins. On out-of-memory (after cudalloc has flushed its cache) it runs
    ``gc.collect()`` and, if that found garbage (arrays in reference cycles
    give their blocks back then), tries once more, as CuPy's own pool does.
    Returns ``(ptr, code, message)``: the pointer and ``OK`` (NULL for size
    0), or NULL with the last failure's code and message."""
    import gc

    ptr = lib().cudalloc_malloc(size, device, stream)
    code = lib().cudalloc_last_error()
    if ptr or code == OK:
        return ptr, OK, None
    if code == ERR_OUT_OF_MEMORY and gc.collect():
        ptr = lib().cudalloc_malloc(size, device, stream)
        if ptr:
            return ptr, OK, None
        code = lib().cudalloc_last_error()
    return 0, code, last_message() or error_string(code)


def error_for(code, message=None):
    """The exception for a cudalloc result code (with the thread's last message)."""
    if message is None:
        message = last_message() or error_string(code)
    cls = {
        ERR_CONFIG: ConfigError,
        ERR_INVALID_DEVICE: InvalidDeviceError,
        ERR_INVALID_ARGUMENT: InvalidArgumentError,
    }.get(code, CudallocError)
    return cls(message, code)


def check(code):
    """Raise the matching exception unless ``code`` is CUDALLOC_OK."""
    if code != OK:
        raise error_for(code)


def check_last():
    """Raise if the last call on this thread (a void export) set an error."""
    check(lib().cudalloc_last_error())


def conf_text(conf, what="the configuration"):
    """``conf`` checked as a configuration string: TypeError unless a str,
    ConfigError if it holds a NUL (C would read only up to it)."""
    if not isinstance(conf, str):
        raise TypeError(
            f"{what} must be a str (CUDALLOC_CONF syntax, key:value,...), "
            f"not {type(conf).__name__}"
        )
    if "\0" in conf:
        raise ConfigError(
            f"{what} contains a NUL character (at index {conf.index(chr(0))}): {conf!r}",
            ERR_CONFIG,
        )
    return conf


def init(conf=None):
    """``cudalloc_init``: ConfigError naming the key on a bad string."""
    arg = None if conf is None else conf_text(conf).encode("utf-8")
    check(lib().cudalloc_init(arg))


def config_in_force():
    """The configuration in force, ``{key: value}`` as ``cudalloc config``
    prints it (the program's values under ``CUDALLOC_CONF``'s). Starts
    cudalloc if nothing did."""
    import json

    return json.loads(read_sized(lib().cudalloc_stats_json))["config"]


def raw_stats(device):
    """``cudalloc_get_stats`` as a dict of the known fields."""
    buf = (ctypes.c_uint64 * _STATS_SLOTS)()
    check(lib().cudalloc_get_stats(int(device), ctypes.cast(buf, ctypes.c_void_p)))
    return {name: int(buf[i]) for i, name in enumerate(STATS_FIELDS)}


def read_sized(fn, *args):
    """Call a ``(…, buf, len) -> needed`` export twice: size, then fill."""
    needed = fn(*args, None, 0)
    for _ in range(4):
        if needed == 0:
            check_last()
            return ""
        size = int(needed) + 4096  # slack: the answer may grow between calls
        buf = ctypes.create_string_buffer(size)
        needed = fn(*args, ctypes.cast(buf, ctypes.c_void_p), size)
        code = lib().cudalloc_last_error()
        if code == OK:
            return buf.value.decode("utf-8", "replace")
        if code != ERR_BUFFER_TOO_SMALL:
            raise error_for(code)
    raise CudallocError("report kept growing while it was read")
