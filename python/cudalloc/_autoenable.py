"""``CUDALLOC=1``: enable cudalloc as soon as torch is imported.

The start-up hook ``cudalloc-autoenable.pth`` (installed next to the package
in site-packages) imports this module only when ``CUDALLOC`` is set to a true
value; with it unset the .pth costs one environment lookup. This module then
puts a finder at the front of ``sys.meta_path`` that waits for ``import
torch``, lets torch import normally, and calls :func:`cudalloc.enable` right
after, before any CUDA tensor can exist. It imports nothing heavy itself.
"""

import os
import sys

ENV = "CUDALLOC"


def requested(environ=None):
    """Whether ``CUDALLOC`` asks for cudalloc (1/true/yes/on)."""
    value = (environ if environ is not None else os.environ).get(ENV, "")
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def enable_from_env():
    """Enable with ``CUDALLOC_CONF``. A bad configuration ends the process with
    a one-line message naming the key: the user asked for cudalloc, so running
    silently without it would mislead. Other failures (no CUDA here) print one
    line and leave PyTorch's own allocator in place."""
    from . import _lib, _torch

    try:
        _torch.enable()
    except _lib.ConfigError as e:
        raise SystemExit(f"cudalloc: {e}") from None
    except Exception as e:  # never take the host process down for this
        sys.stderr.write(f"cudalloc: not enabled ({ENV}=1): {e}\n")


class _TorchFinder:
    """A meta-path finder that only ever answers for the top-level ``torch``.

    It stays installed until torch's module has actually run: libraries such
    as transformers and accelerate probe with ``importlib.util.find_spec("torch")``
    before importing it, and a probe's spec is not the one the import uses."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            try:
                original(module)
            finally:
                try:
                    del loader.exec_module
                except AttributeError:
                    pass
            uninstall()  # torch has run: the hook's work is done
            enable_from_env()

        try:
            loader.exec_module = exec_module
        except (AttributeError, TypeError):  # a loader with __slots__
            spec.loader = _LoaderProxy(loader, exec_module)
        return spec


class _LoaderProxy:
    def __init__(self, loader, exec_module):
        self._loader = loader
        self.exec_module = exec_module

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def __getattr__(self, name):
        return getattr(self._loader, name)


_finder = None


def install():
    """Arrange for enable() right after ``import torch`` (now, if torch is
    already imported). Idempotent."""
    global _finder
    if "torch" in sys.modules:
        enable_from_env()
        return
    if _finder is None:
        _finder = _TorchFinder()
        sys.meta_path.insert(0, _finder)


def uninstall():
    global _finder
    if _finder is not None:
        try:
            sys.meta_path.remove(_finder)
        except ValueError:
            pass
        _finder = None


def installed():
    return _finder is not None


if requested():
    try:
        install()
    except Exception as e:  # a start-up hook must never stop the interpreter
        sys.stderr.write(f"cudalloc: start-up hook failed: {e}\n")
