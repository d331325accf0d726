"""SIGTERM handled like Ctrl-C, so that every `finally` runs on the way out.

`kill PID` (SIGTERM) would otherwise end Python at once, leaving the temporary
files of `files.atomic_write` and of downloads behind. Under `sigterm_raises`
it raises `Terminated`, a KeyboardInterrupt, in the main thread instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises `Terminated` during the body (in the main thread; in any
    other thread, where Python cannot set handlers, nothing changes). The
    previous handler is put back unless a SIGTERM came: the process is then on
    its way out and further ones are ignored."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is _terminate:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _terminate:
            signal.signal(signal.SIGTERM, previous)
