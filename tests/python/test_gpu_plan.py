"""scripts/gpu-all.sh without a GPU: the time plan (--plan), the refusals, the
readiness check, and that every phase fails fast, is summarised and leaves no
process behind; and tests/gpu/proctree.py, which stops torchrun's ranks.
No cargo build, no torch: the binaries are fake paths set through
CUDALLOC_BIN, CUDALLOC_GPU_TEST and CUDALLOC_LIBRARY, and torch is hidden."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "gpu-all.sh")
DEFAULTS = {"gpu-check": 90, "torch-tests": 150, "torch-bench": 120, "frameworks-tests": 60,
            "torch-trace": 60, "trace-replay": 60}
SETTINGS = ("GPU_", "TORCH_", "TRACE_", "CUDALLOC", "PYTHON", "OUT", "PYTEST")
ROW = re.compile(r"^(\S+)\s+limit\s+(\d+)s\s+effective\s+(\d+)s\s+worst end\s+(\d+)s")

sys.path.insert(0, os.path.join(REPO, "tests", "gpu"))
import proctree  # noqa: E402 (found through the path above)


def gpu_all(*args, timeout=60, **env):
    """Run gpu-all.sh with none of the caller's settings, only `env`."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS)}
    e.update(env)
    return subprocess.run(["bash", SCRIPT, *args], env=e, capture_output=True, text=True,
                          timeout=timeout)


def plan(*args, **env):
    r = gpu_all("--plan", *args, **env)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ROW.match(l).groups() for l in r.stdout.splitlines() if ROW.match(l)]
    worst = int(re.search(r"worst case: (\d+)s", r.stdout).group(1))
    return [(name, int(lim), int(eff), int(end)) for name, lim, eff, end in rows], worst


def rule(limits, deadline, ready=60, kill=10, margin=5, minimum=10):
    """The rule in the script's header: each phase gets min(its limit, time
    left - kill-after - margin), or nothing when under `minimum` is left."""
    t, effs = ready, []
    for lim in limits:
        left = deadline - t - kill - margin
        eff = lim if left >= lim else left if left >= minimum else 0
        t += eff + kill if eff else 0
        effs.append(eff)
    return effs, t


def test_default_plan_runs_the_first_three_unshrunk_and_the_frameworks_tests_in_what_is_left():
    rows, worst = plan()
    assert [r[0] for r in rows] == ["gpu-check", "torch-tests", "torch-bench", "frameworks-tests"]
    assert all(lim == eff == DEFAULTS[name] for name, lim, eff, _ in rows[:3]), rows
    # 60 s readiness + each phase's limit and 10 s kill-after.
    assert rows[2][3] == 60 + (90 + 10) + (150 + 10) + (120 + 10) == 450
    # The last phase gets the rest: 480 - 450 - 10 kill-after - 5 margin.
    assert rows[3][:3] == ("frameworks-tests", 60, 15)
    assert worst == 475 and worst + 5 <= 480


@pytest.mark.parametrize(
    "env",
    [
        {"GPU_ALL_DEADLINE_S": "300"},
        {"GPU_ALL_DEADLINE_S": "400"},
        {"TORCH_TRACE": "1"},
        {"TORCH_TRACE": "1", "GPU_ALL_DEADLINE_S": "600", "GPU_ALL_KILL_AFTER_S": "3"},
        {"GPU_ALL_SKIP_READY": "1", "GPU_ALL_DEADLINE_S": "250", "TORCH_BENCH_S": "200"},
    ],
)
def test_a_shorter_deadline_shrinks_the_later_phases(env):
    rows, worst = plan(**env)
    deadline = int(env.get("GPU_ALL_DEADLINE_S", 480))
    ready = 0 if env.get("GPU_ALL_SKIP_READY") == "1" else 60
    kill = int(env.get("GPU_ALL_KILL_AFTER_S", 10))
    limits = [lim for _, lim, _, _ in rows]
    effs, end = rule(limits, deadline, ready=ready, kill=kill)
    assert [eff for _, _, eff, _ in rows] == effs
    assert worst == end <= deadline - 5
    if sum(limits) + len(limits) * kill + ready + 5 > deadline:
        assert any(eff < lim for _, lim, eff, _ in rows), rows


