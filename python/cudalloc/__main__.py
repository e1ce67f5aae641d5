"""python -m cudalloc script.py [args...]   (or: python -m cudalloc -m module [args...])

Runs the script with cudalloc enabled when it imports torch, like CUDALLOC=1."""
import os
import runpy
import sys


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    os.environ["CUDALLOC"] = "1"
    from . import _hook

    _hook._install()
    if argv[0] == "-m":
        if len(argv) < 2:
            print("python -m cudalloc -m MODULE [args...]", file=sys.stderr)
            return 2
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
