#!/usr/bin/env bash
# Every GPU check in one command that ends within a deadline, for a short stay
# on a GPU machine (NVIDIA H100/H200 with the driver, torch, pytest; no Rust
# toolchain, no network needed): the Rust GPU check (scripts/gpu-check.sh:
# config, selftest, bench, GPU suite), the PyTorch end-to-end tests
# (tests/gpu/test_torch.py), the PyTorch benchmark (bench/torch_bench.py,
# run on a copy of docs/BENCHMARKS.md), and the CuPy and Numba plugins with
# several frameworks in one process (tests/gpu/test_frameworks.py,
# test_cupy.py, test_numba.py; CuPy's and Numba's tests are skipped where
# those packages are not installed).
#
# 1. On the build machine:
#      bash scripts/gpu-all.sh --prep
#    builds the release binaries and the GPU test binary and strips their
#    debug info into target/gpu-bundle/ (6.7 MiB; unstripped they are 54
#    MiB). target/gpu-bundle/BUILD records the commit and each binary's
#    build ID. CARGO_TARGET_DIR is honoured; the bundle is always here.
# 2. Copy the working tree and target/gpu-bundle (nothing else from target/)
#    to the GPU machine, and run there, as one command:
#      bash scripts/gpu-all.sh OUTDIR
#    It ends within GPU_ALL_DEADLINE_S (default 480 s; 450 s at worst with
#    the default limits). A phase that failed can be rerun alone, in a
#    second command:
#      bash scripts/gpu-all.sh --only torch-tests OUTDIR2
#    (the last line of summary.txt names the phases to rerun).
# Results in OUTDIR: summary.txt (each phase's result, appended as the phase
# ends, so a command cut short still leaves it), one log per phase
# (gpu-check.log, torch-tests.log, torch-bench.log, frameworks-tests.log)
# and BENCHMARKS.md (the
# doc with the "PyTorch (GPU)" section rewritten: review it, then copy it over
# docs/BENCHMARKS.md).
#
# Usage: bash scripts/gpu-all.sh --prep
#        bash scripts/gpu-all.sh [--plan] [--skip-ready] [--only PHASE[,PHASE...]] [OUTDIR]
#   --plan        print each phase's effective limit and the worst case, run
#                 nothing (and refuse settings that overrun, as a run would)
#   --skip-ready  skip the readiness check (for tests; also GPU_ALL_SKIP_READY=1)
#   --only        run these phases only: gpu-check, torch-tests, torch-bench,
#                 frameworks-tests, torch-trace, trace-replay (always in
#                 that order)
#
# Readiness, before any phase: the binaries the chosen phases use exist and
# are executable (CUDALLOC_BIN, CUDALLOC_GPU_TEST, CUDALLOC_LIBRARY; by default
# the bundle's, see scripts/gpu-bins.sh); for the PyTorch phases,
#   $PYTHON -c 'import torch, pytest; assert torch.cuda.is_available()'
# passes (for frameworks-tests without them, `import pytest`); `nvidia-smi -L` answers. If not, one line says what is wrong,
# summary.txt gets it too, and the exit code is 3.
#
# Time. One deadline for the whole command, GPU_ALL_DEADLINE_S (default 480),
# counted from the start. Phase limits in seconds: GPU_CHECK_S (90),
# TORCH_TESTS_S (150), TORCH_BENCH_S (120), FRAMEWORKS_TESTS_S (60); with TORCH_TRACE=1 also
# TORCH_TRACE_S (60) and TRACE_REPLAY_S (60). A phase that overruns its
# limit gets SIGTERM, and SIGKILL GPU_ALL_KILL_AFTER_S (10) later, sent to its
# whole process group; whatever the phase started is killed when it ends,
# even processes that left its group (torchrun's ranks). The readiness check
# is allowed GPU_ALL_READY_S (60). The rule:
# - each phase runs for min(its limit, time left - kill-after - 5 s margin);
#   a deadline shorter than the limits' sum shrinks the later phases, and a
#   phase left with under 10 s is skipped (and counts as failed);
# - refused at once (exit 2, one line): a deadline over 600 s (the most one
#   command may run on the GPU machine), a phase that alone cannot fit
#   (readiness allowance + its limit + kill-after + margin over the deadline),
#   values that are not whole numbers from 1 up (no leading zero), unknown
#   phase names.
# Worst case with the defaults: 60 + (90 + 10) + (150 + 10) + (120 + 10) =
# 450 s for the first three phases, which run unshrunk; frameworks-tests
# comes last and gets what is left: 15 s when every phase before it uses its
# whole limit (--plan shows it shrunk), its full 60 s whenever they end 45 s
# inside their limits, as they should. 475 s in all leaves time for a second
# command (a rerun) when the GPU machine is had for 15 minutes, its start-up
# included. The limits are a few times what the phases should need: on the
# simulated device `cudalloc bench` takes 1.6 s, `selftest` 0.02 s and
# `config` at once; each torch test starts a fresh Python with torch
# (seconds), the bench three; each frameworks test one Python with CuPy,
# Numba or both (seconds; Numba's kernel test compiles one kernel).
# With TORCH_TRACE=1 the trace phases get only what is left of the 480 s
# (nothing, at worst): record the trace in a command of its own,
#   bash scripts/gpu-all.sh --only torch-trace,trace-replay OUTDIR
#
# TORCH_TRACE=1 (or --only naming them) adds two phases: torch-trace (the training loop alone under
# cudalloc with log_file) and trace-replay (the trace compressed first, to
# train-gpu.csv.gz, then replayed by scripts/torch_native_model.py and
# `cudalloc replay`, then the uncompressed copy removed; torch-trace.log).
# They check the model of native torch, and the CPU-recorded trace, against
# a GPU run (docs/BENCHMARKS.md, "PyTorch's training loop without a GPU").
#
# Exit code: 0 when every phase passed; 1 when one failed, timed out or was
# skipped; 2 settings refused; 3 not ready; 128+N when stopped by signal N.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
bundle=target/gpu-bundle

