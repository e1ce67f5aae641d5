"""Memory snapshots in PyTorch's ``torch.cuda.memory._snapshot()`` format.

``snapshot()`` gives the dict torch's viewer reads (``torch.cuda._memory_viz``:
``segment_plot``, ``trace_plot``, ``segsum``; and pytorch.org/memory_viz, which
takes the pickle ``dump_snapshot()`` writes). ``record_memory_history()``
switches on the history of allocator actions a snapshot carries, as torch's
``_record_memory_history`` does. Under ``patch_torch`` torch's own
``_snapshot``, ``_dump_snapshot``, ``_record_memory_history`` and
``memory_snapshot`` answer from here.

cudalloc records no stack traces: every ``frames`` list is empty.
"""

import json
import numbers
import pickle
import sys

from . import _lib

# The pickle protocol of dump_snapshot(): pytorch.org/memory_viz reads
# protocols 2 to 4 only (Python 3.14 writes 5 by default).
PICKLE_PROTOCOL = 4

_ACTIONS = (
    "alloc",
    "free_requested",
    "free_completed",
    "segment_alloc",
    "segment_free",
    "oom",
    "snapshot",
)
_skip = frozenset()  # actions record_memory_history(skip_actions=...) leaves out


def _require(name):
    if not _lib.has(name):
        raise _lib.CudallocError(f"this libcudalloc.so ({_lib.loaded_path()}) has no {name}")
    return _lib.lib()


def snapshot(device=None, augment_with_fx_traces=False):
    """Every segment of every device with its blocks, and each device's
    recorded actions, as ``torch.cuda.memory._snapshot()`` returns them:
    ``{"segments": [...], "device_traces": [[...], ...]}``.

    ``device`` is ignored (all devices, as torch's), as is
    ``augment_with_fx_traces`` (there are no frames to augment)."""
    _require("cudalloc_snapshot_json")
    s = json.loads(_lib.read_sized(_lib.lib().cudalloc_snapshot_json))
    for seg in s["segments"]:
        seg["segment_pool_id"] = tuple(seg["segment_pool_id"])
    if _skip:
        s["device_traces"] = [
            [e for e in trace if e["action"] not in _skip] for trace in s["device_traces"]
        ]
    return s


def dump_snapshot(filename="dump_snapshot.pickle", augment_with_fx_traces=False):
    """Write :func:`snapshot` pickled to ``filename``, for pytorch.org/memory_viz
    or ``python -m torch.cuda._memory_viz``."""
    s = snapshot(augment_with_fx_traces=augment_with_fx_traces)
    with open(filename, "wb") as f:
        pickle.dump(s, f, protocol=PICKLE_PROTOCOL)


def memory_snapshot(mempool_id=None, include_traces=True):
    """The segments of :func:`snapshot` (``torch.cuda.memory_snapshot()``),
    those of private pool ``mempool_id`` only when given."""
    segments = snapshot()["segments"]
    if mempool_id is not None:
        pool = tuple(mempool_id)
        segments = [s for s in segments if s["segment_pool_id"] == pool]
    return segments


def _entries(n, what):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{what} must be an int, not {type(n).__name__}")
    # torch keeps at least one; a C size_t holds at most 2**64 - 1.
    return min(max(int(n), 1), 2**64 - 1)


def record_memory_history(enabled="all", *args, **kwargs):
    """Switch the history of allocator actions in snapshots on or off, with
    torch's ``_record_memory_history`` arguments:

    - ``enabled``: ``"all"`` (keep the newest ``max_entries`` actions per
      device), ``"state"`` (at most one; cudalloc has no per-block stack
      traces to keep), ``None`` (off, dropping what was recorded); or torch's
      older boolean form, ``enabled=True, trace_alloc_max_entries=N``.
    - ``max_entries`` (default ``sys.maxsize``: unbounded in practice, as
      torch's; each action takes about 80 bytes).
    - ``clear_history``: drop what was recorded when switching on.
    - ``skip_actions``: actions left out of later snapshots (they still take
      room among the ``max_entries``).
    - ``context``, ``stacks``, ``device``, ``compile_context``,
      ``global_record_annotations``: accepted and checked as torch does; no
      stack traces are recorded.

    Off by default; while off, allocations and frees pay one check.
    """
    if isinstance(enabled, bool):
        return _legacy(enabled, *args, **kwargs)
    return _record(enabled, *args, **kwargs)


def _legacy(
    enabled,
    record_context=True,
    trace_alloc_max_entries=1,
    trace_alloc_record_context=False,
    device=None,
    record_context_cpp=False,
    clear_history=False,
    compile_context=False,
    global_record_annotations=False,
    skip_actions=None,
):
    _set(enabled, _entries(trace_alloc_max_entries, "trace_alloc_max_entries"), clear_history, skip_actions)


def _record(
    enabled="all",
    context="all",
    stacks="all",
    max_entries=sys.maxsize,
    device=None,
    clear_history=False,
    compile_context=False,
    global_record_annotations=False,
    skip_actions=None,
):
    if enabled not in (None, "state", "all"):
        raise ValueError(f"expected enabled to be 'state', 'all', or None, not {enabled!r}")
    if context not in (None, "state", "alloc", "all"):
        raise ValueError(f"expected context to be 'state', 'alloc', 'all', or None, not {context!r}")
    if stacks not in ("python", "all"):
        raise ValueError(f"expected stacks to be 'python' or 'all', not {stacks!r}")
    n = _entries(max_entries, "max_entries") if enabled == "all" else 1
    _set(enabled is not None, n, clear_history, skip_actions)


def _set(on, max_entries, clear_history, skip_actions):
    global _skip
    skip = frozenset(skip_actions or ())
    unknown = sorted(skip - set(_ACTIONS))
    if unknown:
        raise ValueError(f"skip_actions: unknown actions {unknown}; known: {list(_ACTIONS)}")
    lib = _require("cudalloc_record_memory_history")
    _lib.check(lib.cudalloc_record_memory_history(1 if on else 0, max_entries, 1 if clear_history else 0))
    _skip = skip if on else frozenset()
