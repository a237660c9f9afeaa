"""The tracer on synthetic lines whose answer is known (tilesweep.trace)."""

import math

import numpy as np
import pytest
import shapely

from tilesweep.errors import UsageError
from tilesweep.trace import TraceSettings, find_towers, trace_lines

LON0, LAT0 = 8.5, 47.35
K = math.cos(math.radians(LAT0))  # ground metres per Mercator metre here
R = 6378137.0


def to_lonlat(x_m, y_m):
    """Ground metres east/north of (LON0, LAT0) to degrees (small distances)."""
    x_m, y_m = np.asarray(x_m, float), np.asarray(y_m, float)
    lon = LON0 + np.degrees(x_m / K / R)
    lat = LAT0 + np.degrees(y_m / R)  # north: 1 m of ground is 1/R rad of latitude
    return lon, lat


def towers_along(vertices, span=350.0):
    """Towers every ~``span`` m along a polyline of (x, y) ground metres, at its vertices too."""
    pts = []
    v = np.asarray(vertices, float)
    for a, b in zip(v[:-1], v[1:]):
        n = max(1, round(np.hypot(*(b - a)) / span))
        pts += [a + (b - a) * i / n for i in range(n)]
    pts.append(v[-1])
    return np.array(pts)


def truth_line(vertices):
    lon, lat = to_lonlat(*np.asarray(vertices, float).T)
    return shapely.LineString(np.column_stack([lon, lat]))


def jitter(p, metres, seed):
    """Tile-centre-like error: uniform within +-metres on each axis, seeded."""
    return p + np.random.default_rng(seed).uniform(-metres, metres, p.shape)


def trace(points, **kw):
    lon, lat = to_lonlat(points[:, 0], points[:, 1])
    return trace_lines(lon, lat, np.full(len(lon), 0.9), TraceSettings(**kw))


def near(line, truth, metres):
    """Hausdorff distance in ground metres (degrees scaled at LAT0) within ``metres``."""
    a = np.asarray(line.coords)
    b = np.asarray(truth.coords)
    scale = np.array([K * R * math.pi / 180, R * math.pi / 180])
    return shapely.hausdorff_distance(shapely.LineString(a * scale), shapely.LineString(b * scale)) <= metres


STRAIGHT = [(0, 0), (3500, 700)]
BENT = [(0, 0), (1800, 0), (3400, 600), (5000, 600)]  # turns of ~20.6 and ~20.6 degrees


def test_straight_line_with_tile_centre_jitter():
    pts = jitter(towers_along(STRAIGHT), 30, seed=1)
    lines = trace(pts)
    assert len(lines) == 1
    assert lines[0].towers == len(pts)
    assert near(lines[0].geometry, truth_line(STRAIGHT), 60)
    assert abs(lines[0].length_m - 3570) < 300
    assert 0.5 < lines[0].confidence <= 0.9


def test_bending_line_is_one_line():
    pts = jitter(towers_along(BENT), 30, seed=2)
    (line,) = trace(pts)
    assert line.towers == len(pts)
    assert near(line.geometry, truth_line(BENT), 60)


def test_two_crossing_lines_stay_apart():
    a = [(-2000, 0), (2000, 0)]
    b = [(-60, -2000), (60, 2000)]  # crosses a near the origin, no tower at the crossing
    pa, pb = towers_along(a, 330) + [170, 0], towers_along(b, 360)
    lines = trace(np.concatenate([pa, pb]))
    assert len(lines) == 2
    truths = [truth_line([pa[0], pa[-1]]), truth_line([pb[0], pb[-1]])]
    for line in lines:
        assert sum(near(line.geometry, t, 60) for t in truths) == 1
    assert sorted(ln.towers for ln in lines) == sorted([len(pa), len(pb)])


def test_parallel_lines_are_two_lines():
    a = [(0, 0), (4000, 0)]
    b = [(0, 300), (4000, 300)]
    pa = jitter(towers_along(a), 30, seed=3)
    pb = jitter(towers_along(b) + [120, 0], 30, seed=4)  # towers staggered
    lines = trace(np.concatenate([pa, pb]))
    assert len(lines) == 2
    assert sorted(ln.towers for ln in lines) == [len(pa), len(pb)]
    for line in lines:
        assert near(line.geometry, truth_line([pa[0], pa[-1]]), 60) or near(line.geometry, truth_line([pb[0], pb[-1]]), 60)


