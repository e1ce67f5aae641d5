"""Build glue for `pip install .`: compile the Rust cdylib and the `cudalloc`
command-line tool with cargo and put them inside the `cudalloc` package
(libcudalloc.so, bin/cudalloc; the `cudalloc` console script runs the
latter), plus the start-up hook cudalloc-autoenable.pth at the top of
site-packages (for CUDALLOC=1). Both binaries go into the wheel without their
debug information (`strip --strip-debug`); cargo's own copies keep it.

Environment: CARGO (the cargo to run), CARGO_TARGET_DIR (reuse a target dir),
CUDALLOC_CARGO_PROFILE (default: release), STRIP (the strip to run).
"""

import json
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
BIN = "cudalloc"  # the command-line tool (src/main.rs)
PTH = "cudalloc-autoenable.pth"


def cargo_version():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    return m.group(1)


def build_binaries():
    """cargo build the library and the command-line tool; return their paths
    and the strip to ship them with (None: cargo already left debug info out)."""
    cargo = os.environ.get("CARGO", "cargo")
    if shutil.which(cargo) is None:
        raise SystemExit(
            "building cudalloc needs Rust's cargo on PATH (https://rustup.rs), "
            "or set CARGO=/path/to/cargo"
        )
    profile = os.environ.get("CUDALLOC_CARGO_PROFILE", "release")
    manifest = os.path.join(ROOT, "Cargo.toml")
    env = dict(os.environ)
    strip = shutil.which(os.environ.get("STRIP") or "strip")
    if strip is None:
        # Without strip, cargo leaves the debug information out itself (a
        # build of its own: the profile's artifacts keep theirs otherwise).
        key = "CARGO_PROFILE_" + ("DEV" if profile == "dev" else profile.upper().replace("-", "_"))
        env[key + "_STRIP"] = "debuginfo"
        print("cudalloc: no strip on PATH; cargo builds without debug information", flush=True)
    cmd = [cargo, "build", "--lib", "--bin", "cudalloc", "--locked", "--profile", profile,
           "--manifest-path", manifest]
    print("cudalloc: " + " ".join(cmd), flush=True)
    subprocess.check_call(cmd, cwd=ROOT, env=env)
    meta = subprocess.check_output(
        [cargo, "metadata", "--format-version", "1", "--no-deps", "--manifest-path", manifest],
        cwd=ROOT,
    )
    target = json.loads(meta)["target_directory"]  # CARGO_TARGET_DIR, .cargo/config
    outdir = os.path.join(target, "debug" if profile == "dev" else profile)
    outs = [os.path.join(outdir, name) for name in (LIB, BIN)]
    for out in outs:
        if not os.path.isfile(out):
            raise SystemExit(f"cargo finished but {out} is missing")
    return outs, strip


def ship(src, dest, strip):
    """Copy a built binary into the package, without its debug information."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.lexists(dest):
        os.remove(dest)
    if strip is not None:
        subprocess.check_call([strip, "--strip-debug", "-o", dest, src])
    else:
        shutil.copyfile(src, dest)
    os.chmod(dest, 0o755)
    print(f"cudalloc: {dest} ({os.path.getsize(dest) / 2**20:.1f} MiB)", flush=True)


class build_py_with_cargo(build_py):
    def run(self):
        super().run()
        (lib, cli), strip = build_binaries()
        ship(lib, os.path.join(self.build_lib, "cudalloc", LIB), strip)
        ship(cli, os.path.join(self.build_lib, "cudalloc", "bin", BIN), strip)
        self.copy_file(os.path.join(ROOT, "python", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, "cudalloc", LIB),
            os.path.join(self.build_lib, "cudalloc", "bin", BIN),
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
