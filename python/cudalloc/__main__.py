"""``python -m cudalloc [--conf CONF] [--no-patch] (script.py | -m module) [args...]``
(``python -m cudalloc --version``: the package's version and its library)

Runs a script or module with cudalloc enabled as soon as it imports torch,
exactly like ``CUDALLOC=1``. Child processes inherit ``CUDALLOC=1`` (and the
configuration), so DataLoader workers and spawned ranks get cudalloc too.
"""

import argparse
import os
import runpy
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m cudalloc",
        description="Run a Python script or module with cudalloc as PyTorch's CUDA allocator.",
    )
    parser.add_argument("--conf", help="configuration (CUDALLOC_CONF syntax, key:value,...)")
    parser.add_argument(
        "--no-patch",
        action="store_true",
        help="leave torch.cuda.memory_stats() and friends alone (CUDALLOC_PATCH_TORCH=0)",
    )
    parser.add_argument("-m", dest="module", help="run a library module as a script")
    parser.add_argument(
        "--version",
        action="store_true",
        help="print the package's version and the library it uses, then exit",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="script.py and its arguments")
    opts = parser.parse_args(argv)
    if opts.version:
        print(version_text())
        return 0
    if opts.module is None and not opts.args:
        parser.error("give a script to run, or -m MODULE")

    os.environ["CUDALLOC"] = "1"
    if opts.conf is not None:
        os.environ["CUDALLOC_CONF"] = opts.conf
    if opts.no_patch:
        os.environ["CUDALLOC_PATCH_TORCH"] = "0"

    from . import _autoenable

    _autoenable.install()
    if opts.module is not None:
        sys.argv = [opts.module] + opts.args
        runpy.run_module(opts.module, run_name="__main__", alter_sys=True)
    else:
        script = opts.args[0]
        if not os.path.isfile(script):
            sys.stderr.write(f"python -m cudalloc: no such script: {script}\n")
            return 2
        sys.argv = list(opts.args)
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
    return 0


def version_text():
    """The package's version and location, and the library it would load
    (loaded, not started: no device is touched)."""
    from . import __version__, _lib

    package = os.path.dirname(os.path.abspath(__file__))
    lines = [f"cudalloc {__version__} (Python package: {package})"]
    try:
        _lib.lib()
        version = (
            _lib.lib().cudalloc_version().decode() if _lib.has("cudalloc_version") else "unknown"
        )
        lines.append(f"library: {version} at {_lib.loaded_path()}")
    except _lib.CudallocError as e:
        lines.append(f"library: not loadable: {e}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
