#!/usr/bin/env python3
"""Record bench/torch_bench.py's training workload as an allocation trace,
on the CPU, for `cudalloc replay` and scripts/torch_native_model.py.

    python scripts/torch_trace.py OUT.csv [--steps 40] [--seed 0] [--min-size N]

Runs the same code as the benchmark's "train" phase (`train_loop`: model,
optimiser, seeded variable sequence lengths, 5 warm-up steps), but on the
CPU with bf16 autocast, under torch.profiler with profile_memory=True, and
writes every allocation and free the CPU allocator saw as an RMM-format CSV
(Thread,Time,Action,Pointer,Size,Stream; one stream, 0). After each step
(after `loss.item()` has waited for the device, and the step's tensors are
freed) it writes a `synchronize` row, cudalloc's extension of the format:
`cudalloc replay --gpu-lag` completes all device work there, and other
readers skip it.

What it is and is not: tensor sizes and lifetimes come from the same
autograd graph and optimiser as on a GPU, so the pattern of large buffers
(activations, gradients, optimiser state, attention outputs) is the GPU
run's. It is not a GPU trace: CPU kernels differ in their temporaries
(oneDNN scratch space, the CPU flash-attention kernel's buffers, no cuBLAS
workspace), a few small CPU-side tensors (the step's randint, AdamW's step
counters) are included, and the CPU run cannot show stream or event effects.
Replays of it are an estimate for the GPU benchmark, not a measurement of it.
`--min-size 1048577` keeps only torch's large pool (requests above 1 MiB),
where the CPU kernels' temporaries (millions of small blocks, most of them
4-byte scalars and per-thread scratch) are absent: tests/data's
torch_bench_train_large.csv.gz was made that way.
The shape follows the benchmark's environment (BENCH_D_MODEL, BENCH_LAYERS,
BENCH_BATCH, BENCH_MAX_SEQ). The default shape takes about 15 s a step on a
2-core VM.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "torch_bench", os.path.join(REPO, "bench", "torch_bench.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SYNC_MARK = "cudalloc::synchronize"


def memory_events(chrome_trace):
    """(time_us, addr, bytes) of each CPU allocator event, bytes < 0 for a
    free, in the order the profiler recorded them; (time_us, None, 0) for
    each step-end mark, placed by its time."""
    with open(chrome_trace, encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    out, marks = [], []
    for e in events:
        if e.get("name") == SYNC_MARK:
            marks.append(e["ts"])
        if e.get("name") != "[memory]":
            continue
        a = e["args"]
        if a.get("Device Type", 0) != 0:  # 0: the CPU
            continue
        out.append((a.get("Ev Idx"), e["ts"], a["Addr"], a["Bytes"]))
    if all(idx is not None for idx, *_ in out):
        out.sort(key=lambda x: x[0])  # the profiler's sequence number: the allocator's order
    else:
        out.sort(key=lambda x: x[1])  # by time, stable: the file's order within a time stamp
    merged, marks = [], sorted(marks, reverse=True)
    for _, ts, addr, n in out:
        while marks and marks[-1] < ts:
            merged.append((marks.pop(), None, 0))
        merged.append((ts, addr, n))
    merged.extend((ts, None, 0) for ts in reversed(marks))
    return merged


def to_csv(events, path, min_size=0):
    """Writes the RMM CSV. Frees of blocks allocated before recording started
    (the model's CPU-side parameters, replaced by their copies) are dropped,
    as are allocations under `min_size` bytes and their frees. Returns (allocations, frees, still live)."""
    live = {}
    allocs = frees = 0
    t0 = min((e[0] for e in events), default=0)
    with open(path, "w", encoding="utf-8") as f:
        f.write("Thread,Time,Action,Pointer,Size,Stream\n")
        for ts, addr, n in events:
            us = int(ts - t0)
            stamp = f"{us // 3_600_000_000:02}:{us // 60_000_000 % 60:02}:{us // 1_000_000 % 60:02}.{us % 1_000_000:06}"
            if addr is None:
                f.write(f"1,{stamp},synchronize,0x0,0,0\n")
            elif n >= max(min_size, 1):
                live[addr] = n
                allocs += 1
                f.write(f"1,{stamp},allocate,{addr:#x},{n},0\n")
            elif n < 0 and addr in live:
                del live[addr]
                frees += 1
                f.write(f"1,{stamp},free,{addr:#x},{-n},0\n")
    return allocs, frees, len(live)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=0, help="drop allocations under N bytes")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    bench = load_bench()
    with tempfile.TemporaryDirectory() as tmp:
        chrome = os.path.join(tmp, "trace.json")
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        started = []

        def place(module):
            # What `.to("cuda")` does on a GPU: `_apply` gives each parameter
            # and buffer a copy on the device. Recording starts here, so the
            # CPU-side construction of the model (host memory on a GPU run
            # too) stays out of the trace, as on a GPU.
            if not started:
                prof.start()
                started.append(True)
            return module._apply(lambda t: t.clone())

        def mark():
            with torch.profiler.record_function(SYNC_MARK):
                pass

        times, shape = bench.train_loop(
            torch, "cpu", args.steps, args.seed, place=place, after_step=mark
        )
        prof.stop()
        prof.export_chrome_trace(chrome)
        events = memory_events(chrome)
    allocs, frees, live = to_csv(events, args.out, args.min_size)
    print(
        f"{args.out}: {allocs} allocations, {frees} frees, {live} live at the end; "
        f"{shape}; {args.steps} steps after 5 warm-up, median step "
        f"{times[len(times) // 2]:.1f} s on the CPU",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