def test_shrinking_by_hand():
    rows, worst = plan(GPU_ALL_DEADLINE_S="300")
    # 60 + 100 = 160 s in; 300 - 160 - 15 = 125 s left for torch-tests; none for the rest.
    assert [(n, e) for n, _, e, _ in rows] == [
        ("gpu-check", 90), ("torch-tests", 125), ("torch-bench", 0), ("frameworks-tests", 0)]
    assert worst == 295


def test_only_runs_the_named_phases_with_their_full_limits():
    # Where the whole plan has no time left for the bench, a second command
    # running it alone gives it its full limit, in the script's order.
    rows, _ = plan(GPU_ALL_DEADLINE_S="300")
    assert rows[2][:3] == ("torch-bench", 120, 0)
    rows, worst = plan("--only", "torch-bench,gpu-check", GPU_ALL_DEADLINE_S="300")
    assert [(n, e) for n, _, e, _ in rows] == [("gpu-check", 90), ("torch-bench", 120)]
    rows, worst = plan("--only=torch-tests")
    assert rows == [("torch-tests", 150, 150, 220)] and worst == 220
    rows, worst = plan("--only", "frameworks-tests")
    assert rows == [("frameworks-tests", 60, 60, 130)] and worst == 130


@pytest.mark.parametrize(
    "env, args, why",
    [
        ({"GPU_ALL_DEADLINE_S": "700"}, [], "over the 600 s"),
        ({"GPU_ALL_DEADLINE_S": "200"}, [], "torch-tests alone overruns the deadline"),
        ({"TORCH_TESTS_S": "500"}, [], "torch-tests alone overruns the deadline"),
        ({"TORCH_TRACE": "1", "TORCH_TRACE_S": "480"}, [], "torch-trace alone overruns"),
        ({"GPU_CHECK_S": "0"}, [], "GPU_CHECK_S=0 is not a whole number of seconds"),
        ({"GPU_ALL_DEADLINE_S": "8m"}, [], "GPU_ALL_DEADLINE_S=8m is not"),
        ({}, ["--only", "torch-test"], "unknown phase 'torch-test'"),
    ],
)
def test_settings_that_overrun_are_refused(env, args, why, tmp_path):
    r = gpu_all("--plan", *args, **env)
    assert r.returncode == 2 and why in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("gpu-all: refused:")
    # A real run refuses the same way before doing anything, and says so in summary.txt.
    out = tmp_path / "out"
    r = gpu_all(*args, str(out), **env)
    assert r.returncode == 2 and r.stdout.count("\n") == 1 and why in r.stdout
    summary = (out / "summary.txt").read_text()
    assert why in summary
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]


def no_gpu_env(tmp_path):
    """Fake binaries, torch hidden (its import fails at once), PATH without
    cargo (nor, on a machine without a GPU, nvidia-smi)."""
    hide = tmp_path / "hide"
    (hide / "torch").mkdir(parents=True)
    (hide / "torch" / "__init__.py").write_text("raise ImportError('torch hidden by the test')\n")
    return dict(
        CUDALLOC_BIN=str(tmp_path / "no" / "cudalloc"),
        CUDALLOC_GPU_TEST=str(tmp_path / "no" / "gpu-test"),
        CUDALLOC_LIBRARY=str(tmp_path / "no" / "libcudalloc.so"),
        PYTHON=sys.executable,
        PYTHONPATH=str(hide),
        PATH="/usr/bin:/bin",
        PYTEST_ADDOPTS="-p no:cacheprovider",
    )


