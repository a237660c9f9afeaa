"""The simulated world: procedural satellite-like imagery and its ground truth.

The world lives in *world metres*: Web-Mercator metres measured from the north-west
corner of the Mercator square (``X = x + 20037508.34`` eastwards, ``Y = 20037508.34 - y``
southwards). Rendering a tile evaluates the world at the centres of the tile's pixel grid:
every value comes from global coordinates and the world seed, never from per-tile state,
so tiles join without seams and the same seed gives the same bytes.

Terrain sizes (fields, forests, lakes, roads) are in Mercator metres; the power-line
infrastructure (span lengths, tower footprints, tower heights) is in ground metres,
converted with the local scale factor ``1 / cos(latitude)``.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple, Union

import numpy as np
from PIL import Image

from ..tiles import (
    EARTH_RADIUS_M,
    ORIGIN_SHIFT_M,
    Tile,
    check_tile,
    xy_bounds,
    xy_to_lnglat,
)
from . import noise as N
from . import tilecache
from .lines import PowerLines, scale_factor

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from ..area import Area

AreaLike = Union["Area", "BaseGeometry", tuple[float, float, float, float], str]
"""What :meth:`World.towers` takes as an area: an Area, a shapely geometry in degrees,
a ``(west, south, east, north)`` box, or a bbox/file string."""

MAX_SIM_ZOOM = 20
"""Deepest zoom the simulator renders (about 15 cm per pixel at the equator)."""

SIZES = (256, 512)
FORMATS = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_ALIASES = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}

SUN_AZIMUTH_DEG = 210.0
"""Sun from the south-south-west: shadows fall towards the north-north-east."""
SUN_ELEVATION_DEG = 50.0
_SHADOW = np.array([math.sin(math.radians(SUN_AZIMUTH_DEG - 180)), -math.cos(math.radians(SUN_AZIMUTH_DEG - 180))])
"""Unit shadow direction in the X (east) / Y (south) frame."""
_COT_EL = 1.0 / math.tan(math.radians(SUN_ELEVATION_DEG))

# field tags (mixed with the seed into noise keys)
_CLIMATE, _ELEV, _MOIST, _SETTLE, _PARCEL, _TEX, _CROWN, _ROADV, _ROADH, _LOT, _TOWER = range(1, 12)

WATER_LEVEL = -0.43
FOREST_LEVEL = 0.14
BARE_LEVEL = -0.40
SETTLE_LEVEL = 0.44

STEEL = np.array([0.76, 0.77, 0.79], np.float32)
"""Tower steel: bright, nearly neutral grey (nothing else in the world has this colour)."""

_FIELD_PALETTE = np.array(
    [
        [0.36, 0.47, 0.22],
        [0.45, 0.54, 0.26],
        [0.56, 0.61, 0.33],
        [0.70, 0.64, 0.40],
        [0.50, 0.40, 0.29],
        [0.62, 0.53, 0.38],
        [0.29, 0.40, 0.20],
        [0.48, 0.55, 0.30],
    ],
    np.float32,
)
_ROOF_PALETTE = np.array(
    [
        [0.60, 0.31, 0.23],
        [0.66, 0.38, 0.27],
        [0.40, 0.40, 0.43],
        [0.46, 0.35, 0.28],
        [0.82, 0.74, 0.62],
        [0.29, 0.29, 0.31],
    ],
    np.float32,
)


class Tower(NamedTuple):
    """One transmission tower of the ground truth: position (degrees) and ids."""

    lon: float
    lat: float
    line_id: int
    tower_id: int


def normalise_format(fmt: str) -> str:
    """``jpg|jpeg|png|webp`` (any case) -> ``jpeg|png|webp``; ``ValueError`` otherwise."""
    f = _ALIASES.get(str(fmt).lower().lstrip("."))
    if f is None:
        raise ValueError(f"image format {fmt!r} is not one of jpg, jpeg, png, webp")
    return f


def _ss(e0: float, e1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blend(rgb: np.ndarray, col: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Composite colour ``col`` ((3,) or (H, W, 3)) over ``rgb`` with alpha ``a`` (H, W)."""
    hi = a.max()
    if hi <= 0.0:
        return rgb
    if a.min() >= 1.0:
        return np.broadcast_to(col, rgb.shape).astype(np.float32)
    return rgb + (col - rgb) * a[..., None]


