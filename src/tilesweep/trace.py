"""Tracing power lines: detections (points with scores) joined into polylines.

Pure functions, no I/O. The model says which *tiles* hold a tower; a tower can light up
its neighbours too, and the points are tile centres, so:

1. **Towers**: detections closer than ``merge_m`` are one tower (complete linkage,
   ``scipy.cluster.hierarchy``), placed at the score-weighted mean of its points, scored
   by the highest.
2. **Runs** (:func:`find_segments`): towers of one line stand roughly evenly along a
   near-straight path. Greedily, the line through two towers (a ``cKDTree``'s pairs) with
   the most towers within ``tolerance_m`` of it and no gap over ``max_gap_m`` is a run,
   refitted, its towers taken, again while a run holds ``min_towers``. Each run is then
   carried on at its ends by a tower left over within twice the tolerance (a tile centre
   puts a line's last tower up to ~70 m off it), and towers still left over that stand
   ``min_pair_m .. max_gap_m`` apart are paired into two-tower runs.
3. **Joining** (:func:`join_segments`): run ends at most ``max_span_m`` apart whose
   directions turn by at most ``max_turn_deg`` join, nearest first, each end once, no
   cycle (``networkx``): a bend, or a gap where towers were missed.
4. **Lines**: each chain of runs is drawn through the runs' fitted lines, joined at their
   intersections, as a ``shapely`` LineString in degrees, with a confidence.

Distances are ground metres: Web-Mercator metres times ``cos(latitude)``, which is exact
enough over the few hundred metres between towers. The result depends only on the set of
detections, not their order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from .errors import UsageError
from .tiles import EARTH_RADIUS_M

if TYPE_CHECKING:
    from shapely import LineString


@dataclass(frozen=True)
class TraceSettings:
    """How detections become lines.

    merge_m: detections closer than this (ground metres, > 0; complete linkage, so a
    group is at most this wide) are one tower. The default merges nothing at zoom 18
    (tile centres are >= ~100 m apart): a tower that lights up its neighbour tile gives two
    points on its line, which the runs below absorb, while merging them would pull towers
    of parallel circuits together. tolerance_m: how far (> 0)
    a tower may stand from its line's straight run: tile centres are up to half a tile
    off, and parallel circuits 55 m apart are traced as one corridor. max_gap_m: the
    longest gap between two towers of one straight run (> merge_m; spans are 250..450 m).
    max_span_m: the longest gap (>= max_gap_m) between two runs joined into one line, at a
    bend or across a missing tower (two spans). max_turn_deg: the
    largest turn where two runs join (0..90). min_towers: towers a run needs (>= 2).
    min_pair_m: towers left on no run that stand ``min_pair_m .. max_gap_m`` apart
    (0 <= min_pair_m < max_gap_m; 0: none) are paired into two-tower runs, which may
    join other runs or stand alone: with them the line recall of benchmarks/lines.py's
    areas' tile centres gains 4-6 points, the demo model's dense full sweep 2, at a point
    or two of precision."""

    merge_m: float = 60.0
    tolerance_m: float = 45.0
    max_gap_m: float = 550.0
    max_span_m: float = 1000.0
    max_turn_deg: float = 35.0
    min_towers: int = 3
    min_pair_m: float = 200.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.merge_m) and self.merge_m > 0):
            raise UsageError(f"merge distance {self.merge_m} m must be > 0")
        if not (math.isfinite(self.tolerance_m) and self.tolerance_m > 0):
            raise UsageError(f"tolerance {self.tolerance_m} m must be > 0")
        if not (math.isfinite(self.max_gap_m) and self.max_gap_m > self.merge_m):
            raise UsageError(f"max gap {self.max_gap_m} m must be larger than the merge distance {self.merge_m} m")
        if not (math.isfinite(self.max_span_m) and self.max_span_m >= self.max_gap_m):
            raise UsageError(f"max span {self.max_span_m} m must be at least the max gap {self.max_gap_m} m")
        if not 0 <= self.max_turn_deg <= 90:
            raise UsageError(f"max turn {self.max_turn_deg} degrees is outside 0..90")
        if not isinstance(self.min_towers, int) or self.min_towers < 2:
            raise UsageError(f"min towers {self.min_towers} must be an integer >= 2")
        if not (math.isfinite(self.min_pair_m) and 0 <= self.min_pair_m < self.max_gap_m):
            raise UsageError(f"min pair distance {self.min_pair_m} m must be >= 0 and below the max gap {self.max_gap_m} m")


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

    geometry: LineString
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


def find_towers(lon: npt.ArrayLike, lat: npt.ArrayLike, score: npt.ArrayLike | None = None,
                merge_m: float = TraceSettings.merge_m) -> Towers:
    """Merge detections closer than ``merge_m`` ground metres (single linkage) into
    towers at their score-weighted mean, in a canonical order (west to east, then south
    to north)."""
    from scipy.cluster.hierarchy import fcluster, linkage

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
    if len(lon_a) > 1:
        # complete linkage: a group is at most merge_m across, so the towers of parallel
        # circuits, or of one line, never chain into one
        labels = fcluster(linkage(np.column_stack([gx, gy]), method="complete"), t=merge_m, criterion="distance")
    else:
        labels = np.ones(1, np.int64)
    groups = sorted((np.flatnonzero(labels == k).tolist() for k in np.unique(labels)), key=lambda g: g[0])
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


def line_confidence(towers: int, mean_score: float, spans: np.ndarray) -> float:
    """Confidence that a chain of towers is a line, in 0..1: the towers' mean score, times
    ``1 - exp(-(towers - 1) / 3)`` (more towers, more sure), times ``exp(-cv**2)`` where
    cv is the spans' coefficient of variation (evenly spaced towers, more sure)."""
    if towers < 2 or not len(spans):
        return 0.0
    cv = float(np.std(spans) / np.mean(spans)) if np.mean(spans) > 0 else 1.0
    return float(np.clip(mean_score, 0, 1) * (1 - math.exp(-(towers - 1) / 3)) * math.exp(-cv * cv))


