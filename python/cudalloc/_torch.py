"""PyTorch integration: install cudalloc as torch's CUDA allocator, and make
torch's memory-statistics functions answer from cudalloc.

torch is imported only inside these functions, never at ``import cudalloc``.
"""

import functools
import os
import sys
import threading
import warnings

from . import _frameworks, _lib, _snapshot, _stats
from ._frameworks import effective_conf

PATCH_ENV = "CUDALLOC_PATCH_TORCH"
ALLOC_FN = "cudalloc_malloc_torch"

_TOO_LATE = (
    "cudalloc.enable() was called after CUDA was initialised in this process; "
    "PyTorch cannot swap its allocator then. Call cudalloc.enable() before the "
    "first CUDA tensor (right after `import torch`), or run with CUDALLOC=1 "
    "(or `python -m cudalloc script.py`), which enables it when torch is imported"
)

# torch's optional hooks on _CUDAPluggableAllocator, and the export each takes
# (signatures from torch/csrc/cuda/Module.cpp: void(int), void(),
# void(void*, cudaStream_t), void(double, int), and
# void(int, MempoolId_t, std::function<bool(cudaStream_t)>), and
# void(int, MempoolId_t) twice).
# The pool hooks: CUDA graph capture calls begin before it starts, end when
# it is over, release when the graph goes. With graph_pools:on cudalloc
# serves the capture from a private pool; with graph_pools:off (the default)
# begin refuses with a RuntimeError, rather than let a graph's memory be
# handed out again.
_HOOKS = (
    ("set_init_fn", "cudalloc_init_devices"),
    ("set_reset_fn", "cudalloc_empty_cache"),
    ("set_record_stream_fn", "cudalloc_record_stream"),
    ("set_memory_fraction_fn", "cudalloc_set_memory_fraction"),
    ("set_end_allocate_to_pool_fn", "cudalloc_end_allocate_to_pool"),
    ("set_release_pool", "cudalloc_release_pool"),
    ("set_begin_allocate_to_pool", "cudalloc_begin_allocate_to_pool"),
)
_POOL_HOOKS = ("set_end_allocate_to_pool_fn", "set_release_pool")
# Without these, empty_cache() is a silent no-op and record_stream is ignored.
_ESSENTIAL_HOOKS = ("set_reset_fn", "set_record_stream_fn")

_lock = threading.RLock()
_allocator = None  # the CUDAPluggableAllocator, kept alive for the process
_conf = None
_hooks_wired = ()
_originals = {}  # (module, name) -> original function, while patched


def _falsy(value):
    return value.strip().lower() in ("", "0", "false", "no", "off")


def is_enabled():
    """Whether cudalloc is torch's CUDA allocator in this process."""
    return _allocator is not None


def enabled_hooks():
    """The torch hooks wired by enable() (names of the ``set_*_fn`` methods)."""
    return _hooks_wired


def enable(conf=None, *, patch_torch=None):
    """Make cudalloc PyTorch's CUDA allocator. Call before the first CUDA tensor.

    ``conf``: a ``CUDALLOC_CONF``-style string (default: the environment).
    ``patch_torch``: make ``torch.cuda.memory_stats`` and friends answer from
    cudalloc (default on; ``CUDALLOC_PATCH_TORCH=0`` turns it off).

    Raises ``ValueError`` (:class:`cudalloc.ConfigError`) naming a bad key,
    and :class:`cudalloc.CudallocError` when CUDA is already initialised or
    the device cannot be used. Returns the ``CUDAPluggableAllocator``.
    """
    global _allocator, _conf, _hooks_wired
    try:
        import torch
    except ImportError as e:
        raise _lib.CudallocError(f"cudalloc.enable() needs PyTorch: {e}") from None
    if patch_torch is None:
        patch_torch = not _falsy(os.environ.get(PATCH_ENV, "1"))
    eff = effective_conf(conf)
    with _lock:
        if _allocator is not None:
            if eff != _conf:
                raise _lib.CudallocError(
                    f"cudalloc is already enabled with configuration {_conf!r}; "
                    f"cannot switch to {eff!r} in the same process"
                )
            if patch_torch:
                _patch()
            return _allocator
        mem = getattr(getattr(torch, "cuda", None), "memory", None)
        if mem is None or not hasattr(mem, "CUDAPluggableAllocator"):
            raise _lib.CudallocError(
                "this PyTorch has no torch.cuda.memory.CUDAPluggableAllocator "
                "(cudalloc needs PyTorch >= 2.0 built with CUDA)"
            )
        if torch.cuda.is_initialized():
            raise _lib.CudallocError(_TOO_LATE)
        # Starts cudalloc, or joins the one CuPy's or Numba's start began
        # (cudalloc/_frameworks.py says when that is allowed).
        in_force = _frameworks.start(conf, "cudalloc.enable()", "PyTorch")
        graph_pools = in_force.get("graph_pools") == "on"
        # cudalloc_malloc_torch throws a C++ exception where plain malloc
        # would return NULL: PyTorch does not check its allocator's NULL,
        # but it turns the exception into RuntimeError ("CUDA out of
        # memory. ..." with the diagnosis). Older libraries lack it.
        alloc_name = ALLOC_FN if _lib.has(ALLOC_FN) else "cudalloc_malloc"
        alloc = mem.CUDAPluggableAllocator(_lib.loaded_path(), alloc_name, "cudalloc_free")
        inner = alloc.allocator()
        if graph_pools:
            lacking = [h for h in _POOL_HOOKS if not hasattr(inner, h)]
            if lacking:
                # A pool that is never ended would hold every release back.
                raise _lib.CudallocError(
                    f"graph_pools:on needs PyTorch's {', '.join(lacking)}, which this "
                    "PyTorch lacks; leave graph_pools off"
                )
        wired = []
        for setter, export in _HOOKS:
            fn = getattr(inner, setter, None)
            if fn is not None and _lib.has(export):  # an older library may lack it
                fn(_lib.address(export))
                wired.append(setter)
        missing = [h for h in _ESSENTIAL_HOOKS if h not in wired]
        if missing:
            warnings.warn(
                f"cudalloc: this PyTorch lacks {', '.join(missing)}: "
                "torch.cuda.empty_cache() / Tensor.record_stream will not reach "
                "cudalloc (call cudalloc.empty_cache() directly)",
                stacklevel=2,
            )
        if "set_begin_allocate_to_pool" not in wired:
            warnings.warn(
                "cudalloc: this PyTorch lacks set_begin_allocate_to_pool, so cudalloc "
                "cannot refuse CUDA graph capture (torch.cuda.graph, "
                "make_graphed_callables, torch.compile's cudagraphs): a graph's memory "
                "would come from the shared cache and could be handed out again while "
                "the graph is replayed. Do not capture CUDA graphs under cudalloc.",
                stacklevel=2,
            )
        try:
            mem.change_current_allocator(alloc)
        except RuntimeError as e:
            raise _lib.CudallocError(f"{_TOO_LATE} (PyTorch: {e})") from None
        _allocator, _conf, _hooks_wired = alloc, eff, tuple(wired)
        if patch_torch:
            _patch()
        return alloc


