"""Run a launcher whose workers leave its process group, and leave nothing behind.

torchrun (torch 2.11) starts each rank in a session of its own, so
`subprocess.run(..., timeout=...)`, which kills the launcher only, and a
timeout that signals the caller's process group both miss the ranks.
`run_launcher` sends SIGTERM to the launcher first (torchrun then stops its
ranks), waits a grace period, then SIGKILLs the launcher and the process
groups of the children it had. Linux only (reads /proc). Needs no torch:
tests/python/test_gpu_plan.py checks it with a stand-in launcher.
"""

import os
import signal
import subprocess


def children(pid):
    """The pids whose parent is `pid`, from /proc."""
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            kids.append(int(d))
    return kids


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        for k in children(todo.pop()):
            found.append(k)
            todo.append(k)
    return found


def _kill_tree(p, groups, grace):
    """SIGTERM `p`, wait `grace` seconds, then SIGKILL it and `groups`."""
    if p.poll() is None:
        p.terminate()
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
    own = os.getpgrp()
    for g in groups - {own}:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _groups(pid):
    gs = set()
    for k in descendants(pid):
        try:
            gs.add(os.getpgid(k))
        except ProcessLookupError:
            pass
    return gs


def run_launcher(cmd, timeout, grace=15, **popen_kw):
    """Like subprocess.run(cmd, capture_output=True, text=True, timeout=timeout),
    but on timeout (or any exception, KeyboardInterrupt included) the
    launcher's whole tree goes, not only the launcher."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException as e:
        # The groups first: once the launcher is gone its ranks have no parent
        # to be found by.
        _kill_tree(p, _groups(p.pid), grace)
        try:
            out, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a worker we missed holds the pipes
            out, err = "", ""
        if isinstance(e, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