def find_segments(x: np.ndarray, y: np.ndarray, settings: TraceSettings = TraceSettings(), chunk: int = 2048) -> list[np.ndarray]:
    """Straight runs of towers: tower indices in order along each run, from positions in
    a metric frame (metres). Greedy and deterministic: of the lines through two towers at
    most ``max_gap_m`` apart (a KD-tree's pairs), the one with the most towers within
    ``tolerance_m`` of it in one run (no gap over ``max_gap_m``; ties: the smaller sum of
    distances, then the first pair) is taken, its towers leave the pool, and again, while
    a run holds ``min_towers``. Cost: pairs x towers per run found (pairs in chunks)."""
    from scipy.spatial import cKDTree

    n = len(x)
    pts = np.column_stack([x, y]).astype(np.float64)
    if n < (2 if settings.min_pair_m > 0 else settings.min_towers):
        return []
    pairs = cKDTree(pts).query_pairs(settings.max_span_m, output_type="ndarray")  # longer baselines aim better
    if not len(pairs):
        return []
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    fresh = np.ones(n, bool)  # towers on no run yet: runs are seeded and counted by these
    idx = np.arange(n)
    out: list[np.ndarray] = []
    while True:
        live = pairs[fresh[pairs[:, 0]] & fresh[pairs[:, 1]]]
        if not len(live) or int(fresh.sum()) < settings.min_towers:
            break
        best: tuple[int, float, int] | None = None
        best_members: np.ndarray | None = None
        for c0 in range(0, len(live), chunk):
            pa, pb = live[c0 : c0 + chunk, 0], live[c0 : c0 + chunk, 1]
            d = pts[pb] - pts[pa]
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            rel = pts[None, :, :] - pts[pa][:, None, :]
            t = rel[..., 0] * d[:, None, 0] + rel[..., 1] * d[:, None, 1]
            e = np.abs(rel[..., 0] * -d[:, None, 1] + rel[..., 1] * d[:, None, 0])
            t = np.where(e <= settings.tolerance_m, t, np.inf)
            order = np.argsort(t, axis=1, kind="stable")
            ts = np.take_along_axis(t, order, axis=1)
            finite = np.isfinite(ts)
            with np.errstate(invalid="ignore"):
                gaps = np.diff(ts, axis=1)
            breaks = ~(gaps <= settings.max_gap_m)  # nan / inf gaps break too
            run = np.concatenate([np.zeros((len(ts), 1), np.int64), np.cumsum(breaks, axis=1)], axis=1)
            pos_a = np.argmax(order == pa[:, None], axis=1)
            same = (run == run[np.arange(len(ts)), pos_a][:, None]) & finite
            # towers already on a run (a crossing, a shared tower) carry a run on but do not count
            count = (same & fresh[order]).sum(axis=1)
            err = np.where(same, np.take_along_axis(e, order, axis=1), 0.0).sum(axis=1)
            for k in np.lexsort((np.arange(len(count)), err, -count))[:1].tolist():
                cand = (int(count[k]), float(err[k]), c0 + k)
                if best is None or (-cand[0], cand[1], cand[2]) < (-best[0], best[1], best[2]):
                    best = cand
                    best_members = idx[order[k][same[k]]]
        if best is None or best[0] < settings.min_towers:
            break
        assert best_members is not None
        for _ in range(2):  # refit the run's line to all its towers and take the run again
            best_members = _run_near(pts, best_members, settings)
        out.append(best_members)
        fresh[best_members] = False
    out = [_extend_run(pts, run, fresh, settings) for run in out]
    if settings.min_pair_m > 0:
        out.extend(_leftover_pairs(pts, pairs, fresh, settings))
    return out


