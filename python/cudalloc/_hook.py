"""The CUDALLOC=1 start-up hook, run from cudalloc.pth only when CUDALLOC is set.

It enables cudalloc right after ``torch`` is imported (before any CUDA call),
through a one-shot ``sys.meta_path`` finder. A bad configuration prints one
line to stderr and the program goes on with torch's own allocator.
"""
import importlib.abc
import importlib.util
import sys


def _enable_from_env():
    try:
        import cudalloc

        cudalloc.enable()
    except Exception as e:  # never break the user's program at start-up
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"cudalloc: not enabled: {msg}", file=sys.stderr)


class _TorchFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # one shot; the rest of meta_path finds torch
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_enable(module):
            exec_module(module)
            _enable_from_env()

        loader.exec_module = exec_then_enable
        return spec


def _install():
    if "torch" in sys.modules:
        _enable_from_env()
    elif not any(isinstance(f, _TorchFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchFinder())
