"""cudalloc for PyTorch: a drop-in CUDA caching allocator.

    import cudalloc
    cudalloc.enable()              # before the first CUDA tensor
    ...
    cudalloc.memory_stats()        # torch-compatible keys; torch's own raise under a pluggable allocator

Or with no code change: ``CUDALLOC=1 python train.py`` (a .pth start-up hook
enables cudalloc when torch is imported), or ``python -m cudalloc train.py``.
Configuration: ``CUDALLOC_CONF`` or ``enable(conf="key:value,...")``.

Importing this package is cheap: it imports neither torch nor the library.
"""
import os

from . import _lib

__all__ = [
    "enable",
    "enabled",
    "patch_torch",
    "memory_stats",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "max_memory_reserved",
    "reset_peak_memory_stats",
    "reset_max_memory_allocated",
    "empty_cache",
    "leak_report",
    "stats_json",
    "library_path",
]

library_path = _lib.library_path

_enabled = False

# torch's set_*_fn hooks on _CUDAPluggableAllocator -> cudalloc exports.
_HOOKS = (
    ("set_init_fn", "cudalloc_init_devices"),  # void(int device_count)
    ("set_reset_fn", "cudalloc_empty_cache"),  # void(): torch.cuda.empty_cache()
    ("set_memory_fraction_fn", "cudalloc_set_memory_fraction"),  # void(double, int)
    ("set_record_stream_fn", "cudalloc_record_stream"),  # void(void*, cudaStream_t)
)


def enabled():
    """Whether enable() installed cudalloc as torch's CUDA allocator."""
    return _enabled


def _patch_wanted(patch):
    if patch is not None:
        return bool(patch)
    return os.environ.get("CUDALLOC_PATCH_TORCH", "1").strip().lower() not in ("0", "false", "no", "off")


def enable(conf=None, patch=None):
    """Install cudalloc as PyTorch's CUDA allocator.

    conf: a ``CUDALLOC_CONF``-style string (``None`` reads ``CUDALLOC_CONF``).
    A bad key or value raises ValueError naming the key.
    patch: make ``torch.cuda.memory_stats`` & co. answer from cudalloc
    (default on; ``CUDALLOC_PATCH_TORCH=0`` turns it off).
    Must run before CUDA is initialised.
    """
    global _enabled
    if _enabled:
        return
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError(
            "cudalloc.enable() must run before CUDA is initialised: call it before the first CUDA "
            "tensor, or set CUDALLOC=1 in the environment to enable it at start-up"
        )
    path = _lib.library_path()
    _lib.init(conf)  # ValueError for a bad configuration, before touching torch's allocator
    alloc = torch.cuda.memory.CUDAPluggableAllocator(path, "cudalloc_malloc", "cudalloc_free")
    raw = alloc.allocator()
    for setter, export in _HOOKS:
        if hasattr(raw, setter) and hasattr(_lib.lib(), export):
            getattr(raw, setter)(_lib.address(export))
    torch.cuda.memory.change_current_allocator(alloc)
    _enabled = True
    if _patch_wanted(patch):
        patch_torch()


def patch_torch():
    """Make torch.cuda's memory statistics answer from cudalloc (torch's own
    raise under a pluggable allocator, which breaks Lightning, HF Trainer...)."""
    import torch

    replacements = {
        "memory_stats": memory_stats,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_reserved,
        "max_memory_reserved": max_memory_reserved,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "reset_max_memory_allocated": reset_max_memory_allocated,
    }
    for mod in (torch.cuda, getattr(torch.cuda, "memory", None)):
        if mod is None:
            continue
        for name, fn in replacements.items():
            if hasattr(mod, name):
                setattr(mod, name, fn)


def _device_index(device):
    if device is None:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return torch.cuda.current_device()
        return 0
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        return int(device.split(":")[1]) if ":" in device else _device_index(None)
    index = getattr(device, "index", None)  # torch.device
    return _device_index(None) if index is None else index


def memory_stats(device=None):
    """torch.cuda.memory_stats()-compatible statistics of one device, plus
    every cudalloc counter under ``cudalloc.<name>``."""
    s = _lib.stats(_device_index(device))
    out = {
        "active.all.current": s["active_allocations"],
        "active.all.allocated": s["num_allocs"],
        "active.all.freed": s["num_frees"],
        "active_bytes.all.current": s["allocated_bytes"] + s["pending_free_bytes"],
        "allocated_bytes.all.current": s["allocated_bytes"],
        "allocated_bytes.all.peak": s["allocated_bytes_peak"],
        "allocation.all.current": s["active_allocations"],
        "allocation.all.allocated": s["num_allocs"],
        "allocation.all.freed": s["num_frees"],
        "inactive_split_bytes.all.current": s["cached_free_bytes"],
        "num_alloc_retries": s["num_alloc_retries"],
        "num_device_alloc": s["num_driver_allocs"],
        "num_device_free": s["num_driver_frees"],
        "num_ooms": s["num_ooms"],
        "requested_bytes.all.current": s["requested_bytes"],
        "reserved_bytes.all.current": s["reserved_bytes"],
        "reserved_bytes.all.peak": s["reserved_bytes_peak"],
        "segment.all.current": s["segments"],
    }
    out.update({"cudalloc." + k: v for k, v in s.items()})
    return dict(sorted(out.items()))


def memory_allocated(device=None):
    return _lib.stats(_device_index(device))["allocated_bytes"]


def max_memory_allocated(device=None):
    return _lib.stats(_device_index(device))["allocated_bytes_peak"]


def memory_reserved(device=None):
    return _lib.stats(_device_index(device))["reserved_bytes"]


def max_memory_reserved(device=None):
    return _lib.stats(_device_index(device))["reserved_bytes_peak"]


def reset_peak_memory_stats(device=None):
    l = _lib.lib()
    l.cudalloc_reset_peak_stats(_device_index(device))
    code, msg = _lib.last_error()
    if code != _lib.OK:
        raise ValueError(msg)


reset_max_memory_allocated = reset_peak_memory_stats


def empty_cache():
    """Release every cached, unused segment to the driver (all devices)."""
    _lib.lib().cudalloc_empty_cache()


def leak_report(min_age_s=0.0, json=False):
    """Live allocations older than min_age_s, grouped by call site when
    backtraces are on (CUDALLOC_CONF=backtrace:16); text or JSON."""
    return _lib.leak_report(min_age_s, json)


def stats_json():
    """Every device's statistics as a JSON string."""
    return _lib.stats_json()
