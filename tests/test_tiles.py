"""Tile math: round trips (property tests) and cross-checks against mercantile and pmtiles."""

import math

import mercantile
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pmtiles.tile import tileid_to_zxy, zxy_to_tileid

from tilesweep import tiles as T


@st.composite
def tiles(draw, min_zoom=0, max_zoom=T.MAX_ZOOM):
    z = draw(st.integers(min_zoom, max_zoom))
    n = 1 << z
    return T.Tile(z, draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1)))


@given(tiles())
def test_quadkey_round_trip_and_matches_mercantile(t):
    qk = T.quadkey(t)
    assert len(qk) == t.z
    assert T.from_quadkey(qk) == t
    assert qk == mercantile.quadkey(t.x, t.y, t.z)


@given(tiles())
def test_tile_id_round_trip_and_matches_pmtiles(t):
    tid = T.tile_id(t)
    assert T.from_tile_id(tid) == t
    assert tid == zxy_to_tileid(t.z, t.x, t.y)
    assert tileid_to_zxy(tid) == (t.z, t.x, t.y)
    assert T.zoom_base_id(t.z) <= tid < T.zoom_base_id(t.z + 1)


def test_tile_id_spec_example():
    # The PMTiles v3 spec's worked example.
    assert T.tile_id(T.Tile(12, 3423, 1763)) == 19078479
    assert [T.tile_id(T.Tile(1, x, y)) for x, y in [(0, 0), (0, 1), (1, 1), (1, 0)]] == [1, 2, 3, 4]


@given(tiles(max_zoom=20), st.integers(0, 4))
def test_descendants_are_one_contiguous_id_range(t, depth):
    zoom = t.z + depth
    start, stop = T.descendant_id_range(t, zoom)
    ids = sorted(T.tile_id(c) for c in T.iter_children(t, zoom))
    assert ids == list(range(start, stop))


@given(st.integers(0, 24), st.data())
def test_tile_id_array_matches_scalar(z, data):
    n = 1 << z
    xs = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=50))
    ys = data.draw(st.lists(st.integers(0, n - 1), min_size=len(xs), max_size=len(xs)))
    got = T.tile_id_array(z, np.array(xs), np.array(ys))
    assert got.tolist() == [T.tile_id(T.Tile(z, x, y)) for x, y in zip(xs, ys)]


@given(tiles())
def test_tms_is_an_involution_and_matches_mercantile_flip(t):
    assert T.tms_y(T.Tile(t.z, t.x, T.tms_y(t))) == t.y
    assert T.tms_y(t) == (2**t.z - 1) - t.y


@given(tiles())
def test_bounds_match_mercantile(t):
    mine = T.bounds(t)
    theirs = mercantile.bounds(t.x, t.y, t.z)
    assert mine == pytest.approx(tuple(theirs), abs=1e-9)
    assert T.xy_bounds(t) == pytest.approx(tuple(mercantile.xy_bounds(t.x, t.y, t.z)), abs=1e-6)


@given(tiles(max_zoom=23))
def test_parent_children_round_trip(t):
    kids = T.children(t)
    assert len(kids) == 4
    assert {T.parent(k) for k in kids} == {t}
    assert set(kids) == {T.Tile(c.z, c.x, c.y) for c in mercantile.children(t.x, t.y, t.z)}
    if t.z:
        p = mercantile.parent(t.x, t.y, t.z)
        assert T.parent(t) == T.Tile(p.z, p.x, p.y)


@given(st.floats(-179.999, 179.999), st.floats(-85.0, 85.0), st.integers(0, 24))
def test_tile_at_matches_mercantile_and_contains_point(lng, lat, z):
    # mercantile nudges points by 1e-14 of the world; stay clear of tile edges to compare.
    fx, fy = T.lnglat_to_fraction(lng, lat)
    n = 1 << z
    assume(min(abs(fx * n - round(fx * n)), abs(fy * n - round(fy * n))) > 1e-6)
    t = T.tile_at(lng, lat, z)
    m = mercantile.tile(lng, lat, z)
    assert (t.x, t.y, t.z) == (m.x, m.y, m.z)
    w, s, e, n = T.bounds(t)
    assert w - 1e-9 <= lng <= e + 1e-9 and s - 1e-9 <= lat <= n + 1e-9


@given(st.floats(-180, 180), st.floats(-85, 85))
def test_lnglat_xy_round_trip(lng, lat):
    x, y = T.lnglat_to_xy(lng, lat)
    assert T.xy_to_lnglat(x, y) == pytest.approx((lng, lat), abs=1e-9)
    assert (x, y) == pytest.approx(mercantile.xy(lng, lat), abs=1e-6)


def test_bounds_array_matches_scalar():
    xs, ys = np.array([0, 5, 1023]), np.array([7, 0, 1023])
    got = T.bounds_array(10, xs, ys)
    for row, x, y in zip(got, xs, ys):
        assert tuple(row) == pytest.approx(T.bounds(T.Tile(10, int(x), int(y))), abs=1e-12)


def test_tile_area_and_resolution_are_sensible():
    # A z18 tile at the equator is about 153 m on a side and 0.6 m/pixel at 256 px.
    t = T.tile_at(0.0001, 0.0001, 18)
    assert T.tile_area_km2(t) == pytest.approx(0.0234, rel=0.01)
    assert T.ground_resolution_m(0.0, 18) == pytest.approx(0.597, rel=0.01)
    total = sum(T.tile_area_km2(T.Tile(2, x, y)) for x in range(4) for y in range(4))
    # The Mercator world is the spherical band |lat| <= MAX_LAT: area 4 pi R^2 sin(MAX_LAT).
    assert total == pytest.approx(4 * math.pi * 6371.0088**2 * math.sin(math.radians(T.MAX_LAT)), rel=1e-9)


@pytest.mark.parametrize("bad", ["1/2", "a/b/c", "3/8/0", "-1/0/0", "25/0/0", "2/0/4"])
def test_parse_tile_rejects_bad_text(bad):
    with pytest.raises(ValueError):
        T.parse_tile(bad)


@pytest.mark.parametrize("bad", ["4", "0123x", "0" * 25])
def test_from_quadkey_rejects_bad_text(bad):
    with pytest.raises(ValueError):
        T.from_quadkey(bad)


def test_tile_units_array_inverts_points_array():
    import numpy as np

    from tilesweep.tiles import points_array, tile_units_array

    rng = np.random.default_rng(5)
    x = rng.integers(0, 1 << 18, 500)
    y = rng.integers(1, (1 << 18) - 1, 500)
    fx, fy = rng.random(500), rng.random(500)
    tx, ty = tile_units_array(18, *points_array(18, x, y, fx, fy))
    assert np.allclose(tx, x + fx, atol=1e-6) and np.allclose(ty, y + fy, atol=1e-6)
    assert np.array_equal(np.floor(tx[(fx > 1e-5) & (fx < 1 - 1e-5)]), x[(fx > 1e-5) & (fx < 1 - 1e-5)])