# torch.cuda functions answered by cudalloc once patched: name -> replacement.
def _replacements():
    s = _stats
    return {
        "memory_stats": s.memory_stats,
        "memory_stats_as_nested_dict": s.memory_stats_as_nested_dict,
        "memory_allocated": s.memory_allocated,
        "max_memory_allocated": s.max_memory_allocated,
        "memory_reserved": s.memory_reserved,
        "max_memory_reserved": s.max_memory_reserved,
        "memory_cached": s.memory_reserved,  # torch's deprecated aliases
        "max_memory_cached": s.max_memory_reserved,
        "reset_peak_memory_stats": s.reset_peak_memory_stats,
        "reset_max_memory_allocated": s.reset_peak_memory_stats,
        "reset_max_memory_cached": s.reset_peak_memory_stats,
        "reset_accumulated_memory_stats": s.reset_accumulated_memory_stats,
        "get_per_process_memory_fraction": s.get_per_process_memory_fraction,
        "memory_summary": s.memory_summary,
        # Memory snapshots (torch.cuda.memory; memory_snapshot in torch.cuda too).
        "memory_snapshot": _snapshot.memory_snapshot,
        "_snapshot": _snapshot.snapshot,
        "_dump_snapshot": _snapshot.dump_snapshot,
        "_record_memory_history": _snapshot.record_memory_history,
    }


# torch.accelerator (torch >= 2.9) asks the device allocator registry, where
# a pluggable allocator is not registered: its figures would be torch's idle
# native allocator's. These answer from cudalloc; the argument is named
# device_index there.
_ACCELERATOR = (
    "memory_stats",
    "memory_stats_as_nested_dict",
    "empty_cache",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "max_memory_reserved",
    "reset_peak_memory_stats",
    "reset_accumulated_memory_stats",
)


def _patch():
    torch = sys.modules.get("torch")
    if torch is None:
        raise _lib.CudallocError("patch_torch(): torch is not imported")
    modules = [m for m in (getattr(torch, "cuda", None),) if m is not None]
    mem = getattr(modules[0], "memory", None) if modules else None
    if mem is not None:
        modules.append(mem)
    accel = getattr(torch, "accelerator", None)
    if accel is not None:
        modules.append(accel)
    everything = dict(_replacements(), empty_cache=_stats.empty_cache)
    for module in modules:
        if module is accel:
            repls = {n: everything[n] for n in _ACCELERATOR}
        else:
            repls = _replacements()  # torch.cuda.empty_cache reaches cudalloc by itself
        for name, repl in repls.items():
            if (module, name) in _originals or not hasattr(module, name):
                continue
            original = getattr(module, name)

            def make(repl=repl, original=original):
                @functools.wraps(original)
                def patched(*args, **kwargs):
                    if "device_index" in kwargs:
                        kwargs["device"] = kwargs.pop("device_index")
                    return repl(*args, **kwargs)

                patched.__cudalloc__ = True
                return patched

            _originals[(module, name)] = original
            setattr(module, name, make())


def patch_torch():
    """Make ``torch.cuda.memory_stats``, ``memory_allocated``,
    ``max_memory_allocated``, ``memory_reserved``, ``max_memory_reserved``,
    ``reset_peak_memory_stats``, ``reset_accumulated_memory_stats``,
    ``get_per_process_memory_fraction``, ``memory_summary`` (and aliases)
    answer from cudalloc, and the same statistics in ``torch.accelerator`` (torch >= 2.9);
    likewise the memory snapshots: ``torch.cuda.memory_snapshot`` and
    ``torch.cuda.memory._snapshot``, ``_dump_snapshot``, ``_record_memory_history``.
    Under a pluggable allocator torch's own versions raise (or, in
    ``torch.accelerator``, describe the idle native allocator). Needs
    :func:`enable` first. Idempotent."""
    with _lock:
        if _allocator is None:
            raise _lib.CudallocError(
                "patch_torch(): cudalloc is not torch's allocator; call cudalloc.enable() first"
            )
        _patch()


def unpatch_torch():
    """Put torch's own statistics functions back."""
    with _lock:
        for (module, name), original in list(_originals.items()):
            setattr(module, name, original)
        _originals.clear()


def is_patched():
    return bool(_originals)
