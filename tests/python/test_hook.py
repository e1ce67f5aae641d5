"""The CUDALLOC=1 start-up hook (cudalloc-autoenable.pth) and `python -m cudalloc`.

The .pth is processed here with site.addsitedir on a temporary directory
holding a copy of it, which is what site-packages does at start-up (the
fresh-venv check in pip_install_check.sh covers the installed copy).
"""

import os
import shutil
import sys
import textwrap

import pytest

from conftest import PTH, SIM_CONF, child_env, run_py

INSTALLED = os.environ.get("CUDALLOC_TEST_INSTALLED") == "1"


@pytest.fixture
def sitedir(tmp_path):
    d = tmp_path / "site"
    d.mkdir()
    shutil.copy(PTH, d / "cudalloc-autoenable.pth")
    return str(d)


def with_site(sitedir, body):
    return f"import site, sys\nsite.addsitedir({sitedir!r})\n" + textwrap.dedent(body)


def test_pth_is_one_import_line():
    with open(PTH, encoding="utf-8") as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    # site.py executes only lines starting with "import"; everything must fit on one.
    assert len(lines) == 1 and lines[0].startswith("import ")


def test_hook_does_nothing_when_cudalloc_unset(sitedir):
    for value in (None, "0", "", "false", "off"):
        r = run_py(
            with_site(
                sitedir,
                """
                mods = sorted(m for m in sys.modules if m.startswith(("cudalloc", "torch", "ctypes")))
                finders = [type(f).__name__ for f in sys.meta_path]
                print(mods, "_TorchFinder" in finders)
                """,
            ),
            env=child_env(fake_torch=True, CUDALLOC=value),
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "[] False", (value, r.stdout)
        assert r.stderr == ""


def test_hook_imports_nothing_with_cudalloc_unset(sitedir, tmp_path):
    # Process the hook's .pth and an empty .pth many times each, in a fresh
    # interpreter with CUDALLOC unset: the difference is the hook's cost.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.pth").write_text("\n")
    code = textwrap.dedent(
        f"""
        import site, sys, time
        def cost(d, name, n=300):
            best = []
            for _ in range(n):
                t = time.perf_counter()
                site.addpackage(d, name, set())
                best.append(time.perf_counter() - t)
            best.sort()
            return best[len(best) // 2]
        before = set(sys.modules)
        hook = cost({sitedir!r}, "cudalloc-autoenable.pth")
        base = cost({str(empty)!r}, "nothing.pth")
        print(sorted(set(sys.modules) - before))
        print((hook - base) * 1e6)
        """
    )
    r = run_py(code, env=child_env(CUDALLOC=None))
    assert r.returncode == 0, r.stderr
    new_modules, extra_us = r.stdout.splitlines()
    assert new_modules == "[]", "the hook imported modules with CUDALLOC unset"
    # A figure, not a check (tests do not depend on the machine's speed): one
    # dict lookup costs microseconds; importing cudalloc or torch would cost
    # milliseconds, which the module check above rules out.
    print(f"hook cost with CUDALLOC unset: {float(extra_us):.1f} us over an empty .pth")


def test_hook_enables_when_torch_is_imported(sitedir):
    r = run_py(
        with_site(
            sitedir,
            """
            assert "torch" not in sys.modules and "cudalloc._autoenable" in sys.modules
            import cudalloc
            assert not cudalloc.is_enabled()
            import torch
            assert torch.__fake__ and sys._fake_torch_imports == 1
            assert cudalloc.is_enabled() and cudalloc.is_patched()
            assert not any(type(f).__name__ == "_TorchFinder" for f in sys.meta_path)
            t = torch.empty(5000, "cuda:1")
            print(torch.cuda.memory_allocated(1), cudalloc.memory_stats(1)["requested_bytes.all.current"])
            import torch.cuda.memory  # later imports are untouched
            """,
        ),
        env=child_env(fake_torch=True, CUDALLOC="1", CUDALLOC_CONF=SIM_CONF),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["5120", "5000"]


def test_hook_survives_a_find_spec_probe_before_the_import(sitedir):
    # transformers, accelerate and others call importlib.util.find_spec("torch")
    # to see whether torch is installed before they import it.
    r = run_py(
        with_site(
            sitedir,
            """
            import importlib.util
            assert importlib.util.find_spec("torch") is not None
            assert importlib.util.find_spec("torch") is not None
            import torch, cudalloc
            print(cudalloc.is_enabled())
            assert not any(type(f).__name__ == "_TorchFinder" for f in sys.meta_path)
            """,
        ),
        env=child_env(fake_torch=True, CUDALLOC="1", CUDALLOC_CONF=SIM_CONF),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True"]


def test_hook_respects_patch_off(sitedir):
    r = run_py(
        with_site(
            sitedir,
            """
            import torch, cudalloc
            print(cudalloc.is_enabled(), cudalloc.is_patched())
            """,
        ),
        env=child_env(
            fake_torch=True, CUDALLOC="1", CUDALLOC_CONF=SIM_CONF, CUDALLOC_PATCH_TORCH="0"
        ),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False"]


def test_hook_bad_conf_is_one_line_naming_key(sitedir):
    r = run_py(
        with_site(sitedir, "import torch\nprint('should not get here')\n"),
        env=child_env(fake_torch=True, CUDALLOC="1", CUDALLOC_CONF="backend:sim,sim_memroy:1GiB"),
    )
    assert r.returncode == 1
    assert "should not get here" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cudalloc: CUDALLOC_CONF: unknown key 'sim_memroy'")


def test_hook_without_cuda_warns_and_continues(sitedir):
    # No backend named -> backend:cuda, unavailable here: one line, torch keeps its allocator.
    r = run_py(
        with_site(sitedir, "import torch, cudalloc\nprint('running', cudalloc.is_enabled())\n"),
        env=child_env(fake_torch=True, CUDALLOC="1", CUDALLOC_CONF=None),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "running False"
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("cudalloc: not enabled (CUDALLOC=1):")


SCRIPT = """
import sys
print("argv", sys.argv[1:], __name__)
import torch, cudalloc
print("enabled", cudalloc.is_enabled(), cudalloc.is_patched())
t = torch.empty(1 << 20, "cuda:0")
print("allocated", torch.cuda.memory_allocated(0))
"""


def test_python_m_cudalloc_runs_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = run_py(
        args=["-m", "cudalloc", str(script), "--epochs", "2"],
        env=child_env(fake_torch=True, CUDALLOC=None, CUDALLOC_CONF=SIM_CONF),
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "argv ['--epochs', '2'] __main__",
        "enabled True True",
        f"allocated {1 << 20}",
    ]


def test_python_m_cudalloc_options_and_module(tmp_path):
    (tmp_path / "trainmod.py").write_text(SCRIPT)
    r = run_py(
        args=["-m", "cudalloc", "--conf", SIM_CONF, "--no-patch", "-m", "trainmod", "x"],
        env=child_env(fake_torch=True, CUDALLOC=None, CUDALLOC_CONF=None,
                      extra_path=[str(tmp_path)]),
        cwd=str(tmp_path),
    )
    # --no-patch: torch's own memory_allocated raises under the pluggable allocator.
    assert "argv ['x'] __main__" in r.stdout and "enabled True False" in r.stdout
    assert r.returncode == 1 and "does not yet support" in r.stderr


def test_python_m_cudalloc_bad_conf(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = run_py(
        args=["-m", "cudalloc", "--conf", "backend:sim,oops:1", str(script)],
        env=child_env(fake_torch=True, CUDALLOC=None),
    )
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "unknown key 'oops'" in r.stderr
    assert "enabled" not in r.stdout


def test_python_m_cudalloc_usage_errors(tmp_path):
    r = run_py(args=["-m", "cudalloc"], env=child_env())
    assert r.returncode == 2 and "give a script" in r.stderr
    r = run_py(args=["-m", "cudalloc", str(tmp_path / "missing.py")], env=child_env())
    assert r.returncode == 2 and "no such script" in r.stderr
