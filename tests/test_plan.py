"""Planning: the cover equals a brute-force check; sampling is pure, nested and exact."""

import mercantile
import numpy as np
import pytest
import shapely
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, Polygon, box

from tilesweep.errors import UsageError
from tilesweep.queue import Block
from tilesweep.plan import (
    PlanSpec,
    cover_blocks,
    mask_cells,
    pack_mask,
    pack_tiles,
    plan_blocks,
    tile_hash,
    unpack_mask,
)
from tilesweep.tiles import Tile, bounds, bounds_array, lnglat_to_fraction, tile_at


def plan_block_list(geom, spec):
    """Every planned block as a queue Block (the path the worker reads)."""
    out = []
    for ch in plan_blocks(geom, spec):
        for i in range(len(ch)):
            if ch.packed is not None:
                out.append(Block(int(ch.z[i]), int(ch.x[i]), int(ch.y[i]), int(ch.counts[i]), ch.packed[i]))
            else:
                mask = None if ch.masks is None else pack_mask(ch.masks[i])
                out.append(Block(spec.block_zoom, int(ch.x[i]), int(ch.y[i]), int(ch.counts[i]), mask))
    return out


def planned_tiles(geom, spec):
    out = set()
    for b in plan_block_list(geom, spec):
        got = b.tile_list(spec.zoom)
        assert len(got) == b.tiles > 0
        assert out.isdisjoint(got)  # blocks never share a tile
        out.update(got)
    return out


def brute_force_cover(geom, z):
    """Every tile in the bbox range, tested one by one: intersection area > 0."""
    w, s, e, n = geom.bounds
    t0, t1 = tile_at(w, n, z), tile_at(e, s, z)
    last = (1 << z) - 1  # one tile of margin: a bbox edge a hair off a tile edge
    xs, ys = np.meshgrid(np.arange(max(0, t0.x - 1), min(last, t1.x + 1) + 1), np.arange(max(0, t0.y - 1), min(last, t1.y + 1) + 1))
    xs, ys = xs.ravel(), ys.ravel()
    b = bounds_array(z, xs, ys)
    boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    keep = shapely.area(shapely.intersection(geom, boxes)) > 0
    return {Tile(z, int(x), int(y)) for x, y in zip(xs[keep], ys[keep])}


CONCAVE = Polygon([(7.40, 46.90), (7.50, 46.90), (7.45, 46.95), (7.50, 47.00), (7.40, 47.00)])
HOLED = Polygon(
    [(7.40, 46.90), (7.50, 46.90), (7.50, 47.00), (7.40, 47.00)],
    [[(7.42, 46.92), (7.47, 46.92), (7.47, 46.97), (7.42, 46.97)], [(7.48, 46.98), (7.49, 46.98), (7.49, 46.99)]],
)
MULTI = MultiPolygon([CONCAVE, box(7.6, 46.9, 7.63, 46.93), Polygon([(7.7, 47.0), (7.75, 47.0), (7.72, 47.05)])])
SOUTH_WEST = Polygon([(-58.5, -34.7), (-58.3, -34.65), (-58.35, -34.5), (-58.45, -34.55)])  # Buenos Aires


@pytest.mark.parametrize("name, geom", [("concave", CONCAVE), ("holes", HOLED), ("multipart", MULTI), ("southwest", SOUTH_WEST)])
@pytest.mark.parametrize("levels", [0, 2, 4, 6])
def test_cover_equals_brute_force(name, geom, levels):
    zoom = 15
    expected = brute_force_cover(geom, zoom)
    assert len(expected) > 100
    assert planned_tiles(geom, PlanSpec(zoom=zoom, block_zoom=zoom - levels)) == expected


def test_cover_takes_inner_blocks_whole():
    # A big square: most blocks lie inside and come without a mask (no per-tile work).
    geom = box(7.0, 46.0, 8.0, 47.0)
    full = partial = 0
    for x, y, masks in cover_blocks(geom, 16, 14):
        if masks is None:
            full += len(x)
        else:
            partial += len(x)
    assert full > 5 * partial > 0


