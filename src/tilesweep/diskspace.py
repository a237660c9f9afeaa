"""A full disk: telling it apart from other errors, and keeping room to release leases.

When the sweep's disk fills up mid-run, the shard or part being written fails with ENOSPC,
and so can the queue's next SQLite commit (its WAL must grow): the very commit that would
release the run's leases. So a run keeps a small reserve file in the sweep folder
(:func:`keep_reserve`); on a full disk, :func:`release_leases` deletes it to make room and
releases the leases, so that the next run (after space is freed) finds the blocks pending,
not held by a dead owner. The error the user sees is one line naming ENOSPC and the path
(:func:`disk_full`, an :class:`OSError` that ``tilesweep``'s ``main`` prints as such).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

RESERVE_FILE = ".space-reserve"
RESERVE_BYTES = 256 << 10
"""Room kept for the last commits of a run on a full disk (a lease release is a few pages)."""


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, and for SQLite's "database or disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.OperationalError):
        return "disk is full" in str(exc) or getattr(exc, "sqlite_errorcode", None) == 13  # SQLITE_FULL
    return False


def disk_full(path: str | os.PathLike[str]) -> OSError:
    """The error for a full disk at ``path``: ``OSError(ENOSPC)`` naming it."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


def keep_reserve(folder: str | os.PathLike[str], size: int = RESERVE_BYTES) -> bool:
    """Make sure ``folder/.space-reserve`` holds ``size`` allocated bytes; False when the
    disk has no room for it (then there is nothing to free later). A sweep on object
    storage (``folder`` its URL) keeps none: its queue is a server's, not on this disk."""
    from .storage import is_url

    if is_url(folder):
        return False
    path = Path(folder) / RESERVE_FILE
    try:
        if path.is_file() and path.stat().st_blocks * 512 >= size:
            return True
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        return True
    except OSError:
        Path(path).unlink(missing_ok=True)
        return False


def free_reserve(folder: str | os.PathLike[str]) -> bool:
    """Delete the reserve (on a full disk); True when there was one."""
    from .storage import is_url

    if is_url(folder):
        return False
    try:
        os.unlink(Path(folder) / RESERVE_FILE)
        return True
    except FileNotFoundError:
        return False


def release_leases(queue: Any, owner: str, folder: str | os.PathLike[str]) -> int:
    """``queue.release(owner)``; on a full disk, free the reserve and try once more. A
    release that still cannot be written raises :func:`disk_full` naming the queue (the
    leases then return when they expire)."""
    try:
        return int(queue.release(owner))
    except (sqlite3.OperationalError, OSError) as exc:
        if not is_disk_full(exc):
            raise
        free_reserve(folder)  # gone already when another worker of the run freed it: try anyway
    try:
        return int(queue.release(owner))
    except (sqlite3.OperationalError, OSError) as exc:
        if is_disk_full(exc):
            raise disk_full(queue.path) from None
        raise
