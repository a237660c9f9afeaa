"""High-voltage power lines of the simulated world: corridors, circuits, towers.

Lines are generated per *home cell*: the Web-Mercator square is cut into cells of
``CELL_M`` metres; each cell, from a generator seeded by (world seed, cell), holds a few
corridors. A corridor is a polyline of 2..4 straight segments (3..9 km each, turning by up
to ~23 degrees at each angle tower) that starts inside its home cell and may run into the
neighbours, carrying 1..3 parallel circuits. Each circuit is one line (one ``line_id``):
towers at every vertex, and each segment divided into equal spans of 250..450 m on the
ground. Towers standing in water are left out (the span over a lake is longer).

Because a corridor reaches at most ``REACH_M`` from its home cell, the towers of any area
are found by generating only the cells within ``REACH_M`` of it: no world enumeration,
and the renderer and :func:`towers_in_bbox` share one code path, so truth and pixels agree
exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable
from functools import lru_cache

import numpy as np

from ..tiles import EARTH_RADIUS_M, ORIGIN_SHIFT_M

CELL_M = 20_000.0
"""Side of a home cell, Web-Mercator metres."""

SEGMENT_M = (3_000.0, 9_000.0)
"""Length range of one straight corridor segment, Web-Mercator metres."""

MAX_SEGMENTS = 4
CIRCUIT_GAP_M = 55.0
"""Ground distance between the parallel circuits of one corridor."""

SPAN_M = (250.0, 450.0)
"""Allowed ground length of a span (tower to tower)."""

REACH_M = MAX_SEGMENTS * SEGMENT_M[1] + 500.0
"""How far (Mercator metres) a line can reach from its home cell."""

CORRIDORS_PER_CELL = 20.0
"""Mean corridors per cell at ``density=1`` (about 5% of zoom-18 tiles hold a tower)."""

MAX_CORRIDORS = 48
N_CELLS = int(math.ceil(2 * ORIGIN_SHIFT_M / CELL_M))
WORLD_M = 2 * ORIGIN_SHIFT_M

WaterTest = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``water(X, Y) -> bool array``: whether each point (renderer metres) lies in water."""


def scale_factor(y_merc: np.ndarray | float) -> np.ndarray | float:
    """Mercator metres per ground metre at Mercator northing ``y`` (1 / cos(latitude))."""
    return np.cosh(np.asarray(y_merc) / EARTH_RADIUS_M)


@dataclass(frozen=True)
class CellLines:
    """The lines whose home is one cell, as flat arrays (world metres X east, Y south)."""

    # towers
    tx: np.ndarray  # X, metres from the west edge of the world
    ty: np.ndarray  # Y, metres from the north edge of the world
    angle: np.ndarray  # direction of the line at the tower, radians, in the X/Y frame
    line_id: np.ndarray  # int64
    tower_id: np.ndarray  # int64
    # corridor polylines (one per circuit): list of (N, 2) vertex arrays in X/Y and line ids
    polylines: tuple[np.ndarray, ...]
    poly_line_ids: tuple[int, ...]
    bbox: tuple[float, float, float, float]  # X0, Y0, X1, Y1 of everything (towers + lines)


def _offset_polyline(v: np.ndarray, d: float) -> np.ndarray:
    """Parallel polyline at distance ``d`` (left of travel), mitred at the vertices."""
    seg = np.diff(v, axis=0)
    n = np.stack([-seg[:, 1], seg[:, 0]], axis=1)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    out = np.empty_like(v)
    out[0] = v[0] + d * n[0]
    out[-1] = v[-1] + d * n[-1]
    for i in range(1, len(v) - 1):
        m = n[i - 1] + n[i]
        m /= np.linalg.norm(m)
        out[i] = v[i] + m * d / float(np.dot(m, n[i]))
    return out


