"""Tile math for XYZ Web-Mercator tiles.

A tile is ``Tile(z, x, y)``: zoom ``z`` in 0..MAX_ZOOM, column ``x`` in 0..2**z - 1 counted
from the antimeridian eastwards, row ``y`` in 0..2**z - 1 counted from the north (the XYZ or
"slippy map" convention). TMS rows (counted from the south) only appear in source templates
(``{-y}``) and MBTiles exports, through :func:`tms_y`.

Everything here is a pure function. Scalar functions take and return :class:`Tile`; the
``*_array`` functions are their numpy twins for millions of tiles at once.

The tile id is the PMTiles v3 TileID: tiles of zoom ``z`` take the ids
``(4**z - 1) / 3 .. (4**(z+1) - 1) / 3 - 1`` in Hilbert-curve order, so the descendants of
any tile at one zoom form a single contiguous id range (see :func:`descendant_id_range`).
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

from .errors import UsageError

MAX_ZOOM = 24
"""Deepest zoom tilesweep accepts (about 2.4 cm per pixel at the equator)."""

EARTH_RADIUS_M = 6378137.0
"""WGS 84 semi-major axis, the sphere radius of Web Mercator (EPSG:3857), metres."""

ORIGIN_SHIFT_M = math.pi * EARTH_RADIUS_M
"""Half the width of the Web-Mercator square, metres (20 037 508.34...)."""

MAX_LAT = math.degrees(math.atan(math.sinh(math.pi)))
"""Northern edge of the Web-Mercator square, degrees (85.0511287798...)."""


class Tile(NamedTuple):
    """An XYZ tile: zoom, column (from the west), row (from the north)."""

    z: int
    x: int
    y: int

    def __str__(self) -> str:
        return f"{self.z}/{self.x}/{self.y}"


class LngLatBbox(NamedTuple):
    """A box in degrees: west, south, east, north."""

    west: float
    south: float
    east: float
    north: float


class XYBbox(NamedTuple):
    """A box in Web-Mercator metres (EPSG:3857): left, bottom, right, top."""

    left: float
    bottom: float
    right: float
    top: float


def check_tile(tile: Tile) -> Tile:
    """Return ``tile`` as a :class:`Tile` if it is valid, else raise ``ValueError``."""
    z, x, y = (int(v) for v in tile)
    if not 0 <= z <= MAX_ZOOM:
        raise ValueError(f"zoom {z} is outside 0..{MAX_ZOOM}")
    n = 1 << z
    if not (0 <= x < n and 0 <= y < n):
        raise ValueError(f"tile {z}/{x}/{y} is outside the zoom-{z} grid (0..{n - 1})")
    return Tile(z, x, y)


def parse_tile(text: str) -> Tile:
    """Parse ``"Z/X/Y"`` into a valid :class:`Tile`; :class:`UsageError` (a ValueError)
    names the bad text."""
    parts = text.strip().split("/")
    try:
        if len(parts) != 3:
            raise ValueError
        z, x, y = (int(p) for p in parts)
        return check_tile(Tile(z, x, y))
    except ValueError as exc:
        detail = str(exc) or "not Z/X/Y (three integers)"
        raise UsageError(f"tile {text!r}: {detail}") from None


# --- positions -----------------------------------------------------------------------


def lnglat_to_xy(lng: float, lat: float) -> tuple[float, float]:
    """Degrees to Web-Mercator metres. Latitude is clamped to +-MAX_LAT."""
    lat = max(-MAX_LAT, min(MAX_LAT, lat))
    x = EARTH_RADIUS_M * math.radians(lng)
    y = EARTH_RADIUS_M * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    return x, y


def xy_to_lnglat(x: float, y: float) -> tuple[float, float]:
    """Web-Mercator metres to degrees."""
    lng = math.degrees(x / EARTH_RADIUS_M)
    lat = math.degrees(2 * math.atan(math.exp(y / EARTH_RADIUS_M)) - math.pi / 2)
    return lng, lat


def tile_at(lng: float, lat: float, z: int) -> Tile:
    """The zoom-``z`` tile that holds the point (degrees). Edges belong to the tile east/south
    of them; the eastern and southern edges of the world are clamped into the last tile."""
    n = 1 << z
    fx, fy = lnglat_to_fraction(lng, lat)
    x = min(n - 1, max(0, int(math.floor(fx * n))))
    y = min(n - 1, max(0, int(math.floor(fy * n))))
    return Tile(z, x, y)


def lnglat_to_fraction(lng: float, lat: float) -> tuple[float, float]:
    """Degrees to the unit Web-Mercator square: (0, 0) north-west, (1, 1) south-east."""
    lat = max(-MAX_LAT, min(MAX_LAT, lat))
    fx = (lng + 180.0) / 360.0
    s = math.sin(math.radians(lat))
    fy = 0.5 - math.log((1 + s) / (1 - s)) / (4 * math.pi)
    return fx, fy


def fraction_to_lnglat(fx: float, fy: float) -> tuple[float, float]:
    """The unit Web-Mercator square to degrees (inverse of :func:`lnglat_to_fraction`)."""
    lng = fx * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * fy))))
    return lng, lat


def bounds(tile: Tile) -> LngLatBbox:
    """The tile's edges in degrees."""
    z, x, y = tile
    n = float(1 << z)
    west, north = fraction_to_lnglat(x / n, y / n)
    east, south = fraction_to_lnglat((x + 1) / n, (y + 1) / n)
    return LngLatBbox(west, south, east, north)