def test_not_ready_is_one_line_and_in_the_summary(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = gpu_all(str(out), **no_gpu_env(tmp_path))
    assert time.monotonic() - t0 < 20
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("gpu-all: not ready: missing or not executable:")
    assert "scripts/gpu-all.sh --prep" in r.stdout and "cargo build" not in r.stdout
    assert "torch hidden by the test" in r.stdout
    if not shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        assert "nvidia-smi -L: not found" in r.stdout
    summary = (out / "summary.txt").read_text()
    assert r.stdout.strip() in summary
    assert "result: not ready, no phase ran" in summary
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]  # no phase ran


def test_bypassed_readiness_every_phase_fails_fast_and_is_summarised(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = gpu_all("--skip-ready", str(out), TORCH_TRACE="1", **no_gpu_env(tmp_path))
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert took < 30, took
    lines = (out / "summary.txt").read_text().splitlines()
    phases = ["gpu-check", "torch-tests", "torch-bench", "frameworks-tests", "torch-trace", "trace-replay"]
    for p in phases:
        assert any(l.startswith(f"{p}: FAILED (exit ") for l in lines), (p, lines)
    assert lines[-1].startswith("result: 6 of 6 phases did not pass")
    assert lines[-1].endswith("rerun: bash scripts/gpu-all.sh --only " + ",".join(phases) + " OUTDIR")
    assert not any(l.startswith("ready:") for l in lines)
    # The torch tests fail at collection (CUDALLOC_REQUIRE_GPU=1), not pass skipped.
    assert "torch hidden by the test" in (out / "torch-tests.log").read_text()
    assert "missing" in (out / "gpu-check.log").read_text()
    # The frameworks tests fail where cudalloc cannot use a GPU, even with
    # CuPy and Numba absent (their own tests skipped).
    log = (out / "frameworks-tests.log").read_text()
    assert "test_frameworks.py::test_cudalloc_serves_the_gpu FAILED" in log, log


def test_a_phase_over_its_limit_is_killed_with_all_it_started(tmp_path):
    # A stand-in python whose "pytest" leaves a process in a session of its
    # own (as torchrun's ranks are), then hangs ignoring SIGTERM.
    pidfile = tmp_path / "escaped.pid"
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/bin/bash\n"
        f"setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}\n"
        "trap '' TERM\n"
        "sleep 300 & wait $!; sleep 300 & wait $!\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = gpu_all("--skip-ready", "--only", "torch-tests", str(out), PYTHON=str(fake),
                TORCH_TESTS_S="1", GPU_ALL_KILL_AFTER_S="1",
                **{k: v for k, v in no_gpu_env(tmp_path).items() if k != "PYTHON"})
    assert time.monotonic() - t0 < 15
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert "torch-tests: TIMEOUT (exit 137" in summary, summary
    assert "rerun: bash scripts/gpu-all.sh --only torch-tests OUTDIR" in summary
    escaped = int(pidfile.read_text())
    assert gone(escaped), f"pid {escaped} outlived its phase"
    assert "killed what the phase left running" in (out / "torch-tests.log").read_text()


def gone(pid, wait=2.0):
    """Whether `pid` is dead (or a zombie nobody has reaped yet)."""
    end = time.monotonic() + wait
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.05)


LAUNCHER = """
import signal, subprocess, sys, time
# A rank in its own session that ignores SIGTERM (a hung rank).
rank = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
    start_new_session=True)
print("rank", rank.pid, flush=True)
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(300)
"""


@pytest.mark.parametrize("launcher", ["polite", "stubborn"])
def test_run_launcher_stops_ranks_in_their_own_sessions(launcher):
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as e:
        proctree.run_launcher([sys.executable, "-c", LAUNCHER, launcher], timeout=0.5, grace=0.5)
    assert time.monotonic() - t0 < 6
    rank = int(re.search(r"rank (\d+)", e.value.output).group(1))
    assert gone(rank), f"rank {rank} outlived its launcher"


def test_run_launcher_returns_like_subprocess_run():
    r = proctree.run_launcher([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=10)
    assert (r.returncode, r.stdout) == (3, "out\n")
