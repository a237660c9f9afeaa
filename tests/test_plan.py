"""Planning: the cover equals a brute-force check; sampling is pure, nested and exact."""

import mercantile
import numpy as np
import pytest
import shapely
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, Polygon, box

from tilesweep.errors import UsageError
from tilesweep.plan import (
    PlanSpec,
    block_tiles,
    cover_blocks,
    pack_mask,
    plan_blocks,
    tile_hash,
    unpack_mask,
)
from tilesweep.tiles import Tile, bounds, bounds_array, lnglat_to_fraction, tile_at


def planned_tiles(geom, spec):
    out = set()
    for ch in plan_blocks(geom, spec):
        for i in range(len(ch)):
            mask = None if ch.masks is None else ch.masks[i]
            got = block_tiles(Tile(spec.block_zoom, int(ch.x[i]), int(ch.y[i])), spec.zoom, mask)
            assert len(got) == ch.counts[i] > 0
            out.update(got)
    return out


def brute_force_cover(geom, z):
    """Every tile in the bbox range, tested one by one: intersection area > 0."""
    w, s, e, n = geom.bounds
    t0, t1 = tile_at(w, n, z), tile_at(e, s, z)
    xs, ys = np.meshgrid(np.arange(t0.x, t1.x + 1), np.arange(t0.y, t1.y + 1))
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
