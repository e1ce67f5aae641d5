"""The ctypes layer against the sim backend: config errors, stats mapping,
reports, and drift checks against the committed header."""

import ctypes
import json
import os
import re

import pytest

import cudalloc
from cudalloc import _lib
from conftest import REPO, SIM_CONF, child_env, run_py

MiB = 1 << 20


def rounded(n):
    return (n + 511) // 512 * 512


def header():
    with open(os.path.join(REPO, "include", "cudalloc.h"), encoding="utf-8") as f:
        return f.read()


def test_stats_fields_mirror_header():
    body = re.search(r"typedef struct \{([^{}]*)\} cudalloc_stats;", header()).group(1)
    fields = re.findall(r"uint64_t (\w+);", body)
    assert tuple(fields) == _lib.STATS_FIELDS


def test_result_codes_mirror_header():
    body = re.search(r"typedef enum \{(.*?)\} cudalloc_result;", header(), re.S).group(1)
    codes = dict(re.findall(r"CUDALLOC_(\w+) = (\d+)", body))
    for name, value in codes.items():
        assert getattr(_lib, name) == int(value), name


def test_version_matches_cargo():
    with open(os.path.join(REPO, "Cargo.toml"), encoding="utf-8") as f:
        version = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    assert cudalloc.__version__ == version


def test_import_needs_no_torch_and_no_library():
    # No library anywhere: import works; first use is a clear error, not a crash.
    code = (
        "import sys, cudalloc\n"
        "assert 'torch' not in sys.modules and cudalloc._lib._lib is None\n"
        "try:\n    cudalloc.memory_stats()\n"
        "except cudalloc.CudallocError as e:\n    print('ERR', e)\n"
    )
    r = run_py(code, env=child_env(CUDALLOC_LIBRARY="/nonexistent/libcudalloc.so"))
    assert r.returncode == 0, r.stderr
    assert "ERR CUDALLOC_LIBRARY=/nonexistent/libcudalloc.so: no such file" in r.stdout


@pytest.mark.parametrize(
    "conf, key",
    [
        ("backend:sim,bogus_key:1", "bogus_key"),
        ("backend:sim,sim_memory:lots", "sim_memory"),
        ("backend:warp", "backend"),
        ("backend:sim,memory_fraction:2", "memory_fraction"),
    ],
)
def test_config_error_names_key(lib, conf, key):
    with pytest.raises(ValueError) as ei:
        cudalloc.configure(conf)
    e = ei.value
    assert isinstance(e, cudalloc.ConfigError) and e.code == _lib.ERR_CONFIG
    assert f"'{key}'" in str(e) and "\n" not in str(e)


def test_reconfigure_is_refused(lib):
    cudalloc.configure(SIM_CONF)  # the configuration in force: fine
    with pytest.raises(cudalloc.CudallocError) as ei:
        cudalloc.configure("backend:sim,sim_devices:2,sim_memory:1GiB,max_memory:1GiB")
    assert ei.value.code == _lib.ERR_ALREADY_INITIALIZED


def test_the_environment_overrides_configure_key_by_key(lib):
    # The suite runs with CUDALLOC_CONF=SIM_CONF: a program's other value for
    # one of its keys gives way to the operator's, so this is the
    # configuration in force, not a new one.
    assert os.environ["CUDALLOC_CONF"] == SIM_CONF
    cudalloc.configure("backend:sim,sim_devices:3,sim_memory:1GiB")
    assert _lib.config_in_force()["sim_devices"] == "2"