@settings(max_examples=40, deadline=None)
@given(
    st.floats(-170, 170), st.floats(-70, 70), st.floats(0.001, 0.05), st.floats(0.001, 0.05), st.integers(10, 14)
)
def test_bbox_cover_equals_mercantile(w, s, dw, dh, zoom):
    e, n = w + dw, s + dh
    # mercantile nudges edges by 1e-14 of the world; compare away from tile edges (the exact
    # edge rule is tested in test_tiles_that_only_touch_are_out).
    for lng, lat in ((w, s), (e, n)):
        fx, fy = lnglat_to_fraction(lng, lat)
        k = 1 << zoom
        assume(min(abs(fx * k - round(fx * k)), abs(fy * k - round(fy * k))) > 1e-6)
    mine = planned_tiles(box(w, s, e, n), PlanSpec(zoom=zoom))
    theirs = {Tile(t.z, t.x, t.y) for t in mercantile.tiles(w, s, e, n, zoom)}
    assert mine == theirs


def test_tiles_that_only_touch_are_out():
    t = Tile(12, 2130, 1450)
    area = box(*bounds(t))
    assert planned_tiles(area, PlanSpec(zoom=12, block_zoom=10)) == {t}
    assert len(planned_tiles(area, PlanSpec(zoom=13, block_zoom=10))) == 4


def test_fraction_is_the_per_tile_hash_test_and_nested():
    geom = box(7.40, 46.90, 7.50, 47.00)
    spec = PlanSpec(zoom=16, block_zoom=12)
    everything = planned_tiles(geom, spec)
    half = planned_tiles(geom, PlanSpec(zoom=16, block_zoom=12, fraction=0.5, seed=7))
    tenth = planned_tiles(geom, PlanSpec(zoom=16, block_zoom=12, fraction=0.1, seed=7))
    assert half == {t for t in everything if tile_hash(7, t) < 0.5 * 2**64}
    assert tenth <= half <= everything
    n = len(everything)
    for got, f in ((half, 0.5), (tenth, 0.1)):  # binomial: within 5 sigma
        assert abs(len(got) - f * n) < 5 * (n * f * (1 - f)) ** 0.5
    other_seed = planned_tiles(geom, PlanSpec(zoom=16, block_zoom=12, fraction=0.5, seed=8))
    assert other_seed != half
    assert planned_tiles(geom, PlanSpec(zoom=16, block_zoom=12, fraction=0.5, seed=7)) == half


@pytest.mark.parametrize("n", [1, 37, 1000])
def test_max_tiles_takes_exactly_the_n_smallest_hashes(n):
    geom = HOLED
    everything = planned_tiles(geom, PlanSpec(zoom=17, block_zoom=13, fraction=0.8, seed=3))
    got = planned_tiles(geom, PlanSpec(zoom=17, block_zoom=13, fraction=0.8, seed=3, max_tiles=n))
    assert len(everything) > n
    assert len(got) == n
    assert got == set(sorted(everything, key=lambda t: tile_hash(3, t))[:n])


def test_max_tiles_above_the_cover_takes_all():
    geom = CONCAVE
    everything = planned_tiles(geom, PlanSpec(zoom=14))
    assert planned_tiles(geom, PlanSpec(zoom=14, max_tiles=10**9)) == everything


