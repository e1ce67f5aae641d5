"""One primary context per device, the current device per thread."""

import threading

from . import driver

_tls = threading.local()
_contexts = {}


def select(devnum):
    _tls.devnum = int(devnum)


def get_context(devnum=None):
    if devnum is None:
        devnum = getattr(_tls, "devnum", 0)
    ctx = _contexts.get(devnum)
    if ctx is None:
        dev = driver.driver.get_device(devnum)
        ctx = _contexts[devnum] = dev.get_primary_context()
    ctx.push()  # the real one pushes it on the thread; pushing calls prepare_for_use()
    return ctx


def reset():
    for ctx in _contexts.values():
        ctx.reset()
    _contexts.clear()
