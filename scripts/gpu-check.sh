#!/usr/bin/env bash
# The GPU check: runs on a machine with an NVIDIA GPU and driver, from binaries
# built on another machine (the GPU machine needs no Rust toolchain).
#
# On the build machine:
#   cargo build --release && cargo test --release --no-run --test gpu
#   then copy the repo with target/release/{cudalloc,libcudalloc.so} and the
#   gpu test binary (target/release/deps/gpu-*) to the GPU machine
#   (with the device tool: carry those paths).
# On the GPU machine, from the repo root:
#   bash scripts/gpu-check.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/cudalloc-gpu}}
mkdir -p "$out"
export CUDALLOC_CONF=${CUDALLOC_CONF:-backend:cuda}
bin=target/release/cudalloc
gpu_test=$(ls -t target/release/deps/gpu-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
[ -x "$bin" ] || { echo "missing $bin: build with cargo build --release" >&2; exit 2; }
[ -n "$gpu_test" ] || { echo "missing the gpu test binary: cargo test --release --no-run --test gpu" >&2; exit 2; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt" || true
echo "== config";   "$bin" config | tee "$out/config.txt"
echo "== selftest"; "$bin" selftest | tee "$out/selftest.txt"
echo "== gpu suite"; "$gpu_test" --ignored --test-threads=1 2>&1 | tee "$out/gpu-suite.txt"
echo "== bench";    "$bin" bench 2>&1 | tee "$out/bench.txt"
echo "done: results in $out"
