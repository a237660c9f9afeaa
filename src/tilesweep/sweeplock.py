"""Which commands may work on one sweep at the same time.

Any number of `tilesweep fetch` processes may share a sweep (the queue hands each block to
one of them). `tilesweep run` may not run beside a fetch, nor beside another run: it
predicts the blocks it fetches itself, so the blocks a fetch beside it holds would be left
unpredicted while the run ended with exit 0. One ``flock`` on ``SWEEP/.workers.lock``
says so: a fetch holds it shared, a run exclusive. Locks held by a process end with it
(``kill -9`` included), so a crash never leaves a sweep locked.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from .errors import UsageError

LOCK_FILE = ".workers.lock"


class SweepLock:
    """Hold the sweep's workers lock for ``command`` (``"fetch"``: shared, ``"run"``:
    exclusive) until :meth:`close`; a conflict is a :class:`UsageError` that names what
    runs, and changes nothing."""

    def __init__(self, sweep_path: Path, command: str) -> None:
        if command not in ("fetch", "run"):
            raise ValueError(f"unknown command {command!r}")
        self.path = Path(sweep_path) / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        exclusive = command == "run"
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            kind, running = self._who()
            os.close(self.fd)
            why = {
                ("run", "fetch"): "`run` fetches and predicts the blocks itself, and would leave those the fetch holds "
                                  "unpredicted; wait for the fetch to end (then `run` predicts what it stored) or stop it",
                ("run", "run"): "wait for it or stop it",
                ("fetch", "run"): "it fetches this sweep's blocks itself; wait for it or stop it",
            }[(command, kind)]
            raise UsageError(f"{running} is running on sweep {str(sweep_path)!r}: {why}") from None
        if exclusive:
            try:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, f"tilesweep run (pid {os.getpid()})\n".encode(), 0)
            except OSError:  # the lock holds; only its label is lost
                pass

    def _who(self) -> tuple[str, str]:
        """What holds the lock: ``("fetch", ...)`` (shared holders) or ``("run", ...)``
        (the exclusive holder, its label read from the file)."""
        try:  # a shared lock is granted only when no exclusive holder exists: fetches hold it
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            return "fetch", "a `tilesweep fetch`"
        except BlockingIOError:
            pass
        try:
            text = os.pread(self.fd, 100, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        m = re.fullmatch(r"tilesweep run \(pid (\d+)\)", text)
        return "run", f"a `tilesweep run` (pid {m[1]})" if m else "a `tilesweep run`"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SweepLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LOCK_FILE", "SweepLock"]
