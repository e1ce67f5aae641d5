"""PyTorch end-to-end on a real GPU (scripts/gpu-all.sh runs it on a GPU machine).

    pip install .   # or: cargo build --release --lib, then
    # CUDALLOC_LIBRARY=target/release/libcudalloc.so PYTHONPATH=python
    python -m pytest tests/gpu/test_torch.py -v

Every scenario runs in a fresh child process: PyTorch swaps its allocator at
most once per process, before CUDA initialises. Skipped without torch or CUDA,
unless CUDALLOC_REQUIRE_GPU=1 (scripts/gpu-all.sh sets it): then that is an
error, not a pass with every test skipped.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proctree import run_launcher  # noqa: E402 (after the path it is found on)

if os.environ.get("CUDALLOC_REQUIRE_GPU") == "1":
    import torch

    assert torch.cuda.is_available(), "CUDALLOC_REQUIRE_GPU=1 but torch.cuda.is_available() is False"
else:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env(**extra):
    e = dict(os.environ)
    e.pop("CUDALLOC", None)
    e.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    e.pop("PYTORCH_ALLOC_CONF", None)
    if "CUDALLOC_LIBRARY" in e or not _installed():
        # Development mode. Python reads no .pth file from PYTHONPATH, so the
        # start-up hook comes from a sitecustomize.py holding the same line.
        e["PYTHONPATH"] = os.pathsep.join(
            [_dev_hook_dir(), os.path.join(REPO, "python"), e.get("PYTHONPATH", "")]
        )
        e.setdefault("CUDALLOC_LIBRARY", os.path.join(REPO, "target", "release", "libcudalloc.so"))
    e.update({k: v for k, v in extra.items() if v is not None})
    return e


def _dev_hook_dir():
    import tempfile

    d = os.path.join(tempfile.gettempdir(), f"cudalloc-devhook-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(REPO, "python", "cudalloc-autoenable.pth"), encoding="utf-8") as f:
        line = f.read()
    with open(os.path.join(d, "sitecustomize.py"), "w", encoding="utf-8") as f:
        f.write(line)
    return d


def _installed():
    r = subprocess.run([sys.executable, "-c", "import cudalloc, os; print(os.path.isfile("
                        "os.path.join(os.path.dirname(cudalloc.__file__), 'libcudalloc.so')))"],
                       capture_output=True, text=True, cwd="/")
    return r.stdout.strip() == "True"


def run(code, timeout=90, check=True, args=(), **extra):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env(**extra),
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def last_json(r):
    return json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])


TRAIN = """
import json, os, sys
import torch
if os.environ.get("USE_CUDALLOC") == "1":
    import cudalloc
    cudalloc.enable()
torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda"
model = torch.nn.TransformerEncoder(
    torch.nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024,
                                     dropout=0.0, batch_first=True), num_layers=3).to(dev)