def xy_bounds(tile: Tile) -> XYBbox:
    """The tile's edges in Web-Mercator metres."""
    z, x, y = tile
    size = 2 * ORIGIN_SHIFT_M / (1 << z)
    left = -ORIGIN_SHIFT_M + x * size
    top = ORIGIN_SHIFT_M - y * size
    return XYBbox(left, top - size, left + size, top)


def center(tile: Tile) -> tuple[float, float]:
    """The tile's centre (lng, lat) in degrees, taken in Mercator space."""
    z, x, y = tile
    n = float(1 << z)
    return fraction_to_lnglat((x + 0.5) / n, (y + 0.5) / n)


def tile_area_km2(tile: Tile) -> float:
    """Ground area of the tile in km2 on the WGS 84 sphere (authalic approximation)."""
    w, s, e, n = bounds(tile)
    r_km = 6371.0088
    return r_km * r_km * math.radians(e - w) * (math.sin(math.radians(n)) - math.sin(math.radians(s)))


def ground_resolution_m(lat: float, z: int, tile_size: int = 256) -> float:
    """Metres per pixel at latitude ``lat`` (degrees) and zoom ``z`` for ``tile_size`` px tiles."""
    return math.cos(math.radians(lat)) * 2 * ORIGIN_SHIFT_M / (tile_size * (1 << z))


# --- tree ------------------------------------------------------------------------------


def parent(tile: Tile, zoom: int | None = None) -> Tile:
    """The ancestor at ``zoom`` (default: one level up). ``zoom`` must be in 0..tile.z."""
    z, x, y = tile
    zoom = z - 1 if zoom is None else zoom
    if not 0 <= zoom <= z:
        raise ValueError(f"parent zoom {zoom} is outside 0..{z}")
    d = z - zoom
    return Tile(zoom, x >> d, y >> d)


def children(tile: Tile, zoom: int | None = None) -> list[Tile]:
    """The descendants at ``zoom`` (default: one level down), row by row from the north-west."""
    return list(iter_children(tile, zoom))


def iter_children(tile: Tile, zoom: int | None = None) -> Iterator[Tile]:
    """Lazily yield the descendants at ``zoom``, row by row from the north-west."""
    z, x, y = tile
    zoom = z + 1 if zoom is None else zoom
    if not z <= zoom <= MAX_ZOOM:
        raise ValueError(f"child zoom {zoom} is outside {z}..{MAX_ZOOM}")
    d = zoom - z
    side = 1 << d
    x0, y0 = x << d, y << d
    for dy in range(side):
        for dx in range(side):
            yield Tile(zoom, x0 + dx, y0 + dy)


def block_tile_list(tile: Tile, zoom: int) -> list[Tile]:
    """Every descendant of ``tile`` at ``zoom``, row by row from the north-west (a block's
    tiles when all are planned); unlike :func:`children`, no range check (hot path)."""
    d = zoom - tile.z
    side = 1 << d
    x0, y0 = tile.x << d, tile.y << d
    return [Tile(zoom, x0 + c, y0 + r) for r in range(side) for c in range(side)]


