"""Signals around the writer's critical sections, and SIGTERM turned into a clean, resumable stop.

Two pieces:

- `deferred_signals()`: a context manager that holds SIGINT and SIGTERM back while a short critical section runs
  (the writer's manifest rename + the in-memory registration of the unit it commits) and delivers them, in arrival
  order, when the section ends. Python only runs signal handlers in the main thread and only the main thread may
  install them, so in any other thread it does nothing: code that may run on a worker thread must be correct
  without it (the writer's cleanup reads the manifest on disk before it deletes anything).
- `raise_on_sigterm()`: called once at CLI start-up. Slurm (`scancel`, `scontrol requeue`, the end of a time
  limit) and torchrun send SIGTERM, whose default action kills the process at once, silently (exit -15), skipping
  every `finally`. After this call SIGTERM raises `Terminated` (a `KeyboardInterrupt`) in the main thread, so the
  run unwinds like Ctrl-C: `finally` blocks and the writer's lock release run and the CLI prints a line.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

DEFERRED = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (or another termination signal) arrived; raised in the main thread by `raise_on_sigterm`'s handler.

    A KeyboardInterrupt so that existing ``except KeyboardInterrupt`` paths stop the run the same way and
    ``except Exception`` blocks do not swallow it. `signum` is the signal number (exit status 128 + signum)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred_signals(signums: tuple[int, ...] = DEFERRED) -> Iterator[None]:
    """Hold `signums` back inside the block; on exit restore the previous handlers and re-deliver what arrived.

    Re-delivery uses `signal.raise_signal`, so the previous handler acts as if the signal had come just now:
    Python's default SIGINT handler raises KeyboardInterrupt, `raise_on_sigterm`'s raises `Terminated`, SIG_DFL for
    SIGTERM ends the process, SIG_IGN ignores it. Nested uses defer to the outermost block. Outside the main thread
    (where handlers cannot be installed) this is a no-op. A handler installed from C (``getsignal`` returns None)
    cannot be restored, so that signal is not deferred."""
    if not _is_main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if signum not in pending:
            pending.append(signum)

    previous: dict[int, Any] = {}
    try:
        for s in signums:
            old = signal.getsignal(s)
            if old is None:
                continue
            previous[s] = old
            signal.signal(s, hold)
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        for s in pending:
            logger.debug("delivering %s deferred over a critical section", signal.Signals(s).name)
            signal.raise_signal(s)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def raise_on_sigterm() -> bool:
    """Make SIGTERM raise `Terminated` in the main thread instead of killing the process silently.

    Call it once from the main thread at program start (the CLI). It replaces only the default action: a handler
    someone else installed (submitit's, a test harness's) or SIG_IGN is kept. Returns whether it installed it.
    The CLI should catch `Terminated` (before KeyboardInterrupt), print one line saying the run stopped and that
    rerunning the same command resumes it, and exit with 128 + signum (143)."""
    if not _is_main_thread():
        raise RuntimeError("raise_on_sigterm() must be called from the main thread (signal handlers live there)")
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True