def test_block_priority_is_a_seeded_shuffle():
    geom = box(7.0, 46.0, 8.0, 47.0)
    def order(seed):
        keys = []
        for ch in plan_blocks(geom, PlanSpec(zoom=16, block_zoom=12, seed=seed)):
            keys += [(int(p), int(x), int(y)) for p, x, y in zip(ch.priority, ch.x, ch.y)]
        return [(x, y) for _, x, y in sorted(keys)]
    a, b, again = order(1), order(2), order(1)
    assert a == again
    assert a != b and sorted(a) == sorted(b)
    assert a != sorted(a)  # not spatial order
    # The first tenth of a shuffled order spreads over the whole area, not one corner.
    first = np.array(a[: len(a) // 10])
    xs = np.array([x for x, _ in a])
    assert first[:, 0].min() - xs.min() < 0.1 * (xs.max() - xs.min())
    assert xs.max() - first[:, 0].max() < 0.1 * (xs.max() - xs.min())


def test_chunks_stay_bounded_for_a_huge_area():
    # Zoom 18 over a 10 x 10 degree box is about 70 million tiles: take only the first
    # chunks, which must come quickly and be small (the planner streams).
    chunks = plan_blocks(box(0, 40, 10, 50), PlanSpec(zoom=18))
    for _ in range(3):
        ch = next(chunks)
        assert int(ch.counts.sum()) <= 1 << 20


def test_mask_round_trip():
    rng = np.random.default_rng(0)
    for levels in (0, 1, 4, 6):
        m = rng.random((1 << levels, 1 << levels)) < 0.5
        assert (unpack_mask(pack_mask(m), levels) == m).all()
    assert unpack_mask(None, 4) is None


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(zoom=25), "zoom 25 is outside"),
        (dict(zoom=-1), "zoom -1 is outside"),
        (dict(zoom=10, block_zoom=11), "block zoom 11"),
        (dict(zoom=18, block_zoom=2), "more than 10 levels"),
        (dict(zoom=10, fraction=0.0), "fraction 0"),
        (dict(zoom=10, fraction=1.5), "fraction 1.5"),
        (dict(zoom=10, max_tiles=0), "max tiles 0"),
        (dict(zoom=10, seed=-3), "seed -3"),
    ],
)
def test_bad_specs(kwargs, words):
    with pytest.raises(UsageError, match=words):
        PlanSpec(**kwargs)


# --- adaptive blocks (issue 15): the coarsest cell holding at most N planned tiles ----------


def _parent_count(tiles_set, block, zoom):
    """Planned tiles under the parent cell of ``block``."""
    pz = block.z - 1
    d = zoom - pz
    px, py = block.x >> 1, block.y >> 1
    return sum(1 for t in tiles_set if t.x >> d == px and t.y >> d == py)


def check_adaptive(geom, spec, expected):
    """Blocks hold 1..N tiles, never overlap, union to exactly ``expected``, and each is the
    coarsest such cell: its parent holds more than N planned tiles."""
    blocks = plan_block_list(geom, spec)
    n = spec.block_tiles
    got = set()
    for b in blocks:
        tiles = b.tile_list(spec.zoom)
        assert 0 < len(tiles) == b.tiles <= n
        assert b.z <= spec.base_zoom
        assert got.isdisjoint(tiles)
        got.update(tiles)
    assert got == expected
    by_parent = {}
    for t in expected:
        for b in {(bl.z - 1) for bl in blocks if bl.z > 0}:
            d = spec.zoom - b
            by_parent[(b, t.x >> d, t.y >> d)] = by_parent.get((b, t.x >> d, t.y >> d), 0) + 1
    for b in blocks:
        if b.z > 0:
            assert by_parent[(b.z - 1, b.x >> 1, b.y >> 1)] > n, f"block {b.z}/{b.x}/{b.y} could be coarser"
    return blocks


STRIP = shapely.LineString([(7.40, 46.90), (7.52, 46.97), (7.45, 47.02), (7.60, 47.05)]).buffer(0.0015)
COMB = shapely.union_all([box(7.40 + 0.004 * i, 46.90, 7.4015 + 0.004 * i, 46.96) for i in range(20)])


@pytest.mark.parametrize("name, geom", [("concave", CONCAVE), ("holes", HOLED), ("multipart", MULTI), ("strip", STRIP), ("comb", COMB)])
@pytest.mark.parametrize("fraction, n", [(1.0, 256), (0.1, 256), (0.01, 256), (0.3, 64), (1.0, 1), (0.05, 1000)])
def test_adaptive_blocks_are_exact_and_coarsest(name, geom, fraction, n):
    zoom = 15
    spec = PlanSpec(zoom=zoom, fraction=fraction, seed=5, block_tiles=n)
    expected = {t for t in brute_force_cover(geom, zoom) if tile_hash(5, t) < fraction * 2**64}
    assert expected
    check_adaptive(geom, spec, expected)


