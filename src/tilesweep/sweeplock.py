"""Which commands may work on one sweep at the same time.

Any number of `tilesweep fetch` processes may share a sweep (the queue hands each block to
one of them), and any number of `tilesweep run` processes too: each predicts the blocks it
leases, and the prediction ledger counts a block that two of them scored once
(:mod:`tilesweep.predict.ledger`). A `run` may not run beside a `fetch`: a run predicts
the blocks it fetches itself, so the blocks a fetch beside it holds would be left
unpredicted while the run ended with exit 0.

Two ``flock`` files say so: a fetch holds ``SWEEP/.workers.lock`` shared, a run holds
``SWEEP/.runs.lock`` shared, and each, before it holds its own, checks that the other kind
holds none (it takes the other's file exclusively for that instant, retrying for a
quarter of a second while another start's probe holds it). A
fetch takes its own lock *while* it holds the runs' file exclusively; a run takes its own
before it checks: so of a fetch and a run that start at the same instant at least one sees
the other and is refused. Locks held by a process end with it (``kill -9`` included), so
a crash never leaves a sweep locked.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path

from .errors import UsageError

LOCK_FILE = ".workers.lock"
RUN_LOCK_FILE = ".runs.lock"
PROBE_S = 0.25  # how long a start retries a probe that another start holds for an instant


def _try(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class SweepLock:
    """Hold the sweep's lock for ``command`` (``"fetch"`` or ``"run"``, each shared with
    its own kind, module doc) until :meth:`close`; a conflict is a :class:`UsageError`
    that names what runs, and changes nothing."""

    def __init__(self, sweep_path: Path, command: str) -> None:
        if command not in ("fetch", "run"):
            raise ValueError(f"unknown command {command!r}")
        self.sweep_path = Path(sweep_path)
        self.path = self.sweep_path / (LOCK_FILE if command == "fetch" else RUN_LOCK_FILE)
        other = self.sweep_path / (RUN_LOCK_FILE if command == "fetch" else LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        ofd = os.open(other, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            ok = False
            deadline = time.monotonic() + PROBE_S
            while not ok:  # another process's probe holds a file for an instant: try again
                if command == "fetch":
                    ok = _try(ofd, fcntl.LOCK_EX)  # no run holds the runs' file ...
                    if ok:
                        fcntl.flock(self.fd, fcntl.LOCK_SH)  # ... while we take ours (no one holds it alone)
                else:
                    ok = (_try(self.fd, fcntl.LOCK_SH)  # a fetch is not checking this instant
                          and _try(ofd, fcntl.LOCK_EX))  # and no fetch holds the workers' file
                if ok or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
        except BaseException:
            os.close(ofd)
            os.close(self.fd)
            raise
        if not ok:
            running = self._who(ofd if command == "run" else self.fd, "fetch" if command == "run" else "run", ofd)
            os.close(ofd)
            os.close(self.fd)
            why = ("`run` fetches and predicts the blocks itself, and would leave those the fetch holds "
                   "unpredicted; wait for the fetch to end (then `run` predicts what it stored) or stop it"
                   if command == "run" else "it fetches this sweep's blocks itself; wait for it or stop it")
            raise UsageError(f"{running} is running on sweep {str(sweep_path)!r}: {why}") from None
        os.close(ofd)  # the instant's exclusive lock ends with it
        if command == "run":
            try:
                os.pwrite(self.fd, f"tilesweep run (pid {os.getpid()})\n".ljust(40).encode(), 0)
            except OSError:  # the lock holds; only its label is lost
                pass

    def _who(self, fd: int, kind: str, ofd: int) -> str:
        """What holds the other lock: a fetch, or a run with its label (the last run to
        start wrote it)."""
        if kind == "fetch":
            return "a `tilesweep fetch`"
        try:
            text = os.pread(ofd, 100, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        m = re.fullmatch(r"tilesweep run \(pid (\d+)\)", text)
        return f"a `tilesweep run` (pid {m[1]})" if m else "a `tilesweep run`"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SweepLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LOCK_FILE", "RUN_LOCK_FILE", "SweepLock"]
