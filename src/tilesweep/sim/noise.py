"""Hashed-lattice value noise, evaluated over axis-aligned pixel grids or scattered points.

Everything is keyed on integers (the world seed, a field tag, lattice indices), never on
per-tile state, so a value depends only on *where* it is in the world. Coordinates are
metres from the north-west corner of the Web-Mercator square (``X`` eastwards, ``Y``
southwards, both >= 0), the frame the renderer works in.

A tile's pixel centres form an axis-aligned grid, so noise over a tile is separable: hash
the few lattice points that cover the tile, interpolate along rows, then along columns.
Octaves much larger than a pixel are evaluated on a coarse grid (every ``COARSE_STEP``
pixels, tile edges included) and linearly upsampled: neighbouring tiles sample the same
points on their shared edge, so the result stays continuous across tile edges.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_S33 = np.uint64(33)
_S11 = np.uint64(11)
_INV53 = 1.0 / float(1 << 53)

COARSE_STEP = 16
"""Pixels between the samples of the coarse grid used for octaves much larger than a pixel."""


def mix64(h: np.ndarray) -> np.ndarray:
    """The murmur3 64-bit finaliser: a bijective scramble of uint64 values (wrapping)."""
    h = np.asarray(h, dtype=np.uint64)
    if h.ndim == 0:  # numpy warns on scalar wrap-around, not on arrays
        h = h.reshape(1)
        return _mix_arr(h)[0]
    return _mix_arr(h)


def _mix_arr(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _S33)
    h = h * _M1
    h = h ^ (h >> _S33)
    h = h * _M2
    return h ^ (h >> _S33)


def _mix_int(h: int) -> int:
    m = 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & m
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & m
    return h ^ (h >> 33)


def key(*parts: int) -> int:
    """Fold integers (seed, tags, ...) into one 64-bit key (pure Python, same on every platform)."""
    m = 0xFFFFFFFFFFFFFFFF
    h = 0
    for p in parts:
        h = _mix_int(h ^ (((int(p) & m) * 0x165667B19E3779F9 + 0x9E3779B97F4A7C15) & m))
    return h


def hash2(ix: npt.ArrayLike, iy: npt.ArrayLike, k: int) -> np.ndarray:
    """uint64 hash of integer lattice coordinates under key ``k`` (broadcasts)."""
    a = np.atleast_1d(np.asarray(ix).astype(np.int64).astype(np.uint64))
    b = np.atleast_1d(np.asarray(iy).astype(np.int64).astype(np.uint64))
    out = mix64((a * _P1) ^ mix64(b * _P2 + np.uint64(k)))
    return out if (np.ndim(ix) or np.ndim(iy)) else out.reshape(())


def unit(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1)."""
    return (h >> _S11).astype(np.float64) * _INV53


def rand2(ix: npt.ArrayLike, iy: npt.ArrayLike, k: int) -> np.ndarray:
    """Uniform [0, 1) per lattice point."""
    return unit(hash2(ix, iy, k))


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def noise_grid(xs: np.ndarray, ys: np.ndarray, lam: float, k: int) -> np.ndarray:
    """Value noise in [-1, 1] with lattice spacing ``lam`` metres on the grid ``ys x xs``."""
    u = xs / lam
    v = ys / lam
    iu = np.floor(u)
    iv = np.floor(v)
    su = _smooth(u - iu).astype(np.float32)
    sv = _smooth(v - iv).astype(np.float32)
    u0 = int(iu.min())
    v0 = int(iv.min())
    lu = np.arange(u0, int(iu.max()) + 2)
    lv = np.arange(v0, int(iv.max()) + 2)
    g = (rand2(lu[None, :], lv[:, None], k) * 2.0 - 1.0).astype(np.float32)
    cu = (iu - u0).astype(np.intp)
    cv = (iv - v0).astype(np.intp)
    a = g[:, cu] + (g[:, cu + 1] - g[:, cu]) * su  # (len(lv), W)
    top = a[cv]
    return top + (a[cv + 1] - top) * sv[:, None]


