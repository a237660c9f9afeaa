"""Stop signals: SIGINT (Ctrl-C) and SIGTERM (what systemd, Docker and Kubernetes send)
both mean "stop gracefully": stop leasing, make what is complete durable, release the
rest. Whoever sends it, to the whole process group or to one process, a stop is a stop.
The exit status says which signal came: 128 + its number (130, 143).

Three ways a process hears them:

- the CLI's main thread (:func:`install_cli_handlers`): the signal raises
  KeyboardInterrupt, as Ctrl-C always did, so every ``except KeyboardInterrupt`` path
  handles SIGTERM too;
- a loop that must wind down in order (:func:`stop_on_signals`): the signal only calls
  ``on_stop``, so it never lands as an exception inside a lock or a queue's internals;
  a second signal raises KeyboardInterrupt (the impatient second Ctrl-C);
- a worker process (:func:`install_worker_handlers`): the signal is noted, and the worker
  stops at its next look (it also looks before it leases anything).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_reported: list[bool] = []  # the CLI said what the stop kept (see mark_reported)


def note(signum: int) -> None:
    """Record that ``signum`` asked this process to stop."""
    _received.append(int(signum))


def received() -> int | None:
    """The last stop signal this process got, or None."""
    return _received[-1] if _received else None


def exit_status(default: int = signal.SIGINT) -> int:
    """128 + the stop signal received (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + (received() or int(default))


def mark_reported() -> None:
    """The CLI printed what a stop kept; a stop that was not reported came before the work
    began (typer turns a KeyboardInterrupt into a silent exit 130)."""
    _reported.append(True)


def reported() -> bool:
    return bool(_reported)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise(signum: int, frame: Any) -> None:
    note(signum)
    raise KeyboardInterrupt


def install_cli_handlers() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (noting which)."""
    if _in_main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _raise)


def install_worker_handlers() -> None:
    """In a worker process: a stop signal is only noted; the worker polls :func:`received`."""
    if _in_main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: note(signum))


@contextlib.contextmanager
def stop_on_signals(on_stop: Callable[[], None]) -> Iterator[Callable[[], bool]]:
    """While inside, a stop signal calls ``on_stop`` (from the main thread, between two
    bytecodes) instead of raising; a second one raises KeyboardInterrupt. Yields a
    function that tells whether a signal came. Outside the main thread (where Python
    delivers no signal) it installs nothing. The previous handlers are restored after."""
    got: list[int] = []
    if not _in_main_thread():
        yield lambda: bool(got)
        return

    def handler(signum: int, frame: Any) -> None:
        note(signum)
        got.append(signum)
        if len(got) > 1:
            raise KeyboardInterrupt
        on_stop()

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield lambda: bool(got)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def kept_handlers() -> Iterator[None]:
    """Restore this thread's stop-signal handlers on the way out (an asyncio loop resets
    them to the defaults when it closes: SIGTERM would kill at once again)."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


__all__ = ["exit_status", "install_cli_handlers", "install_worker_handlers", "kept_handlers", "mark_reported", "note", "received",
           "reported", "stop_on_signals"]
