"""Starting cudalloc for a framework: one allocator for every framework in the process.

PyTorch (:func:`cudalloc.enable`), CuPy (:func:`cudalloc.cupy.enable`) and
Numba (``NUMBA_CUDA_MEMORY_MANAGER=cudalloc.numba``) all call
``libcudalloc.so`` in the same process, so they share one cache, one set of
limits and one statistics view. The library starts once; this module
decides what a second framework's start does:

- the same configuration as the one in force: nothing (cudalloc_init
  accepts it again);
- no configuration given (``conf=None``), and an earlier framework start
  in this process started cudalloc: join it, whatever its configuration;
- otherwise (another configuration, or cudalloc started by something other
  than a framework's enable, such as ``cudalloc.memory_stats()`` reading
  ``CUDALLOC_CONF`` with no backend named): :class:`CudallocError`, saying
  which start came first and how to make them agree.

Nothing here imports a framework.
"""

import os
import threading
import warnings

from . import _lib

CONF_ENV = "CUDALLOC_CONF"

_lock = threading.RLock()
_first = None  # (who, effective configuration) of the first framework start


def effective_conf(conf=None):
    """The configuration string a framework start hands to cudalloc_init:
    the program's, which ``$CUDALLOC_CONF`` overrides key by key in the library.

    ``conf`` (default: none). Under a framework the memory must be real
    device memory, so when it names no ``backend`` this asks for ``cuda``
    rather than ``auto`` (which falls back to the simulated device); a
    backend in ``$CUDALLOC_CONF`` still wins.
    """
    text = _lib.conf_text(conf) if conf is not None else ""
    keys = {item.split(":", 1)[0].strip() for item in text.split(",") if item.strip()}
    if "backend" not in keys:
        text = "backend:cuda," + text if text.strip() else "backend:cuda"
    return text


def first_start():
    """``(who, configuration)`` of the framework start that started cudalloc
    in this process, or None."""
    return _first


def start(conf, who, framework, *, stacklevel=3):
    """Start cudalloc for ``framework`` (``"CuPy"``) from ``who`` (``"cudalloc.cupy.enable()"``)
    with ``conf`` (None: the environment's), or join the cudalloc another
    framework started (see the module's docs). Returns the configuration in
    force, ``{key: value}``. Raises :class:`ConfigError` naming a bad key,
    and :class:`CudallocError` when another configuration is in force."""
    global _first
    eff = effective_conf(conf)
    with _lock:
        try:
            _lib.init(eff)  # ConfigError names the key
        except _lib.CudallocError as e:
            if e.code != _lib.ERR_ALREADY_INITIALIZED:
                raise
            if not (conf is None and _first is not None):
                raise _already_started(eff, who, e.code) from None
        else:
            if _first is None:
                _first = (who, eff)
        # The values in force: the program's, under CUDALLOC_CONF's.
        in_force = _lib.config_in_force()
    if in_force.get("backend") == "sim":
        warnings.warn(
            f"cudalloc: backend:sim hands {framework} simulated addresses that no "
            "kernel may touch; use it only for tests",
            stacklevel=stacklevel,
        )
    return in_force


def _already_started(eff, who, code):
    env = os.environ.get(CONF_ENV)
    if _first is not None:
        first_who, first_conf = _first
        return _lib.CudallocError(
            f"cudalloc was already started by {first_who} with configuration "
            f"{first_conf!r}; {who} asks for {eff!r}. Frameworks in one process share "
            f"one cudalloc: give the configuration once (to the first enable(), or in "
            f"{CONF_ENV}), and call the others with no configuration",
            code,
        )
    return _lib.CudallocError(
        "cudalloc was already started, with a configuration other than "
        f"{who}'s {eff!r}: by cudalloc.configure(), or by another cudalloc "
        f"call (memory_stats(), device_count(), ...), which starts it from "
        f"{CONF_ENV} ({env!r}; naming no backend there means backend:auto). "
        f"Call {who} before any other cudalloc call, or give both "
        f"the same configuration (name the backend in {CONF_ENV}: backend:cuda)",
        code,
    )