def noise_points(px: np.ndarray, py: np.ndarray, lam: float, k: int) -> np.ndarray:
    """Value noise in [-1, 1] at scattered points; equals :func:`noise_grid` there."""
    u = np.asarray(px, dtype=np.float64) / lam
    v = np.asarray(py, dtype=np.float64) / lam
    iu = np.floor(u)
    iv = np.floor(v)
    su = _smooth(u - iu)
    sv = _smooth(v - iv)

    def g(du: int, dv: int) -> np.ndarray:
        return rand2(iu + du, iv + dv, k) * 2.0 - 1.0

    top = g(0, 0) + (g(1, 0) - g(0, 0)) * su
    bot = g(0, 1) + (g(1, 1) - g(0, 1)) * su
    return top + (bot - top) * sv


def octaves(lam_max: float, lam_min: float) -> list[float]:
    """Wavelengths lam_max, lam_max/2, ... down to lam_min (inclusive)."""
    out = []
    lam = lam_max
    while lam >= lam_min * 0.999:
        out.append(lam)
        lam /= 2.0
    return out


def fbm_norm(lams: list[float], gain: float) -> float:
    return float(sum(gain**i for i in range(len(lams))))


class Grid:
    """The pixel-centre grid of one tile render, in world metres (see module docstring)."""

    def __init__(self, x0: float, y0: float, res: float, size: int) -> None:
        self.x0 = x0
        self.y0 = y0
        self.res = res
        self.size = size
        idx = np.arange(size, dtype=np.float64)
        self.xs = x0 + (idx + 0.5) * res
        self.ys = y0 + (idx + 0.5) * res
        step = COARSE_STEP if size % COARSE_STEP == 0 else size
        n = size // step
        cidx = np.arange(n + 1, dtype=np.float64) * step
        self.cxs = x0 + cidx * res
        self.cys = y0 + cidx * res
        # linear upsampling of the coarse grid to pixel centres
        pos = (idx + 0.5) / step
        self._ci = np.minimum(np.floor(pos).astype(np.intp), n - 1)
        self._cw = (pos - self._ci).astype(np.float32)

    def upsample(self, c: np.ndarray) -> np.ndarray:
        ci, cw = self._ci, self._cw
        a = c[:, ci] + (c[:, ci + 1] - c[:, ci]) * cw
        return a[ci] + (a[ci + 1] - a[ci]) * cw[:, None]

    def fbm(self, k: int, lam_max: float, lam_min: float, gain: float = 0.5) -> np.ndarray:
        """Fractal sum of value-noise octaves, normalised by the full octave set.

        Octaves finer than two pixels are left out (they would alias); the normalisation
        still counts them so the large-scale values agree between zooms."""
        lams = octaves(lam_max, lam_min)
        norm = fbm_norm(lams, gain)
        coarse_limit = 8 * COARSE_STEP * self.res
        fine_limit = 2.0 * self.res
        coarse = None
        fine = None
        for i, lam in enumerate(lams):
            amp = gain**i / norm
            if lam >= coarse_limit:
                term = noise_grid(self.cxs, self.cys, lam, key(k, i)) * amp
                coarse = term if coarse is None else coarse + term
            elif lam >= fine_limit:
                term = noise_grid(self.xs, self.ys, lam, key(k, i)) * amp
                fine = term if fine is None else fine + term
        out = self.upsample(coarse) if coarse is not None else np.zeros((self.size, self.size), np.float32)
        if fine is not None:
            out = out + fine
        return out

    def noise(self, k: int, lam: float) -> np.ndarray | None:
        """One octave at full resolution, or ``None`` when it is finer than two pixels."""
        if lam < 2.0 * self.res:
            return None
        return noise_grid(self.xs, self.ys, lam, k)


def fbm_points(px: np.ndarray, py: np.ndarray, k: int, lam_max: float, lam_min: float, gain: float = 0.5) -> np.ndarray:
    """:meth:`Grid.fbm` at scattered points with every octave (the reference value)."""
    lams = octaves(lam_max, lam_min)
    norm = fbm_norm(lams, gain)
    out = np.zeros(np.shape(px), dtype=np.float64)
    for i, lam in enumerate(lams):
        out += noise_points(px, py, lam, key(k, i)) * (gain**i / norm)
    return out
