"""Errors that carry a message meant for the user."""

from __future__ import annotations

import os
from pathlib import Path


class UsageError(ValueError):
    """A user's bad input: a bbox, zoom, template, file or option.

    The CLI prints its message as one line and exits with status 2; the message must name
    the bad value. Raise it before anything is written."""


class WorkerDied(RuntimeError):
    """One or more worker processes died (killed by a signal, or an unexpected error)
    while the others went on; the blocks they held went back to the queue. The CLI prints
    its message as one line and exits with status 1: the same command finishes the sweep."""


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """``path`` as a :class:`Path` if a file can be written there; :class:`UsageError`
    naming it when its folder is missing, is not a folder, is not writable, or the path is
    a folder itself. Call it before writing anything."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        raise UsageError(f"{what} {str(p)!r} is a folder, not a file name")
    if not parent.exists():
        raise UsageError(f"{what} {str(p)!r}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{what} {str(p)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {str(p)!r}: folder {str(parent)!r} is not writable")
    return p