def test_stats_mapping(lib):
    dev = 1
    cudalloc.empty_cache()
    cudalloc.reset_peak_memory_stats(dev)
    before = cudalloc.memory_stats(dev)
    sizes = [1000, 4096, 3 * MiB + 7, 200, 12 * MiB]
    ptrs = [lib.cudalloc_malloc(n, dev, None) for n in sizes]
    assert all(ptrs) and len(set(ptrs)) == len(ptrs)
    s = cudalloc.memory_stats(dev)
    live = sum(rounded(n) for n in sizes)
    assert s["allocated_bytes.all.current"] == live
    assert s["allocated_bytes.all.peak"] == live
    assert s["requested_bytes.all.current"] == sum(sizes)
    assert s["active.all.current"] == len(sizes) == s["allocation.all.current"]
    assert s["active_bytes.all.current"] == live
    assert s["allocation.all.allocated"] - before["allocation.all.allocated"] == len(sizes)
    assert s["reserved_bytes.all.current"] >= live
    assert s["reserved_bytes.all.current"] == s["reserved_bytes.all.peak"]
    assert s["segment.all.current"] >= 2  # small and large pools
    assert s["num_device_alloc"] == s["segment.all.allocated"] == s["cudalloc.num_driver_allocs"]
    assert s["num_ooms"] == 0 and s["num_alloc_retries"] == 0
    assert list(s) == sorted(s), "torch returns the keys sorted"
    # The helpers agree with the dict, and device 0 is untouched.
    assert cudalloc.memory_allocated(dev) == live
    assert cudalloc.memory_allocated(f"cuda:{dev}") == live
    assert cudalloc.memory_reserved(dev) == s["reserved_bytes.all.current"]
    assert cudalloc.memory_allocated(0) == 0
    nested = cudalloc.memory_stats_as_nested_dict(dev)
    assert nested["allocated_bytes"]["all"]["current"] == live
    # Free two: current drops, peak stays; reset_peak brings it down.
    for p in ptrs[:2]:
        lib.cudalloc_free(p, 0, dev, None)
    left = live - rounded(sizes[0]) - rounded(sizes[1])
    assert cudalloc.memory_allocated(dev) == left
    assert cudalloc.max_memory_allocated(dev) == live
    cudalloc.reset_peak_memory_stats(dev)
    assert cudalloc.max_memory_allocated(dev) == left
    reserved = cudalloc.memory_reserved(dev)
    assert cudalloc.max_memory_reserved(dev) == reserved
    for p in ptrs[2:]:
        lib.cudalloc_free(p, 0, dev, None)
    assert cudalloc.memory_allocated(dev) == 0
    assert cudalloc.memory_reserved(dev) == reserved  # cached, not released
    cudalloc.empty_cache()
    assert cudalloc.memory_reserved(dev) == 0
    assert cudalloc.memory_stats(dev)["segment.all.current"] == 0
    cudalloc.check_invariants()


def test_invalid_free_is_counted_not_fatal(lib):
    before = cudalloc.raw_stats(0)["num_invalid_frees"]
    lib.cudalloc_free(ctypes.c_void_p(0xDEAD000), 0, 0, None)
    assert lib.cudalloc_last_error() == _lib.ERR_INVALID_FREE
    assert cudalloc.raw_stats(0)["num_invalid_frees"] == before + 1


def test_bad_device(lib):
    with pytest.raises(cudalloc.InvalidDeviceError) as ei:
        cudalloc.memory_stats(7)
    assert isinstance(ei.value, ValueError) and "device 7" in str(ei.value)
    with pytest.raises(ValueError):
        cudalloc.memory_stats("cpu")
    # Past a C int, ctypes would wrap the index onto another device.
    for big in (2**32, -(2**32), 2**31, "cuda:4294967296"):
        with pytest.raises(cudalloc.InvalidDeviceError, match="out of a C int"):
            cudalloc.memory_allocated(big)
    assert cudalloc.device_count() == 2


def test_summary_json_and_leak_report(lib):
    p = lib.cudalloc_malloc(5 * MiB, 0, None)
    try:
        text = cudalloc.memory_summary(0)
        assert "device 0" in text and "5.00 MiB" in text
        doc = json.loads(cudalloc.stats_json())
        dev0 = [d for d in doc["devices"] if d["device"] == 0][0]
        assert dev0["allocated_bytes"] == cudalloc.memory_allocated(0) == 5 * MiB
        assert doc["config"]["backend"] == "sim"
        report = cudalloc.leak_report()
        assert hex(p) in report
        leaks = json.loads(cudalloc.leak_report(json=True))
        assert hex(p) in json.dumps(leaks) or str(p) in json.dumps(leaks)
        with pytest.raises(ValueError):
            cudalloc.leak_report(min_age_s=-1)
    finally:
        lib.cudalloc_free(p, 0, 0, None)
    assert hex(p) not in cudalloc.leak_report()


def test_memory_fraction_export_sets_limit(lib):
    # torch's set_per_process_memory_fraction reaches this export.
    assert cudalloc.get_per_process_memory_fraction(1) == 1.0
    lib.cudalloc_set_memory_fraction(0.5, 1)
    assert lib.cudalloc_last_error() == 0
    assert cudalloc.raw_stats(1)["limit_bytes"] == 512 * MiB
    assert cudalloc.get_per_process_memory_fraction("cuda:1") == 0.5
    assert cudalloc.get_per_process_memory_fraction(0) == 1.0
    lib.cudalloc_set_memory_fraction(1.0, 1)
    lib.cudalloc_set_memory_fraction(7.0, 1)
    assert lib.cudalloc_last_error() != 0  # refused, nothing changed
    assert cudalloc.raw_stats(1)["limit_bytes"] in (0, 1024 * MiB)
    assert cudalloc.get_per_process_memory_fraction(1) == 1.0
    with pytest.raises(cudalloc.InvalidDeviceError, match="device 9 is not valid"):
        cudalloc.get_per_process_memory_fraction(9)