# ------------------------------------------------------------ on the build machine
if [ "${1:-}" = "--prep" ]; then
    set -e
    py=${PYTHON:-python3}
    t0=$SECONDS
    cargo build --release
    # Where cargo puts its output (CARGO_TARGET_DIR and .cargo/config count).
    target_dir=$(cargo metadata --format-version 1 --no-deps |
        "$py" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    # The test binary's path as cargo reports it (not the newest file).
    gpu_test=$(cargo test --release --no-run --test gpu --message-format=json |
        "$py" -c '
import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin)
        if m.get("reason") == "compiler-artifact" and m.get("executable")
        and m["target"]["name"] == "gpu"]
print(exes[-1])')
    rm -rf "$bundle" && mkdir -p "$bundle"
    strip --strip-debug -o "$bundle/cudalloc" "$target_dir/release/cudalloc"
    strip --strip-debug -o "$bundle/libcudalloc.so" "$target_dir/release/libcudalloc.so"
    strip --strip-debug -o "$bundle/gpu-test" "$gpu_test"
    chmod +x "$bundle/cudalloc" "$bundle/libcudalloc.so" "$bundle/gpu-test"
    {
        if commit=$(git rev-parse HEAD 2>/dev/null); then
            changed=$(git status --porcelain --untracked-files=no | wc -l)
            echo "commit $commit ($([ "$changed" -eq 0 ] && echo clean || echo "$changed files modified"))"
            echo "subject $(git log -1 --format=%s)"
        else
            echo "commit unknown (not a git checkout)"
        fi
        echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ) with $(rustc --version)"
        for f in cudalloc libcudalloc.so gpu-test; do
            echo "$f build-id $(readelf -n "$bundle/$f" | sed -n 's/^ *Build ID: //p') sha256 $(sha256sum "$bundle/$f" | cut -c1-12)"
        done
    } >"$bundle/BUILD"
    cat "$bundle/BUILD"
    du -b "$bundle"/* | awk '{ printf "%6.1f MiB  %s\n", $1 / 1048576, $2; n += $1 } END { printf "%6.1f MiB  in all\n", n / 1048576 }'
    echo "prepared in $((SECONDS - t0)) s. Copy the working tree and $bundle to the GPU machine, then run there: bash scripts/gpu-all.sh OUTDIR"
    exit 0
fi

# ------------------------------------------------------------ the plan
all_phases=(gpu-check torch-tests torch-bench frameworks-tests torch-trace trace-replay)
declare -A limit=(
    [gpu-check]=${GPU_CHECK_S:-90}
    [torch-tests]=${TORCH_TESTS_S:-150}
    [torch-bench]=${TORCH_BENCH_S:-120}
    [frameworks-tests]=${FRAMEWORKS_TESTS_S:-60}
    [torch-trace]=${TORCH_TRACE_S:-60}
    [trace-replay]=${TRACE_REPLAY_S:-60}
)
declare -A limit_var=(
    [gpu-check]=GPU_CHECK_S [torch-tests]=TORCH_TESTS_S [torch-bench]=TORCH_BENCH_S
    [frameworks-tests]=FRAMEWORKS_TESTS_S [torch-trace]=TORCH_TRACE_S [trace-replay]=TRACE_REPLAY_S
)
max_command_s=600 # the most one command may run on the GPU machine
margin_s=5        # after the last phase: reaping, the summary
min_phase_s=10    # a phase left with less is skipped
deadline=${GPU_ALL_DEADLINE_S:-480}
kill_after=${GPU_ALL_KILL_AFTER_S:-10}
ready_s=${GPU_ALL_READY_S:-60}
skip_ready=${GPU_ALL_SKIP_READY:-0}
plan_only=0
only=
out=

die_usage() {
    echo "gpu-all: $*; usage: bash scripts/gpu-all.sh --prep | [--plan] [--skip-ready] [--only PHASE[,PHASE...]] [OUTDIR]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case $1 in
    --plan) plan_only=1 ;;
    --skip-ready) skip_ready=1 ;;
    --only)
        [ $# -ge 2 ] || die_usage "--only needs a phase list"
        only=$2
        shift
        ;;
    --only=*) only=${1#--only=} ;;
    -*) die_usage "unknown option $1" ;;
    *)
        [ -z "$out" ] || die_usage "one OUTDIR only"
        out=$1
        ;;
    esac
    shift
done
out=${out:-${OUT:-/tmp/cudalloc-gpu}}
[ "$skip_ready" = 1 ] && ready_s=0

refuse=()
if [ -n "$only" ]; then
    phases=()
    IFS=, read -ra wanted <<<"$only"
    for w in "${wanted[@]}"; do
        [ -n "$w" ] || continue
        [ -n "${limit[$w]+x}" ] || refuse+=("unknown phase '$w' (phases: ${all_phases[*]})")
    done
    for p in "${all_phases[@]}"; do
        [[ ",$only," == *",$p,"* ]] && phases+=("$p")
    done
else
    phases=(gpu-check torch-tests torch-bench frameworks-tests)
    [ "${TORCH_TRACE:-0}" = 1 ] && phases+=(torch-trace trace-replay)
fi
[ ${#phases[@]} -gt 0 ] || [ ${#refuse[@]} -gt 0 ] || refuse+=("no phase chosen")

posint() { [[ $2 =~ ^[1-9][0-9]{0,5}$ ]] || refuse+=("$1=$2 is not a whole number of seconds from 1 to 999999"); }
posint GPU_ALL_DEADLINE_S "$deadline"
posint GPU_ALL_KILL_AFTER_S "$kill_after"
[ "$skip_ready" = 1 ] || posint GPU_ALL_READY_S "$ready_s"
for p in "${phases[@]}"; do posint "${limit_var[$p]}" "${limit[$p]}"; done
if [ ${#refuse[@]} -eq 0 ]; then
    [ "$deadline" -le "$max_command_s" ] ||
        refuse+=("GPU_ALL_DEADLINE_S=$deadline is over the ${max_command_s} s one command may run")
    for p in "${phases[@]}"; do
        need=$((ready_s + limit[$p] + kill_after + margin_s))
        [ "$need" -le "$deadline" ] ||
            refuse+=("$p alone overruns the deadline: ${ready_s} s readiness + ${limit_var[$p]}=${limit[$p]} + ${kill_after} s kill-after + ${margin_s} s margin = ${need} s > GPU_ALL_DEADLINE_S=$deadline")
    done
fi

joined() { # items, as one line
    local s=$1
    shift
    for x in "$@"; do s+="; $x"; done
    echo "$s"
}

# effective LIMIT START: the limit a phase starting START seconds in gets
# (0: skipped).
effective() {
    local lim=$1 start=$2 left
    left=$((deadline - start - kill_after - margin_s))
    if [ "$left" -ge "$lim" ]; then
        echo "$lim"
    elif [ "$left" -ge "$min_phase_s" ]; then
        echo "$left"
    else
        echo 0
    fi
}

if [ "$plan_only" = 1 ]; then
    if [ ${#refuse[@]} -gt 0 ]; then
        echo "gpu-all: refused: $(joined "${refuse[@]}")"
        exit 2
    fi
    echo "deadline ${deadline}s, readiness up to ${ready_s}s, kill-after ${kill_after}s, margin ${margin_s}s"
    t=$ready_s
    for p in "${phases[@]}"; do
        eff=$(effective "${limit[$p]}" "$t")
        if [ "$eff" -eq 0 ]; then
            note="skipped if the phases before use their limits"
        elif [ "$eff" -lt "${limit[$p]}" ]; then
            note="shrunk to fit the deadline"
            t=$((t + eff + kill_after))
        else
            note=
            t=$((t + eff + kill_after))
        fi
        printf '%-16s limit %4ss  effective %4ss  worst end %4ss%s\n' \
            "$p" "${limit[$p]}" "$eff" "$t" "${note:+  ($note)}"
    done
    echo "worst case: ${t}s of the ${deadline}s deadline"
    exit 0
fi

# ------------------------------------------------------------ on the GPU machine
mkdir -p "$out"
summary=$out/summary.txt
echo "# gpu-all $(date -u +%Y-%m-%dT%H:%M:%SZ) on ${HOSTNAME:-?}: phases ${phases[*]}; deadline ${deadline}s" >>"$summary"
if [ ${#refuse[@]} -gt 0 ]; then
    line="gpu-all: refused: $(joined "${refuse[@]}")"
    echo "$line"
    echo "$line" >>"$summary"
    exit 2
fi

export PYTHONUNBUFFERED=1
# The Python layer in development mode: the bundle's library, the package
# from python/ (no pip install needed on the GPU machine).
# shellcheck source=scripts/gpu-bins.sh
. scripts/gpu-bins.sh
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
# torch tests must not pass by skipping everything when CUDA is missing.
export CUDALLOC_REQUIRE_GPU=1
py=${PYTHON:-python3}

uses() { # PHASE...: whether any of these phases runs
    local p q
    for p in "${phases[@]}"; do for q in "$@"; do [ "$p" = "$q" ] && return 0; done; done
    return 1
}

why() { # exit-code limit output: why a check failed, in a few words
    if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then
        echo "no answer in $2 s"
    elif [ "$1" -eq 127 ]; then
        echo "not found"
    elif [ -n "$3" ]; then
        echo "$3" | tail -1
    else
        echo "exit $1"
    fi
}
if [ "$skip_ready" != 1 ]; then
    t0=$SECONDS
    # Within the allowance: python, nvidia-smi, and 2 s kill-after each.
    py_s=$((ready_s * 2 / 3)) smi_s=$((ready_s / 4))
    [ "$py_s" -ge 1 ] || py_s=1
    [ "$smi_s" -ge 1 ] || smi_s=1
    problems=()
    need=()
    uses gpu-check && need+=("$CUDALLOC_BIN" "$CUDALLOC_GPU_TEST")
    uses torch-tests torch-bench torch-trace frameworks-tests && need+=("$CUDALLOC_LIBRARY")
    uses trace-replay && need+=("$CUDALLOC_BIN")
    missing=()
    for f in "${need[@]}"; do
        [ -f "$f" ] && [ -x "$f" ] || [[ " ${missing[*]} " == *" $f "* ]] || missing+=("$f")
    done
    [ ${#missing[@]} -eq 0 ] ||
        problems+=("missing or not executable: ${missing[*]} (run bash scripts/gpu-all.sh --prep on the build machine and copy $bundle with the working tree, or set CUDALLOC_BIN, CUDALLOC_GPU_TEST, CUDALLOC_LIBRARY)")
    if uses torch-tests torch-bench torch-trace trace-replay; then
        # The first import of torch on a fresh machine reads a few GB.
        msg=$(timeout -k 2 "$py_s" "$py" -c \
            'import torch, pytest; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"' 2>&1)
        r=$?
        [ "$r" -eq 0 ] || problems+=("$py: $(why "$r" "$py_s" "$msg")")
    elif uses frameworks-tests; then
        # CuPy and Numba are optional (their tests skip without them); pytest is not.
        msg=$(timeout -k 2 "$py_s" "$py" -c 'import pytest' 2>&1)
        r=$?
        [ "$r" -eq 0 ] || problems+=("$py: $(why "$r" "$py_s" "$msg")")
    fi
    msg=$(timeout -k 2 "$smi_s" nvidia-smi -L 2>&1)
    r=$?
    [ "$r" -eq 0 ] || problems+=("nvidia-smi -L: $(why "$r" "$smi_s" "$msg")")
    if [ ${#problems[@]} -gt 0 ]; then
        line="gpu-all: not ready: $(joined "${problems[@]}")"
        echo "$line"
        echo "$line" >>"$summary"
        echo "result: not ready, no phase ran ($((SECONDS - t0))s)" >>"$summary"
        exit 3
    fi
    echo "ready: ok ($((SECONDS - t0))s)" | tee -a "$summary"
fi

# What the figures come from: the bundle's commit and each binary's build ID.
build_id() {
    local id
    id=$(readelf -n "$1" 2>/dev/null | sed -n 's/^ *Build ID: //p' | head -1)
    [ -n "$id" ] || id=$(file -b "$1" 2>/dev/null | sed -n 's/.*BuildID\[[^]]*\]=\([0-9a-f]*\).*/\1/p')
    echo "${id:-unknown}"
}
{
    if [ -f "$bundle/BUILD" ]; then
        echo "# bundle: $(head -1 "$bundle/BUILD")"
    else
        echo "# bundle: none ($bundle/BUILD is missing): commit unknown"
    fi
    for f in "$CUDALLOC_BIN" "$CUDALLOC_GPU_TEST" "$CUDALLOC_LIBRARY"; do
        if [ -f "$f" ]; then
            echo "# $f build-id $(build_id "$f") sha256 $(sha256sum "$f" | cut -c1-12)"
        else
            echo "# $f missing"
        fi
    done
} | tee -a "$summary"