# --- quadkeys and TMS --------------------------------------------------------------------


def tms_y(tile: Tile) -> int:
    """The TMS row (counted from the south) of an XYZ tile; the map is its own inverse."""
    z, _, y = tile
    return (1 << z) - 1 - y


def quadkey(tile: Tile) -> str:
    """Bing Maps quadkey: one digit 0..3 per zoom level; zoom 0 is the empty string."""
    z, x, y = tile
    digits = []
    for i in range(z, 0, -1):
        mask = 1 << (i - 1)
        digits.append(str((1 if x & mask else 0) + (2 if y & mask else 0)))
    return "".join(digits)


def from_quadkey(qk: str) -> Tile:
    """Inverse of :func:`quadkey`; ``ValueError`` for a string that is not a quadkey."""
    if len(qk) > MAX_ZOOM or any(c not in "0123" for c in qk):
        raise ValueError(f"quadkey {qk!r} is not up to {MAX_ZOOM} digits 0-3")
    x = y = 0
    for c in qk:
        d = ord(c) - 48
        x = (x << 1) | (d & 1)
        y = (y << 1) | (d >> 1)
    return Tile(len(qk), x, y)


# --- PMTiles v3 Hilbert tile ids ----------------------------------------------------------


def zoom_base_id(z: int) -> int:
    """First tile id of zoom ``z``: the number of tiles at all shallower zooms, (4**z - 1)/3."""
    return ((1 << (2 * z)) - 1) // 3


def tile_id(tile: Tile) -> int:
    """PMTiles v3 TileID: zoom base plus the Hilbert index of (x, y) in the zoom-z grid."""
    z, x, y = tile
    return zoom_base_id(z) + _hilbert_index(z, x, y)


def _hilbert_index(z: int, x: int, y: int) -> int:
    return hilbert_frame(Tile(z, x, y))[0]


def hilbert_frame(tile: Tile) -> tuple[int, int, int]:
    """``(h, c, s)``: the tile's Hilbert index in its zoom's grid (``tile_id(tile) -
    zoom_base_id(tile.z)``) and, mod 2, the complement (``c``) and swap (``s``) reflections
    the walk applied on the way down. Those reflections apply to every lower-order bit, so
    the curve inside the tile is the canonical curve of its depth seen through them
    (:func:`descendant_ranks`). The one Hilbert walk of the package."""
    z, x, y = tile
    h = c = sw = 0
    n = 1 << z
    while n > 1:
        n >>= 1
        rx = 1 if x & n else 0
        ry = 1 if y & n else 0
        h += n * n * ((3 * rx) ^ ry)
        x, y = x & (n - 1), y & (n - 1)
        if ry == 0:
            if rx == 1:
                x, y = n - 1 - x, n - 1 - y
                c ^= 1
            x, y = y, x
            sw ^= 1
    return h, c, sw


def _rotate(n: int, x: int, y: int, rx: int, ry: int) -> tuple[int, int]:
    if ry == 0:
        if rx == 1:
            x, y = n - 1 - x, n - 1 - y
        x, y = y, x
    return x, y


