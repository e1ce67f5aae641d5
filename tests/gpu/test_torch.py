"""PyTorch end to end on a real GPU (not run in CI: no GPU there).

Run on a GPU machine with cudalloc installed (pip install .) or with
CUDALLOC_LIBRARY pointing at a built libcudalloc.so and PYTHONPATH=python:
    python -m pytest -q tests/gpu/test_torch.py
Each test runs in a fresh interpreter: the allocator swap must happen before
CUDA initialises, and only once per process.
"""
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(code, **env):
    e = dict(os.environ)
    e.setdefault("PYTHONPATH", os.path.join(ROOT, "python"))
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True, timeout=600)


TRAIN = """
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator(device="cuda").manual_seed(1)
    losses = []
    for step in range(50):
        x = torch.randn(256, 512, device="cuda", generator=g)
        y = torch.randint(0, 10, (256,), device="cuda", generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    print(" ".join(f"{l:.6f}" for l in losses))
"""


def test_same_losses_as_native():
    native = run(TRAIN)
    ours = run("import cudalloc; cudalloc.enable()\n" + textwrap.dedent(TRAIN))
    assert native.returncode == 0 and ours.returncode == 0, native.stderr + ours.stderr
    assert native.stdout == ours.stdout


def test_empty_cache_lowers_reserved_and_stats_are_patched():
    r = run(
        """
        import cudalloc, torch
        cudalloc.enable()
        xs = [torch.empty(64 << 20, dtype=torch.uint8, device="cuda") for _ in range(8)]
        assert torch.cuda.memory_allocated() >= 8 * (64 << 20)
        del xs
        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        after = torch.cuda.memory_reserved()
        assert after < before, (before, after)
        assert torch.cuda.memory_stats()["num_ooms"] == 0
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr


def test_record_stream_on_side_stream_is_safe():
    r = run(
        """
        import cudalloc, torch
        cudalloc.enable()
        side = torch.cuda.Stream()
        for _ in range(20):
            x = torch.full((32 << 20,), 7.0, device="cuda")
            with torch.cuda.stream(side):
                y = x * 2
                x.record_stream(side)
            del x
            z = torch.full((32 << 20,), 1.0, device="cuda")   # may not reuse x's block before side is done
            torch.cuda.synchronize()
            assert bool((y == 14.0).all()) and bool((z == 1.0).all())
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr


def test_oom_is_diagnosed_and_the_process_continues():
    r = run(
        """
        import cudalloc, torch
        cudalloc.enable()
        try:
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
        except RuntimeError:
            pass
        else:
            raise AssertionError("1 PiB allocated")
        x = torch.ones(1 << 20, device="cuda")
        print(int(x.sum().item()))
        """
    )
    assert r.returncode == 0, r.stderr
    assert "out of memory" in r.stderr and "could not allocate" in r.stderr
    assert r.stdout.strip() == str(1 << 20)


def test_cudalloc_env_enables_from_the_environment_alone():
    r = run(
        """
        import torch, cudalloc
        x = torch.ones(1000, device="cuda")
        assert cudalloc.enabled()
        assert torch.cuda.memory_stats()["allocated_bytes.all.current"] >= 4000
        print("ok")
        """,
        CUDALLOC="1",
    )
    assert r.returncode == 0, r.stderr


def test_two_processes_share_one_gpu(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, torch, torch.distributed as dist, cudalloc
            cudalloc.enable()
            dist.init_process_group("gloo")
            x = torch.ones(1 << 20, device="cuda") * (dist.get_rank() + 1)
            t = x.sum().cpu()
            dist.all_reduce(t)
            assert int(t.item()) == 3 * (1 << 20), t
            assert cudalloc.memory_allocated() >= 4 << 20
            dist.destroy_process_group()
            """
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