def test_reset_accumulated_memory_stats(lib):
    # torch.cuda.reset_accumulated_memory_stats raises under a pluggable
    # allocator; patched, it reaches this.
    dev = 1
    p = lib.cudalloc_malloc(5 * MiB, dev, None)
    lib.cudalloc_free(p, 0, dev, None)
    keep = lib.cudalloc_malloc(4096, dev, None)
    before = cudalloc.memory_stats(dev)
    assert before["allocation.all.allocated"] >= 2 and before["allocation.all.freed"] >= 1
    cudalloc.reset_accumulated_memory_stats(dev)
    s = cudalloc.memory_stats(dev)
    for key in ("allocation.all.allocated", "allocation.all.freed", "segment.all.allocated",
                "num_device_alloc", "num_alloc_retries", "cudalloc.num_cache_hits"):
        assert s[key] == 0, key
    for key in ("allocated_bytes.all.current", "allocated_bytes.all.peak",
                "reserved_bytes.all.current", "segment.all.current", "allocation.all.current"):
        assert s[key] == before[key], key
    lib.cudalloc_free(keep, 0, dev, None)
    assert cudalloc.memory_stats(dev)["allocation.all.freed"] == 1
    with pytest.raises(cudalloc.InvalidDeviceError):
        cudalloc.reset_accumulated_memory_stats(9)


def test_oom_diagnosis_reaches_stderr():
    # What a user sees when torch gets NULL: the diagnosis is already on stderr.
    code = (
        "import cudalloc, sys\n"
        "from cudalloc import _lib\n"
        f"cudalloc.configure({SIM_CONF!r})\n"
        "lib = _lib.lib()\n"
        "keep = lib.cudalloc_malloc(300 << 20, 0, None)\n"
        "p = lib.cudalloc_malloc(1 << 50, 0, None)\n"
        "print('ptr', p, 'code', lib.cudalloc_last_error(), 'ooms', cudalloc.memory_stats(0)['num_ooms'])\n"
        "sys.stdout.flush()\n"
        "p2 = lib.cudalloc_malloc(1 << 20, 0, None)\n"
        "print('after', bool(p2))\n"
    )
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert f"ptr None code {_lib.ERR_OUT_OF_MEMORY} ooms 1" in r.stdout
    assert "after True" in r.stdout  # the process carries on
    assert "cudalloc: out of memory on device 0" in r.stderr
    assert "could not allocate 1024.0TiB" in r.stderr or "1125899906842624 bytes" in r.stderr
    assert "live 300" in r.stderr  # the diagnosis says what is held


def test_oom_diagnosis_can_be_filtered():
    code = (
        "import cudalloc\nfrom cudalloc import _lib\n"
        f"cudalloc.configure({SIM_CONF!r})\n"
        "assert not _lib.lib().cudalloc_malloc(1 << 50, 0, None)\n"
    )
    r = run_py(code, env=child_env(CUDALLOC_LOG="off"))
    assert r.returncode == 0, r.stderr
    assert "out of memory" not in r.stderr


def test_forked_child_gets_a_clear_error_and_the_parent_carries_on():
    # As in a DataLoader worker forked after the allocator started: the
    # child's calls raise CudallocError naming the fork (no hang, no crash),
    # and the parent keeps working.
    code = (
        "import os, cudalloc\n"
        "from cudalloc import _lib\n"
        "_lib.init(%r)\n"
        "assert cudalloc.memory_stats()['num_alloc_retries'] == 0\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        cudalloc.memory_stats()\n"
        "        os._exit(2)\n"
        "    except cudalloc.CudallocError as e:\n"
        "        os._exit(0 if 'forked' in str(e) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child', os.waitstatus_to_exitcode(status))\n"
        "cudalloc.memory_stats()\n"
        "print('parent ok')\n" % SIM_CONF
    )
    r = run_py(code, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "child 0" in r.stdout and "parent ok" in r.stdout, r.stdout + r.stderr
