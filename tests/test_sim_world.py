"""Simulator imagery and ground truth: determinism, seams, towers on tower pixels."""

from __future__ import annotations

import hashlib
import io
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tilesweep import tiles as T
from tilesweep.sim import World, encode, read_truth, tile_has_tower, towers_in_tile, truth, write_truth
from tilesweep.sim import tilecache
from tilesweep.sim.lines import SPAN_M

AREA = (8.5, 47.3, 8.6, 47.4)  # ~0.1 degree square, ~8,000 zoom-18 tiles


@pytest.fixture(scope="module", autouse=True)
def no_tile_cache():
    """The world's own tests render every tile (and a fresh process renders afresh), never
    reading the session's tile cache (conftest.py); the cache has its own test below."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(tilecache.ENV, raising=False)
        yield


@pytest.fixture(scope="module")
def world() -> World:
    return World(0)


@pytest.fixture(scope="module")
def towers(world):
    return world.towers(AREA)


def steel_mask(a: np.ndarray) -> np.ndarray:
    """Pixels of tower steel: bright, nearly neutral grey (a deliberately simple detector)."""
    a = a.astype(np.int16)
    hi, lo = a.max(-1), a.min(-1)
    return (hi - lo <= 10) & (lo >= 165) & (hi <= 222)


def pixel_of(lon: float, lat: float, tile: T.Tile, size: int = 256) -> tuple[int, int]:
    fx, fy = T.lnglat_to_fraction(lon, lat)
    n = 1 << tile.z
    return int((fx * n - tile.x) * size), int((fy * n - tile.y) * size)


def haversine_m(a, b) -> float:
    r = 6371008.8
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    dp, dl = p2 - p1, math.radians(b.lon - a.lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(h))


# --- determinism --------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_differs(towers):
    t = T.tile_at(towers[0].lon, towers[0].lat, 18)
    a, b, c = World(0), World(0), World(1)
    for fmt in ("jpeg", "png", "webp"):
        assert a.render(t, fmt=fmt) == b.render(t, fmt=fmt)
    assert not np.array_equal(a.render_array(t), c.render_array(t))
    assert a.towers(AREA) == b.towers(AREA) != c.towers(AREA)


def test_same_bytes_in_a_fresh_process(towers):
    t = T.tile_at(towers[0].lon, towers[0].lat, 18)
    code = (
        "import hashlib; from tilesweep.sim import World; from tilesweep.tiles import Tile; "
        f"print(hashlib.sha256(World(0).render(Tile{tuple(t)})).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hashlib.sha256(World(0).render(t)).hexdigest()


def test_tile_cache_gives_the_rendered_pixels_and_is_keyed_by_world(towers, tmp_path, monkeypatch):
    t = T.tile_at(towers[0].lon, towers[0].lat, 18)
    fresh = {seed: World(seed).render_array(t) for seed in (0, 1)}
    monkeypatch.setenv(tilecache.ENV, str(tmp_path / "c"))
    assert np.array_equal(World(0).render_array(t), fresh[0])  # a miss renders and stores
    (entry,) = (tmp_path / "c").iterdir()
    assert entry.stat().st_size == 256 * 256 * 3 and not list((tmp_path / "c").glob(".*"))
    # another world (seed, line density) or size is another entry, never this one's pixels
    assert np.array_equal(World(1).render_array(t), fresh[1])
    assert not np.array_equal(World(0, line_density=0).render_array(t), fresh[0])
    assert World(0).render_array(t, 512).shape == (512, 512, 3)
    assert len(list((tmp_path / "c").iterdir())) == 4
    # a hit is read from the entry, in this process or a fresh one: plant other pixels to see it
    planted = np.full((256, 256, 3), 7, np.uint8)
    entry.write_bytes(planted.tobytes())
    got = World(0).render_array(t)
    assert np.array_equal(got, planted) and got.flags.writeable
    code = (
        "from tilesweep.sim import World; from tilesweep.tiles import Tile; "
        f"print(World(0).render_array(Tile{tuple(t)}).sum())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(out) == planted.sum()
    # a damaged (short) entry is rendered again and replaced
    entry.write_bytes(b"\0" * 100)
    assert np.array_equal(World(0).render_array(t), fresh[0]) and entry.stat().st_size == 256 * 256 * 3
    # unset: no cache at all
    monkeypatch.delenv(tilecache.ENV)
    entry.write_bytes(planted.tobytes())
    assert np.array_equal(World(0).render_array(t), fresh[0])


# --- seams ----------------------------------------------------------------------------------


@pytest.mark.parametrize("z", [3, 9, 13, 16, 17, 18, 19])
def test_children_mosaic_equals_parent_at_512(world, towers, z):
    """A 512 px render of a tile has exactly the pixel grid of its four 256 px children, so
    the children, side by side, must reproduce it: every seam between them is an interior
    row or column of the parent. Only rounding may differ."""
    parent = T.tile_at(towers[0].lon, towers[0].lat, z)
    big = world.render_array(parent, 512).astype(np.int16)
    mosaic = np.zeros_like(big)
    for c in T.children(parent):
        mosaic[(c.y - 2 * parent.y) * 256 :][:256, (c.x - 2 * parent.x) * 256 :][:, :256] = world.render_array(c)
    diff = np.abs(big - mosaic)
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_edge_columns_continue_across_tiles(world, towers):
    z = 18
    base = T.tile_at(towers[0].lon, towers[0].lat, z)
    a = world.render_array(base).astype(np.float32)
    east = world.render_array(T.Tile(z, base.x + 1, base.y)).astype(np.float32)
    row = np.concatenate([a, east], axis=1)
    steps = np.abs(np.diff(row, axis=1)).mean(axis=(0, 2))
    assert steps[255] <= np.percentile(steps, 99) + 1.0


def test_parent_matches_its_children(world, towers):
    parent = T.tile_at(towers[0].lon, towers[0].lat, 15)
    mosaic = np.zeros((512, 512, 3), np.float32)
    for c in T.children(parent):
        mosaic[(c.y - 2 * parent.y) * 256 :][:256, (c.x - 2 * parent.x) * 256 :][:, :256] = world.render_array(c)
    down = mosaic.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    p = world.render_array(parent).astype(np.float32)
    assert np.abs(down - p).mean() < 12.0
    # a 512 px render covers the same ground as its four 256 px children, at twice the detail
    big = world.render_array(parent, 512).astype(np.float32)
    assert np.abs(big.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3)) - p).mean() < 8.0


# --- ground truth vs pixels -------------------------------------------------------------------


def test_area_has_dozens_of_towers_and_few_tower_tiles(towers):
    assert 50 <= len(towers) <= 2000
    assert len({t.tower_id for t in towers}) == len(towers)
    a, b = T.tile_at(AREA[0], AREA[3], 18), T.tile_at(AREA[2], AREA[1], 18)
    n = (b.x - a.x + 1) * (b.y - a.y + 1)
    frac = len({T.tile_at(t.lon, t.lat, 18) for t in towers}) / n
    assert 0.01 < frac < 0.2
    for t in towers:
        assert AREA[0] <= t.lon <= AREA[2] and AREA[1] <= t.lat <= AREA[3]


def test_spans_are_250_to_450_m(towers):
    by_id = {t.tower_id: t for t in towers}
    spans = [haversine_m(t, by_id[t.tower_id + 1]) for t in towers if t.tower_id + 1 in by_id and by_id[t.tower_id + 1].line_id == t.line_id]
    assert len(spans) > 20
    assert min(spans) >= SPAN_M[0] * 0.97 and max(spans) <= SPAN_M[1] * 1.03, (min(spans), max(spans))


def test_towers_in_tile_agree_with_area_truth(world, towers):
    t = towers[len(towers) // 2]
    tile = T.tile_at(t.lon, t.lat, 18)
    inside = towers_in_tile(tile)
    assert t in inside and tile_has_tower(tile)
    w, s, e, n = T.bounds(tile)
    assert all(w <= x.lon <= e and s <= x.lat <= n for x in inside)
    assert world.towers(tuple(T.bounds(tile))) == inside or set(inside) <= set(world.towers(tuple(T.bounds(tile))))


@pytest.mark.parametrize("z,min_steel", [(17, 15), (18, 40), (19, 80)])
def test_truth_towers_land_on_tower_pixels(world, towers, z, min_steel):
    for t in towers[:: max(1, len(towers) // 12)]:
        tile = T.tile_at(t.lon, t.lat, z)
        px, py = pixel_of(t.lon, t.lat, tile)
        arr = world.render_array(tile)
        r = {17: 10, 18: 20, 19: 40}[z]
        patch = arr[max(0, py - r) : py + r + 1, max(0, px - r) : px + r + 1]
        assert steel_mask(patch).sum() >= min_steel, (t, z, steel_mask(patch).sum())


def test_tiles_without_towers_have_no_tower_pixels(world):
    a, b = T.tile_at(AREA[0], AREA[3], 18), T.tile_at(AREA[2], AREA[1], 18)
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 25:
        tile = T.Tile(18, int(rng.integers(a.x, b.x + 1)), int(rng.integers(a.y, b.y + 1)))
        w, s, e, n = T.bounds(tile)
        m = 0.0006  # ~45-65 m: no tower, arm or shadow can reach in
        if world.towers((w - m, s - m, e + m, n + m)):
            continue
        assert steel_mask(world.render_array(tile)).sum() == 0, tile
        checked += 1


def test_towers_survive_jpeg(world, towers):
    t = towers[3]
    tile = T.tile_at(t.lon, t.lat, 18)
    img = np.asarray(Image.open(io.BytesIO(world.render(tile, fmt="jpeg"))).convert("RGB")).astype(np.int16)
    px, py = pixel_of(t.lon, t.lat, tile)
    patch = img[max(0, py - 20) : py + 21, max(0, px - 20) : px + 21]
    assert (patch.min(-1) >= 160).sum() >= 20  # the bright steel is still there


# --- encodings --------------------------------------------------------------------------------


def test_encodings_and_sizes(world):
    t = T.Tile(16, 34316, 22968)
    arr = world.render_array(t)
    assert arr.shape == (256, 256, 3) and arr.dtype == np.uint8
    assert world.render(t, fmt="jpeg")[:3] == b"\xff\xd8\xff"
    assert world.render(t, fmt="png")[:8] == b"\x89PNG\r\n\x1a\n"
    webp = world.render(t, fmt="webp")
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    big = Image.open(io.BytesIO(world.render(t, size=512, fmt="png")))
    assert big.size == (512, 512)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode(arr, "png")))), arr)


def test_bad_render_arguments(world):
    with pytest.raises(ValueError):
        world.render_array(T.Tile(21, 0, 0))
    with pytest.raises(ValueError):
        world.render_array(T.Tile(3, 0, 0), size=300)
    with pytest.raises(ValueError):
        world.render(T.Tile(3, 0, 0), fmt="gif")


def test_every_zoom_renders(world):
    for z in range(0, 21):
        t = T.tile_at(8.55, 47.35, z)
        arr = world.render_array(t)
        assert arr.std() > 1.0  # not a flat colour


# --- truth files ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".geojson", ".parquet"])
def test_truth_files_round_trip(tmp_path, towers, suffix):
    path = tmp_path / f"towers{suffix}"
    assert write_truth(towers, path) == len(towers)
    back = read_truth(path)
    assert [(t.line_id, t.tower_id) for t in back] == [(t.line_id, t.tower_id) for t in towers]
    assert max(abs(a.lon - b.lon) + abs(a.lat - b.lat) for a, b in zip(back, towers)) < 1e-8


def test_truth_polygon_area_is_a_subset(towers):
    from shapely.geometry import Polygon

    tri = Polygon([(AREA[0], AREA[1]), (AREA[2], AREA[1]), (AREA[0], AREA[3])])
    sub = truth(tri)
    assert 0 < len(sub) < len(towers) and set(sub) <= set(towers)