def _extend_run(pts: np.ndarray, run: np.ndarray, fresh: np.ndarray, settings: TraceSettings) -> np.ndarray:
    """A run carried on at both ends by towers left on no run: the nearest one past the
    end (by ``min_pair_m / 2`` .. ``max_gap_m`` along the run's fitted line) within twice
    ``tolerance_m`` of it, again while one is found (the fit is refitted each time). A
    line's last tower often stands where a tile centre's error takes it just past the
    tolerance, with no tower beyond it to make a run of its own. Marks them taken in
    ``fresh``."""
    run = np.asarray(run)
    for _ in range(2):  # the far end, then (reversed) the near end
        while True:
            c, u, _, _ = _fit(pts[run])
            if float((pts[run[-1]] - pts[run[0]]) @ u) < 0:
                u = -u
            rel = pts - pts[run[-1]]
            t = rel @ u
            e = np.abs(rel @ np.array([-u[1], u[0]]) + float((pts[run[-1]] - c) @ np.array([-u[1], u[0]])))
            ok = fresh & (t >= settings.min_pair_m / 2) & (t <= settings.max_gap_m) & (e <= 2 * settings.tolerance_m)
            if not ok.any():
                break
            k = int(np.flatnonzero(ok)[np.argmin(t[ok])])
            run = np.append(run, k)
            fresh[k] = False
        run = run[::-1]
    return run


def _leftover_pairs(pts: np.ndarray, pairs: np.ndarray, fresh: np.ndarray, settings: TraceSettings) -> list[np.ndarray]:
    """Two-tower runs from the towers left on no run: pairs ``min_pair_m .. max_gap_m``
    apart (one tower spacing: not the neighbouring circuit of a corridor, 55 m away),
    closest first, each tower once. A line's last towers past a crossing, or a line that
    only touches the area, are such pairs; the joining step may carry a run on into one."""
    live = pairs[fresh[pairs[:, 0]] & fresh[pairs[:, 1]]]
    d = np.hypot(*(pts[live[:, 1]] - pts[live[:, 0]]).T)
    ok = (d >= settings.min_pair_m) & (d <= settings.max_gap_m)
    live, d = live[ok], d[ok]
    taken = np.zeros(len(pts), bool)
    out = []
    for k in np.lexsort((live[:, 1], live[:, 0], d)).tolist():
        a, b = int(live[k, 0]), int(live[k, 1])
        if not (taken[a] or taken[b]):
            taken[a] = taken[b] = True
            out.append(np.array([a, b]) if pts[a, 0] <= pts[b, 0] else np.array([b, a]))
    return out


