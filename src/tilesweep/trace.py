"""Tracing power lines: detections (points with scores) joined into polylines.

Pure functions, no I/O. The model says which *tiles* hold a tower; a tower can light up
its neighbours too, and the points are tile centres, so:

1. **Towers**: detections closer than ``merge_m`` are one tower (connected components of a
   KD-tree's close pairs, ``scipy.spatial.cKDTree`` + ``networkx``), placed at the
   score-weighted mean of its points, scored by the highest.
2. **Candidate spans**: pairs of towers at most ``max_span_m`` apart (the KD-tree again).
   A span is *supported* at an end when a third tower continues it almost straight
   (turn <= ``max_turn_deg``) at a similar spacing (ratio within ``1 / max_ratio ..
   max_ratio``): towers of one line stand roughly evenly along a near-straight path.
3. **Linking**: spans are taken best first (supported at both ends, then one, then none;
   shorter first), each accepted when both towers have fewer than two spans, it closes no
   cycle (``networkx.utils.UnionFind``), and it turns and spaces like the span it joins at
   each end. A missing tower leaves a double span, which still links (``max_span_m``
   covers it; the spacing check allows twice the span).
4. **Lines**: the components are paths, walked end to end (``networkx``); those with at
   least ``min_towers`` towers are lines, smoothed along their length
   (``scipy.signal.savgol_filter``, which takes out most of the tile-centre jitter and
   keeps the bends), as ``shapely`` LineStrings in degrees.

Distances are ground metres: Web-Mercator metres times ``cos(latitude)``, which is exact
enough over the few hundred metres between towers. The result depends only on the set of
detections, not their order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from .errors import UsageError
from .tiles import EARTH_RADIUS_M


@dataclass(frozen=True)
class TraceSettings:
    """How detections become lines.

    merge_m: detections closer than this (ground metres, > 0) are one tower; the default
    joins the centres of neighbouring zoom-18 tiles (diagonal ~150 m at 47 degrees).
    max_span_m: the longest span between two towers of a line (> merge_m), a missing tower
    included (two spans of up to 450 m). max_turn_deg: the largest turn at a tower (0..90).
    max_ratio: how much longer one span may be than the next (>= 1; a gap of one missing
    tower doubles a span, and is allowed on top). min_towers: towers a line needs (>= 2).
    smooth: towers per smoothing window (odd, 0 or 1: none; >= 5 fits a parabola)."""

    merge_m: float = 160.0
    max_span_m: float = 1000.0
    max_turn_deg: float = 35.0
    max_ratio: float = 1.6
    min_towers: int = 3
    smooth: int = 5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.merge_m) and self.merge_m > 0):
            raise UsageError(f"merge distance {self.merge_m} m must be > 0")
        if not (math.isfinite(self.max_span_m) and self.max_span_m > self.merge_m):
            raise UsageError(f"max span {self.max_span_m} m must be larger than the merge distance {self.merge_m} m")
        if not 0 <= self.max_turn_deg <= 90:
            raise UsageError(f"max turn {self.max_turn_deg} degrees is outside 0..90")
        if not (math.isfinite(self.max_ratio) and self.max_ratio >= 1):
            raise UsageError(f"max span ratio {self.max_ratio} must be >= 1")
        if not isinstance(self.min_towers, int) or self.min_towers < 2:
            raise UsageError(f"min towers {self.min_towers} must be an integer >= 2")
        if not isinstance(self.smooth, int) or self.smooth < 0 or (self.smooth > 1 and self.smooth % 2 == 0):
            raise UsageError(f"smoothing window {self.smooth} must be 0, 1 or an odd number of towers")


class Towers(NamedTuple):
    """Towers found from detections: position (degrees), score (0..1) and how many
    detections each merges."""

    lon: np.ndarray
    lat: np.ndarray
    score: np.ndarray
    detections: np.ndarray


class TracedLine(NamedTuple):
    """One traced line: ``geometry`` a shapely LineString (lon, lat degrees, west/east end
    first as traced), ``towers`` it joins, ``length_m`` along the ground, ``mean_score`` of
    its towers and ``confidence`` in 0..1 (see :func:`line_confidence`)."""

    geometry: object
    towers: int
    length_m: float
    mean_score: float
    confidence: float


def _to_metres(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Web-Mercator metres (x east, y north)."""
    x = np.radians(lon) * EARTH_RADIUS_M
    y = np.log(np.tan(np.pi / 4 + np.radians(lat) / 2)) * EARTH_RADIUS_M
    return x, y


