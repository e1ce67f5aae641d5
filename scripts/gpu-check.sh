#!/usr/bin/env bash
# The GPU check: runs on a machine with an NVIDIA GPU and driver, from binaries
# built on another machine (the GPU machine needs no Rust toolchain).
#
# On the build machine: bash scripts/gpu-all.sh --prep (stripped release
# binaries in target/gpu-bundle/). Copy the working tree and
# target/gpu-bundle to the GPU machine; there, from the repo root:
#   bash scripts/gpu-check.sh [OUTDIR]
# (scripts/gpu-all.sh runs it with the PyTorch checks, under a deadline.)
# The binaries: CUDALLOC_BIN and CUDALLOC_GPU_TEST when set, else the bundle's,
# else target/release's (scripts/gpu-bins.sh).
# Steps: config, selftest, bench, then the GPU suite (the figures come before
# the longest step). Every step runs even when an earlier one fails; the exit
# code is the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:-${OUT:-/tmp/cudalloc-gpu}}
mkdir -p "$out"
export CUDALLOC_CONF=${CUDALLOC_CONF:-backend:cuda}
# shellcheck source=scripts/gpu-bins.sh
. scripts/gpu-bins.sh
bin=$CUDALLOC_BIN
gpu_test=$CUDALLOC_GPU_TEST
for f in "$bin" "$gpu_test"; do
    [ -x "$f" ] || {
        echo "missing $f: run bash scripts/gpu-all.sh --prep on the build machine and copy" \
            "target/gpu-bundle with the working tree (or set CUDALLOC_BIN, CUDALLOC_GPU_TEST)" >&2
        exit 2
    }
done

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
step bench bench.txt "$bin" bench
step "gpu suite" gpu-suite.txt "$gpu_test" --ignored --test-threads=1
echo "done: results in $out (exit $rc)"
exit "$rc"
