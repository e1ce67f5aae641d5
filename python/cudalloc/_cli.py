"""The ``cudalloc`` command of the installed package.

``pip install .`` bundles the Rust command-line tool (``bench``, ``config``,
``selftest``, ``replay``, ``trace-gen``, ``report``) in the package as
``cudalloc/bin/cudalloc``; the ``cudalloc`` console script runs it here, in
place of this process, with the same arguments.
"""

import os
import sys

BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "cudalloc")


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if not os.path.isfile(BIN):
        sys.stderr.write(
            f"cudalloc: the command-line tool is not bundled with this copy of the "
            f"package ({BIN} is missing): install the package with `pip install .` "
            f"from the cudalloc repository, or run `cargo run --release -- ARGS` there\n"
        )
        return 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        os.execv(BIN, ["cudalloc"] + args)
    except OSError as e:
        sys.stderr.write(f"cudalloc: cannot run {BIN}: {e.strerror or e}\n")
        return 126
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
