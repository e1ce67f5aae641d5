#!/usr/bin/env python3
"""PyTorch allocator benchmark: native caching allocator, backend:cudaMallocAsync,
cudalloc, and RMM's rmm_torch_allocator (when rmm is importable).

    python bench/torch_bench.py                      # all modes, writes docs/BENCHMARKS.md
    python bench/torch_bench.py --modes native,cudalloc --no-doc

Each allocator runs in a fresh process (this script with --worker MODE), one
after the other, in one invocation. Two workloads:
1. alloc: torch.empty of mixed sizes (seeded; 512 B .. 256 MiB, mostly small)
   with a window of live tensors; time per alloc+free pair.
2. train: a transformer encoder trained with variable sequence lengths
   (seeded, so every allocator sees the same batches); median step time, and
   the peak reserved and peak allocated bytes the allocator reports.

The markdown table goes to docs/BENCHMARKS.md under "## PyTorch (GPU)",
replacing only that section. cudalloc needs `pip install .` or
CUDALLOC_LIBRARY=target/release/libcudalloc.so with PYTHONPATH=python.
This module imports torch only inside the worker.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DOC = os.path.join(REPO, "docs", "BENCHMARKS.md")
HEADING = "## PyTorch (GPU)"
MODES = ("native", "native-expandable", "cudaMallocAsync", "cudalloc", "cudalloc-expandable", "rmm")
MiB = 1 << 20


# ---------------------------------------------------------------- the worker


def setup_allocator(mode):
    """Install the allocator for `mode` before CUDA initialises. Returns a
    function giving (peak reserved, peak allocated) in bytes, or None each."""
    import torch

    if mode in ("native", "native-expandable", "cudaMallocAsync"):
        # cudaMallocAsync and expandable_segments come from
        # PYTORCH_CUDA_ALLOC_CONF, set by the parent.
        def peaks():
            try:
                return torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
            except RuntimeError:
                return None, None

        def reset():
            try:
                torch.cuda.reset_peak_memory_stats()
            except RuntimeError:
                pass

        return peaks, reset
    if mode in ("cudalloc", "cudalloc-expandable"):
        import cudalloc

        conf = os.environ.get("CUDALLOC_BENCH_CONF") or ""
        if mode == "cudalloc-expandable":
            conf = ",".join(c for c in (conf, "expandable_segments:on") if c)
        cudalloc.enable(conf or None)
        return (
            lambda: (cudalloc.max_memory_reserved(), cudalloc.max_memory_allocated()),
            cudalloc.reset_peak_memory_stats,
        )
    if mode == "rmm":
        import rmm
        import rmm.statistics

        rmm.reinitialize(pool_allocator=True)
        rmm.statistics.enable_statistics()
        from rmm.allocators.torch import rmm_torch_allocator

        torch.cuda.memory.change_current_allocator(rmm_torch_allocator)

        def peaks():
            st = rmm.statistics.get_statistics()
            return None, (st.peak_bytes if st is not None else None)

        def reset():
            try:
                rmm.statistics.pop_statistics()
                rmm.statistics.push_statistics()
            except Exception:
                pass

        return peaks, reset
    raise SystemExit(f"unknown mode {mode}")


def bench_alloc(torch, iters, seed):
    import random

    rng = random.Random(seed)

    def size():
        r = rng.random()
        if r < 0.70:
            return int(2 ** rng.uniform(9, 20))  # 512 B .. 1 MiB
        if r < 0.95:
            return int(2 ** rng.uniform(20, 24.3))  # 1 .. 20 MiB
        return int(2 ** rng.uniform(24.3, 28))  # 20 .. 256 MiB

    sizes = [size() for _ in range(iters)]
    slots = [rng.randrange(64) for _ in range(iters)]
    live = [None] * 64

    def run(n):
        for i in range(n):
            live[slots[i]] = torch.empty(sizes[i], dtype=torch.uint8, device="cuda")

    run(min(2000, iters))  # warm the cache
    torch.cuda.synchronize()
    import time

    t = time.perf_counter()
    run(iters)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    live.clear()
    return dt / iters * 1e6


def train_loop(
    torch, device, steps, seed, warmup=5, after_warmup=None, place=None, after_step=None
):
    """The training workload: builds the model on the CPU, moves it to
    `device` with `place(module)` (default `module.to(device)`), runs `warmup`
    steps, calls `after_warmup()`, then runs `steps` more, calling
    `after_step()` after each step (the host has synchronised with the device
    by then, and the step's tensors are freed). Returns the sorted
    step times (seconds) of the `steps` timed steps and a description of the
    shape. On "cpu" it runs the same code (bf16 autocast on the CPU), which is
    how scripts/torch_trace.py records its allocation trace without a GPU."""
    import time

    torch.manual_seed(seed)
    d = int(os.environ.get("BENCH_D_MODEL", "1024"))
    layers = int(os.environ.get("BENCH_LAYERS", "6"))
    batch = int(os.environ.get("BENCH_BATCH", "16"))
    max_seq = int(os.environ.get("BENCH_MAX_SEQ", "1024"))
    if place is None:
        place = lambda module: module.to(device)  # noqa: E731
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(
            d_model=d, nhead=16, dim_feedforward=4 * d, dropout=0.0, batch_first=True
        ),
        num_layers=layers,
    )
    head = torch.nn.Linear(d, 1)
    model, head = place(model), place(head)
    # foreach=True is AdamW's default for CUDA parameters; named so that a CPU
    # run takes the same (multi-tensor) path.
    opt = torch.optim.AdamW(
        list(model.parameters()) + list(head.parameters()), lr=1e-4, foreach=True
    )
    g = torch.Generator().manual_seed(seed)

    def step():
        seq = int(torch.randint(32, max_seq + 1, (1,), generator=g))
        x = torch.randn(batch, seq, d, generator=g).to(device, non_blocking=True)
        y = torch.randn(batch, 1, generator=g).to(device, non_blocking=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(head(model(x).mean(dim=1)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # synchronises: the step is done

    for _ in range(warmup):
        step()
        if after_step is not None:
            after_step()
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        if after_step is not None:
            after_step()
    times.sort()
    shape = f"d_model {d}, {layers} layers, batch {batch}, seq 32..{max_seq}, bf16 autocast"
    return times, shape


def bench_train(torch, steps, seed, peaks, reset):
    times, shape = train_loop(torch, "cuda", steps, seed, after_warmup=reset)
    reserved, allocated = peaks()
    return {
        "step_ms_median": times[len(times) // 2] * 1e3,
        "step_ms_mean": sum(times) / len(times) * 1e3,
        "peak_reserved": reserved,
        "peak_allocated": allocated,
        "shape": shape,
    }


def worker(mode, args):
    import torch

    peaks, reset = setup_allocator(mode)  # before the first CUDA tensor
    out = {"mode": mode, "torch": torch.__version__}
    # --alloc-iters 0: the training loop alone (scripts/gpu-all.sh records
    # its trace that way).
    out["alloc_us"] = bench_alloc(torch, args.alloc_iters, args.seed) if args.alloc_iters > 0 else None
    torch.cuda.synchronize()
    # Each allocator would carry its own leftovers from the alloc phase into
    # the training peaks: start the training phase from an empty cache.
    torch.cuda.empty_cache()
    out.update(bench_train(torch, args.steps, args.seed, peaks, reset))
    out["device"] = torch.cuda.get_device_name(0)
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- the parent


def mode_env(mode):
    env = dict(os.environ)
    env.pop("CUDALLOC", None)  # modes other than cudalloc must stay native
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    env.pop("PYTORCH_ALLOC_CONF", None)  # the newer name, read too
    if mode == "cudaMallocAsync":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
    if mode == "native-expandable":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if mode.startswith("cudalloc") and "CUDALLOC_LIBRARY" in env:
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python"), env.get("PYTHONPATH", "")])
    return env


def rmm_importable():
    r = subprocess.run(
        [sys.executable, "-c", "import rmm.allocators.torch"], capture_output=True, text=True
    )
    return r.returncode == 0


def fmt_mib(n):
    return "n/a" if n is None else f"{n / MiB:,.0f}"


def fmt_num(x, fmt):
    return "n/a" if x is None else fmt.format(x)


def fmt_ms(t):
    return fmt_num(t, "{:.1f}")


def ratio(a, b, fmt="{:.2f}×"):
    return "n/a" if a is None or b is None or b == 0 else fmt.format(a / b)


def table(results):
    native = next((r for r in results if r["mode"] == "native"), None)
    lines = [
        "| allocator | alloc+free (µs) | step (ms, median) | speed vs native | step (ms, mean) | "
        "peak reserved (MiB) | reserved vs native | peak allocated (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} | | | | | | |")
            continue
        speed = ratio(native["step_ms_median"], r["step_ms_median"]) if native and "step_ms_median" in native else "n/a"
        rres = ratio(r["peak_reserved"], native.get("peak_reserved")) if native else "n/a"
        lines.append(
            f"| {r['mode']} | {fmt_num(r.get('alloc_us'), '{:.2f}')} | {r['step_ms_median']:.1f} | {speed} | "
            f"{fmt_ms(r.get('step_ms_mean'))} | "
            f"{fmt_mib(r['peak_reserved'])} | {rres} | {fmt_mib(r['peak_allocated'])} |"
        )
    return "\n".join(lines)


def replace_section(text, heading, body):
    """`text` with the section under `heading` (up to the next "## " heading)
    replaced by `body`; appended at the end when there is no such section."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == heading), None)
    section = heading + "\n\n" + body.rstrip("\n") + "\n"
    if start is None:
        sep = "" if text.endswith("\n\n") or not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--alloc-iters", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default=DOC, help="markdown file to update (default docs/BENCHMARKS.md)")
    p.add_argument("--no-doc", action="store_true", help="print the table only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args)

    modes = [m for m in args.modes.split(",") if m]
    results = []
    for mode in modes:
        if mode == "rmm" and not rmm_importable():
            print("rmm: not importable, skipped", file=sys.stderr)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode,
               "--steps", str(args.steps), "--alloc-iters", str(args.alloc_iters),
               "--seed", str(args.seed)]
        print(f"== {mode}", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, env=mode_env(mode), capture_output=True, text=True)
        found = [l[7:] for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        if r.returncode != 0 or not found:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{mode} failed (exit {r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr)
            results.append({"mode": mode, "error": tail.replace("|", "/")[:200]})
            continue
        results.append(json.loads(found[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)

    ok = [r for r in results if "error" not in r]
    device = ok[0]["device"] if ok else "unknown device"
    body = "\n".join(
        [
            f"- **Command:** `python bench/torch_bench.py --modes {','.join(modes)} "
            f"--steps {args.steps} --alloc-iters {args.alloc_iters} --seed {args.seed}`",
            f"- **Machine:** {device}; torch {ok[0]['torch'] if ok else '?'}; "
            f"Python {platform.python_version()}; {datetime.date.today().isoformat()}",
            f"- **alloc:** {args.alloc_iters} `torch.empty` of mixed sizes (70% 512 B–1 MiB, "
            "25% 1–20 MiB, 5% 20–256 MiB) over 64 live slots; time per alloc+free.",
            f"- **train:** {ok[0]['shape'] if ok else '?'}; {args.steps} timed steps after 5 "
            "warm-up steps; peaks as each allocator reports them after the warm-up "
            "(rmm: allocated from its statistics adaptor; reserved not reported).",
            "- Speed vs native = native median step time / this one (higher is faster). "
            "Targets for cudalloc: speed ≥ 1.00×, peak reserved ≤ 0.90× native. "
            "The mean shows the steps that grow or release memory (driver calls), "
            "which the median leaves out.",
            "",
            table(results),
        ]
    )
    print(body)
    if not ok and not args.no_doc:
        # Nothing was measured (no GPU, say): keep the figures already there.
        print(f"no allocator ran: {args.doc} left unchanged", file=sys.stderr)
    elif not args.no_doc:
        with open(args.doc, encoding="utf-8") as f:
            text = f.read()
        with open(args.doc, "w", encoding="utf-8") as f:
            f.write(replace_section(text, HEADING, body))
        print(f"wrote {args.doc} ({HEADING})", file=sys.stderr)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