def _line_cov(d: np.ndarray, width: float, res: float) -> np.ndarray:
    """Anti-aliased coverage of a line of ``width`` at distance ``d`` (same units as res);
    lines thinner than a pixel are drawn one pixel wide and proportionally faint."""
    w = max(width, res)
    return np.clip((w * 0.5 - d) / res + 0.5, 0.0, 1.0) * (width / w)


def _inside_cov(sd: np.ndarray, res: float) -> np.ndarray:
    """Coverage from a signed distance (negative inside)."""
    return np.clip(0.5 - sd / res, 0.0, 1.0)


class World:
    """A deterministic procedural world. Same ``seed``, same pixels, towers and bytes.

    ``line_density`` scales the number of power-line corridors (1.0: about 5% of zoom-18
    tiles hold a tower)."""

    def __init__(self, seed: int = 0, line_density: float = 1.0) -> None:
        if line_density < 0:
            raise ValueError(f"line density {line_density:g} must be >= 0")
        self.seed = int(seed)
        self.line_density = float(line_density)
        self._k = {tag: N.key(self.seed, tag) for tag in range(1, 12)}
        self.lines = PowerLines(self.seed, self.line_density, self._water_at)

    def __repr__(self) -> str:
        return f"World(seed={self.seed}, line_density={self.line_density:g})"

    # --- fields at points (ground truth side) ------------------------------------------

    def _elev_points(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return N.fbm_points(X, Y, self._k[_ELEV], 30_000.0, 120.0)

    def _water_at(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """True where a point (world metres) is water or within a few metres of the shore."""
        return self._elev_points(X, Y) < WATER_LEVEL + 0.01

    # --- ground truth ------------------------------------------------------------------

    def _tower_records(self, x0: float, y0: float, x1: float, y1: float) -> dict[str, np.ndarray]:
        return self.lines.towers_in_box(x0, y0, x1, y1)

    @staticmethod
    def _to_towers(rec: dict[str, np.ndarray]) -> list[Tower]:
        out = []
        for X, Y, lid, tid in zip(rec["tx"], rec["ty"], rec["line_id"], rec["tower_id"]):
            lon, lat = xy_to_lnglat(float(X) - ORIGIN_SHIFT_M, ORIGIN_SHIFT_M - float(Y))
            out.append(Tower(lon, lat, int(lid), int(tid)))
        return out

    def towers_in_tile(self, tile: Tile) -> list[Tower]:
        """Towers whose centre lies in the tile (west/north edges in, east/south out)."""
        left, bottom, right, top = xy_bounds(check_tile(tile))
        rec = self._tower_records(left + ORIGIN_SHIFT_M, ORIGIN_SHIFT_M - top, right + ORIGIN_SHIFT_M, ORIGIN_SHIFT_M - bottom)
        return self._to_towers(rec)

    def tile_has_tower(self, tile: Tile) -> bool:
        """Whether a tower centre lies in the tile."""
        return bool(self.towers_in_tile(tile))

    def iter_towers(self, area: AreaLike) -> Iterator[Tower]:
        """Stream the towers inside ``area`` (an :class:`~tilesweep.area.Area`, a shapely
        geometry, a ``(west, south, east, north)`` box or a bbox/file string), cell row by
        cell row, without holding the whole area in memory."""
        import shapely

        from .truth import as_geometry

        geom = as_geometry(area)
        w, s, e, n = geom.bounds
        from ..tiles import lnglat_to_xy

        xl, yb = lnglat_to_xy(w, s)
        xr, yt = lnglat_to_xy(e, n)
        X0, X1 = xl + ORIGIN_SHIFT_M, xr + ORIGIN_SHIFT_M
        Y0, Y1 = ORIGIN_SHIFT_M - yt, ORIGIN_SHIFT_M - yb
        is_box = bool(shapely.equals(geom, shapely.box(w, s, e, n)))
        step = 200_000.0  # stream in horizontal bands
        y = Y0
        while y <= Y1:
            yn = min(Y1, y + step)
            rec = self._tower_records(X0, y, np.nextafter(X1, np.inf), np.nextafter(yn, np.inf) if yn >= Y1 else yn)
            towers = self._to_towers(rec)
            if towers and not is_box:
                lon = np.array([t.lon for t in towers])
                lat = np.array([t.lat for t in towers])
                inside = shapely.intersects_xy(geom, lon, lat)
                towers = [t for t, ok in zip(towers, inside) if ok]
            yield from towers
            if yn >= Y1:
                break
            y = yn

    def towers(self, area: AreaLike) -> list[Tower]:
        """The towers inside ``area`` (see :meth:`iter_towers`), by tower id within bands."""
        return list(self.iter_towers(area))

    # --- rendering ------------------------------------------------------------------------

    def render(self, tile: Tile, size: int = 256, fmt: str = "jpeg", quality: int = 85) -> bytes:
        """The tile as encoded image bytes (JPEG, PNG or WebP), ``size`` 256 or 512 px."""
        return encode(self.render_array(tile, size), fmt, quality)

    def render_array(self, tile: Tile, size: int = 256) -> np.ndarray:
        """The tile as ``uint8[size, size, 3]`` RGB, rows from the north (a fresh array).

        With ``TILESWEEP_SIM_CACHE=DIR`` set, pixels rendered before (by any process) are
        read from ``DIR`` instead (see :mod:`tilesweep.sim.tilecache`)."""
        z, tx, ty = check_tile(tile)
        if z > MAX_SIM_ZOOM:
            raise ValueError(f"zoom {z} is beyond the simulator's deepest zoom {MAX_SIM_ZOOM}")
        if size not in SIZES:
            raise ValueError(f"tile size {size} is not one of {SIZES}")
        folder = tilecache.cache_dir()
        if folder is None:
            return self._render_array(z, tx, ty, size)
        path = tilecache.entry_path(folder, self.seed, self.line_density, z, tx, ty, size)
        arr = tilecache.load(path, size)
        if arr is None:
            arr = self._render_array(z, tx, ty, size)
            tilecache.store(path, arr)
        return arr

    def _render_array(self, z: int, tx: int, ty: int, size: int) -> np.ndarray:
        left, bottom, right, top = xy_bounds(Tile(z, tx, ty))
        res = (right - left) / size
        g = N.Grid(left + ORIGIN_SHIFT_M, ORIGIN_SHIFT_M - top, res, size)
        kc = float(scale_factor(0.5 * (top + bottom)))  # Mercator metres per ground metre
        rgb = self._terrain(g, kc)
        if res < 80.0:
            rgb = self._roads(g, rgb, kc)
        rgb = self._power(g, rgb, kc)
        return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    # terrain -------------------------------------------------------------------------------

    def _terrain(self, g: N.Grid, kc: float) -> np.ndarray:
        K = self._k
        climate = g.fbm(K[_CLIMATE], 4_000_000.0, 150_000.0)
        arid = _ss(-0.05, 0.45, climate)
        elev = g.fbm(K[_ELEV], 30_000.0, 120.0)
        moist = g.fbm(K[_MOIST], 50_000.0, 40.0) - 0.25 * arid
        settle = g.fbm(K[_SETTLE], 8_000.0, 60.0)

        rgb = self._fields(g, kc)
        # bare soil
        tex = g.noise(K[_TEX] + 7, 40.0)
        soil = np.array([0.60, 0.50, 0.38], np.float32)
        soil_col = soil * (1.0 + 0.12 * tex[..., None]) if tex is not None else soil
        rgb = _blend(rgb, soil_col, _ss(BARE_LEVEL + 0.02, BARE_LEVEL - 0.02, moist))
        # dry climate: paler, browner vegetation
        if arid.max() > 0:
            rgb = rgb + (rgb * np.array([1.18, 1.05, 0.82], np.float32) + 0.04 - rgb) * (0.7 * arid)[..., None]
        # forest
        edge = g.noise(K[_CROWN] + 99, 12.0)
        fmask = _ss(FOREST_LEVEL - 0.004, FOREST_LEVEL + 0.004, moist if edge is None else moist + 0.02 * edge)
        if fmask.max() > 0:
            clear = self._corridor_clearing(g, kc)
            if clear is not None:
                fmask = fmask * (1.0 - clear)
            rgb = _blend(rgb, self._forest_colour(g, kc), fmask)
        # settlements
        smask = _ss(SETTLE_LEVEL - 0.01, SETTLE_LEVEL + 0.01, settle)
        if smask.max() > 0:
            rgb = _blend(rgb, self._settlement_colour(g, kc), smask)
        # water with a muddy shore
        shore = _ss(WATER_LEVEL + 0.03, WATER_LEVEL + 0.005, elev)
        if shore.max() > 0:
            rgb = _blend(rgb, np.array([0.55, 0.50, 0.40], np.float32), shore * 0.6)
            depth = np.clip((WATER_LEVEL - elev) / 0.15, 0.0, 1.0)[..., None]
            water = np.array([0.13, 0.24, 0.25], np.float32) * (1 - depth) + np.array([0.05, 0.12, 0.17], np.float32) * depth
            ripple = g.noise(K[_TEX] + 9, 30.0)
            if ripple is not None:
                water = water * (1.0 + 0.05 * ripple[..., None])
            rgb = _blend(rgb, water, _ss(WATER_LEVEL + 0.004, WATER_LEVEL - 0.004, elev))
        # large-scale colour variation (haze, season)
        tint = g.fbm(K[_TEX] + 11, 30_000.0, 2_000.0)
        rgb = rgb * (1.0 + 0.08 * tint[..., None])
        return rgb

    def _fields(self, g: N.Grid, kc: float) -> np.ndarray:
        K = self._k[_PARCEL]
        res = g.res
        avg = np.array([0.50, 0.52, 0.31], np.float32)
        detail = float(np.clip((160.0 - res) / 100.0, 0.0, 1.0))
        out = np.broadcast_to(avg, (g.size, g.size, 3)).astype(np.float32)
        if detail > 0:
            cw = 220.0
            X = g.xs
            k0 = np.floor(X / cw)

            def boundary(k: np.ndarray) -> np.ndarray:
                return (k + 0.35 * (N.rand2(k, 0, K) - 0.5)) * cw

            b0, b1 = boundary(k0), boundary(k0 + 1)
            col = np.where(X < b0, k0 - 1, np.where(X >= b1, k0 + 1, k0))
            left, right = boundary(col), boundary(col + 1)
            dx = np.minimum(X - left, right - X).astype(np.float32)  # (W,)
            hr = 110.0 + 220.0 * N.rand2(col, 1, K)
            off = N.rand2(col, 2, K) * hr
            # row index per pixel, from a float64 base per column plus a float32 local part
            base = (g.y0 + off) / hr
            bi = np.floor(base)
            ly = ((np.arange(g.size, dtype=np.float32) + 0.5) * np.float32(res))
            vl = (base - bi).astype(np.float32)[None, :] + ly[:, None] / hr.astype(np.float32)[None, :]
            rl = np.floor(vl)
            fr = vl - rl
            dy = np.minimum(fr, 1.0 - fr) * hr[None, :].astype(np.float32)
            colh = N.mix64(col.astype(np.int64).astype(np.uint64) * N._P1 + np.uint64(K))
            rowi = (bi.astype(np.int64)[None, :] + rl.astype(np.int64)).astype(np.uint64)
            h = N.mix64(colh[None, :] ^ (rowi * N._P2))
            r1 = N.unit(h)
            r2 = (h & np.uint64(0xFFFFF)).astype(np.float32) * np.float32(1.0 / 0x100000)
            colr = _FIELD_PALETTE[(r1 * len(_FIELD_PALETTE)).astype(np.intp)]
            bright: np.ndarray = (0.9 + 0.2 * r2).astype(np.float32)
            periods = np.array([4.0, 5.5, 7.0, 9.0])
            if periods[-1] > 3 * res:
                pi = (r2 * 4).astype(np.intp)
                ok = periods > 3 * res
                # phase at the tile origin in float64, the rest in float32 local metres
                fx = np.where(ok[:, None], np.sin(2 * np.pi * ((g.xs[None, :] / periods[:, None]) % 1.0)), 0.0).astype(np.float32)
                fy = np.where(ok[:, None], np.sin(2 * np.pi * ((g.ys[None, :] / periods[:, None]) % 1.0)), 0.0).astype(np.float32)
                horiz = (h & np.uint64(0x100000)) != 0
                stripe = np.where(horiz, fy.T[np.arange(g.size)[:, None], pi], fx.T[np.arange(g.size)[None, :], pi])
                bright = bright * (1.0 + 0.045 * stripe)
            for lam, amp in ((60.0, 0.06), (18.0, 0.07), (5.0, 0.05)):
                t = g.noise(self._k[_TEX] + int(lam), lam)
                if t is not None:
                    bright = bright * (1.0 + amp * t)
            fields = colr * bright[..., None]
            edge = np.minimum(dx[None, :], dy)
            hedge = _line_cov(edge, 3.0 * kc, res) * 0.8
            fields = _blend(fields, np.array([0.20, 0.28, 0.14], np.float32), hedge)
            out = out + (fields - out) * detail
        return out

    def _forest_colour(self, g: N.Grid, kc: float) -> np.ndarray:
        base = np.array([0.17, 0.26, 0.12], np.float32)
        col = np.broadcast_to(base, (g.size, g.size, 3)).astype(np.float32)
        b: np.ndarray = np.ones((g.size, g.size), np.float32)
        for lam, amp in ((60.0, 0.12), (8.0, 0.30), (3.5, 0.18)):
            t = g.noise(self._k[_CROWN] + int(lam), lam)
            if t is not None:
                b = b * (1.0 + amp * t)
        return col * b[..., None]

    def _settlement_colour(self, g: N.Grid, kc: float) -> np.ndarray:
        res = g.res
        avg = np.array([0.52, 0.47, 0.42], np.float32)
        out = np.broadcast_to(avg, (g.size, g.size, 3)).astype(np.float32)
        detail = float(np.clip((8.0 - res) / 4.0, 0.0, 1.0))
        if detail <= 0:
            return out
        X = g.xs[None, :]
        Y = g.ys[:, None]
        lot = 16.0
        lx = np.floor(X / lot)
        ly = np.floor(Y / lot)
        street_x = (lx % 6) == 0
        street_y = (ly % 6) == 0
        garden = np.array([0.34, 0.44, 0.24], np.float32)
        t = g.noise(self._k[_LOT] + 5, 9.0)
        gcol = garden * (1.0 + 0.2 * t[..., None]) if t is not None else garden
        det = np.broadcast_to(gcol, (g.size, g.size, 3)).astype(np.float32)
        roof, bmask = self._buildings(X, Y, lot)
        # shadows: building mask displaced towards the sun
        for f in (0.5, 1.0):
            sx, sy = _SHADOW * 7.0 * kc * f
            _, sm = self._buildings(X - sx, Y - sy, lot)
            det = det * (1.0 - 0.45 * sm * (1 - bmask))[..., None]
        det = _blend(det, roof, bmask)
        # streets: asphalt with pale kerbs
        fx = X / lot - lx
        fy = Y / lot - ly
        sx_d = np.abs(fx - 0.5) * lot
        sy_d = np.abs(fy - 0.5) * lot
        kerb = np.maximum(street_x * (sx_d < 7.0), street_y * (sy_d < 7.0))
        asphalt = np.maximum(street_x * _inside_cov(sx_d - 4.0, res), street_y * _inside_cov(sy_d - 4.0, res))
        det = _blend(det, np.array([0.62, 0.58, 0.52], np.float32), kerb.astype(np.float32))
        det = _blend(det, np.array([0.34, 0.34, 0.35], np.float32), asphalt.astype(np.float32))
        return out + (det - out) * detail

    def _buildings(self, X: np.ndarray, Y: np.ndarray, lot: float) -> tuple[np.ndarray, np.ndarray]:
        K = self._k[_LOT]
        lx = np.floor(X / lot)
        ly = np.floor(Y / lot)
        h = N.hash2(lx, ly, K)
        r1 = N.unit(h)
        h2 = N.mix64(h)
        r2 = N.unit(h2)
        r3 = N.unit(N.mix64(h2))
        present = (r1 < 0.8) & ((lx % 6) != 0) & ((ly % 6) != 0)
        bw = 7.0 + 6.0 * r2
        bh = 7.0 + 6.0 * r3
        fx = X - lx * lot - (lot - bw) * 0.5
        fy = Y - ly * lot - (lot - bh) * 0.5
        inside = present & (fx >= 0) & (fx < bw) & (fy >= 0) & (fy < bh)
        roof = _ROOF_PALETTE[(r1 * 1.25 * len(_ROOF_PALETTE)).astype(np.intp) % len(_ROOF_PALETTE)]
        ridge = np.where(fx < bw * 0.5, 1.06, 0.9).astype(np.float32)
        return roof * ridge[..., None], inside.astype(np.float32)

    # roads ------------------------------------------------------------------------------------

    def _roads(self, g: N.Grid, rgb: np.ndarray, kc: float) -> np.ndarray:
        res = g.res
        spacing = 2_600.0
        width = 7.0 * kc
        cov = np.zeros((g.size, g.size), np.float32)
        for axis, tag in ((0, _ROADV), (1, _ROADH)):
            K = self._k[tag]
            across = g.xs if axis == 0 else g.ys  # coordinate across the road
            along = g.ys if axis == 0 else g.xs
            lo = int(math.floor((across[0] - 600.0) / spacing))
            hi = int(math.floor((across[-1] + 600.0) / spacing))
            for i in range(lo, hi + 1):
                if N.rand2(np.array([i]), np.array([0]), K)[0] > 0.7:
                    continue
                base = (i + 0.5 + 0.3 * (N.rand2(np.array([i]), np.array([1]), K)[0] - 0.5)) * spacing
                pos = base + 180.0 * N.noise_points(np.full(along.shape, i * 7919.0), along, 3_000.0, K + 1)
                d = np.abs(across[None, :] - pos[:, None]) if axis == 0 else np.abs(across[:, None] - pos[None, :])
                if d.min() > width + 2 * res:
                    continue
                cov = np.maximum(cov, _line_cov(d, width, res))
        if cov.max() > 0:
            rgb = _blend(rgb, np.array([0.40, 0.40, 0.41], np.float32), np.minimum(cov * 1.0, 1.0))
        return rgb

    # power lines --------------------------------------------------------------------------------

    def _window(self, g: N.Grid, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice] | None:
        i0 = max(0, int(math.floor((x0 - g.x0) / g.res)))
        i1 = min(g.size, int(math.ceil((x1 - g.x0) / g.res)) + 1)
        j0 = max(0, int(math.floor((y0 - g.y0) / g.res)))
        j1 = min(g.size, int(math.ceil((y1 - g.y0) / g.res)) + 1)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(j0, j1), slice(i0, i1)

    def _tile_box(self, g: N.Grid, margin: float) -> tuple[float, float, float, float]:
        ext = g.res * g.size
        return g.x0 - margin, g.y0 - margin, g.x0 + ext + margin, g.y0 + ext + margin

    def _corridor_clearing(self, g: N.Grid, kc: float) -> np.ndarray | None:
        """Coverage of the cleared strips that power lines cut through forests."""
        if g.res > 60.0:
            return None
        half = 22.0 * kc
        clear = None
        for a, b, _lid in self.lines.segments_in_box(*self._tile_box(g, half + g.res)):
            win = self._window(g, min(a[0], b[0]) - half, min(a[1], b[1]) - half, max(a[0], b[0]) + half, max(a[1], b[1]) + half)
            if win is None:
                continue
            sy, sx = win
            X = g.xs[sx][None, :]
            Y = g.ys[sy][:, None]
            ab = b - a
            L2 = float(ab @ ab)
            t = np.clip(((X - a[0]) * ab[0] + (Y - a[1]) * ab[1]) / L2, 0.0, 1.0)
            d = np.hypot(X - a[0] - t * ab[0], Y - a[1] - t * ab[1])
            c = _inside_cov(d - half, max(g.res, 3.0 * kc))
            if clear is None:
                clear = np.zeros((g.size, g.size), np.float32)
            clear[sy, sx] = np.maximum(clear[sy, sx], c)
        return clear

    def _power(self, g: N.Grid, rgb: np.ndarray, kc: float) -> np.ndarray:
        res_ground = g.res / kc
        if res_ground > 6.0:
            return rgb
        rgb = np.array(rgb, dtype=np.float32, copy=True)
        if res_ground < 2.5:
            self._wires(g, rgb, kc)
        margin = 60.0 * kc
        rec = self.lines.towers_in_box(*self._tile_box(g, margin))
        for X, Y, ang, tid in zip(rec["tx"], rec["ty"], rec["angle"], rec["tower_id"]):
            self._tower(g, rgb, float(X), float(Y), float(ang), int(tid))
        return rgb

    def _wires(self, g: N.Grid, rgb: np.ndarray, kc: float) -> None:
        reach = 40.0 * kc
        for ax, ay, bx, by, _lid in self.lines.spans_in_box(*self._tile_box(g, reach)):
            win = self._window(g, min(ax, bx) - reach, min(ay, by) - reach, max(ax, bx) + reach, max(ay, by) + reach)
            if win is None:
                continue
            sy, sx = win
            k = float(scale_factor(ORIGIN_SHIFT_M - 0.5 * (ay + by)))
            res = g.res / k
            px = ((g.xs[sx][None, :] - ax) / k).astype(np.float32)
            py = ((g.ys[sy][:, None] - ay) / k).astype(np.float32)
            ux, uy = (bx - ax) / k, (by - ay) / k
            L = math.hypot(ux, uy)
            ux, uy = ux / L, uy / L
            nx, ny = -uy, ux
            t = (px * ux + py * uy) / L
            c = px * nx + py * ny
            inspan = _ss(-0.01, 0.01, t) * _ss(1.01, 0.99, t)
            height = 27.0 - 9.0 * 4.0 * t * (1.0 - t)
            sh_perp = float(_SHADOW @ np.array([nx, ny])) * _COT_EL
            wire = np.zeros(c.shape, np.float32)
            shadow = np.zeros(c.shape, np.float32)
            for phase in (-9.5, 0.0, 9.5):
                wire = np.maximum(wire, _line_cov(np.abs(c - phase), 0.4, res))
                shadow = np.maximum(shadow, _line_cov(np.abs(c - phase - height * sh_perp), 0.5, res))
            win_rgb = rgb[sy, sx]
            win_rgb *= (1.0 - 0.2 * shadow * inspan)[..., None]
            win_rgb += (np.array([0.25, 0.25, 0.27], np.float32) - win_rgb) * (0.38 * wire * inspan)[..., None]
            rgb[sy, sx] = win_rgb

    def _tower(self, g: N.Grid, rgb: np.ndarray, X: float, Y: float, ang: float, tid: int) -> None:
        r = N.unit(N.mix64(np.array([tid], dtype=np.uint64) ^ np.uint64(self._k[_TOWER])))
        r2 = N.unit(N.mix64(N.mix64(np.array([tid], dtype=np.uint64) ^ np.uint64(self._k[_TOWER]))))
        B = 8.0 + 3.0 * float(r[0])  # base side, ground metres
        A = 22.0 + 6.0 * float(r2[0])  # cross-arm span
        H = 34.0 + 12.0 * float(r[0])  # height
        k = float(scale_factor(ORIGIN_SHIFT_M - Y))
        L = H * _COT_EL
        ext = 0.5 * A + 2.0
        sxL, syL = _SHADOW * L
        win = self._window(
            g,
            X + (min(0.0, sxL) - ext) * k,
            Y + (min(0.0, syL) - ext) * k,
            X + (max(0.0, sxL) + ext) * k,
            Y + (max(0.0, syL) + ext) * k,
        )
        if win is None:
            return
        sy, sx = win
        res = g.res / k
        px = ((g.xs[sx][None, :] - X) / k).astype(np.float32)
        py = ((g.ys[sy][:, None] - Y) / k).astype(np.float32)
        ca, sa = math.cos(ang), math.sin(ang)
        a = px * ca + py * sa  # along the line
        c = -px * sa + py * ca  # across (cross-arm direction)
        aa, ac = np.abs(a), np.abs(c)
        box = np.maximum(aa, ac)
        win_rgb = rgb[sy, sx]

        # disturbed ground and footings under the tower
        pad = _inside_cov(box - (B * 0.5 + 1.5), max(res, 1.0)) * 0.55
        win_rgb += (np.array([0.58, 0.52, 0.42], np.float32) - win_rgb) * pad[..., None]

        # shadow of body (legs and bracing), cross-arm and peak
        s = np.array(_SHADOW)
        along_s = px * s[0] + py * s[1]
        lat_s = px * (-s[1]) + py * s[0]
        t = np.clip(along_s / L, 0.0, 1.0)
        rel = ang - math.atan2(s[1], s[0])
        proj = abs(math.cos(rel)) + abs(math.sin(rel))
        half_w = 0.5 * proj * (B * (1.0 - t) ** 1.4 + 1.2 * t)
        body_in = (along_s > -B * 0.4) & (along_s < L)
        legs = _line_cov(np.abs(np.abs(lat_s) - half_w), 0.7, res)
        period = 5.0
        zig = half_w * (4.0 * np.abs((along_s / period) % 1.0 - 0.5) - 1.0)
        brace = np.maximum(_line_cov(np.abs(lat_s - zig), 0.45, res), _line_cov(np.abs(lat_s + zig), 0.45, res))
        fill = _inside_cov(np.abs(lat_s) - half_w, res) * 0.18
        body = np.where(body_in, np.maximum(np.maximum(legs, brace * (np.abs(lat_s) <= half_w + res)), fill), 0.0)
        qa = (px - 0.8 * L * s[0]) * ca + (py - 0.8 * L * s[1]) * sa
        qc = -(px - 0.8 * L * s[0]) * sa + (py - 0.8 * L * s[1]) * ca
        arm_sh = _inside_cov(np.maximum(np.abs(qa) - 0.9, np.abs(qc) - A * 0.5), res)
        shadow = np.maximum(body, arm_sh)
        shadow *= 1.0 - _inside_cov(box - B * 0.5, res) * 0.0  # shadow also falls inside the base
        win_rgb *= (1.0 - 0.6 * shadow)[..., None]

        # steel: base outline, X bracing, waist, cross-arm
        inside_base = box <= B * 0.5 + res
        outline = _line_cov(np.abs(box - B * 0.5), 0.6, res)
        diag = np.where(inside_base, _line_cov(np.abs(aa - ac) * 0.7071, 0.45, res), 0.0)
        waist = _line_cov(np.abs(box - 1.3), 0.5, res)
        arm_in = np.maximum(aa - 0.8, ac - A * 0.5)
        arm = _inside_cov(arm_in, res)
        zz = 0.8 * (4.0 * np.abs((ac / 1.6) % 1.0 - 0.5) - 1.0)
        arm_lattice = np.where(arm_in < 0, 1.0 - 0.35 * _line_cov(np.abs(a - zz), 0.35, res), 1.0)
        steel_a = np.maximum(np.maximum(outline, diag), np.maximum(waist, arm))
        steel_col = STEEL * np.where(arm > 0, arm_lattice, 1.0)[..., None]
        win_rgb += (steel_col - win_rgb) * (0.95 * steel_a)[..., None]
        # insulator strings: small dark dots at the phase positions
        for phase in (-9.5, 0.0, 9.5):
            dot = _inside_cov(np.hypot(a, c - phase) - 0.45, res) * 0.8
            win_rgb *= (1.0 - 0.5 * dot)[..., None]
        rgb[sy, sx] = win_rgb


def encode(arr: np.ndarray, fmt: str = "jpeg", quality: int = 85) -> bytes:
    """Encode ``uint8[H, W, 3]`` as JPEG, PNG or WebP bytes."""
    f = normalise_format(fmt)
    img = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    if f == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    elif f == "png":
        img.save(buf, "PNG", compress_level=3)
    else:
        img.save(buf, "WEBP", quality=quality, method=2)
    return buf.getvalue()


def tiles_in_bbox(west: float, south: float, east: float, north: float, z: int) -> Iterable[Tile]:
    """Every zoom-``z`` tile that touches the box, row by row (a plain bbox tile range)."""
    from ..tiles import tile_at

    a = tile_at(west, north, z)
    b = tile_at(east, south, z)
    for y in range(a.y, b.y + 1):
        for x in range(a.x, b.x + 1):
            yield Tile(z, x, y)


__all__ = ["World", "Tower", "encode", "normalise_format", "MAX_SIM_ZOOM", "SIZES", "FORMATS", "EARTH_RADIUS_M"]