def test_noise_points_make_no_line_and_do_not_join():
    line_pts = towers_along(STRAIGHT)
    rng = np.random.default_rng(5)
    noise = rng.uniform(-3000, 6000, (12, 2))
    noise = noise[np.min(np.hypot(*(noise[:, None, :] - line_pts[None]).transpose(2, 0, 1)), axis=1) > 1200][:6]
    noise = noise[np.min(np.hypot(*(noise[:, None, :] - noise[None]).transpose(2, 0, 1)) + np.eye(len(noise)) * 1e9, axis=1) > 1100]
    assert len(noise) >= 2
    lines = trace(np.concatenate([line_pts, noise]))
    assert len(lines) == 1 and lines[0].towers == len(line_pts)


def test_gap_of_one_missing_tower_is_bridged():
    pts = towers_along(STRAIGHT)
    gapped = np.delete(pts, 5, axis=0)
    (line,) = trace(gapped)
    assert line.towers == len(gapped)
    assert near(line.geometry, truth_line(STRAIGHT), 20)


def test_neighbouring_detections_of_one_tower_merge():
    pts = towers_along(STRAIGHT)
    doubled = np.concatenate([pts, pts + [104, 0], pts[:3] + [0, 104]])  # the next tile east lights up too
    lon, lat = to_lonlat(*doubled.T)
    towers = find_towers(lon, lat, merge_m=160)
    assert len(towers.lon) == len(pts)
    assert sorted(towers.detections.tolist()) == [2] * (len(pts) - 3) + [3] * 3
    (line,) = trace(doubled, merge_m=160)
    assert line.towers == len(pts)
    east = np.concatenate([pts, pts + [104, 0]])
    (line,) = trace(east)  # by default neighbouring tiles' detections stay apart, on the same line
    assert line.towers == len(east)


def test_same_detections_in_any_order_same_lines():
    pts = np.concatenate([jitter(towers_along(BENT), 40, 6), towers_along([(0, 2000), (4000, 2000)])])
    lon, lat = to_lonlat(*pts.T)
    score = np.linspace(0.5, 1.0, len(lon))
    ref = trace_lines(lon, lat, score)
    perm = np.random.default_rng(7).permutation(len(lon))
    again = trace_lines(lon[perm], lat[perm], score[perm])
    assert len(ref) == 2
    assert [(ln.geometry.wkt, ln.towers, ln.confidence) for ln in ref] == [(ln.geometry.wkt, ln.towers, ln.confidence) for ln in again]


def test_short_chains_and_no_detections():
    assert trace_lines([], []) == []
    pts = towers_along([(0, 0), (700, 0)])  # three towers
    assert len(trace(pts)) == 1
    assert trace(pts, min_towers=4, min_pair_m=0) == []


def test_leftover_towers_one_spacing_apart_are_a_two_tower_line():
    """A line that only touches the area (or its last towers past a crossing): two towers
    one spacing apart are a line; two towers of a corridor's circuits, 55 m apart, or
    ones farther apart than max_gap_m, are not."""
    (line,) = trace(np.array([[0.0, 0.0], [350.0, 40.0]]))
    assert line.towers == 2 and near(line.geometry, truth_line([(0, 0), (350, 40)]), 5)
    assert trace(np.array([[0.0, 0.0], [350.0, 40.0]]), min_pair_m=0) == []
    assert trace(np.array([[0.0, 0.0], [0.0, 55.0]])) == []
    assert trace(np.array([[0.0, 0.0], [700.0, 0.0]])) == []
    far = np.array([[5000.0, 3000.0], [5350.0, 3000.0]])
    lines = trace(np.concatenate([towers_along(STRAIGHT), far]))
    assert sorted(ln.towers for ln in lines) == [2, len(towers_along(STRAIGHT))]


@pytest.mark.parametrize("kw", [{"merge_m": 0}, {"max_gap_m": 50}, {"max_span_m": 500}, {"max_turn_deg": 120},
                                {"tolerance_m": 0}, {"min_towers": 1}, {"min_pair_m": 600}, {"min_pair_m": -1}])
def test_bad_settings(kw):
    with pytest.raises(UsageError):
        TraceSettings(**kw)


def test_a_last_tower_just_past_the_tolerance_carries_the_run_on():
    """Tile centres put a line's last tower up to ~70 m off its line: it joins the run (the
    run's own towers within tolerance_m, the last one within twice that); one 120 m off
    does not."""
    pts = towers_along([(0, 0), (1400, 0)])  # five towers, 350 m apart
    off = pts.copy()
    off[-1, 1] = 70.0
    (line,) = trace(off)
    assert line.towers == 5
    assert trace(off, min_pair_m=0)[0].towers == 5
    far = pts.copy()
    far[-1, 1] = 120.0
    assert [ln.towers for ln in trace(far, min_pair_m=0)] == [4]
