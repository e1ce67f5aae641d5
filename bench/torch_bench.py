"""Compare PyTorch allocators on a GPU, each in a fresh process, in one run.

    python bench/torch_bench.py [--write docs/BENCHMARKS.md]

Allocators: torch's native caching allocator, backend:cudaMallocAsync,
cudalloc, and RMM's rmm_torch_allocator when importable. Workloads:
1. alloc: torch.empty of mixed sizes (512 B .. 64 MiB) in a loop, us per tensor;
2. train: a small transformer with variable sequence lengths: step time,
   peak reserved, peak allocated.
Not run in CI (no GPU).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import textwrap

CHILD = r"""
import json, os, sys, time
which = sys.argv[1]
import torch
if which == "cudalloc":
    import cudalloc; cudalloc.enable()
elif which == "rmm":
    import rmm; from rmm.allocators.torch import rmm_torch_allocator
    rmm.reinitialize(pool_allocator=True)
    torch.cuda.memory.change_current_allocator(rmm_torch_allocator)
def peaks():
    s = torch.cuda.memory_stats()
    return s.get("reserved_bytes.all.peak", 0), s.get("allocated_bytes.all.peak", 0)
torch.manual_seed(0)
# 1. mixed-size allocation loop
sizes = [512 << (i % 18) for i in range(64)]
torch.cuda.synchronize(); t = time.perf_counter(); n = 0
for _ in range(200):
    xs = [torch.empty(s, dtype=torch.uint8, device="cuda") for s in sizes]
    n += len(xs); del xs
torch.cuda.synchronize(); alloc_us = (time.perf_counter() - t) / n * 1e6
# 2. variable-length training loop
layer = torch.nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True).cuda()
opt = torch.optim.AdamW(layer.parameters())
g = torch.Generator().manual_seed(1)
lens = torch.randint(64, 1024, (60,), generator=g).tolist()
times = []
try:
    torch.cuda.reset_peak_memory_stats()
except Exception:
    pass
for i, L in enumerate(lens):
    x = torch.randn(16, L, 512, device="cuda")
    torch.cuda.synchronize(); t = time.perf_counter()
    loss = layer(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
    torch.cuda.synchronize()
    if i >= 10: times.append(time.perf_counter() - t)
res, alloc = peaks()
print(json.dumps({"alloc_us": alloc_us, "step_ms": 1e3 * sum(times) / len(times), "peak_reserved": res, "peak_allocated": alloc}))
"""


def run(which):
    env = dict(os.environ)
    if which == "cudaMallocAsync":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
    env.setdefault("PYTHONPATH", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    r = subprocess.run([sys.executable, "-c", CHILD, which], env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(results):
    gib = 1 << 30
    native = results.get("native", {})
    rows = ["| allocator | alloc us/tensor | step ms | vs native | peak reserved GiB | vs native | peak allocated GiB |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | error: {r['error']} | | | | | |")
            continue
        speed = native.get("step_ms", 0) / r["step_ms"] if r.get("step_ms") else 0
        mem = r["peak_reserved"] / native["peak_reserved"] if native.get("peak_reserved") else 0
        rows.append(
            f"| {name} | {r['alloc_us']:.2f} | {r['step_ms']:.2f} | {speed:.3f}x | {r['peak_reserved'] / gib:.3f} | {mem:.3f}x | {r['peak_allocated'] / gib:.3f} |"
        )
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", help="markdown file whose '## PyTorch (GPU)' section is replaced")
    args = ap.parse_args()
    results = {}
    for which in ["native", "cudaMallocAsync", "cudalloc", "rmm"]:
        if which == "rmm":
            try:
                import rmm  # noqa: F401
            except ImportError:
                continue
        results[which] = run(which)
        print(which, results[which], flush=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    md = textwrap.dedent(
        f"""\
        ## PyTorch (GPU)

        - Command: `python bench/torch_bench.py --write docs/BENCHMARKS.md`
        - Device: {device}; torch {torch.__version__}; date {datetime.date.today()}
        - Step time: mean of steps 11-60 of a TransformerEncoderLayer(512, 8 heads) on batches of 16 x L, L uniform in 64..1024 (seed 1).

        """
    ) + table(results) + "\n"
    print(md)
    if args.write:
        text = open(args.write).read() if os.path.exists(args.write) else "# Benchmarks\n"
        head, sep, rest = text.partition("## PyTorch (GPU)")
        tail = ""
        if sep:
            nxt = rest.find("\n## ")
            tail = rest[nxt:] if nxt >= 0 else ""
        open(args.write, "w").write(head.rstrip() + "\n\n" + md + tail)


if __name__ == "__main__":
    main()
