#!/usr/bin/env bash
# Every GPU check in one call, for a short lease on a GPU machine (the `device`
# tool gives a task about 15 minutes in all): the Rust GPU check
# (scripts/gpu-check.sh: config, selftest, GPU suite, bench), the PyTorch
# end-to-end tests (tests/gpu/test_torch.py) and the PyTorch benchmark
# (bench/torch_bench.py, run on a copy of docs/BENCHMARKS.md). Each phase has
# its own time limit and a failing phase does not stop the next; the summary
# at the end gives each phase's exit code.
#
# 1. Here (the build machine; the GPU machine needs no Rust toolchain):
#      bash scripts/gpu-all.sh --prep
#    builds the release binaries and the GPU test binary, strips their debug
#    info (about 9 MB together; unstripped they pass the tool's 64 MiB carry
#    limit) into target/gpu-bundle/.
# 2. With the device tool:
#      run(command="bash scripts/gpu-all.sh $OUT", timeout_s=600,
#          carry=["target/gpu-bundle"])
#    Results come back as four files: gpu-check.log, torch-tests.log,
#    torch-bench.log and BENCHMARKS.md (the doc with the "PyTorch (GPU)"
#    section rewritten; review it, then copy it over docs/BENCHMARKS.md).
#
# Usage: bash scripts/gpu-all.sh --prep | [OUTDIR]
# Phase limits (seconds): GPU_CHECK_S, TORCH_TESTS_S, TORCH_BENCH_S; the
# defaults add up to 9 minutes.
# TORCH_TRACE=1 adds a phase (TORCH_TRACE_S, default 90 s; set the others
# lower to fit): the training loop alone under cudalloc with log_file, and
# the trace replayed by scripts/torch_native_model.py and `cudalloc replay`
# (train-gpu.csv.gz and torch-trace.log come back). It checks the model of
# native torch, and the CPU-recorded trace, against a GPU run
# (docs/BENCHMARKS.md, "PyTorch's training loop without a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle
if [ "${1:-}" = "--prep" ]; then
    set -e
    cargo build --release
    cargo test --release --no-run --test gpu
    gpu_test=$(ls -t target/release/deps/gpu-* | grep -v '\.d$' | head -1)
    rm -rf "$bundle" && mkdir -p "$bundle"
    strip --strip-debug -o "$bundle/cudalloc" target/release/cudalloc
    strip --strip-debug -o "$bundle/libcudalloc.so" target/release/libcudalloc.so
    strip --strip-debug -o "$bundle/gpu-test" "$gpu_test"
    du -sh "$bundle"
    echo "carry [\"$bundle\"] and run: bash scripts/gpu-all.sh \$OUT"
    exit 0
fi
# On the GPU machine: put the carried binaries where gpu-check.sh looks
# (unless what is there is newer, as on the build machine).
if [ -f "$bundle/cudalloc" ] && [ "$bundle/cudalloc" -nt target/release/cudalloc ]; then
    mkdir -p target/release/deps
    cp "$bundle/cudalloc" "$bundle/libcudalloc.so" target/release/
    cp "$bundle/gpu-test" target/release/deps/gpu-bundle
fi
out=${1:-${OUT:-/tmp/cudalloc-gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The Python layer in development mode: the freshly built library, the
# package from python/ (no pip install needed on the GPU machine).
export CUDALLOC_LIBRARY=${CUDALLOC_LIBRARY:-$PWD/target/release/libcudalloc.so}
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}

phase() { # name limit_s log command...
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit}s)" | tee -a "$log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
    summary+=("$name: exit $rc ($((SECONDS - t0))s)")
}
summary=()

tmp=$(mktemp -d)
phase "gpu-check" "${GPU_CHECK_S:-150}" "$out/gpu-check.log" bash scripts/gpu-check.sh "$tmp"
phase "torch tests" "${TORCH_TESTS_S:-240}" "$out/torch-tests.log" \
    "$py" -m pytest tests/gpu/test_torch.py -v -rs
# torch_bench rewrites its section of a copy of the doc; the copy comes back
# for review and commit on the build machine.
cp docs/BENCHMARKS.md "$out/BENCHMARKS.md"
phase "torch bench" "${TORCH_BENCH_S:-150}" "$out/torch-bench.log" \
    "$py" bench/torch_bench.py --doc "$out/BENCHMARKS.md"
if [ "${TORCH_TRACE:-0}" = 1 ]; then
    phase "torch trace" "${TORCH_TRACE_S:-90}" "$out/torch-trace.log" \
        env CUDALLOC_BENCH_CONF="log_file:$out/train-gpu.csv" \
        "$py" bench/torch_bench.py --modes cudalloc --alloc-iters 0 --no-doc
    phase "trace replay" 60 "$out/torch-trace.log" bash -c \
        "$py scripts/torch_native_model.py '$out/train-gpu.csv' &&
         target/release/cudalloc replay '$out/train-gpu.csv' &&
         gzip -9 '$out/train-gpu.csv'"
fi
rm -rf "$tmp"

echo "== summary"
printf '%s\n' "${summary[@]}"
