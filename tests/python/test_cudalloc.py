"""The Python package against the sim backend, without torch or a GPU."""
import os
import subprocess
import sys
import timeit

from conftest import PTH, PYTHON_DIR, env, run_py


def test_import_is_cheap_and_needs_neither_torch_nor_the_library():
    r = run_py(
        """
        import sys, cudalloc
        assert "torch" not in sys.modules
        assert cudalloc._lib._lib is None, "the library must load lazily"
        print(cudalloc.library_path())
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(".so")


def test_bad_configuration_raises_valueerror_naming_the_key():
    r = run_py(
        """
        from cudalloc import _lib
        for conf, key in [("bogus_key:1", "bogus_key"), ("sim_memory:lots", "sim_memory"), ("backend", "backend")]:
            try:
                _lib.init(conf)
            except ValueError as e:
                assert key in str(e), (conf, str(e))
                assert "\\n" not in str(e).strip(), "one line"
            else:
                raise AssertionError(conf + " accepted")
        _lib.init("backend:sim,sim_devices:2,sim_memory:1GiB")   # a good one still works after
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_stats_follow_allocations_with_torch_key_names():
    r = run_py(
        """
        import cudalloc
        from cudalloc import _lib
        lib = _lib.lib()
        ptrs = [lib.cudalloc_malloc(1000, 0, None) for _ in range(10)]
        assert all(ptrs)
        s = cudalloc.memory_stats()
        assert s["allocated_bytes.all.current"] == 10 * 1024, s
        assert s["active.all.current"] == 10
        assert s["requested_bytes.all.current"] == 10 * 1000
        assert s["reserved_bytes.all.current"] == 2 << 20
        assert s["segment.all.current"] == 1
        assert cudalloc.memory_allocated(0) == 10 * 1024
        assert cudalloc.memory_reserved("cuda:0") == 2 << 20
        assert cudalloc.memory_allocated(1) == 0, "device 1 is separate"
        for p in ptrs:
            lib.cudalloc_free(p, 0, 0, None)
        assert cudalloc.memory_allocated() == 0
        assert cudalloc.max_memory_allocated() == 10 * 1024
        cudalloc.reset_peak_memory_stats()
        assert cudalloc.max_memory_allocated() == 0
        cudalloc.empty_cache()
        assert cudalloc.memory_reserved() == 0
        assert cudalloc.max_memory_reserved() == 2 << 20
        s = cudalloc.memory_stats()
        assert s["cudalloc.num_allocs"] == 10 and s["cudalloc.num_frees"] == 10
        try:
            cudalloc.memory_stats(7)
        except ValueError as e:
            assert "device 7" in str(e)
        else:
            raise AssertionError("device 7 accepted")
        import json
        assert json.loads(cudalloc.stats_json())
        p = lib.cudalloc_malloc(3_000_000, 0, None)
        report = cudalloc.leak_report()
        assert "3000000" in report or "2.86" in report, report
        lib.cudalloc_free(p, 0, 0, None)
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_oom_diagnosis_reaches_stderr():
    r = run_py(
        """
        from cudalloc import _lib
        lib = _lib.lib()
        assert lib.cudalloc_malloc(1 << 50, 0, None) is None
        code, msg = _lib.last_error()
        assert code == 42003, code
        print("returned NULL")
        """
    )
    assert r.returncode == 0, r.stderr
    assert "out of memory on device 0" in r.stderr and "could not allocate" in r.stderr, r.stderr


def test_pth_hook_does_nothing_without_cudalloc_env():
    line = open(PTH).read()
    r = run_py(
        f"""
        import sys
        exec({line!r})
        assert "cudalloc" not in sys.modules and "cudalloc._hook" not in sys.modules
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    r = run_py(
        f"""
        import sys
        exec({line!r})
        from cudalloc._hook import _TorchFinder
        assert any(isinstance(f, _TorchFinder) for f in sys.meta_path)
        assert "torch" not in sys.modules
        print("ok")
        """,
        CUDALLOC="1",
    )
    assert r.returncode == 0, r.stderr


def test_pth_hook_costs_next_to_nothing_when_unset():
    os.environ.pop("CUDALLOC", None)
    code = compile(open(PTH).read(), "cudalloc.pth", "exec")
    n = 20000
    per_call = timeit.timeit(lambda: exec(code, {}), number=n) / n
    # An environment lookup: about a microsecond. The bound is generous for slow CI.
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us per start-up"


def test_enable_installs_hooks_and_patches_torch(fake_torch):
    r = run_py(
        """
        import torch, cudalloc
        cudalloc.enable()
        a = torch.cuda.memory.current
        assert a is not None, "change_current_allocator not called"
        assert a.args == (cudalloc.library_path(), "cudalloc_malloc", "cudalloc_free")
        assert set(a._raw.hooks) == {"init", "reset", "fraction", "record_stream"}, a._raw.hooks
        assert all(isinstance(p, int) and p for p in a._raw.hooks.values())
        assert torch.cuda.memory_stats()["allocated_bytes.all.current"] == 0
        assert torch.cuda.memory.memory_stats is cudalloc.memory_stats
        assert torch.cuda.max_memory_allocated() == 0
        print("ok")
        """,
        PYTHONPATH=fake_torch + os.pathsep + PYTHON_DIR,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_enable_refuses_after_cuda_init_and_rejects_bad_conf(fake_torch):
    r = run_py(
        """
        import torch, cudalloc
        try:
            cudalloc.enable(conf="bogus_key:3")
        except ValueError as e:
            assert "bogus_key" in str(e)
        else:
            raise AssertionError("bad conf accepted")
        assert torch.cuda.memory.current is None, "nothing installed on a bad conf"
        torch.cuda._initialized = True
        try:
            cudalloc.enable()
        except RuntimeError as e:
            assert "before" in str(e) and "CUDALLOC=1" in str(e), str(e)
        else:
            raise AssertionError("enabled after CUDA initialisation")
        print("ok")
        """,
        PYTHONPATH=fake_torch + os.pathsep + PYTHON_DIR,
    )
    assert r.returncode == 0, r.stderr


def test_cudalloc_env_enables_on_torch_import(fake_torch):
    line = open(PTH).read()
    code = f"""
        exec({line!r})
        import torch, cudalloc
        print("enabled" if cudalloc.enabled() else "not enabled")
        print("patched" if torch.cuda.memory_stats is cudalloc.memory_stats else "unpatched")
        """
    path = fake_torch + os.pathsep + PYTHON_DIR
    r = run_py(code, CUDALLOC="1", PYTHONPATH=path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["enabled", "patched"], r.stdout
    r = run_py(code, CUDALLOC="1", PYTHONPATH=path, CUDALLOC_PATCH_TORCH="0")
    assert r.stdout.split() == ["enabled", "unpatched"], r.stdout + r.stderr
    r = run_py(code, CUDALLOC="1", PYTHONPATH=path, CUDALLOC_CONF="bogus_key:1")
    assert r.returncode == 0, "a bad conf must not break the program"
    assert r.stdout.split()[0] == "not"
    errs = [l for l in r.stderr.splitlines() if l.startswith("cudalloc:")]
    assert len(errs) == 1 and "bogus_key" in errs[0], r.stderr


def test_python_m_cudalloc_runs_a_script(tmp_path, fake_torch):
    script = tmp_path / "train.py"
    script.write_text("import sys, torch, cudalloc\nprint(sys.argv[1:], cudalloc.enabled())\n")
    r = subprocess.run(
        [sys.executable, "-m", "cudalloc", str(script), "--epochs", "2"],
        env=env(PYTHONPATH=fake_torch + os.pathsep + PYTHON_DIR),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['--epochs', '2'] True", r.stdout
