"""What torch's snapshot viewer (torch/utils/viz/MemoryViz.js, served at
pytorch.org/memory_viz) needs of a snapshot, checked in Python.

The viewer unpickles the file with its own small unpickler (protocols 2 to 4,
a fixed set of opcodes), then, for the "Allocator State History" view, starts
from the snapshot's segments and active blocks and walks the device's trace
backwards, undoing one action per step. A step it cannot undo (a free of a
block it does not hold, a segment it does not know) or a block outside every
segment makes the page fail. ``check_viewer`` walks the same way and asserts
every step; ``check_pickle`` checks the file against the unpickler.

Imported by test_snapshot.py (in process) and by test_real_torch.py's children.
"""

import pickletools

# The opcodes the viewer's unpickler reads (PROTO 2..4 only).
VIEWER_OPCODES = frozenset(
    """PROTO FRAME STOP MARK MEMOIZE BINPUT LONG_BINPUT BINGET LONG_BINGET
    EMPTY_DICT DICT SETITEM SETITEMS EMPTY_LIST LIST APPEND APPENDS
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 SHORT_BINUNICODE BINUNICODE
    BININT BININT1 BININT2 LONG1 BINFLOAT NEWTRUE NEWFALSE NONE""".split()
)


def check_pickle(data):
    """Every opcode of pickle ``data`` is one the viewer reads."""
    seen = set()
    for op, arg, _pos in pickletools.genops(data):
        seen.add(op.name)
        if op.name == "PROTO":
            assert 2 <= arg <= 4, f"protocol {arg}: the viewer reads 2 to 4"
    extra = seen - VIEWER_OPCODES
    assert not extra, f"opcodes the viewer cannot read: {sorted(extra)}"


ACTIVE = ("active_allocated", "active_pending_free")


def _segments(snap, device):
    """{address: size} of the device's segments; checks each is tiled by its blocks."""
    segs = {}
    blocks = {}
    for s in snap["segments"]:
        if s["device"] != device:
            continue
        assert s["address"] not in segs, f"segment {s['address']:#x} twice"
        segs[s["address"]] = s["total_size"]
        at = s["address"]
        for b in s["blocks"]:
            assert b["address"] == at, f"block at {b['address']:#x}, expected {at:#x}"
            assert b["state"] in ACTIVE + ("inactive",), b
            assert 0 <= b["requested_size"] <= b["size"], b
            if b["state"] in ACTIVE:
                blocks[at] = b["state"] == "active_pending_free"
            at += b["size"]
        assert at == s["address"] + s["total_size"], f"segment {s['address']:#x} not tiled"
        allocated = sum(b["size"] for b in s["blocks"] if b["state"] == "active_allocated")
        active = sum(b["size"] for b in s["blocks"] if b["state"] in ACTIVE)
        assert (s["allocated_size"], s["active_size"]) == (allocated, active), s
    return segs, blocks


def _inside(segs, addr):
    return any(base <= addr < base + size for base, size in segs.items())


def check_viewer(snap):
    """Walk every device's trace back from the snapshot as the viewer does."""
    assert set(snap) >= {"segments", "device_traces"}, set(snap)
    for device, trace in enumerate(snap["device_traces"]):
        # The viewer merges a free_requested directly followed by the
        # free_completed of the same address into one "free".
        events = []
        for e in trace:
            assert e["action"] in (
                "alloc",
                "free_requested",
                "free_completed",
                "segment_alloc",
                "segment_free",
                "oom",
                "snapshot",
            ), e
            assert isinstance(e["time_us"], int) and e["frames"] == [], e
            if e["action"] == "oom":
                assert "device_free" in e and "addr" not in e, e
            if (
                e["action"] == "free_completed"
                and events
                and events[-1]["action"] == "free_requested"
                and events[-1]["addr"] == e["addr"]
            ):
                events[-1] = dict(events[-1], action="free")
                continue
            events.append(e)
        segs, blocks = _segments(snap, device)
        for i in range(len(events) - 1, -1, -1):
            for addr in blocks:
                assert _inside(segs, addr), f"device {device} step {i}: block {addr:#x} outside"
            e = events[i]
            act = e["action"]
            if act == "free":
                blocks[e["addr"]] = False
            elif act == "free_requested":
                assert e["addr"] in blocks, f"step {i}: free_requested of an unknown block {e}"
                blocks[e["addr"]] = False
            elif act == "free_completed":
                blocks[e["addr"]] = True
            elif act == "alloc":
                blocks.pop(e["addr"], None)
            elif act == "segment_free":
                assert e["addr"] not in segs, f"step {i}: segment_free of a live segment {e}"
                segs[e["addr"]] = e["size"]
            elif act == "segment_alloc":
                assert segs.get(e["addr"]) == e["size"], f"step {i}: unknown segment {e}"
                del segs[e["addr"]]
        for addr in blocks:
            assert _inside(segs, addr), f"device {device} start: block {addr:#x} outside"