def _run_near(pts: np.ndarray, members: np.ndarray, settings: TraceSettings) -> np.ndarray:
    """The towers within ``tolerance_m`` of the least-squares line of ``members``, in the
    run (no gap over ``max_gap_m``) that holds most of them, in order along it."""
    c, u, _, _ = _fit(pts[members])
    rel = pts - c
    t = rel @ u
    e = np.abs(rel @ np.array([-u[1], u[0]]))
    near = np.flatnonzero(e <= settings.tolerance_m)
    near = near[np.argsort(t[near], kind="stable")]
    run = np.concatenate([[0], np.cumsum(np.diff(t[near]) > settings.max_gap_m)])
    ids, counts = np.unique(run[np.isin(near, members)], return_counts=True)
    keep = near[run == ids[np.argmax(counts)]] if len(ids) else members
    return keep if len(keep) >= len(members) else members


def _fit(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Total-least-squares line of points: centre, unit direction, extreme projections."""
    c = pts.mean(axis=0)
    u = np.linalg.svd(pts - c, full_matrices=False)[2][0]
    t = (pts - c) @ u
    if t[0] > t[-1]:
        u, t = -u, -t
    return c, u, float(t.min()), float(t.max())


def join_segments(pts: np.ndarray, segments: list[np.ndarray], settings: TraceSettings = TraceSettings()) -> list[list[int]]:
    """Chains of segment indices: segment ends at most ``max_span_m`` apart whose
    directions turn by at most ``max_turn_deg`` join, nearest first, each end once,
    no cycle (``networkx``). Each chain is in order along it."""
    import networkx as nx
    from networkx.utils import UnionFind

    fits = [_fit(pts[s]) for s in segments]
    ends = []  # (segment, which end: 0 start, 1 end, point, outward direction)
    for i, (c, u, t0, t1) in enumerate(fits):
        ends.append((i, 0, c + u * t0, -u))
        ends.append((i, 1, c + u * t1, u))
    cos_turn = math.cos(math.radians(settings.max_turn_deg))
    cands = []
    for a in range(len(ends)):
        for b in range(a + 1, len(ends)):
            (i, _, p, du), (j, _, q, dv) = ends[a], ends[b]
            dist = float(np.hypot(*(q - p)))
            if i == j or dist > settings.max_span_m or float(np.dot(du, -dv)) < cos_turn:
                continue
            if dist > settings.tolerance_m:
                g = (q - p) / dist
                aligned = float(np.dot(g, du)) >= cos_turn and float(np.dot(-g, dv)) >= cos_turn
                w = q - p
                lateral = max(abs(float(du[0] * w[1] - du[1] * w[0])), abs(float(dv[0] * w[1] - dv[1] * w[0])))
                if not aligned and lateral > 2 * settings.tolerance_m:
                    continue  # the gap must run on along both segments (or they overlap, side by side)
            cands.append((dist, a, b))
    cands.sort()
    used: set[int] = set()
    uf = UnionFind(range(len(segments)))
    graph: nx.Graph[int] = nx.Graph()
    graph.add_nodes_from(range(len(segments)))
    for _, a, b in cands:
        i, j = ends[a][0], ends[b][0]
        if a in used or b in used or uf[i] == uf[j]:
            continue
        used.update((a, b))
        uf.union(i, j)
        graph.add_edge(i, j)
    chains = []
    for comp in nx.connected_components(graph):
        start = min(v for v in comp if graph.degree(v) <= 1)
        chains.append(list(nx.dfs_preorder_nodes(graph, start)))
    chains.sort(key=min)
    return chains


def _polyline(pts: np.ndarray, segments: list[np.ndarray], chain: list[int], settings: TraceSettings) -> tuple[np.ndarray, list[int]]:
    """Vertices (metric frame) of a chain of segments, each segment's fitted line from its
    first to its last tower, joined at the intersection of neighbouring fitted lines (when
    they meet near both ends; else end to end), and the towers in order."""
    import shapely

    lines: list[tuple[np.ndarray, np.ndarray]] = []
    towers: list[int] = []
    for k, si in enumerate(chain):
        c, u, t0, t1 = _fit(pts[segments[si]])
        a, b = c + u * t0, c + u * t1
        members = segments[si][np.argsort((pts[segments[si]] - c) @ u)]
        if lines:
            pa, pb = lines[-1]
            if min(np.hypot(*(a - pb)), np.hypot(*(a - pa))) > min(np.hypot(*(b - pb)), np.hypot(*(b - pa))):
                a, b, members = b, a, members[::-1]
            if k == 1 and np.hypot(*(pa - a)) < np.hypot(*(pb - a)):
                lines[-1] = (pb, pa)
                towers.reverse()
        lines.append((a, b))
        towers.extend(members.tolist())
    verts = [lines[0][0]]
    for (a0, b0), (a1, b1) in zip(lines[:-1], lines[1:]):
        ext = settings.max_span_m
        u0, u1 = (b0 - a0) / max(np.hypot(*(b0 - a0)), 1e-9), (b1 - a1) / max(np.hypot(*(b1 - a1)), 1e-9)
        x = shapely.intersection(shapely.LineString([a0, b0 + u0 * ext]), shapely.LineString([a1 - u1 * ext, b1]))
        if isinstance(x, shapely.Point) and not x.is_empty and min(np.hypot(*(np.array(x.coords[0]) - b0)), np.hypot(*(np.array(x.coords[0]) - a1))) <= ext:
            verts.append(np.array(x.coords[0]))
        elif np.hypot(*(b0 - a1)) <= 2 * settings.tolerance_m or np.dot(b0 - a0, a1 - b0) < 0:
            verts.append((b0 + a1) / 2)  # they meet end to end, or overlap side by side
        else:
            verts.extend([b0, a1])
    verts.append(lines[-1][1])
    return np.array(verts), list(dict.fromkeys(towers))  # a tower shared by two runs counts once


def trace_lines(lon: npt.ArrayLike, lat: npt.ArrayLike, score: npt.ArrayLike | None = None,
                settings: TraceSettings = TraceSettings()) -> list[TracedLine]:
    """Lines traced through detections at (``lon``, ``lat``) degrees with scores 0..1
    (default 1), best confidence first (ties: west first). Deterministic: the same set of
    detections gives the same lines in any order."""
    import shapely

    towers = find_towers(lon, lat, score, settings.merge_m)
    if len(towers.lon) < (2 if settings.min_pair_m > 0 else settings.min_towers):
        return []
    mx, my = _to_metres(towers.lon, towers.lat)
    k = math.cos(math.radians(float(np.mean(towers.lat))))
    pts = np.column_stack([mx * k, my * k])
    segments = find_segments(pts[:, 0], pts[:, 1], settings)
    out = []
    for chain in join_segments(pts, segments, settings):
        verts, members = _polyline(pts, segments, chain, settings)
        if verts[0][0] > verts[-1][0]:
            verts = verts[::-1]
        lo, la = _to_degrees(verts[:, 0] / k, verts[:, 1] / k)
        spans = np.concatenate([np.diff(np.sort((pts[segments[si]] - _fit(pts[segments[si]])[0]) @ _fit(pts[segments[si]])[1])) for si in chain])
        mean_score = float(np.mean(towers.score[members]))
        out.append(TracedLine(
            shapely.LineString(np.column_stack([lo, la])), len(members), float(np.sum(np.hypot(*np.diff(verts, axis=0).T))),
            mean_score, line_confidence(len(members), mean_score, spans),
        ))
    out.sort(key=lambda t: (-t.confidence, t.geometry.coords[0]))
    return out
