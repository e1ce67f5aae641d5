"""Torch-compatible statistics, answered from cudalloc_get_stats.

Key names follow ``torch.cuda.memory_stats()``. cudalloc keeps one set of
counters per device (no small/large split in the statistics), so only the
``.all.`` keys exist, and only those cudalloc can fill exactly. Every raw
``cudalloc_stats`` field is also there, as ``cudalloc.<field>``.
"""

import collections
import operator
import sys

from . import _lib


def _torch():
    # Never import torch here: use it only if the process already has.
    return sys.modules.get("torch")


def device_index(device=None):
    """An integer device index from None / int / "cuda:N" / torch.device.

    None means torch's current device when torch has initialised CUDA, else 0.
    """
    if device is None:
        torch = _torch()
        try:
            if torch is not None and torch.cuda.is_initialized():
                return int(torch.cuda.current_device())
        except Exception:  # a torch without CUDA support: fall through
            pass
        return 0
    if isinstance(device, bool):
        raise TypeError(f"invalid device {device!r}")
    if isinstance(device, int):
        return _checked(device)
    if isinstance(device, str):
        kind, _, idx = device.partition(":")
        if kind != "cuda":
            raise ValueError(f"expected a CUDA device, got {device!r}")
        if not idx:
            return device_index(None)
        try:
            index = int(idx)
        except ValueError:
            raise ValueError(f"invalid device {device!r}: expected 'cuda' or 'cuda:N'") from None
        return _checked(index)
    if hasattr(type(device), "__index__"):  # an integer type of another kind (numpy)
        return _checked(operator.index(device))
    kind = getattr(device, "type", None)
    if kind is not None:  # torch.device
        if kind != "cuda":
            raise ValueError(f"expected a CUDA device, got {device!r}")
        idx = getattr(device, "index", None)
        return device_index(None) if idx is None else _checked(int(idx))
    raise TypeError(f"invalid device {device!r}")


def _checked(index):
    """``index``, unless the C ``int`` it is passed as cannot hold it (ctypes
    would wrap it silently onto another device)."""
    if not -(2**31) <= index < 2**31:
        raise _lib.InvalidDeviceError(
            f"device {index} is not valid: out of a C int's range",
            _lib.ERR_INVALID_DEVICE,
        )
    return index


def raw_stats(device=None):
    """Every cudalloc_stats field of ``device`` as a plain dict."""
    return _lib.raw_stats(device_index(device))


def memory_stats(device=None):
    """``torch.cuda.memory_stats()``-style dict (sorted keys) for ``device``."""
    s = raw_stats(device)
    stats = {
        "allocated_bytes.all.current": s["allocated_bytes"],
        "allocated_bytes.all.peak": s["allocated_bytes_peak"],
        "reserved_bytes.all.current": s["reserved_bytes"],
        "reserved_bytes.all.peak": s["reserved_bytes_peak"],
        "requested_bytes.all.current": s["requested_bytes"],
        # torch's "active" = allocated, or freed but still waiting on streams.
        "active_bytes.all.current": s["allocated_bytes"] + s["pending_free_bytes"],
        "active.all.current": s["active_allocations"],
        "allocation.all.current": s["active_allocations"],
        "allocation.all.allocated": s["num_allocs"],
        "allocation.all.freed": s["num_frees"],
        "segment.all.current": s["segments"],
        "segment.all.allocated": s["num_driver_allocs"],
        "segment.all.freed": s["num_driver_frees"],
        "num_alloc_retries": s["num_alloc_retries"],
        "num_ooms": s["num_ooms"],
        "num_device_alloc": s["num_driver_allocs"],
        "num_device_free": s["num_driver_frees"],
    }
    for name, value in s.items():
        stats["cudalloc." + name] = value
    return collections.OrderedDict(sorted(stats.items()))


def memory_stats_as_nested_dict(device=None):
    """The same figures nested on the dots, like torch's function of that name."""
    nested = {}
    for key, value in memory_stats(device).items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def memory_allocated(device=None):
    return raw_stats(device)["allocated_bytes"]


def max_memory_allocated(device=None):
    return raw_stats(device)["allocated_bytes_peak"]


def memory_reserved(device=None):
    return raw_stats(device)["reserved_bytes"]


def max_memory_reserved(device=None):
    return raw_stats(device)["reserved_bytes_peak"]


def reset_peak_memory_stats(device=None):
    lib = _lib.lib()
    lib.cudalloc_reset_peak_stats(device_index(device))
    _lib.check_last()


def _export(name):
    if not _lib.has(name):
        raise _lib.CudallocError(f"this libcudalloc.so ({_lib.loaded_path()}) has no {name}")
    return getattr(_lib.lib(), name)


def reset_accumulated_memory_stats(device=None):
    """Restart the accumulated counters (allocation, segment and OOM counts)
    of ``device`` from zero; current values and peaks stay."""
    _export("cudalloc_reset_accumulated_stats")(device_index(device))
    _lib.check_last()


def get_per_process_memory_fraction(device=None):
    """The fraction of ``device``'s memory cudalloc may reserve (1.0 unless
    ``torch.cuda.set_per_process_memory_fraction`` lowered it)."""
    f = _export("cudalloc_get_memory_fraction")(device_index(device))
    if f < 0:
        _lib.check_last()
    return f


def empty_cache():
    """Release every cached, unused segment on every device."""
    lib = _lib.lib()
    lib.cudalloc_empty_cache()
    _lib.check_last()


def device_count():
    n = _lib.lib().cudalloc_device_count()
    if n < 0:
        _lib.check_last()
    return n


def _fmt(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return str(n)


def memory_summary(device=None, abbreviated=False):
    """A short text table, standing in for ``torch.cuda.memory_summary``."""
    dev = device_index(device)
    s = _lib.raw_stats(dev)
    rows = [
        ("allocated", _fmt(s["allocated_bytes"]), _fmt(s["allocated_bytes_peak"])),
        ("reserved", _fmt(s["reserved_bytes"]), _fmt(s["reserved_bytes_peak"])),
        ("requested", _fmt(s["requested_bytes"]), ""),
        ("cached free", _fmt(s["cached_free_bytes"]), ""),
        ("largest free block", _fmt(s["largest_free_block"]), ""),
        ("pending frees", _fmt(s["pending_free_bytes"]), ""),
        ("live allocations", str(s["active_allocations"]), ""),
        ("segments", str(s["segments"]), ""),
    ]
    if not abbreviated:
        rows += [
            ("allocations / frees", f"{s['num_allocs']} / {s['num_frees']}", ""),
            ("cache hits", str(s["num_cache_hits"]), ""),
            ("driver allocs / frees", f"{s['num_driver_allocs']} / {s['num_driver_frees']}", ""),
            ("OOMs / retries", f"{s['num_ooms']} / {s['num_alloc_retries']}", ""),
            ("invalid frees", str(s["num_invalid_frees"]), ""),
            ("limit", _fmt(s["limit_bytes"]) if s["limit_bytes"] else "none", ""),
        ]
    lines = [f"cudalloc memory summary, device {dev}", f"{'':<22} {'current':>14} {'peak':>14}"]
    lines += [f"{name:<22} {cur:>14} {peak:>14}" for name, cur, peak in rows]
    return "\n".join(lines) + "\n"