@settings(max_examples=25, deadline=None)
@given(
    st.floats(-170, 170), st.floats(-70, 70), st.floats(0.002, 0.04), st.floats(0.002, 0.04),
    st.integers(11, 14), st.sampled_from([1.0, 0.5, 0.05, 0.005]), st.sampled_from([4, 16, 100, 256]), st.integers(0, 99),
)
def test_adaptive_property(w, s, dw, dh, zoom, fraction, n, seed):
    w, s = round(w, 6), round(s, 6)  # no sub-ulp slivers, where "area > 0" is float noise
    geom = Polygon([(w, s), (w + dw, s + dh * 0.3), (w + dw * 0.6, s + dh), (w + dw * 0.1, s + dh * 0.7)])
    spec = PlanSpec(zoom=zoom, fraction=fraction, seed=seed, block_tiles=n)
    expected = {t for t in brute_force_cover(geom, zoom) if tile_hash(seed, t) < fraction * 2**64}
    if not expected:
        assert plan_block_list(geom, spec) == []
        return
    check_adaptive(geom, spec, expected)


def test_adaptive_max_tiles_is_exact():
    spec = PlanSpec(zoom=17, fraction=0.8, seed=3, max_tiles=777)
    fixed = planned_tiles(HOLED, PlanSpec(zoom=17, block_zoom=13, fraction=0.8, seed=3, max_tiles=777))
    assert len(fixed) == 777
    check_adaptive(HOLED, spec, fixed)


@pytest.mark.parametrize("fraction", [1.0, 0.1, 0.01, 0.001])
def test_adaptive_blocks_hold_at_least_a_quarter_of_n_on_average(fraction):
    # A country-sized stretch at zoom 15 (about 4 M tiles): blocks average >= N/4 tiles at
    # every density, where fixed zoom-11 cells hold 256 * fraction.
    geom = box(5.0, 45.0, 15.0, 52.0)
    spec = PlanSpec(zoom=15, fraction=fraction, seed=1)
    tiles = blocks = 0
    for ch in plan_blocks(geom, spec):
        tiles += int(ch.counts.sum())
        blocks += len(ch)
        assert int(ch.counts.max()) <= 256
    assert tiles / blocks >= 256 / 4, (tiles, blocks)


@pytest.mark.parametrize("geom", [STRIP, COMB], ids=["strip", "comb"])
def test_boundary_heavy_areas_keep_blocks_full(geom):
    # At fraction 1 a thin strip or comb leaves fixed cells a few tiles each; adaptive
    # blocks gather a boundary's tiles into coarser cells.
    zoom = 18
    fixed = plan_block_list(geom, PlanSpec(zoom=zoom, block_zoom=zoom - 4))
    adaptive = plan_block_list(geom, PlanSpec(zoom=zoom))
    tiles = sum(b.tiles for b in fixed)
    assert tiles == sum(b.tiles for b in adaptive)
    assert tiles / len(adaptive) >= 256 / 4
    assert len(adaptive) < len(fixed)


def test_pack_tiles_round_trip_and_is_small():
    rng = np.random.default_rng(1)
    for levels in (0, 1, 3, 4, 9, 17):
        side = 1 << levels
        for n in sorted({1, min(5, side * side), min(300, side * side), side * side if levels < 10 else 1}):
            idx = rng.choice(side * side, size=n, replace=False) if side * side < 10**7 else np.unique(rng.integers(0, side * side, n))
            rows, cols = idx // side, idx % side
            data = pack_tiles(levels, 1000 << levels, 7 << levels, (1000 << levels) + cols, (7 << levels) + rows)
            if len(idx) == side * side:
                assert data is None
                continue
            got = mask_cells(data, levels)
            assert sorted(zip(got[0].tolist(), got[1].tolist())) == sorted(zip(rows.tolist(), cols.tolist()))
            assert len(data) <= max((side * side + 7) // 8, 1 + 8 * len(idx))
    # a legacy bit mask decodes as before
    m = rng.random((16, 16)) < 0.3
    assert (unpack_mask(pack_mask(m), 4) == m).all()


def test_block_zoom_and_block_tiles_exclude_each_other():
    with pytest.raises(UsageError, match="exclude each other"):
        PlanSpec(zoom=16, block_zoom=12, block_tiles=64)
    with pytest.raises(UsageError, match="block tiles 0"):
        PlanSpec(zoom=16, block_tiles=0)
    assert PlanSpec(zoom=16).block_tiles == 256 and PlanSpec(zoom=16).base_zoom == 12
    assert PlanSpec(zoom=2).base_zoom == 0
