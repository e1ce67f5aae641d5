"""enable() / patch_torch() / CUDALLOC=1 against a real PyTorch, with no GPU.

The rest of this suite uses the fake torch in tests/python/fake_torch, which
can drift from the real API. These tests run the same entry points in a real
PyTorch built with CUDA (the PyPI wheel imports fine on a machine without a
GPU): the CUDAPluggableAllocator is built from cudalloc's exports, every hook
is wired, torch's own statistics functions are replaced, and CUDA is never
initialised by any of it. They use the sim backend, since no tensor can be
allocated without a driver; tests/gpu/test_torch.py does that on a GPU.

The interpreter is $CUDALLOC_TORCH_PYTHON: .ci/setup.d/torch.sh makes a venv
with torch, and scripts/test.d/python.sh sets the variable when that venv
works. The tests are skipped when it is unset.
"""

import os
import subprocess
import textwrap

import pytest

from conftest import INSTALLED, PYTHON_SRC, SIM_CONF, child_env as _child_env

PY = os.environ.get("CUDALLOC_TORCH_PYTHON")
pytestmark = pytest.mark.skipif(
    not PY,
    reason="CUDALLOC_TORCH_PYTHON is unset (.ci/setup.d/torch.sh makes the venv, "
    "scripts/test.d/python.sh finds it)",
)



def child_env(**extra):
    """The torch venv lacks cudalloc: against an installed copy (the pip check),
    point the child at the site-packages that holds it (and its library)."""
    if INSTALLED:
        import cudalloc

        site = os.path.dirname(os.path.dirname(os.path.abspath(cudalloc.__file__)))
        extra["extra_path"] = [*extra.get("extra_path", []), site]
    return _child_env(**extra)


PRELUDE = textwrap.dedent(
    """
    import os, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    assert not getattr(torch, "__fake__", False) and torch.version.cuda, torch.__file__
    assert not torch.cuda.is_initialized()
    import cudalloc
    if os.environ.get("CUDALLOC_TEST_INSTALLED") == "1":  # the wheel's copy
        assert "site-packages" in cudalloc.__file__ and "CUDALLOC_LIBRARY" not in os.environ
    """
)


