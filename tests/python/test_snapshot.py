"""Memory snapshots in torch's format, on the sim backend (no torch): the
dict's shape, the history switch, the pickle, and what torch's viewer needs
(memviz_check). test_real_torch.py loads the same in torch's own viewer."""

import pickle
import sys

import pytest

import cudalloc
from cudalloc import _lib
from memviz_check import check_pickle, check_viewer

MiB = 1 << 20


@pytest.fixture
def history(lib):
    """History on for the test (from an empty cache), off (and empty) after it."""
    cudalloc.empty_cache()
    cudalloc.record_memory_history(max_entries=100_000, clear_history=True)
    yield
    cudalloc.record_memory_history(None)


def blocks_at(snap, addr):
    return [b for s in snap["segments"] for b in s["blocks"] if b["address"] == addr]


def test_snapshot_has_torchs_fields_and_states(lib):
    cudalloc.empty_cache()
    p = lib.cudalloc_malloc(1000, 1, 0x10)
    q = lib.cudalloc_malloc(3 * MiB, 1, 0x10)
    r = lib.cudalloc_malloc(4096, 1, 0x10)
    lib.cudalloc_record_stream(r, 0x77)
    lib.cudalloc_free(r, 0, 1, 0x10)  # waits for stream 0x77's events
    try:
        s = cudalloc.snapshot()
        assert set(s) == {"segments", "device_traces"}
        assert len(s["device_traces"]) == cudalloc.device_count()
        check_viewer(s)
        (b,) = blocks_at(s, p)
        assert (b["size"], b["requested_size"], b["state"], b["frames"]) == (
            1024,
            1000,
            "active_allocated",
            [],
        )
        (pending,) = blocks_at(s, r)
        assert pending["state"] == "active_pending_free"
        seg = next(x for x in s["segments"] if x["address"] == q)
        assert seg["segment_type"] == "large" and seg["total_size"] == 20 * MiB
        assert seg["device"] == 1 and seg["stream"] == 0x10
        assert seg["segment_pool_id"] == (0, 0) and seg["is_expandable"] is False
        assert seg["requested_size"] == 3 * MiB
        small = next(x for x in s["segments"] if x["address"] == p)
        assert small["segment_type"] == "small"
        assert [x["state"] for x in small["blocks"]][:3] == [
            "active_allocated",
            "active_pending_free",
            "inactive",
        ]
        stats = cudalloc.raw_stats(1)
        assert sum(x["total_size"] for x in s["segments"] if x["device"] == 1) == stats["reserved_bytes"]
        assert [x["address"] for x in cudalloc.memory_snapshot()] == [x["address"] for x in s["segments"]]
        assert cudalloc.memory_snapshot(mempool_id=(3, 4)) == []
    finally:
        lib.cudalloc_free(p, 0, 1, 0x10)
        lib.cudalloc_free(q, 0, 1, 0x10)
    cudalloc.check_invariants()


def test_history_records_the_actions_in_order(history, lib):
    p = lib.cudalloc_malloc(5 * MiB, 0, 0x20)
    q = lib.cudalloc_malloc(512, 0, 0x20)
    lib.cudalloc_free(q, 0, 0, 0x20)
    lib.cudalloc_free(p, 0, 0, 0x20)
    assert not lib.cudalloc_malloc(1 << 45, 0, 0x20)  # an OOM, recorded
    cudalloc.empty_cache()
    s = cudalloc.snapshot()
    check_viewer(s)
    trace = s["device_traces"][0]
    got = [(e["action"], e.get("addr"), e["size"]) for e in trace]
    assert got[:6] == [
        ("segment_alloc", p, 20 * MiB),
        ("alloc", p, 5 * MiB),
        ("segment_alloc", q, 2 * MiB),
        ("alloc", q, 512),
        ("free_requested", q, 512),
        ("free_completed", q, 512),
    ], got
    assert got[6:8] == [("free_requested", p, 5 * MiB), ("free_completed", p, 5 * MiB)]
    oom = trace[8]
    assert oom["action"] == "oom" and oom["size"] == 1 << 45 and oom["device_free"] > 0
    assert sorted(e["addr"] for e in trace[9:]) == sorted([p, q])
    assert {e["action"] for e in trace[9:]} == {"segment_free"}
    assert all(e["stream"] == 0x20 for e in trace if e["action"] != "snapshot")
    # The snapshot just read is marked in the next one.
    assert cudalloc.snapshot()["device_traces"][0][-1]["action"] == "snapshot"