def _towers_along(v: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tower positions (N, 2) and directions along polyline ``v`` (world metres)."""
    pts = []
    angs = []
    heading = np.arctan2(np.diff(v[:, 1]), np.diff(v[:, 0]))
    for j in range(len(v) - 1):
        a, b = v[j], v[j + 1]
        length = float(np.hypot(*(b - a)))
        k = float(scale_factor(ORIGIN_SHIFT_M - 0.5 * (a[1] + b[1])))
        ground = length / k
        target = rng.uniform(280.0, 420.0)
        n = max(1, int(round(ground / target)))
        n = max(n, int(math.ceil(ground / SPAN_M[1])))
        t = np.arange(n) / n
        pts.append(a[None, :] + t[:, None] * (b - a)[None, :])
        seg_ang = np.full(n, heading[j])
        if j > 0:  # angle tower: bisect the turn
            h0, h1 = heading[j - 1], heading[j]
            seg_ang[0] = h0 + math.remainder(h1 - h0, 2 * math.pi) / 2
        angs.append(seg_ang)
    pts.append(v[-1][None, :])
    angs.append(np.array([heading[-1]]))
    return np.concatenate(pts), np.concatenate(angs)


def generate_cell(seed: int, cx: int, cy: int, density: float, water: WaterTest) -> CellLines:
    """All lines of home cell (cx, cy). ``water(X, Y) -> bool array`` drops towers in water."""
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFF, (seed >> 48) & 0xFFFF, cx, cy, 0x7011])
    lam = CORRIDORS_PER_CELL * density * (0.6 + 0.8 * rng.random())
    n_corr = min(MAX_CORRIDORS, int(rng.poisson(lam))) if lam > 0 else 0
    txs, tys, angs, lids, tids = [], [], [], [], []
    polys: list[np.ndarray] = []
    poly_ids: list[int] = []
    cell_index = cy * N_CELLS + cx
    for c in range(n_corr):
        start = np.array([(cx + rng.random()) * CELL_M, (cy + rng.random()) * CELL_M])
        heading = rng.uniform(0, 2 * math.pi)
        nseg = int(rng.integers(2, MAX_SEGMENTS + 1))
        verts = [start]
        for _ in range(nseg):
            length = rng.uniform(*SEGMENT_M)
            verts.append(verts[-1] + length * np.array([math.cos(heading), math.sin(heading)]))
            heading += rng.uniform(-0.4, 0.4)
        v = np.array(verts)
        u = rng.random()
        n_circ = 1 if u < 0.55 else (2 if u < 0.88 else 3)
        k0 = float(scale_factor(ORIGIN_SHIFT_M - start[1]))
        for ci in range(n_circ):
            d = (ci - (n_circ - 1) / 2) * CIRCUIT_GAP_M * k0
            vc = _offset_polyline(v, d) if d else v
            line_id = (cell_index * MAX_CORRIDORS + c) * 4 + ci
            pts, ang = _towers_along(vc, rng)
            tid = line_id * 4096 + np.arange(len(pts), dtype=np.int64)
            inside = (pts[:, 0] >= 0) & (pts[:, 0] < WORLD_M) & (pts[:, 1] >= 0) & (pts[:, 1] < WORLD_M)
            keep = inside
            txs.append(pts[keep, 0])
            tys.append(pts[keep, 1])
            angs.append(ang[keep])
            lids.append(np.full(int(keep.sum()), line_id, dtype=np.int64))
            tids.append(tid[keep])
            polys.append(vc)
            poly_ids.append(line_id)
    if txs:
        # towers standing in water are left out (one batched lookup per cell)
        px, py = np.concatenate(txs), np.concatenate(tys)
        dry = ~water(px, py) if len(px) else np.zeros(0, bool)
        bounds = np.cumsum([0] + [len(a) for a in txs])
        for i in range(len(txs)):
            m = dry[bounds[i]:bounds[i + 1]]
            txs[i], tys[i], angs[i], lids[i], tids[i] = txs[i][m], tys[i][m], angs[i][m], lids[i][m], tids[i][m]
    if polys:
        allv = np.concatenate(polys)
        bbox = (float(allv[:, 0].min()), float(allv[:, 1].min()), float(allv[:, 0].max()), float(allv[:, 1].max()))
    else:
        bbox = (0.0, 0.0, -1.0, -1.0)

    def cat(a: list[np.ndarray], dt: type[np.generic]) -> np.ndarray:
        return np.concatenate(a).astype(dt) if a else np.zeros(0, dt)

    return CellLines(
        cat(txs, np.float64), cat(tys, np.float64), cat(angs, np.float64),
        cat(lids, np.int64), cat(tids, np.int64), tuple(polys), tuple(poly_ids), bbox,
    )


class PowerLines:
    """The power lines of one world: cached per cell, queried by box."""

    def __init__(self, seed: int, density: float, water: WaterTest) -> None:
        self.seed = seed
        self.density = density
        self._water = water
        self.cell = lru_cache(maxsize=4096)(self._cell)

    def _cell(self, cx: int, cy: int) -> CellLines:
        return generate_cell(self.seed, cx, cy, self.density, self._water)

    def cells_near(self, x0: float, y0: float, x1: float, y1: float) -> list[CellLines]:
        """Cells whose lines may touch the box (world metres)."""
        c0 = max(0, int(math.floor((x0 - REACH_M) / CELL_M)))
        c1 = min(N_CELLS - 1, int(math.floor((x1 + REACH_M) / CELL_M)))
        r0 = max(0, int(math.floor((y0 - REACH_M) / CELL_M)))
        r1 = min(N_CELLS - 1, int(math.floor((y1 + REACH_M) / CELL_M)))
        out = []
        for cy in range(r0, r1 + 1):
            for cx in range(c0, c1 + 1):
                cl = self.cell(cx, cy)
                bx0, by0, bx1, by1 = cl.bbox
                if bx1 >= x0 and bx0 <= x1 and by1 >= y0 and by0 <= y1:
                    out.append(cl)
        return out

    def towers_in_box(self, x0: float, y0: float, x1: float, y1: float) -> dict[str, np.ndarray]:
        """Towers with x0 <= X < x1 and y0 <= Y < y1 (world metres), sorted by tower id."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tx", "ty", "angle", "line_id", "tower_id")}
        for cl in self.cells_near(x0, y0, x1, y1):
            m = (cl.tx >= x0) & (cl.tx < x1) & (cl.ty >= y0) & (cl.ty < y1)
            if m.any():
                for k in parts:
                    parts[k].append(getattr(cl, k)[m])
        out = {k: (np.concatenate(v) if v else np.zeros(0, np.int64 if k in ("line_id", "tower_id") else np.float64)) for k, v in parts.items()}
        order = np.argsort(out["tower_id"], kind="stable")
        return {k: v[order] for k, v in out.items()}

    def segments_in_box(self, x0: float, y0: float, x1: float, y1: float) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Straight corridor segments (a, b, line_id) whose bbox touches the box."""
        out = []
        for cl in self.cells_near(x0, y0, x1, y1):
            for v, lid in zip(cl.polylines, cl.poly_line_ids):
                for j in range(len(v) - 1):
                    a, b = v[j], v[j + 1]
                    if min(a[0], b[0]) <= x1 and max(a[0], b[0]) >= x0 and min(a[1], b[1]) <= y1 and max(a[1], b[1]) >= y0:
                        out.append((a, b, lid))
        return out

    def spans_in_box(self, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float, float, float, int]]:
        """Spans between consecutive standing towers of a line whose bbox touches the box."""
        out = []
        for cl in self.cells_near(x0, y0, x1, y1):
            if len(cl.tx) < 2:
                continue
            same = cl.line_id[1:] == cl.line_id[:-1]
            ax, ay, bx, by = cl.tx[:-1], cl.ty[:-1], cl.tx[1:], cl.ty[1:]
            m = same & (np.minimum(ax, bx) <= x1) & (np.maximum(ax, bx) >= x0) & (np.minimum(ay, by) <= y1) & (np.maximum(ay, by) >= y0)
            for i in np.flatnonzero(m):
                out.append((float(ax[i]), float(ay[i]), float(bx[i]), float(by[i]), int(cl.line_id[i])))
        return out
