"""The package's command-line entry points: ``python -m cudalloc --version``,
and the ``cudalloc`` command (cudalloc._cli), which runs the Rust tool that
``pip install .`` bundles in the package."""

import os

import pytest

import cudalloc
from conftest import INSTALLED, REPO, child_env, run_py


def test_python_m_cudalloc_version():
    r = run_py(args=["-m", "cudalloc", "--version"], env=child_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"cudalloc {cudalloc.__version__} (Python package: ")
    assert lines[1] == f"library: {cudalloc.__version__} at {cudalloc.library_path()}"


def cli_bin():
    return os.environ.get("CUDALLOC_BIN") or os.path.join(REPO, "target", "debug", "cudalloc")


def test_cudalloc_command_runs_the_bundled_tool(tmp_path):
    # The console script's main() replaces the process with the tool, which
    # gets the arguments as given.
    trace = os.path.join(REPO, "tests", "data", "random_seed1.csv")
    if INSTALLED:
        prelude = "import cudalloc._cli as cli\n"
    else:  # no bundled tool in the source tree: stand the debug build in for it
        prelude = f"import cudalloc._cli as cli\ncli.BIN = {cli_bin()!r}\n"
    r = run_py(prelude + f"cli.main(['replay', {trace!r}])\n", env=child_env(), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "failures (OOM at this capacity)" in r.stdout
    r = run_py(prelude + "cli.main(['no-such-subcommand'])\n", env=child_env())
    assert r.returncode == 2 and "no-such-subcommand" in r.stderr  # the tool's usage error


@pytest.mark.skipif(INSTALLED, reason="the installed package bundles the tool")
def test_cudalloc_command_without_the_bundled_tool():
    r = run_py(args=["-m", "cudalloc._cli", "--help"], env=child_env())
    assert r.returncode == 1
    assert "the command-line tool is not bundled" in r.stderr and "pip install ." in r.stderr
