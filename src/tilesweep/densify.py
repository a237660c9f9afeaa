"""Densify around detections (``tilesweep densify``, ``run --densify R``).

A sparse sample finds some towers; the tiles around them (and, with ``along``, the tiles
a line through two nearby detections would cross) are where the other towers are. A
*round* plans those tiles that the sweep has not planned yet, inside its area, as new
blocks in the queue; ``run`` then fetches and predicts them like any others, and the next
round starts from the detections it found.

How a round's tiles become work (docs/architecture.md, "Densify"): **new blocks, never
re-opened ones.** A block is a quadtree cell whose queue id is the cell's id, and a
sparse sample's blocks are coarse cells, so new tiles usually fall inside an existing
block's cell. They go into a *new* block at the finest block zoom whose cell is not yet
a block (its parent, and so on, when it is); its tile set holds only the new tiles, so
blocks may nest as cells but never share a tile. Everything keyed by block id (queue,
leases, acks, the prediction ledger, the sink's ``block`` column) works unchanged, and
every tile still has exactly one block, so exactly-once and ``status``'s accounting hold.

A round is a pure function of the sweep (area, the queue's planned tiles) and its
predictions: the same state gives the same tiles and blocks. It is recorded in
``SWEEP/densify.sqlite`` (the round, its settings and each block it planned) in one
transaction *before* its blocks are put in the queue; a round whose put was cut short (a
kill) is completed by the next ``densify`` or ``run --densify`` (puts are idempotent),
and until then ``status`` says the queue and the record disagree.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .errors import UsageError
from .plan import _classify, block_priority_array, mask_cells, pack_tiles
from .queue import Block
from .tiles import EARTH_RADIUS_M, tile_id_array, tile_units_array

if TYPE_CHECKING:
    from .sweep import Sweep

ROUNDS_FILE = "densify.sqlite"
MAX_RADIUS = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round      INTEGER PRIMARY KEY,   -- 1, 2, ... (the plan itself is round 0)
    radius     INTEGER NOT NULL,
    along      INTEGER NOT NULL,
    model      TEXT NOT NULL,
    threshold  REAL,                  -- NULL: the model's own label
    detections INTEGER NOT NULL,      -- detections the round started from
    tiles      INTEGER NOT NULL,      -- tiles it planned
    blocks     INTEGER NOT NULL,      -- blocks it planned
    planned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS round_blocks (
    id       INTEGER PRIMARY KEY,     -- the block's queue id
    round    INTEGER NOT NULL,
    z        INTEGER NOT NULL,
    x        INTEGER NOT NULL,
    y        INTEGER NOT NULL,
    tiles    INTEGER NOT NULL,
    mask     BLOB,
    priority INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class DensifySettings:
    """What a round adds around detections.

    radius: tiles within this many tiles (Chebyshev: a (2R+1)**2 square) of a detection,
    0..16. along: follow lines. The tiles within ``along_width / 2`` tiles (0..8; 0: the
    tiles the line crosses) of the line through two detections between ``min_pair_m``
    and ``pair_m`` ground metres apart (one tower spacing, 250..450 m, plus the tile
    centres' error), drawn ``extend`` times their distance past each of them (0..4: where
    the next towers of that line stand); and around a detection with no such partner,
    the ring of tiles ``ring_m`` (near, far ground metres, widened by half a tile's
    diagonal; (0, 0): none) from it, where its line's next tower stands in a direction
    not known yet; and around a detection at the end of a line (its partners all on one
    side) the part of that ring within ``end_turn_deg`` (0..90) ahead of it, where the
    tower after a bend stands (the simulator's lines turn by up to 23 degrees). 10% of a realistic area (benchmarks/lines.py) then finds nearly all its
    towers fetching about 30% of the tiles, where ``radius`` 1 and a one-tile line fetch
    more and find fewer."""

    radius: int = 1
    along: bool = False
    pair_m: float = 600.0
    min_pair_m: float = 200.0
    extend: float = 1.0
    along_width: float = 1.0
    ring_m: tuple[float, float] = (300.0, 400.0)
    end_turn_deg: float = 25.0

    def __post_init__(self) -> None:
        if not isinstance(self.radius, int) or not 0 <= self.radius <= MAX_RADIUS:
            raise UsageError(f"radius {self.radius} is outside 0..{MAX_RADIUS} tiles")
        if not (math.isfinite(self.pair_m) and 0 <= self.min_pair_m < self.pair_m):
            raise UsageError(f"pair distances {self.min_pair_m}..{self.pair_m} m must satisfy 0 <= min < max")
        if not (math.isfinite(self.extend) and 0 <= self.extend <= 4):
            raise UsageError(f"extend {self.extend} is outside 0..4")
        if not (len(self.ring_m) == 2 and all(math.isfinite(v) for v in self.ring_m) and 0 <= self.ring_m[0] <= self.ring_m[1]):
            raise UsageError(f"ring {self.ring_m} m must be two distances with 0 <= near <= far")
        if not (math.isfinite(self.end_turn_deg) and 0 <= self.end_turn_deg <= 90):
            raise UsageError(f"end turn {self.end_turn_deg} degrees is outside 0..90")
        if not (math.isfinite(self.along_width) and 0 <= self.along_width <= 8):
            raise UsageError(f"along width {self.along_width} tiles is outside 0..8")
        if self.radius == 0 and not self.along:
            raise UsageError("radius 0 without --along adds nothing; give --radius 1 or more, or --along")


@dataclass(frozen=True)
class RoundPlan:
    """One round, computed and not yet written: its blocks and how many detections and
    candidate tiles it came from."""

    blocks: list[Block]
    detections: int
    candidates: int

    @property
    def tiles(self) -> int:
        return sum(b.tiles for b in self.blocks)


@dataclass(frozen=True)
class DensifyReport:
    """A densify call: ``round`` (the number of the round planned, or of the last one
    when nothing was added), ``tiles`` and ``blocks`` added, the detections it started
    from, ``completed``: blocks of an earlier cut-short round put now."""

    round: int
    tiles: int
    blocks: int
    detections: int
    completed: int
    seconds: float


# --- pure tile sets -----------------------------------------------------------------------


def _unique(z: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tiles inside the zoom-``z`` grid, deduplicated, sorted by (x, y)."""
    n = 1 << z
    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    ok = (x >= 0) & (x < n) & (y >= 0) & (y < n)
    keys = np.unique((x[ok] << 32) | y[ok])
    return keys >> 32, keys & 0xFFFFFFFF


def neighbour_tiles(z: int, x: np.ndarray, y: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles within ``radius`` tiles (a square of side 2R+1) of tiles (z, x, y), the tiles
    themselves included."""
    d = np.arange(-radius, radius + 1, dtype=np.int64)
    dx, dy = np.meshgrid(d, d)
    return _unique(z, (np.asarray(x, np.int64)[:, None] + dx.ravel()).ravel(),
                   (np.asarray(y, np.int64)[:, None] + dy.ravel()).ravel())


def _points(z: int, x: np.ndarray, y: np.ndarray, points: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detection tiles inside the grid, deduplicated and sorted by (x, y), and each one's
    point in tile units (``float64[N, 2]``: ``x + fx, y + fy``, ``fx, fy`` in 0..1; the tile
    centre where ``points`` is None; a tile's first point where it repeats)."""
    n = 1 << z
    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    p = np.column_stack([x + 0.5, y + 0.5]) if points is None else np.asarray(points, np.float64).reshape(len(x), 2)
    ok = (x >= 0) & (x < n) & (y >= 0) & (y < n)
    keys, first = np.unique((x[ok] << 32) | y[ok], return_index=True)
    return keys >> 32, keys & 0xFFFFFFFF, p[ok][first]


def _tile_metres(z: int, y: np.ndarray) -> np.ndarray:
    """Ground size (metres) of zoom-``z`` tiles in rows ``y``."""
    n = 1 << z
    lat = np.arctan(np.sinh(np.pi * (1 - 2 * (np.asarray(y, np.float64) + 0.5) / n)))
    return 2 * np.pi * EARTH_RADIUS_M * np.cos(lat) / n


def along_tiles(z: int, x: np.ndarray, y: np.ndarray, settings: DensifySettings,
                points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tiles crossed by the lines through pairs of detections (tiles (z, x, y); ``points``:
    where in them, in tile units, as :func:`_points`; default their centres)
    ``min_pair_m .. pair_m`` apart, each drawn ``extend`` times the pair's distance past
    both detections (a KD-tree finds the pairs; shapely tests the tile squares)."""
    import shapely
    from scipy.spatial import cKDTree

    x, y, pts = _points(z, x, y, points)
    if len(x) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tile_m = float(np.min(_tile_metres(z, y)))  # the smallest tiles: the radius in tiles is the largest
    pairs = cKDTree(pts).query_pairs(settings.pair_m / tile_m, output_type="ndarray")
    if not len(pairs):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    a, b = pts[pairs[:, 0]], pts[pairs[:, 1]]
    ground = np.hypot(*(b - a).T) * _tile_metres(z, (a[:, 1] + b[:, 1]) / 2 - 0.5)
    keep = (ground >= settings.min_pair_m) & (ground <= settings.pair_m)
    a, b = a[keep], b[keep]
    if not len(a):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    p0, p1 = a - settings.extend * (b - a), b + settings.extend * (b - a)
    xs, ys = [], []
    for (x0, y0), (x1, y1) in zip(p0.tolist(), p1.tolist()):
        line: shapely.Geometry = shapely.LineString([(x0, y0), (x1, y1)])
        if settings.along_width > 0:
            line = shapely.buffer(line, settings.along_width / 2, cap_style="flat")
        w_ = settings.along_width
        gx, gy = (g.ravel() for g in np.meshgrid(np.arange(math.floor(min(x0, x1) - w_), math.floor(max(x0, x1) + w_) + 1),
                                                 np.arange(math.floor(min(y0, y1) - w_), math.floor(max(y0, y1) + w_) + 1)))
        hit = shapely.intersects(shapely.box(gx, gy, gx + 1, gy + 1), line)
        xs.append(gx[hit])
        ys.append(gy[hit])
    return _unique(z, np.concatenate(xs), np.concatenate(ys))


def lone_ring_tiles(z: int, x: np.ndarray, y: np.ndarray, settings: DensifySettings,
                    points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where the next tower of a line whose direction is not known stands. Around each
    *lone* detection tile (no other detection ``min_pair_m .. pair_m`` ground metres away)
    the ring of tiles whose centres stand ``ring_m`` (near, far ground metres, widened by
    half a tile's diagonal) from it, in either direction; around each detection at the
    *end* of a line (its partners all on one side), the part of that ring ahead of it,
    within ``end_turn_deg`` of the way the line comes in (a bend: the band through a pair
    runs straight on and misses the tower after an angle tower). Far cheaper than a
    square that reaches as far. The ring is centred on each detection's point (``points``,
    as :func:`along_tiles`; default the tile centres)."""
    from scipy.spatial import cKDTree

    x, y, pts = _points(z, x, y, points)
    if not len(x) or settings.ring_m[1] <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tile_m = _tile_metres(z, y)
    near = cKDTree(pts).query_ball_point(pts, settings.pair_m / float(np.min(tile_m)))
    cos_end = math.cos(math.radians(settings.end_turn_deg))
    xs, ys = [], []
    for i, js in enumerate(near):
        v = pts[js] - pts[i]
        d = np.hypot(*v.T) * tile_m[i]
        v = v[(d >= settings.min_pair_m) & (d <= settings.pair_m)]
        if len(v):
            u = v / np.hypot(*v.T)[:, None]
            ahead = -u.mean(axis=0)
            if np.min(u @ -ahead) <= 0 or np.hypot(*ahead) < 1e-9:
                continue  # partners on both sides: inside a line, the bands cover it
            ahead /= np.hypot(*ahead)
        r_in = max(0.0, settings.ring_m[0] / tile_m[i] - 0.71)
        r_out = settings.ring_m[1] / tile_m[i] + 0.71
        k = int(math.ceil(r_out)) + 1
        g = np.arange(-k, k + 1, dtype=np.int64)
        dx, dy = (a.ravel() for a in np.meshgrid(g, g))
        # from the point to the centres of the tiles around it (the tile's own centre: 0.5, 0.5)
        ox, oy = x[i] + 0.5 - pts[i, 0], y[i] + 0.5 - pts[i, 1]
        rx, ry = dx + ox, dy + oy
        r = np.hypot(rx, ry)
        m = (r >= r_in) & (r <= r_out)
        if len(v):
            m &= (rx * ahead[0] + ry * ahead[1]) >= cos_end * np.maximum(r, 1e-9)
        xs.append(x[i] + dx[m])
        ys.append(y[i] + dy[m])
    if not xs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return _unique(z, np.concatenate(xs), np.concatenate(ys))


def candidate_tiles(z: int, x: np.ndarray, y: np.ndarray, settings: DensifySettings,
                    points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every tile a round would like to have, planned or not: the neighbours of the
    detection tiles (z, x, y), and with ``along`` the tiles along their lines and the
    rings around lone detections (:func:`lone_ring_tiles`), drawn through the detections'
    ``points`` (tile units, :func:`_points`: where a model with positions placed them;
    default the tile centres)."""
    nx_, ny_ = neighbour_tiles(z, x, y, settings.radius)
    if not settings.along:
        return nx_, ny_
    ax, ay = along_tiles(z, x, y, settings, points)
    rx, ry = lone_ring_tiles(z, x, y, settings, points)
    return _unique(z, np.concatenate([nx_, ax, rx]), np.concatenate([ny_, ay, ry]))


# --- against the queue ----------------------------------------------------------------------


def _queued(queue: Any, z: int, x: np.ndarray, y: np.ndarray, zooms: Iterable[int]) -> tuple[np.ndarray, set[int]]:
    """(planned: bool per tile, the queue ids found) for zoom-``z`` tiles, looking up
    their ancestors at ``zooms`` in the queue and testing each found block's tile set."""
    planned = np.zeros(len(x), bool)
    ids: set[int] = set()
    for bz in zooms:
        d = z - bz
        ids.update(tile_id_array(bz, x >> d, y >> d).astype(np.int64).tolist())
    found: set[int] = set()
    if not ids:
        return planned, found
    index = {(int(a) << 32) | int(b): i for i, (a, b) in enumerate(zip(x.tolist(), y.tolist()))}
    for block in queue.blocks_by_id(ids):
        found.add(block.id)
        levels = z - block.z
        x0, y0 = block.x << levels, block.y << levels
        cells = mask_cells(block.mask, levels)
        if cells is None:  # every descendant planned
            planned |= ((x >> levels) == block.x) & ((y >> levels) == block.y)
            continue
        for r, c in zip(cells[0].tolist(), cells[1].tolist()):
            i = index.get(((x0 + c) << 32) | (y0 + r))
            if i is not None:
                planned[i] = True
    return planned, found


def group_blocks(queue: Any, z: int, x: np.ndarray, y: np.ndarray, finest: int, taken: set[int]) -> list[Block]:
    """New blocks for new tiles (z, x, y): grouped by their cell at the ``finest`` block
    zoom; a group whose cell is already a block (``taken``, or found in the queue) moves up
    to the parent cell, merged with the other groups there, until its cell is free; past
    zoom 0 (many rounds over one place) it moves down below ``finest`` instead, to the
    tile's own cell at worst. Blocks in id order."""
    out: list[Block] = []
    cur_x, cur_y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    # up from the finest block zoom to zoom 0, then down below it to the tiles themselves
    # (a tile's own cell is never taken: the tile is not planned)
    for bz in [*range(finest, -1, -1), *range(finest + 1, z + 1)]:
        if not len(cur_x):
            break
        d = z - bz
        cx, cy = cur_x >> d, cur_y >> d
        ids = tile_id_array(bz, cx, cy).astype(np.int64)
        uniq = sorted(set(ids.tolist()))
        taken |= {b.id for b in queue.blocks_by_id([i for i in uniq if i not in taken])}
        busy = np.isin(ids, np.array(sorted(taken), np.int64))
        free_ids = ids[~busy]
        fx, fy, fcx, fcy = cur_x[~busy], cur_y[~busy], cx[~busy], cy[~busy]
        order = np.argsort(free_ids, kind="stable")
        fx, fy, fcx, fcy, free_ids = fx[order], fy[order], fcx[order], fcy[order], free_ids[order]
        starts = np.flatnonzero(np.r_[True, free_ids[1:] != free_ids[:-1]]) if len(free_ids) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(free_ids)]
        for s, e in zip(starts.tolist(), ends.tolist()):
            bx, by = int(fcx[s]), int(fcy[s])
            packed = pack_tiles(d, bx << d, by << d, fx[s:e], fy[s:e])
            out.append(Block(bz, bx, by, e - s, packed))
            taken.add(int(free_ids[s]))
        cur_x, cur_y = cur_x[busy], cur_y[busy]
    if len(cur_x):  # pragma: no cover - a tile's own cell is always free
        raise RuntimeError(f"no free block cell for {len(cur_x)} densified tiles")
    out.sort(key=lambda b: b.id)
    return out


def detection_tiles(sweep: "Sweep", model: str | None, threshold: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(x, y, points, model name)`` of the tiles the model detected (sorted by x, y), and
    each detection's point in tile units (``float64[N, 2]``, :func:`_points`): where the
    model placed it in the tile (a model with positions), else exactly the tile centre."""
    from .detections import check_threshold, choose_model, detections
    from .sql import connect, stream

    threshold = check_threshold(threshold)
    m = choose_model(sweep, model)
    assert m is not None
    con = connect()
    try:
        xs, ys, lons, lats = [], [], [], []
        for batch in stream(detections(sweep, model=model, threshold=threshold, con=con).select("x, y, lon, lat")):
            xs.append(batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64))
            ys.append(batch.column(1).to_numpy(zero_copy_only=False).astype(np.int64))
            lons.append(batch.column(2).to_numpy(zero_copy_only=False).astype(np.float64))
            lats.append(batch.column(3).to_numpy(zero_copy_only=False).astype(np.float64))
    finally:
        con.close()
    if not xs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2)), str(m["name"])
    x, y = np.concatenate(xs), np.concatenate(ys)
    px, py = tile_units_array(sweep.zoom, np.concatenate(lons), np.concatenate(lats))
    centre = (np.abs(px - x - 0.5) < 1e-6) & (np.abs(py - y - 0.5) < 1e-6)  # a tile centre: exactly
    px, py = np.where(centre, x + 0.5, px), np.where(centre, y + 0.5, py)
    x, y, points = _points(sweep.zoom, x, y, np.column_stack([px, py]))
    return x, y, points, str(m["name"])


def finest_block_zoom(sweep: "Sweep") -> int:
    """The zoom of the finest block cells the plan's spec allows (adaptive: the base cells
    of ``block_tiles``, e.g. zoom 14 at zoom 18; fixed: the block zoom). The sweep records
    the finest zoom its blocks *use*, which for a sparse sample can be much coarser."""
    pc = sweep.plan_config
    if "block_tiles" not in pc:
        return sweep.block_zoom
    return sweep.zoom - min(sweep.zoom, (int(pc["block_tiles"]).bit_length() - 1) // 2)


def plan_round(sweep: "Sweep", model: str | None = None, threshold: float | None = None,
               settings: DensifySettings = DensifySettings()) -> tuple[RoundPlan, str]:
    """The next round's blocks (nothing is written): the candidate tiles around the
    model's detections that lie in the area and are not planned yet. A pure function of
    the sweep's area, queue and predictions."""
    from .area import load_area

    z = sweep.zoom
    dx, dy, points, name = detection_tiles(sweep, model, threshold)
    if not len(dx):
        return RoundPlan([], 0, 0), name
    cx, cy = candidate_tiles(z, dx, dy, settings, points)
    geometry = load_area(sweep.area_path).geometry
    import shapely

    shapely.prepare(geometry)
    inside, boundary = _classify(geometry, z, cx, cy)
    keep = inside | boundary
    cx, cy = cx[keep], cy[keep]
    n_candidates = len(cx)
    zooms = range(sweep.block_zoom, min(sweep.block_zoom_min, _min_round_zoom(sweep.path)) - 1, -1)
    planned, found = _queued(sweep.queue, z, cx, cy, zooms)
    nx_, ny_ = cx[~planned], cy[~planned]
    blocks = group_blocks(sweep.queue, z, nx_, ny_, finest_block_zoom(sweep), set(found)) if len(nx_) else []
    return RoundPlan(blocks, len(dx), n_candidates), name


# --- the record -------------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    for stmt in filter(str.strip, _SCHEMA.split(";")):
        db.execute(stmt)
    return db


def rounds(sweep_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The densify rounds recorded in a sweep, in order (empty when there are none)."""
    path = Path(sweep_path) / ROUNDS_FILE
    if not path.is_file():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cur = db.execute("SELECT round, radius, along, model, threshold, detections, tiles, blocks, planned_at FROM rounds ORDER BY round")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def round_totals(sweep_path: str | os.PathLike[str]) -> tuple[int, int]:
    """(tiles, blocks) that densify rounds added to a sweep's plan."""
    rs = rounds(sweep_path)
    return sum(int(r["tiles"]) for r in rs), sum(int(r["blocks"]) for r in rs)


def _min_round_zoom(sweep_path: Path) -> int:
    path = Path(sweep_path) / ROUNDS_FILE
    if not path.is_file():
        return 1 << 30
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT MIN(z) FROM round_blocks").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        db.close()
    return 1 << 30 if row is None or row[0] is None else int(row[0])


def block_rounds(sweep_path: str | os.PathLike[str]) -> dict[int, int]:
    """Queue id -> round for every block a densify round planned (the others: round 0)."""
    path = Path(sweep_path) / ROUNDS_FILE
    if not path.is_file():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {int(i): int(r) for i, r in db.execute("SELECT id, round FROM round_blocks")}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def complete_rounds(sweep: "Sweep") -> int:
    """Put in the queue every recorded round block it lacks (a round cut short between
    its record and its put); returns how many were put. Idempotent."""
    path = sweep.path / ROUNDS_FILE
    if not path.is_file():
        return 0
    db = _connect(path)
    try:
        rows = db.execute("SELECT z, x, y, tiles, mask, priority FROM round_blocks ORDER BY id").fetchall()
    finally:
        db.close()
    return sweep.queue.put((Block(int(z), int(x), int(y), int(n), m), int(p)) for z, x, y, n, m, p in rows)


def _test_kill(point: str) -> None:
    """Test hook: ``TILESWEEP_TEST_KILL_DENSIFY=point`` kills this process with SIGKILL
    there (tests of the accounting after a kill -9 mid-round)."""
    if os.environ.get("TILESWEEP_TEST_KILL_DENSIFY") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def densify(sweep: "Sweep", model: str | None = None, threshold: float | None = None,
            settings: DensifySettings = DensifySettings(), max_rounds: int | None = None) -> DensifyReport:
    """Plan one densify round into ``sweep``: record it, then queue its blocks. Nothing is
    added when the sweep already has ``max_rounds`` rounds or the round finds no new tile
    (``round`` is then the last round's number, ``tiles`` 0)."""


    if max_rounds is not None and max_rounds < 1:
        raise UsageError(f"rounds {max_rounds} must be at least 1")
    started = time.perf_counter()
    completed = complete_rounds(sweep)
    done = rounds(sweep.path)
    last = done[-1]["round"] if done else 0
    if max_rounds is not None and last >= max_rounds:
        return DensifyReport(last, 0, 0, 0, completed, time.perf_counter() - started)
    plan, name = plan_round(sweep, model, threshold, settings)
    if not plan.blocks:
        return DensifyReport(last, 0, 0, plan.detections, completed, time.perf_counter() - started)
    coarsest, finest = min(b.z for b in plan.blocks), max(b.z for b in plan.blocks)
    if coarsest < sweep.block_zoom_min or finest > sweep.block_zoom:  # the store probes block zooms in this range
        def widen(cfg: dict[str, Any]) -> bool:  # on what is recorded now: another machine may have widened it too
            pc = cfg["plan"]
            had = "block_zoom_min" in pc
            lo, hi = int(pc.get("block_zoom_min", pc["block_zoom"])), int(pc["block_zoom"])
            pc["block_zoom_min"], pc["block_zoom"] = min(coarsest, lo), max(finest, hi)
            return (pc["block_zoom_min"], pc["block_zoom"]) != (lo, hi) or not had

        sweep.update_config(widen)
    seed = int(sweep.plan_config.get("seed", 0))
    prio = block_priority_array(seed, np.array([b.z for b in plan.blocks]), np.array([b.x for b in plan.blocks]),
                                np.array([b.y for b in plan.blocks]))
    r = last + 1
    db = _connect(sweep.path / ROUNDS_FILE)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (r, settings.radius, int(settings.along), name, threshold, plan.detections, plan.tiles,
                        len(plan.blocks), time.time()))
            db.executemany("INSERT INTO round_blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           [(b.id, r, b.z, b.x, b.y, b.tiles, b.mask, int(p)) for b, p in zip(plan.blocks, prio.tolist())])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.close()
    _test_kill("recorded")
    sweep.queue.put((b, int(p)) for b, p in zip(plan.blocks, prio.tolist()))
    return DensifyReport(r, plan.tiles, len(plan.blocks), plan.detections, completed, time.perf_counter() - started)