failed=()
ran=()
current_pid=
current_name=
# Kill what a phase left: its process group, and any process carrying its tag
# in its environment (those that started their own session, torchrun's ranks).
reap() { # pid tag log
    local left
    kill -KILL -- "-$1" 2>/dev/null
    left=$(grep -lzxF "GPU_ALL_TAG=$2" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$")
    if [ -n "$left" ]; then
        # shellcheck disable=SC2086 # one pid a word
        kill -KILL $left 2>/dev/null
        echo "== killed what the phase left running: ${left//$'\n'/ }" >>"$3"
    fi
}
# shellcheck disable=SC2317 # called by the traps
on_signal() {
    local sig=$1
    if [ -n "$current_pid" ]; then
        kill -TERM -- "-$current_pid" 2>/dev/null
        sleep 2
        reap "$current_pid" "gpu-all-$$-$current_name" "$out/$current_name.log"
        echo "$current_name: INTERRUPTED by SIG$sig" | tee -a "$summary"
        failed+=("$current_name")
    fi
    local p rerun=()
    for p in "${phases[@]}"; do
        [[ " ${ran[*]} " == *" $p "* ]] && [[ " ${failed[*]} " != *" $p "* ]] || rerun+=("$p")
    done
    echo "result: stopped by SIG$sig; rerun: bash scripts/gpu-all.sh --only $(IFS=,; echo "${rerun[*]}") OUTDIR" | tee -a "$summary"
    trap - "$sig"
    kill -"$sig" $$
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

phase() { # name log command...
    local name=$1 log=$2 lim eff note rc t0 verdict
    shift 2
    lim=${limit[$name]}
    eff=$(effective "$lim" "$SECONDS")
    if [ "$eff" -eq 0 ]; then
        echo "$name: SKIPPED ($((deadline - SECONDS))s left before the deadline)" | tee -a "$summary"
        failed+=("$name")
        return
    fi
    note=
    [ "$eff" -eq "$lim" ] || note=", shrunk from ${lim}s to fit the deadline"
    echo "== $name (limit ${eff}s$note)" | tee -a "$log"
    t0=$SECONDS
    ran+=("$name")
    # setsid: the phase gets its own process group, and timeout signals that
    # whole group (not only its child) at the limit and at the kill-after.
    GPU_ALL_TAG="gpu-all-$$-$name" setsid timeout --kill-after="$kill_after" "$eff" "$@" \
        </dev/null >>"$log" 2>&1 &
    current_pid=$!
    current_name=$name
    wait "$current_pid"
    rc=$?
    reap "$current_pid" "gpu-all-$$-$name" "$log"
    current_pid=
    verdict=FAILED
    [ "$rc" -ne 0 ] || verdict=ok
    # 124: stopped at the limit; 137: killed after the kill-after (or by
    # someone else before the limit: FAILED then).
    if [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ $((SECONDS - t0)) -ge "$eff" ]; }; then
        verdict=TIMEOUT
    fi
    [ "$rc" -eq 0 ] || failed+=("$name")
    echo "== $name: exit $rc after $((SECONDS - t0))s" >>"$log"
    echo "$name: $verdict (exit $rc, $((SECONDS - t0))s of ${eff}s$note)" | tee -a "$summary"
}

tmp=$(mktemp -d)
uses gpu-check && phase gpu-check "$out/gpu-check.log" bash scripts/gpu-check.sh "$tmp"
uses torch-tests && phase torch-tests "$out/torch-tests.log" \
    "$py" -m pytest tests/gpu/test_torch.py -v -rs
if uses torch-bench; then
    # torch_bench rewrites its section of a copy of the doc; the copy comes
    # back for review and commit on the build machine.
    cp docs/BENCHMARKS.md "$out/BENCHMARKS.md"
    phase torch-bench "$out/torch-bench.log" "$py" bench/torch_bench.py --doc "$out/BENCHMARKS.md"
fi
# CuPy's and Numba's plugins, and torch, CuPy and Numba in one process; the
# first test fails (not skips) where cudalloc cannot use the GPU.
uses frameworks-tests && phase frameworks-tests "$out/frameworks-tests.log" \
    "$py" -m pytest tests/gpu/test_frameworks.py tests/gpu/test_cupy.py tests/gpu/test_numba.py -v -rs
trace=$out/train-gpu.csv
if uses torch-trace; then
    rm -f "$trace"
    phase torch-trace "$out/torch-trace.log" env CUDALLOC_BENCH_CONF="log_file:$trace" \
        "$py" bench/torch_bench.py --modes cudalloc --alloc-iters 0 --no-doc
fi
# The trace is compressed first, so the .gz is there even when what follows
# fails or runs out of time; the model and the replay read the plain file,
# which is removed at the end (a GPU trace can be too big to copy back).
# shellcheck disable=SC2016 # expanded by the inner bash
uses trace-replay && phase trace-replay "$out/torch-trace.log" bash -c '
    py=$1 csv=$2
    if [ -f "$csv" ]; then
        gzip -9 -kf "$csv" || exit
    elif [ -f "$csv.gz" ]; then
        gzip -dkf "$csv.gz" || exit
    else
        echo "no trace: $csv (run the torch-trace phase first)"
        exit 1
    fi
    rc=0
    "$py" scripts/torch_native_model.py "$csv" || rc=$?
    "$CUDALLOC_BIN" replay "$csv" || { r=$?; [ "$rc" -ne 0 ] || rc=$r; }
    rm -f "$csv"
    exit "$rc"' trace-replay "$py" "$trace"
rm -rf "$tmp"

if [ ${#failed[@]} -eq 0 ]; then
    echo "result: all ${#phases[@]} phases passed ($((SECONDS))s)" | tee -a "$summary"
    exit 0
fi
# trace-replay needs the trace, which a second command has to record again.
if [[ " ${failed[*]} " == *" trace-replay "* ]] && [[ " ${failed[*]} " != *" torch-trace "* ]]; then
    failed=("${failed[@]/trace-replay/torch-trace,trace-replay}")
fi
echo "result: ${#failed[@]} of ${#phases[@]} phases did not pass ($((SECONDS))s); rerun: bash scripts/gpu-all.sh --only $(IFS=,; echo "${failed[*]}") OUTDIR" | tee -a "$summary"
exit 1