def test_history_is_bounded_skips_and_switches_off(lib):
    cudalloc.record_memory_history("all", max_entries=4, clear_history=True)
    try:
        for _ in range(5):
            lib.cudalloc_free(lib.cudalloc_malloc(4096, 0, 0x30), 0, 0, 0x30)
        trace = cudalloc.snapshot()["device_traces"][0]
        assert [e["action"] for e in trace] == [
            "free_completed",
            "alloc",
            "free_requested",
            "free_completed",
        ], "the newest 4"
        cudalloc.record_memory_history("all", max_entries=100, skip_actions=["free_requested"])
        lib.cudalloc_free(lib.cudalloc_malloc(4096, 0, 0x30), 0, 0, 0x30)
        actions = [e["action"] for e in cudalloc.snapshot()["device_traces"][0]]
        assert "free_requested" not in actions and actions[-2:] == ["alloc", "free_completed"]
        cudalloc.record_memory_history("state")  # torch keeps one action then
        lib.cudalloc_free(lib.cudalloc_malloc(4096, 0, 0x30), 0, 0, 0x30)
        assert len(cudalloc.snapshot()["device_traces"][0]) == 1
        # torch's older form: a bool and trace_alloc_max_entries.
        cudalloc.record_memory_history(True, trace_alloc_max_entries=3)
        for _ in range(3):
            lib.cudalloc_free(lib.cudalloc_malloc(4096, 0, 0x30), 0, 0, 0x30)
        assert len(cudalloc.snapshot()["device_traces"][0]) == 3
    finally:
        cudalloc.record_memory_history(None)
    lib.cudalloc_free(lib.cudalloc_malloc(4096, 0, 0x30), 0, 0, 0x30)
    assert cudalloc.snapshot()["device_traces"] == [[], []]


@pytest.mark.parametrize(
    "args, kwargs, exc",
    [
        (("everything",), {}, ValueError),
        ((), {"context": "some"}, ValueError),
        ((), {"stacks": "cpp"}, ValueError),
        ((), {"max_entries": "many"}, TypeError),
        ((), {"max_entries": 2.5}, TypeError),
        ((), {"skip_actions": ["malloc"]}, ValueError),
        ((), {"no_such_argument": 1}, TypeError),
    ],
)
def test_bad_history_arguments_change_nothing(lib, args, kwargs, exc):
    with pytest.raises(exc):
        cudalloc.record_memory_history(*args, **kwargs)
    lib.cudalloc_free(lib.cudalloc_malloc(4096, 0, 0x30), 0, 0, 0x30)
    assert cudalloc.snapshot()["device_traces"] == [[], []], "still off"


def test_dump_snapshot_writes_a_pickle_the_viewer_reads(history, lib, tmp_path):
    ps = [lib.cudalloc_malloc(n, 0, 0x40) for n in (700, 3 * MiB, 12 * MiB, 90_000)]
    for p in ps[::2]:
        lib.cudalloc_free(p, 0, 0, 0x40)
    path = tmp_path / "snap.pickle"
    cudalloc.dump_snapshot(str(path))
    data = path.read_bytes()
    check_pickle(data)
    s = pickle.loads(data)
    check_viewer(s)
    assert any(b["address"] == ps[1] for seg in s["segments"] for b in seg["blocks"])
    assert [e["action"] for e in s["device_traces"][0]].count("alloc") == 4
    # The default protocol of a newer Python would not do: the dump pins 4.
    if sys.version_info >= (3, 14):
        with pytest.raises(AssertionError):
            check_pickle(pickle.dumps(s))
    for p in ps[1::2]:
        lib.cudalloc_free(p, 0, 0, 0x40)
    cudalloc.check_invariants()


def test_the_viewer_check_catches_an_inconsistent_trace():
    # The check itself: a free_requested of a block the snapshot does not
    # hold, and a block outside every segment, are what break the viewer.
    seg = {
        "device": 0,
        "address": 4096,
        "total_size": 2048,
        "allocated_size": 0,
        "active_size": 0,
        "blocks": [{"address": 4096, "size": 2048, "requested_size": 0, "state": "inactive"}],
    }
    ev = {"action": "free_requested", "addr": 4096, "size": 512, "stream": 0, "time_us": 1, "frames": []}
    with pytest.raises(AssertionError, match="unknown block"):
        check_viewer({"segments": [seg], "device_traces": [[ev]]})
    done = dict(ev, action="free_completed", addr=1 << 30)
    with pytest.raises(AssertionError, match="outside"):
        check_viewer({"segments": [seg], "device_traces": [[done]]})


def test_missing_exports_are_a_clear_error(monkeypatch, lib):
    real = _lib.has
    monkeypatch.setattr(_lib, "has", lambda name: name != "cudalloc_snapshot_json" and real(name))
    with pytest.raises(cudalloc.CudallocError, match="has no cudalloc_snapshot_json"):
        cudalloc.snapshot()