head = torch.nn.Linear(256, 1).to(dev)
opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=1e-3)
g = torch.Generator().manual_seed(1)
losses = []
for step in range(30):
    seq = int(torch.randint(16, 257, (1,), generator=g))  # variable sequence length
    x = torch.randn(8, seq, 256, generator=g).to(dev)
    y = torch.randn(8, 1, generator=g).to(dev)
    loss = torch.nn.functional.mse_loss(head(model(x).mean(dim=1)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(json.dumps({"losses": losses}))
"""


def test_training_losses_match_native():
    common = dict(CUBLAS_WORKSPACE_CONFIG=":4096:8")
    native = last_json(run(TRAIN, **common))["losses"]
    ours = last_json(run(TRAIN, USE_CUDALLOC="1", **common))["losses"]
    assert len(native) == len(ours) == 30
    assert torch.allclose(torch.tensor(ours, dtype=torch.float64),
                          torch.tensor(native, dtype=torch.float64), rtol=1e-6, atol=1e-7), (native, ours)


def test_empty_cache_lowers_reserved():
    run(
        """
        import torch, cudalloc
        cudalloc.enable()
        xs = [torch.empty(n << 20, dtype=torch.uint8, device="cuda") for n in (1, 3, 30, 64, 5)]
        del xs
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        assert before >= 100 << 20, before
        assert torch.cuda.memory_allocated() == 0
        torch.cuda.empty_cache()          # reaches cudalloc through set_reset_fn
        after = torch.cuda.memory_reserved()
        assert after < before and after == 0, (before, after)
        print("ok", before, after)
        """
    )


def test_memory_fraction_and_accumulated_stats_through_torch():
    # Both getters raise in torch under a pluggable allocator; patched, they
    # answer from cudalloc, and the setter reaches it through memory_fraction_fn.
    run(
        """
        import torch, cudalloc
        cudalloc.enable()
        assert torch.cuda.get_per_process_memory_fraction() == 1.0
        torch.cuda.set_per_process_memory_fraction(0.5)
        assert torch.cuda.get_per_process_memory_fraction() == 0.5
        total = torch.cuda.get_device_properties(0).total_memory
        limit = cudalloc.raw_stats()["limit_bytes"]
        assert 0 < limit <= total // 2 + (1 << 20), (limit, total)
        x = torch.empty(1 << 20, device="cuda")
        del x
        assert torch.cuda.memory_stats()["allocation.all.allocated"] >= 1
        torch.cuda.reset_accumulated_memory_stats()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == 0
        print("ok")
        """
    )


def test_record_stream_is_honoured():
    run(
        """
        import torch, cudalloc
        cudalloc.enable()
        n = 64 << 20
        side = torch.cuda.Stream()
        for trial in range(5):
            x = torch.zeros(n, dtype=torch.uint8, device="cuda")
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.cuda._sleep(200_000_000)   # keep the side stream busy
                x.fill_(7)                      # ... then write x
            x.record_stream(side)
            del x                               # freed while the side stream still uses it
            z = torch.zeros(n, dtype=torch.uint8, device="cuda")  # must not get x's memory early
            torch.cuda.synchronize()
            assert int(z.max()) == 0, f"trial {trial}: memory reused before the side stream finished"
            del z
        print("ok")
        """
    )


def test_oom_is_diagnosed_and_process_continues():
    r = run(
        """
        import sys, torch, cudalloc
        cudalloc.enable()
        held = []
        try:
            while True:
                held.append(torch.empty(1 << 30, dtype=torch.uint8, device="cuda"))
        except RuntimeError as e:
            sys.stderr.flush()
            print("TORCH-ERROR:", str(e).splitlines()[0], file=sys.stderr)
            # cudalloc throws c10::OutOfMemoryError: torch's typed OOM.
            assert isinstance(e, torch.cuda.OutOfMemoryError), type(e)
        n = len(held)
        assert n > 1, n
        assert torch.cuda.memory_stats()["num_ooms"] >= 1
        held.clear()
        again = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(n - 1)]
        print("continued", n, len(again))
        """
    )
    assert "continued" in r.stdout
    diag = r.stderr.find("cudalloc: out of memory on device 0")
    assert 0 <= diag < r.stderr.find("TORCH-ERROR:"), r.stderr
    # cudalloc_malloc_torch's C++ exception, as torch raised it.
    assert "TORCH-ERROR: CUDA out of memory." in r.stderr, r.stderr


SCRIPT = """
import sys, torch, cudalloc
t = torch.ones(1 << 20, device="cuda")
s = torch.cuda.memory_stats()
print("enabled", cudalloc.is_enabled(), cudalloc.is_patched())
print("allocated", torch.cuda.memory_allocated(), s["allocated_bytes.all.current"])
get = getattr(torch.cuda.memory, "_get_current_allocator", None)
print("allocator", type(get()).__name__ if get else "?")
"""


def test_cuda_graph_capture_is_refused_cleanly():
    # graph_pools:off (the default): torch.cuda.graph must fail before the
    # capture starts (not capture into shared memory), and CUDA goes on.
    r = run(
        """
        import torch, cudalloc
        cudalloc.enable()
        x = torch.ones(1 << 20, device="cuda")
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                y = x * 2
        except RuntimeError as e:
            assert "private memory pools" in str(e), e
        else:
            raise AssertionError("the capture ran")
        # torch.cuda.graph made its capture stream current before refusing.
        torch.cuda.set_stream(torch.cuda.default_stream())
        z = x + 1
        torch.cuda.synchronize()
        assert z.sum().item() == 2 * (1 << 20)
        print("refused, and CUDA works")
        """
    )
    assert "refused, and CUDA works" in r.stdout


def test_cuda_graphs_replay_from_private_pools():
    # graph_pools:on: a captured graph's memory is its pool's. Replays write
    # only there (eager tensors made after the capture keep their values),
    # make_graphed_callables (two graphs sharing one pool) matches eager
    # autograd, and the memory goes back once the graphs are gone.
    r = run(
        """
        import gc, torch, cudalloc
        cudalloc.enable("graph_pools:on")
        x = torch.ones(1 << 20, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up off the default stream, as torch asks
            y = x * 2
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            t = x * 2
            y = t + 1
            del t  # freed during the capture: the pool's to reuse, no one else's
        eager = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(16)]
        for v in (3.0, 5.0):
            x.fill_(v)
            g.replay()
            torch.cuda.synchronize()
            assert y.eq(2 * v + 1).all(), y[:4]
            assert all(e.eq(7.0).all() for e in eager), "a replay wrote into eager memory"
        assert y.data_ptr() not in {e.data_ptr() for e in eager}

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 1)).cuda()
        graphed = torch.cuda.make_graphed_callables(model, (torch.randn(32, 64, device="cuda"),))
        real = torch.randn(32, 64, device="cuda")
        out_g = graphed(real)
        out_g.sum().backward()
        grads_g = [p.grad.clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        out_e = model(real)
        out_e.sum().backward()
        assert torch.allclose(out_g, out_e, rtol=1e-5, atol=1e-6)
        for a, p in zip(grads_g, model.parameters()):
            assert torch.allclose(a, p.grad, rtol=1e-5, atol=1e-6)
        cudalloc.check_invariants()

        torch.cuda.synchronize()
        del eager, out_e
        gc.collect()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_reserved()
        # g's pool holds a 20 MiB segment (t and y, 4 MiB each): it goes back
        # only once the graph is gone (releasePool) and y is freed.
        del g, y
        gc.collect()
        torch.cuda.empty_cache()
        after = torch.cuda.memory_reserved()
        assert held - after >= 20 << 20, (held, after)
        cudalloc.check_invariants()
        print("graphs ok", held, after)
        """
    )
    assert "graphs ok" in r.stdout


def test_cudalloc_env_enables_and_patches_stats():
    r = run(SCRIPT, CUDALLOC="1")
    assert "enabled True True" in r.stdout
    assert f"allocated {4 << 20} {4 << 20}" in r.stdout


def test_python_m_cudalloc(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "cudalloc", str(script)], env=env(),
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "enabled True True" in r.stdout


def test_enable_after_cuda_init_refused():
    r = run(
        """
        import torch, cudalloc
        torch.ones(1, device="cuda")
        try:
            cudalloc.enable()
        except cudalloc.CudallocError as e:
            print("refused:", e)
        """
    )
    assert "refused:" in r.stdout and "before the first CUDA tensor" in r.stdout


DIST = """
import os, torch, torch.distributed as dist, cudalloc
dist.init_process_group("gloo")
rank = dist.get_rank()
assert cudalloc.is_enabled(), "CUDALLOC=1 must reach every rank"
t = torch.full((1 << 20,), float(rank + 1), device="cuda")
dist.all_reduce(t)
assert float(t[0]) == 3.0, float(t[0])
own = cudalloc.memory_allocated()
assert 4 << 20 <= own < 8 << 20, own   # its own tensor, not the other rank's too
print(f"rank {rank} ok pid {os.getpid()} allocated {own}")
dist.destroy_process_group()
"""


def test_two_ranks_share_one_gpu_with_gloo(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST)
    # torchrun starts each rank in its own session: on timeout run_launcher
    # stops torchrun (SIGTERM, then SIGKILL) and the ranks' process groups.
    r = run_launcher(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=29517", str(script)],
        env=env(CUDALLOC="1"), timeout=120, grace=15,
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "rank 0 ok" in r.stdout and "rank 1 ok" in r.stdout
