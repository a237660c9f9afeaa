"""Making files durable: the fsync steps every local writer here uses. Publication (the
temp name, create-if-absent, the crash argument) is :mod:`tilesweep.storage`'s job; a file
is whole once renamed there, and the folder's fsync makes the rename survive a power cut."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """fsync a file by name (its bytes and size are on disk when this returns)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that names created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it to ``final`` (atomic, replacing it) and fsync the folder:
    :meth:`tilesweep.storage.LocalStorage.publish` with ``replace=True``, for writers of
    files outside a sweep (``geoout``)."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)