def run(body, args=(), **env):
    code = PRELUDE + textwrap.dedent(body)
    r = subprocess.run(
        [PY, "-c", code, *args],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def test_the_wheel_is_the_real_torch():
    r = run("print(torch.__version__, torch.version.cuda)")
    print(r.stdout)


def test_enable_installs_a_pluggable_allocator_with_every_hook():
    run(
        f"""
        assert torch.cuda.get_allocator_backend() == "native"
        alloc = cudalloc.enable({SIM_CONF!r})
        assert isinstance(alloc, torch.cuda.memory.CUDAPluggableAllocator)
        assert torch.cuda.get_allocator_backend() == "pluggable"
        # Every optional hook this torch offers is wired, the essential two included.
        assert set(cudalloc.enabled_hooks()) == {{
            "set_init_fn", "set_reset_fn", "set_record_stream_fn", "set_memory_fraction_fn",
            "set_begin_allocate_to_pool", "set_end_allocate_to_pool_fn", "set_release_pool",
        }}, cudalloc.enabled_hooks()
        assert cudalloc.enable({SIM_CONF!r}) is alloc  # idempotent
        assert not torch.cuda.is_initialized()  # enabling never starts CUDA
        """
    )


def test_torch_statistics_answer_from_cudalloc_and_unpatch_restores_them():
    run(
        f"""
        originals = {{n: getattr(torch.cuda, n) for n in ("memory_stats", "memory_allocated")}}
        cudalloc.enable({SIM_CONF!r})
        from cudalloc import _lib
        p = _lib.lib().cudalloc_malloc(3 << 20, 1, None)
        assert p
        for stats in (
            torch.cuda.memory_stats(1),
            torch.cuda.memory.memory_stats("cuda:1"),
            torch.accelerator.memory_stats(device_index=1),
            torch.cuda.memory_stats(torch.device("cuda", 1)),
        ):
            assert stats["allocated_bytes.all.current"] == 3 << 20, stats
            assert "cudalloc.reserved_bytes" in stats
        assert torch.cuda.memory_allocated(1) == 3 << 20
        assert torch.cuda.max_memory_allocated(1) == 3 << 20
        assert torch.accelerator.memory_allocated(1) == 3 << 20
        assert torch.cuda.memory_reserved(1) >= 3 << 20
        assert torch.cuda.memory_allocated() == 0  # device 0: CUDA not initialised
        assert "cudalloc" in torch.cuda.memory_summary(1)
        assert torch.cuda.memory_stats.__name__ == "memory_stats"  # functools.wraps
        _lib.lib().cudalloc_free(p, 0, 1, None)
        torch.cuda.reset_peak_memory_stats(1)
        assert torch.cuda.max_memory_allocated(1) == 0
        # Both raise under a pluggable allocator in torch itself.
        assert torch.cuda.memory_stats(1)["allocation.all.allocated"] == 1
        torch.cuda.reset_accumulated_memory_stats(1)
        assert torch.cuda.memory_stats(1)["allocation.all.allocated"] == 0
        torch.accelerator.reset_accumulated_memory_stats(1)
        assert torch.cuda.get_per_process_memory_fraction(1) == 1.0
        _lib.lib().cudalloc_set_memory_fraction(0.25, 1)
        assert torch.cuda.get_per_process_memory_fraction("cuda:1") == 0.25
        try:
            torch.cuda.memory_allocated(5)
        except ValueError as e:
            assert "device 5 is not valid" in str(e), e
        else:
            raise AssertionError("device 5 accepted")
        cudalloc.unpatch_torch()
        for n, f in originals.items():
            assert getattr(torch.cuda, n) is f
        assert not torch.cuda.is_initialized()
        """
    )


def test_a_bad_configuration_names_the_key_and_leaves_torch_alone():
    run(
        """
        try:
            cudalloc.enable("backend:sim,small_max:lots")
        except ValueError as e:
            assert "small_max" in str(e) and "lots" in str(e), e
        else:
            raise AssertionError("bad conf accepted")
        assert not cudalloc.is_enabled() and not cudalloc.is_patched()
        assert torch.cuda.get_allocator_backend() == "native"
        """
    )


def test_cudalloc_1_enables_at_import_torch(tmp_path):
    # The .pth hook runs only from site-packages; in development mode a
    # sitecustomize holding the same line stands in (as in tests/gpu).
    with open(os.path.join(PYTHON_SRC, "cudalloc-autoenable.pth"), encoding="utf-8") as f:
        line = f.read()
    (tmp_path / "sitecustomize.py").write_text(line, encoding="utf-8")
    shim = str(tmp_path)
    body = """
        assert cudalloc.is_enabled() == (os.environ["CUDALLOC"] == "1")
        assert torch.cuda.get_allocator_backend() == (
            "pluggable" if os.environ["CUDALLOC"] == "1" else "native")
        """
    run(body, extra_path=[shim], CUDALLOC="1", CUDALLOC_CONF=SIM_CONF)
    run(body, extra_path=[shim], CUDALLOC="0", CUDALLOC_CONF=SIM_CONF)


def test_python_m_cudalloc_runs_a_script_with_cudalloc_enabled(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch, cudalloc\n"
        "assert cudalloc.is_enabled(), 'not enabled'\n"
        "assert torch.cuda.get_allocator_backend() == 'pluggable'\n"
        "print('args', sys.argv[1:])\n"
    )
    r = subprocess.run(
        [PY, "-m", "cudalloc", str(script), "--lr", "3"],
        env=child_env(CUDALLOC_CONF=SIM_CONF),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "args ['--lr', '3']" in r.stdout


def test_graph_pools_are_refused_through_torchs_own_cxx_call():
    # CUDA graph capture and use_mem_pool start with the allocator's
    # beginAllocateToPool; torch's C++ calls cudalloc's hook through a
    # std::function, and the C++ exception it throws comes back as
    # RuntimeError, before any capture (no GPU needed to reach it).
    run(
        f"""
        cudalloc.enable({SIM_CONF!r})
        from cudalloc import _lib
        for begin, pool in (
            (torch._C._cuda_beginAllocateCurrentThreadToPool, (5, 0)),
            (torch._C._cuda_beginAllocateToPool, (0, 9)),
        ):
            try:
                begin(1, pool)
            except RuntimeError as e:
                msg = str(e)
            else:
                raise AssertionError("the pool was accepted")
            assert "private memory pools" in msg, msg
            assert f"device 1, pool ({{pool[0]}}, {{pool[1]}})" in msg, msg
            assert _lib.lib().cudalloc_last_error() == _lib.ERR_UNSUPPORTED
        # Nothing else changed: cudalloc still serves.
        p = _lib.lib().cudalloc_malloc(1 << 20, 0, None)
        assert p and torch.cuda.memory_allocated(0) == 1 << 20
        _lib.lib().cudalloc_free(p, 0, 0, None)
        assert not torch.cuda.is_initialized()
        """
    )


def test_graph_pools_route_by_torchs_own_filter():
    # With graph_pools:on, torch's _cuda_beginAllocateCurrentThreadToPool hands
    # cudalloc a std::function made by torch (a lambda comparing thread ids):
    # this thread's allocations go to the pool, another thread's do not. The
    # end and the release come through torch's own calls too.
    run(
        f"""
        import ctypes, threading
        cudalloc.enable({SIM_CONF!r} + ",graph_pools:on")
        from cudalloc import _lib
        lib = _lib.lib()
        mt = lib.cudalloc_malloc_torch
        mt.restype, mt.argtypes = ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        MiB = 1 << 20
        torch._C._cuda_beginAllocateCurrentThreadToPool(1, (5, 0))
        assert lib.cudalloc_last_error() == 0, _lib.last_message()
        p = mt(MiB, 1, None)
        other = []
        t = threading.Thread(target=lambda: other.append(mt(MiB, 1, None)))
        t.start()
        t.join()
        q = other[0]
        assert p and q and p != q
        lib.cudalloc_free(p, 0, 1, None)
        assert mt(MiB, 1, None) == p, "the pool reuses its own block"
        lib.cudalloc_free(p, 0, 1, None)
        torch._C._cuda_endAllocateToPool(1, (5, 0))
        assert lib.cudalloc_last_error() == 0, _lib.last_message()
        r = mt(MiB, 1, None)
        assert r and r != p, "after the routing, the pool's block is not handed out"
        lib.cudalloc_free(q, 0, 1, None)
        lib.cudalloc_free(r, 0, 1, None)
        cudalloc.empty_cache()
        assert torch.cuda.memory_reserved(1) == 2 * MiB, "the live pool keeps its segment"
        torch._C._cuda_releasePool(1, (5, 0))
        assert lib.cudalloc_last_error() == 0, _lib.last_message()
        cudalloc.empty_cache()
        assert torch.cuda.memory_reserved(1) == 0
        cudalloc.check_invariants()
        assert not torch.cuda.is_initialized()
        """
    )


def test_snapshots_load_in_torchs_own_viewer(tmp_path):
    # torch's snapshot functions answer from cudalloc (under a pluggable
    # allocator torch's own raise), and what they give loads in torch's
    # viewer: _memory_viz's segsum, trace, segment_plot, trace_plot and the
    # flamegraph texts, in process and through its command line.
    path = tmp_path / "snap.pickle"
    run(
        f"""
        import base64, json, pickle, re, subprocess
        import torch.cuda._memory_viz as mv
        from memviz_check import check_pickle, check_viewer
        cudalloc.enable({SIM_CONF!r})
        from cudalloc import _lib
        lib = _lib.lib()
        MiB = 1 << 20
        torch.cuda.memory._record_memory_history(max_entries=100000)
        live = []
        for dev, stream in ((0, 0), (0, 0x51), (1, 0x52)):
            ps = [lib.cudalloc_malloc(n, dev, stream) for n in
                  (700, 4096, 3 * MiB, 25 * MiB, 100_000, 512, 9 * MiB, 2 * MiB)]
            assert all(ps)
            for p in ps[::3]:
                lib.cudalloc_free(p, 0, dev, stream)
            live += [(p, dev, stream) for i, p in enumerate(ps) if i % 3]
        # One free waits on another stream's work (record_stream).
        p, dev, stream = live.pop()
        lib.cudalloc_record_stream(p, 0x99)
        lib.cudalloc_free(p, 0, dev, stream)
        assert not lib.cudalloc_malloc(1 << 45, 0, 0)  # an OOM in the history
        s = torch.cuda.memory._snapshot()
        check_viewer(s)
        states = {{b["state"] for seg in s["segments"] for b in seg["blocks"]}}
        assert states == {{"active_allocated", "active_pending_free", "inactive"}}, states
        actions = {{e["action"] for t in s["device_traces"] for e in t}}
        assert {{"alloc", "free_requested", "free_completed", "segment_alloc", "oom"}} <= actions
        # The viewer's text reports.
        summary = mv.segsum(s)
        reserved = sum(x["total_size"] for x in s["segments"])
        assert f"segments: {{len(s['segments'])}}" in summary, summary
        assert str(mv.Bytes(reserved)) in summary, summary
        text = mv.trace(s)
        assert "cudaMalloc(" in text and "raise OutOfMemoryError" in text, text
        assert "Device 1" in text, text
        assert "active_pending_free" in mv.segments(s, format_flamegraph=lambda t: t)
        assert mv.memory(s, format_flamegraph=lambda t: t)
        # The HTML plots embed the pickle for the page's own unpickler.
        for html in (mv.segment_plot(s), mv.trace_plot(s), mv.trace_plot(s, plot_segments=True)):
            blob = json.loads(re.search(r"const local_files = (.*)", html).group(1))
            data = base64.b64decode(blob[0]["base64"]).rstrip(b"\\0")
            assert pickle.loads(data) == s
        mv.trace_plot(pickle.loads(pickle.dumps(s)), filter_freed=True)
        # _dump_snapshot writes what pytorch.org/memory_viz reads.
        torch.cuda.memory._dump_snapshot(sys.argv[1])
        with open(sys.argv[1], "rb") as f:
            data = f.read()
        check_pickle(data)
        check_viewer(pickle.loads(data))
        for cmd in (["stats"], ["trace"], ["segment_plot", "-o", sys.argv[1] + ".html"],
                    ["trace_plot", "-o", sys.argv[1] + ".t.html"]):
            r = subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", cmd[0],
                                sys.argv[1], *cmd[1:]], capture_output=True, text=True)
            assert r.returncode == 0, (cmd, r.stderr)
        # memory_snapshot gives the segments; history off drops the trace.
        assert [x["address"] for x in torch.cuda.memory_snapshot()] == [
            x["address"] for x in s["segments"]]
        torch.cuda.memory._record_memory_history(enabled=None)
        assert torch.cuda.memory._snapshot()["device_traces"] == [[], []]
        for p, dev, stream in live:
            lib.cudalloc_free(p, 0, dev, stream)
        cudalloc.check_invariants()
        assert not torch.cuda.is_initialized()
        """,
        args=[str(path)],
        extra_path=[os.path.dirname(os.path.abspath(__file__))],
    )
