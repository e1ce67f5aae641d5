"""cudalloc: a CUDA caching allocator (Rust, ``libcudalloc.so``) for PyTorch.

    import torch, cudalloc
    cudalloc.enable()            # before the first CUDA tensor
    ...
    cudalloc.memory_stats()      # torch.cuda.memory_stats() keys
    cudalloc.dump_snapshot("s.pickle")  # for pytorch.org/memory_viz

or, with no code change: ``CUDALLOC=1 python train.py`` / ``python -m cudalloc train.py``.
Configuration: ``CUDALLOC_CONF`` (``key:value,...``) or ``enable(conf=...)``.

CuPy: ``cudalloc.cupy.enable()``. Numba: ``NUMBA_CUDA_MEMORY_MANAGER=cudalloc.numba``.
Frameworks in one process share one cudalloc (one cache, one set of statistics).

Importing this package loads neither torch nor the library; the library is
loaded on first use (``$CUDALLOC_LIBRARY`` overrides the bundled copy).
"""

from ._capacity import can_allocate, is_low_memory
from ._lib import (
    ConfigError,
    CudallocError,
    InvalidArgumentError,
    InvalidDeviceError,
    library_path,
)
from ._stats import (
    device_count,
    empty_cache,
    get_per_process_memory_fraction,
    max_memory_allocated,
    max_memory_reserved,
    memory_allocated,
    memory_reserved,
    memory_stats,
    memory_stats_as_nested_dict,
    memory_summary,
    raw_stats,
    reset_accumulated_memory_stats,
    reset_peak_memory_stats,
)
from ._snapshot import dump_snapshot, memory_snapshot, record_memory_history, snapshot
from ._torch import enable, enabled_hooks, is_enabled, is_patched, patch_torch, unpatch_torch

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CudallocError",
    "InvalidArgumentError",
    "InvalidDeviceError",
    "can_allocate",
    "check_invariants",
    "configure",
    "device_count",
    "dump_snapshot",
    "empty_cache",
    "enable",
    "enabled_hooks",
    "get_per_process_memory_fraction",
    "is_enabled",
    "is_low_memory",
    "is_patched",
    "leak_report",
    "library_path",
    "max_memory_allocated",
    "max_memory_reserved",
    "memory_allocated",
    "memory_reserved",
    "memory_snapshot",
    "memory_stats",
    "memory_stats_as_nested_dict",
    "memory_summary",
    "on_oom",
    "on_pressure",
    "patch_torch",
    "raw_stats",
    "record_memory_history",
    "reset_accumulated_memory_stats",
    "reset_peak_memory_stats",
    "snapshot",
    "stats_json",
    "unpatch_torch",
]


def configure(conf=None):
    """Initialise cudalloc with ``conf`` (``CUDALLOC_CONF`` syntax; None: the
    environment) without touching torch. Raises :class:`ConfigError` (a
    ValueError) naming a bad key. Needed only before direct use of the
    library; :func:`enable` does it for PyTorch."""
    from . import _lib

    _lib.init(conf)


def check_invariants():
    """Walk cudalloc's internal structures; raise CudallocError if one is broken."""
    from . import _lib

    _lib.check(_lib.lib().cudalloc_check_invariants())


def _require(name):
    from . import _lib

    if not _lib.has(name):
        raise CudallocError(f"this libcudalloc.so ({_lib.loaded_path()}) has no {name}")
    return _lib


def stats_json():
    """Every device's statistics and the effective configuration, as a JSON string."""
    _lib = _require("cudalloc_stats_json")
    return _lib.read_sized(_lib.lib().cudalloc_stats_json)


def leak_report(min_age_s=0.0, json=False):
    """Live allocations at least ``min_age_s`` seconds old (text, or JSON text)."""
    import numbers

    if isinstance(min_age_s, bool) or not isinstance(min_age_s, numbers.Real):
        raise TypeError(
            f"leak_report(): min_age_s must be a number of seconds, not {type(min_age_s).__name__}"
        )
    _lib = _require("cudalloc_leak_report")
    return _lib.read_sized(_lib.lib().cudalloc_leak_report, float(min_age_s), 1 if json else 0)


_callbacks = []  # ctypes callback objects must outlive the library's use of them


def on_oom(callback):
    """Register ``callback(device, requested_bytes)``, run by cudalloc after it
    has flushed its cache and before its last retry (e.g. to drop Python-side
    caches and ``gc.collect()``). It runs on the allocating thread, possibly
    a PyTorch worker thread: it must not allocate CUDA memory. Cannot be removed."""
    if not callable(callback):
        raise TypeError(f"on_oom() needs a callable, not {type(callback).__name__}")
    _lib = _require("cudalloc_register_oom_callback")

    def trampoline(device, requested, _user):
        try:
            callback(device, requested)
        except Exception as e:  # an exception must not cross into C
            import sys

            sys.stderr.write(f"cudalloc: OOM callback raised: {e!r}\n")

    c = _lib.OOM_CALLBACK(trampoline)
    _lib.check(_lib.lib().cudalloc_register_oom_callback(c, None))
    _callbacks.append(c)
    return callback


def on_pressure(callback):
    """Register ``callback(device, level)`` (0 LOW, 1 MODERATE, 2 HIGH,
    3 CRITICAL), run when a device's pressure level changes. Same threading
    caveats as :func:`on_oom`. Cannot be removed."""
    if not callable(callback):
        raise TypeError(f"on_pressure() needs a callable, not {type(callback).__name__}")
    _lib = _require("cudalloc_register_pressure_callback")

    def trampoline(device, level, _user):
        try:
            callback(device, level)
        except Exception as e:
            import sys

            sys.stderr.write(f"cudalloc: pressure callback raised: {e!r}\n")

    c = _lib.PRESSURE_CALLBACK(trampoline)
    _lib.check(_lib.lib().cudalloc_register_pressure_callback(c, None))
    _callbacks.append(c)
    return callback
