"""Builds the Rust cdylib into the `cudalloc` package and installs the
`cudalloc.pth` start-up hook (CUDALLOC=1 enablement) next to it."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools_rust import Binding, RustExtension


class build_py_with_pth(build_py):
    """Also put cudalloc.pth at the root of site-packages, as coverage does."""

    def run(self):
        super().run()
        self.copy_file(os.path.join("python", "cudalloc.pth"), os.path.join(self.build_lib, "cudalloc.pth"), preserve_mode=0)


setup(
    package_dir={"": "python"},
    packages=["cudalloc"],
    rust_extensions=[
        RustExtension("cudalloc.libcudalloc", path="Cargo.toml", binding=Binding.NoBinding, debug=False)
    ],
    cmdclass={"build_py": build_py_with_pth},
    zip_safe=False,
)