def _to_degrees(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lon = np.degrees(x / EARTH_RADIUS_M)
    lat = np.degrees(2 * np.arctan(np.exp(y / EARTH_RADIUS_M)) - np.pi / 2)
    return lon, lat


def _ground_frame(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Points in a metric frame: Mercator metres scaled by cos of the points' mean
    latitude (ground metres near them), and that scale."""
    x, y = _to_metres(lon, lat)
    k = math.cos(math.radians(float(np.mean(lat)))) if len(lat) else 1.0
    return x * k, y * k, k


def find_towers(lon: Sequence[float], lat: Sequence[float], score: Sequence[float] | None = None,
                merge_m: float = TraceSettings.merge_m) -> Towers:
    """Merge detections closer than ``merge_m`` ground metres (single linkage) into
    towers at their score-weighted mean, in a canonical order (west to east, then south
    to north)."""
    from networkx.utils import UnionFind
    from scipy.spatial import cKDTree

    lon_a = np.asarray(lon, np.float64)
    lat_a = np.asarray(lat, np.float64)
    s = np.ones(len(lon_a)) if score is None else np.asarray(score, np.float64)
    if not (len(lon_a) == len(lat_a) == len(s)):
        raise ValueError("lon, lat and score must have the same length")
    if not len(lon_a):
        z = np.zeros(0)
        return Towers(z, z, z, np.zeros(0, np.int64))
    order = np.lexsort((lat_a, lon_a))
    lon_a, lat_a, s = lon_a[order], lat_a[order], s[order]
    gx, gy, _ = _ground_frame(lon_a, lat_a)
    pairs = cKDTree(np.column_stack([gx, gy])).query_pairs(merge_m, output_type="ndarray")
    uf = UnionFind(range(len(lon_a)))
    for a, b in pairs.tolist():
        uf.union(a, b)
    groups = sorted((sorted(g) for g in uf.to_sets()), key=lambda g: g[0])
    out_lon, out_lat, out_s, out_n = [], [], [], []
    mx, my = _to_metres(lon_a, lat_a)
    for g in groups:
        w = np.maximum(s[g], 1e-6)
        cx, cy = np.average(mx[g], weights=w), np.average(my[g], weights=w)
        lo, la = _to_degrees(np.array([cx]), np.array([cy]))
        out_lon.append(float(lo[0]))
        out_lat.append(float(la[0]))
        out_s.append(float(s[g].max()))
        out_n.append(len(g))
    lon_t, lat_t = np.array(out_lon), np.array(out_lat)
    o = np.lexsort((lat_t, lon_t))
    return Towers(lon_t[o], lat_t[o], np.array(out_s)[o], np.array(out_n, np.int64)[o])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def line_confidence(towers: int, mean_score: float, spans: np.ndarray) -> float:
    """Confidence that a chain of towers is a line, in 0..1: the towers' mean score, times
    ``1 - exp(-(towers - 1) / 3)`` (more towers, more sure), times ``exp(-cv**2)`` where
    cv is the spans' coefficient of variation (evenly spaced towers, more sure)."""
    if towers < 2 or not len(spans):
        return 0.0
    cv = float(np.std(spans) / np.mean(spans)) if np.mean(spans) > 0 else 1.0
    return float(np.clip(mean_score, 0, 1) * (1 - math.exp(-(towers - 1) / 3)) * math.exp(-cv * cv))


def link_towers(x: np.ndarray, y: np.ndarray, settings: TraceSettings = TraceSettings()) -> list[list[int]]:
    """Chains of tower indices (each a path, in order along it) from tower positions in a
    metric frame (metres): see the module docstring, steps 2 to 4 (without smoothing).
    Chains of a single tower are included."""
    import networkx as nx
    from networkx.utils import UnionFind
    from scipy.spatial import cKDTree

    n = len(x)
    if n == 0:
        return []
    pts = np.column_stack([x, y])
    pairs = cKDTree(pts).query_pairs(settings.max_span_m, output_type="ndarray")
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if len(pairs) else pairs.reshape(0, 2)
    cos_turn = math.cos(math.radians(settings.max_turn_deg))
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for a, b in pairs.tolist():
        nbrs[a].append(b)
        nbrs[b].append(a)

    def fits(prev: int, at: int, nxt: int, gap_ok: bool = True) -> bool:
        """Whether prev -> at -> nxt turns little and keeps the spacing."""
        u, v = pts[at] - pts[prev], pts[nxt] - pts[at]
        lu, lv = float(np.hypot(*u)), float(np.hypot(*v))
        if lu == 0 or lv == 0 or float(np.dot(u, v)) / (lu * lv) < cos_turn:
            return False
        r = max(lu, lv) / min(lu, lv)
        return r <= settings.max_ratio or (gap_ok and r <= 2 * settings.max_ratio)

    def support_at(at: int, other: int) -> int:
        return int(any(fits(w, at, other, gap_ok=False) for w in nbrs[at] if w != other))

    cands = []
    for a, b in pairs.tolist():
        d = float(np.hypot(*(pts[a] - pts[b])))
        cands.append((-(support_at(a, b) + support_at(b, a)), d, a, b))
    cands.sort()
    g = nx.Graph()
    g.add_nodes_from(range(n))
    uf = UnionFind(range(n))
    for _, _, a, b in cands:
        if g.degree(a) >= 2 or g.degree(b) >= 2 or uf[a] == uf[b]:
            continue
        if any(not fits(w, a, b) for w in g.neighbors(a)) or any(not fits(a, b, w) for w in g.neighbors(b)):
            continue
        g.add_edge(a, b)
        uf.union(a, b)
    chains = []
    for comp in nx.connected_components(g):
        ends = sorted(v for v in comp if g.degree(v) <= 1)
        chains.append(list(nx.dfs_preorder_nodes(g, ends[0])))
    chains.sort(key=lambda c: min(c))
    return chains


def trace_lines(lon: Sequence[float], lat: Sequence[float], score: Sequence[float] | None = None,
                settings: TraceSettings = TraceSettings()) -> list[TracedLine]:
    """Lines traced through detections at (``lon``, ``lat``) degrees with scores 0..1
    (default 1), best confidence first (ties: west first). Deterministic: the same set of
    detections gives the same lines in any order."""
    import shapely
    from scipy.signal import savgol_filter

    towers = find_towers(lon, lat, score, settings.merge_m)
    if len(towers.lon) < settings.min_towers:
        return []
    mx, my = _to_metres(towers.lon, towers.lat)
    k = math.cos(math.radians(float(np.mean(towers.lat))))
    out = []
    for chain in link_towers(mx * k, my * k, settings):
        if len(chain) < settings.min_towers:
            continue
        cx, cy = mx[chain], my[chain]
        if cx[0] > cx[-1] or (cx[0] == cx[-1] and cy[0] > cy[-1]):
            cx, cy, chain = cx[::-1], cy[::-1], chain[::-1]
        win = min(settings.smooth, len(chain) if len(chain) % 2 else len(chain) - 1)
        if win >= 3:
            order = 2 if win >= 5 else 1
            cx, cy = savgol_filter(cx, win, order, mode="interp"), savgol_filter(cy, win, order, mode="interp")
        lo, la = _to_degrees(cx, cy)
        ground = np.hypot(np.diff(mx[chain]), np.diff(my[chain])) * np.cos(np.radians(towers.lat[chain][:-1]))
        mean_score = float(np.mean(towers.score[chain]))
        out.append(TracedLine(
            shapely.linestrings(np.column_stack([lo, la])), len(chain), float(ground.sum()),
            mean_score, line_confidence(len(chain), mean_score, ground),
        ))
    out.sort(key=lambda t: (-t.confidence, t.geometry.coords[0]))  # type: ignore[attr-defined]
    return out
