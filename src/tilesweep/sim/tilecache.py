"""An opt-in on-disk cache of rendered tile pixels, shared by every process that names it.

Set ``TILESWEEP_SIM_CACHE=DIR`` and :meth:`World.render_array <tilesweep.sim.world.World.render_array>`
(so also ``World.render``, the simulator's server, ``tilesweep sim render``) keeps each
tile's pixels in ``DIR`` and reads them back instead of rendering again. Unset (the
default), nothing is cached and nothing is written. The test suite sets it to one folder
per test session, because the same tiles of the same worlds are rendered in many tests
and processes.

Entries are content-addressed: the file name is the SHA-256 of everything the pixels
depend on, namely the world's seed and line density, the tile, the size in pixels, the
numpy version and the bytes of the simulator's rendering code (so an edit to the
renderer never reads stale pixels). An entry holds the raw ``uint8[size, size, 3]``
pixels (196,608 bytes for a 256 px tile). Writes go to a temporary file renamed into
place, so concurrent processes never read half an entry; an entry of the wrong length is
ignored and rendered again. The cache is best-effort: an error writing it (a full disk)
leaves the render's result unchanged. Encoding (JPEG/PNG/WebP) and the server's faults
happen after it, per request, as without it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path

import numpy as np

ENV = "TILESWEEP_SIM_CACHE"
"""The environment variable naming the cache folder (unset or empty: no cache)."""

_CODE = ("world.py", "noise.py", "lines.py", "../tiles.py")
"""The source files whose bytes the rendered pixels depend on (relative to this package)."""


def cache_dir() -> Path | None:
    """The cache folder named by ``TILESWEEP_SIM_CACHE``, or None (read on every call)."""
    d = os.environ.get(ENV)
    return Path(d) if d else None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """SHA-256 (hex) of the rendering code's source bytes and the numpy version."""
    h = hashlib.sha256(np.__version__.encode())
    here = Path(__file__).resolve().parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def entry_path(folder: Path, seed: int, line_density: float, z: int, x: int, y: int, size: int) -> Path:
    """Where the pixels of tile ``z/x/y`` at ``size`` px of ``World(seed, line_density)`` live."""
    key = f"{code_version()}|{seed}|{line_density!r}|{z}|{x}|{y}|{size}"
    return folder / (hashlib.sha256(key.encode()).hexdigest() + ".rgb")


def load(path: Path, size: int) -> np.ndarray | None:
    """The cached ``uint8[size, size, 3]`` pixels (a fresh, writeable array), or None."""
    try:
        arr = np.fromfile(path, dtype=np.uint8)
    except OSError:  # absent (not cached yet) or unreadable
        return None
    if arr.size != size * size * 3:
        return None  # a damaged entry: render again (the store below replaces it)
    return arr.reshape(size, size, 3)


def store(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` to ``path`` atomically (temporary file + rename); errors are ignored."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


__all__ = ["ENV", "cache_dir", "code_version", "entry_path", "load", "store"]
