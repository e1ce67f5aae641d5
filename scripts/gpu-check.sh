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
# (scripts/gpu-all.sh --prep does the build-machine part for the device tool.)
# Every step runs even when an earlier one fails; the exit code is the first
# failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/cudalloc-gpu}}
mkdir -p "$out"
export CUDALLOC_CONF=${CUDALLOC_CONF:-backend:cuda}
bin=target/release/cudalloc
gpu_test=$(ls -t target/release/deps/gpu-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
[ -x "$bin" ] || { echo "missing $bin: build with cargo build --release" >&2; exit 2; }
[ -n "$gpu_test" ] || { echo "missing the gpu test binary: cargo test --release --no-run --test gpu" >&2; exit 2; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt" || true
rc=0
step() { # name file command...
    local name=$1 file=$2
    shift 2
    echo "== $name"
    "$@" 2>&1 | tee "$out/$file"
    local r=${PIPESTATUS[0]}
    [ "$r" -eq 0 ] || { echo "== $name failed: exit $r"; [ "$rc" -ne 0 ] || rc=$r; }
}
step config config.txt "$bin" config
step selftest selftest.txt "$bin" selftest
step "gpu suite" gpu-suite.txt "$gpu_test" --ignored --test-threads=1
step bench bench.txt "$bin" bench
echo "done: results in $out (exit $rc)"
exit "$rc"
