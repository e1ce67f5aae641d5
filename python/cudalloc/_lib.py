"""ctypes access to libcudalloc.so: loading, the stats struct, init, reports.

Nothing here imports torch. The library is found, in order:
1. ``CUDALLOC_LIBRARY`` (a path; for development against target/debug);
2. the copy bundled in this package by ``pip install``.
"""
import ctypes
import glob
import os

# Result codes (include/cudalloc.h, base 42000).
OK = 0
ERR_CONFIG = 42005
ERR_ALREADY_INITIALIZED = 42006
ERR_BUFFER_TOO_SMALL = 42011

# Field names of cudalloc_stats, in order (fields are only ever appended).
STATS_FIELDS = (
    "allocated_bytes allocated_bytes_peak reserved_bytes reserved_bytes_peak requested_bytes "
    "active_allocations num_allocs num_frees num_cache_hits num_driver_allocs num_driver_frees "
    "num_ooms num_alloc_retries num_invalid_frees num_segments_adopted segments cached_free_bytes "
    "largest_free_block pending_free_bytes limit_bytes pressure_level num_pressure_low "
    "num_pressure_moderate num_pressure_high num_pressure_critical num_trims trimmed_bytes "
    "num_leak_age_alarms num_leak_growth_alarms"
).split()


class Stats(ctypes.Structure):
    # Room for fields a newer library may append: it writes them, we ignore them.
    _fields_ = [(name, ctypes.c_uint64) for name in STATS_FIELDS] + [("_reserved", ctypes.c_uint64 * 32)]

    def as_dict(self):
        return {name: int(getattr(self, name)) for name in STATS_FIELDS}


_lib = None


def library_path():
    """The path of the libcudalloc.so this package uses."""
    env = os.environ.get("CUDALLOC_LIBRARY")
    if env:
        if not os.path.exists(env):
            raise FileNotFoundError(f"CUDALLOC_LIBRARY={env} does not exist")
        return os.path.abspath(env)
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "libcudalloc*.so")))
    if not found:
        raise FileNotFoundError(
            "libcudalloc.so is not bundled in this cudalloc package; reinstall with `pip install .` "
            "or set CUDALLOC_LIBRARY=/path/to/libcudalloc.so"
        )
    return found[0]


def lib():
    """The loaded library, with prototypes set (loaded once)."""
    global _lib
    if _lib is not None:
        return _lib
    l = ctypes.CDLL(library_path())
    c = ctypes
    protos = {
        "cudalloc_malloc": (c.c_void_p, [c.c_size_t, c.c_int, c.c_void_p]),
        "cudalloc_free": (None, [c.c_void_p, c.c_size_t, c.c_int, c.c_void_p]),
        "cudalloc_record_stream": (None, [c.c_void_p, c.c_void_p]),
        "cudalloc_empty_cache": (None, []),
        "cudalloc_get_stats": (c.c_int, [c.c_int, c.POINTER(Stats)]),
        "cudalloc_reset_peak_stats": (None, [c.c_int]),
        "cudalloc_set_memory_fraction": (None, [c.c_double, c.c_int]),
        "cudalloc_init": (c.c_int, [c.c_char_p]),
        "cudalloc_init_devices": (None, [c.c_int]),
        "cudalloc_device_count": (c.c_int, []),
        "cudalloc_check_invariants": (c.c_int, []),
        "cudalloc_last_error": (c.c_int, []),
        "cudalloc_last_error_message": (c.c_char_p, []),
        "cudalloc_error_string": (c.c_char_p, [c.c_int]),
        "cudalloc_leak_report": (c.c_size_t, [c.c_double, c.c_int, c.c_char_p, c.c_size_t]),
        "cudalloc_stats_json": (c.c_size_t, [c.c_char_p, c.c_size_t]),
    }
    for name, (res, args) in protos.items():
        if hasattr(l, name):  # older libraries may lack the newer exports
            f = getattr(l, name)
            f.restype, f.argtypes = res, args
    _lib = l
    return l


def address(name):
    """The raw address of an export, for torch's set_*_fn hooks."""
    return ctypes.cast(getattr(lib(), name), ctypes.c_void_p).value


def last_error():
    l = lib()
    msg = l.cudalloc_last_error_message()
    return l.cudalloc_last_error(), (msg.decode("utf-8", "replace") if msg else "")


def init(conf=None):
    """cudalloc_init(conf); ValueError naming the key for a bad configuration."""
    l = lib()
    code = l.cudalloc_init(None if conf is None else conf.encode())
    if code == OK:
        return
    _, msg = last_error()
    if code == ERR_CONFIG:
        raise ValueError(msg)
    if code == ERR_ALREADY_INITIALIZED:
        raise RuntimeError(msg)
    raise RuntimeError(f"cudalloc_init failed ({code}): {msg}")


def stats(device):
    s = Stats()
    code = lib().cudalloc_get_stats(int(device), ctypes.byref(s))
    if code != OK:
        _, msg = last_error()
        raise ValueError(msg or f"cudalloc_get_stats failed ({code})")
    return s.as_dict()


def _sized_text(fn, *args):
    """Call a size-query export (NULL buf, 0 len -> size needed) and return its text."""
    need = fn(*args, None, 0)
    if need == 0:
        _, msg = last_error()
        raise RuntimeError(msg or "cudalloc returned no text")
    buf = ctypes.create_string_buffer(need)
    fn(*args, buf, need)
    return buf.value.decode("utf-8", "replace")


def stats_json():
    l = lib()
    if not hasattr(l, "cudalloc_stats_json"):
        raise NotImplementedError("this libcudalloc has no cudalloc_stats_json")
    return _sized_text(l.cudalloc_stats_json)


def leak_report(min_age_s=0.0, json=False):
    l = lib()
    if not hasattr(l, "cudalloc_leak_report"):
        raise NotImplementedError("this libcudalloc has no cudalloc_leak_report")
    return _sized_text(l.cudalloc_leak_report, float(min_age_s), 1 if json else 0)
