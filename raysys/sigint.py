"""Ctrl-C after Ray Train and Ray Tune: their `fit()` install SIGINT handlers of their own and leave them
installed when they return. Tune's swallows the next Ctrl-C; Train's aborts its (already finished) run. So
after a teacher run or a sweep, Ctrl-C in a later stage (distillation, registration, the served endpoint)
did nothing. `keep_sigint_handler()` puts back the handler the process had before the block."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def keep_sigint_handler() -> Iterator[None]:
    """Restore the SIGINT handler in effect before the block (signals live on the main thread: elsewhere, and
    for a handler not installed from Python, a no-op)."""
    before = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)