def from_tile_id(tid: int) -> Tile:
    """Inverse of :func:`tile_id`; ``ValueError`` for a negative id or one past MAX_ZOOM."""
    if tid < 0:
        raise ValueError(f"tile id {tid} is negative")
    z = 0
    while zoom_base_id(z + 1) <= tid:
        z += 1
        if z > MAX_ZOOM:
            raise ValueError(f"tile id {tid} is beyond zoom {MAX_ZOOM}")
    d = tid - zoom_base_id(z)
    x = y = 0
    s = 1
    n = 1 << z
    while s < n:
        rx = 1 & (d // 2)
        ry = 1 & (d ^ rx)
        x, y = _rotate(s, x, y, rx, ry)
        x += s * rx
        y += s * ry
        d //= 4
        s *= 2
    return Tile(z, x, y)


def descendant_id_range(tile: Tile, zoom: int) -> tuple[int, int]:
    """Half-open range ``[start, stop)`` of the tile ids of ``tile``'s descendants at ``zoom``.

    Hilbert curves nest, so those descendants are exactly one contiguous run of ids."""
    z = tile.z
    if not z <= zoom <= MAX_ZOOM:
        raise ValueError(f"descendant zoom {zoom} is outside {z}..{MAX_ZOOM}")
    per = 1 << (2 * (zoom - z))
    start = zoom_base_id(zoom) + _hilbert_index(*tile) * per
    return start, start + per


# --- numpy twins --------------------------------------------------------------------------


def tile_id_array(z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vectorised :func:`tile_id` for many tiles of one zoom; returns uint64."""
    x = np.asarray(x, dtype=np.int64).copy()
    y = np.asarray(y, dtype=np.int64).copy()
    d = np.zeros(x.shape, dtype=np.int64)
    s = 1 << z
    while s > 1:
        s >>= 1
        rx = (x & s) != 0
        ry = (y & s) != 0
        d += (s * s) * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        x &= s - 1
        y &= s - 1
        flip = ~ry & rx
        x = np.where(flip, s - 1 - x, x)
        y = np.where(flip, s - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
    return (d + zoom_base_id(z)).astype(np.uint64)


_RANKS: dict[int, list[np.ndarray]] = {}  # depth -> the four reflected canonical curves


def descendant_ranks(zoom: int, tile: Tile) -> np.ndarray:
    """Hilbert rank (tile id minus the first descendant's id) of each descendant of
    ``tile`` at ``zoom``, as uint64 indexed by ``dy * side + dx`` (read-only).

    Inside a tile the curve is the canonical depth-``d`` curve seen through one of four
    reflections (complement both axes and/or swap them, which commute), fixed by the
    tile's own bits (:func:`hilbert_frame`). The four tables per depth are computed once,
    which makes opening a shard cheap (no full-depth Hilbert computation per tile)."""
    d = zoom - tile.z
    tables = _RANKS.get(d)
    if tables is None:
        side = 1 << d
        dy, dx = np.divmod(np.arange(side * side, dtype=np.int64), side)
        tables = []
        for c in (0, 1):
            for sw in (0, 1):
                tx, ty = (side - 1 - dx, side - 1 - dy) if c else (dx, dy)
                if sw:
                    tx, ty = ty, tx
                t = tile_id_array(d, tx, ty) - np.uint64(zoom_base_id(d))
                t.flags.writeable = False
                tables.append(t)
        _RANKS[d] = tables
    _, c, sw = hilbert_frame(tile)
    return tables[2 * c + sw]


def centres_array(z: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`center`: tile centres ``(lon, lat)`` in degrees, float64, taken
    in Mercator space."""
    return points_array(z, x, y, 0.5, 0.5)


def points_array(z: int, x: np.ndarray, y: np.ndarray, fx: "np.ndarray | float", fy: "np.ndarray | float") -> tuple[np.ndarray, np.ndarray]:
    """``(lon, lat)`` in degrees (float64) of the points ``fx``, ``fy`` (fractions 0..1 of
    a tile's side: ``fx`` east from its west edge, ``fy`` south from its north edge, in
    Mercator space) of tiles ``x``, ``y`` at zoom ``z``; ``0.5, 0.5`` is the centre."""
    n = float(1 << z)
    lon = (np.asarray(x, np.float64) + np.asarray(fx, np.float64)) / n * 360.0 - 180.0
    lat = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * (np.asarray(y, np.float64) + np.asarray(fy, np.float64)) / n))))
    return lon, lat


def tile_units_array(z: int, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`points_array`: points ``(lon, lat)`` in degrees as float64
    zoom-``z`` tile units (``x + fx``, ``y + fy``: the tile's column and row plus the
    fractions 0..1 within it, east and south), in Mercator space."""
    n = float(1 << z)
    tx = (np.asarray(lon, np.float64) + 180.0) / 360.0 * n
    ty = (1.0 - np.arcsinh(np.tan(np.radians(np.asarray(lat, np.float64)))) / np.pi) / 2.0 * n
    return tx, ty


def bounds_array(z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vectorised :func:`bounds`: an ``(N, 4)`` float64 array of west, south, east, north."""
    n = float(1 << z)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    west = x / n * 360.0 - 180.0
    east = (x + 1) / n * 360.0 - 180.0
    north = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * y / n))))
    south = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (y + 1) / n))))
    return np.stack([west, south, east, north], axis=-1)
