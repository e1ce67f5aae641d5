"""Build glue for `pip install .`: compile the Rust cdylib with cargo and put
libcudalloc.so inside the `cudalloc` package, plus the start-up hook
cudalloc-autoenable.pth at the top of site-packages (for CUDALLOC=1).

Environment: CARGO (the cargo to run), CARGO_TARGET_DIR (reuse a target dir),
CUDALLOC_CARGO_PROFILE (default: release).
"""

import os
import re
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:  # setuptools >= 70.1 ships bdist_wheel itself
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    from wheel.bdist_wheel import bdist_wheel

ROOT = os.path.dirname(os.path.abspath(__file__))
LIB = "libcudalloc.so"
PTH = "cudalloc-autoenable.pth"


def cargo_version():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    return m.group(1)


def build_library():
    cargo = os.environ.get("CARGO", "cargo")
    if shutil.which(cargo) is None:
        raise SystemExit(
            "building cudalloc needs Rust's cargo on PATH (https://rustup.rs), "
            "or set CARGO=/path/to/cargo"
        )
    profile = os.environ.get("CUDALLOC_CARGO_PROFILE", "release")
    cmd = [cargo, "build", "--lib", "--locked", "--profile", profile,
           "--manifest-path", os.path.join(ROOT, "Cargo.toml")]
    print("cudalloc: " + " ".join(cmd), flush=True)
    subprocess.check_call(cmd, cwd=ROOT)
    target = os.environ.get("CARGO_TARGET_DIR") or "target"
    target = os.path.join(ROOT, target)  # a relative dir is relative to ROOT
    out = os.path.join(target, "debug" if profile == "dev" else profile, LIB)
    if not os.path.isfile(out):
        raise SystemExit(f"cargo finished but {out} is missing")
    return out


class build_py_with_cargo(build_py):
    def run(self):
        super().run()
        lib = build_library()
        self.copy_file(lib, os.path.join(self.build_lib, "cudalloc", LIB))
        self.copy_file(os.path.join(ROOT, "python", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, "cudalloc", LIB),
            os.path.join(self.build_lib, PTH),
        ]


class BinaryDistribution(Distribution):
    """Holds a native library, so the wheel goes to platlib with a platform tag."""

    def has_ext_modules(self):
        return True


class bdist_wheel_py3_none(bdist_wheel):
    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat  # any CPython 3: the library does not link libpython


setup(
    version=cargo_version(),
    distclass=BinaryDistribution,
    cmdclass={"build_py": build_py_with_cargo, "bdist_wheel": bdist_wheel_py3_none},
)
