"""Super-tile requests (issue 12), for real: `tilesweep fetch --super 4` against the
simulator's WMS route over loopback HTTP, real shards, real queue.

The sweep is 9 x 6 zoom-18 tiles in one 16 x 16 block: with --super 4 that is five
super-tiles (16, 16, 4, 8 and 8 tiles wanted) and one group of 2 tiles asked for one by
one (below the quarter fill). Cut tiles must be byte for byte the simulator's own tiles."""

import asyncio
import shutil
import tomllib

import pytest
from helpers.cli import tilesweep

from tilesweep.errors import UsageError
from tilesweep.fetch import FetchSettings
from tilesweep.sim import Faults, World, run_in_thread
from tilesweep.sources import Source, parse_source
from tilesweep.store import Status, TileStore
from tilesweep.sweep import Sweep
from tilesweep.supertile import SuperTileFetcher, check_blocks
from tilesweep.tilecut import jpeg_cut_mode
from tilesweep.tiles import Tile, bounds, xy_bounds

# The byte-for-byte comparisons with single tiles need the lossless JPEG crop (the system
# library libturbojpeg0, which .ci/run installs); without it JPEGs are re-encoded at 95.
lossless_jpeg = pytest.mark.skipif(
    jpeg_cut_mode() != "lossless",
    reason="libturbojpeg is not installed (apt-get install libturbojpeg0): super-tile JPEGs are re-encoded, "
           "so their bytes cannot equal single tiles'")

SEED = 5
ZOOM = 18
X0, Y0, NX, NY = 137312, 91872, 9, 6  # x0, y0 on the 16-grid: one zoom-14 block
TILES = [Tile(ZOOM, X0 + i, Y0 + j) for j in range(NY) for i in range(NX)]
SUPER_GROUPS = 5  # groups of 4 x 4 with >= 4 wanted tiles; one more group of 2 goes tile by tile


def _bbox() -> str:
    w, _, _, n = bounds(TILES[0])
    _, s, e, _ = bounds(TILES[-1])
    dx, dy = (e - w) / NX / 4, (n - s) / NY / 4  # a quarter tile inside: no neighbour touches it
    return f"{w + dx:.7f},{s + dy:.7f},{e - dx:.7f},{n - dy:.7f}"


@pytest.fixture(scope="module")
def expected():
    world = World(seed=SEED)
    return {t: world.render(t) for t in TILES}


@pytest.fixture(scope="module")
def srv():
    """One simulator for the module (its renders are cached); tests set ``area_faults``,
    the faults of super-tile requests only, and read its counters as differences."""
    with run_in_thread(World(seed=SEED)) as server:
        yield server


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("planned") / "s"
    tilesweep("plan", _bbox(), sweep, "--zoom", ZOOM)
    return sweep


@pytest.fixture
def sweep(tmp_path, planned):
    shutil.copytree(planned, tmp_path / "s")
    return tmp_path / "s"


class Counted:
    """The server's counters since the ``with`` began."""

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        self.before = dict(self.server.stats)
        return self

    def __exit__(self, *exc):
        self.server.area_faults = None
        self.after = dict(self.server.stats)

    def __getitem__(self, key):
        return self.after.get(key, 0) - self.before.get(key, 0)


def status_json(sweep):
    """`tilesweep status --json`, in process (a subprocess costs seconds on a loaded machine)."""
    with Sweep.open(sweep) as sw:
        return sw.status().to_json()


def stored(sweep):
    store = TileStore(sweep / "tiles", ZOOM, ZOOM - 4, coarsest=0)
    out = {}
    for block in store.blocks():
        for tile, status, data in store.reader(block).iter_records(status=None):
            assert tile not in out
            out[tile] = (status, data)
    store.close()
    return out


def assert_complete(sweep, expected):
    st = status_json(sweep)
    assert st["tiles_done"] == st["tiles_total"] == len(TILES) and st["tiles_ok"] == len(TILES), st
    assert st["blocks_dead"] == 0 and st["mismatch"] is None
    got = stored(sweep)
    assert set(got) == set(expected)
    bad = [t for t, (status, data) in got.items() if status != Status.OK or data != expected[t]]
    assert not bad, f"{len(bad)} tiles differ from the simulator's own, e.g. {bad[:2]}"
    return st


@lossless_jpeg
def test_super_tiles_store_the_same_bytes_as_single_tiles(tmp_path, srv, planned, expected):
    sup, single = tmp_path / "super", tmp_path / "single"
    shutil.copytree(planned, sup)
    shutil.copytree(planned, single)
    with Counted(srv) as c:
        tilesweep("fetch", sup, "--source", srv.template(scheme="wms") + "&KEY=${SIM_KEY}", "--super", "4", "-q",
                  env={"SIM_KEY": "s3cret-value"})
    assert c["requests"] == c["area_requests"] == SUPER_GROUPS + 2  # five super-tiles, two tiles alone
    assert c["area_tiles"] == 16 * SUPER_GROUPS + 2  # 28 cut tiles were not planned: dropped
    with Counted(srv) as c:
        tilesweep("fetch", single, "--source", srv.template(), "-q")
    assert c["requests"] == len(TILES)
    assert stored(single) == stored(sup)
    assert_complete(sup, expected)
    text = (sup / "sweep.toml").read_text()
    cfg = tomllib.loads(text)["source"]
    assert cfg["supertile"] == 4 and "${SIM_KEY}" in cfg["template"] and "s3cret" not in text


def test_a_super_tile_of_the_wrong_size_falls_back_to_single_tiles(srv, sweep, expected):
    with Counted(srv) as c:
        srv.area_faults = Faults(wrong_size=1.0)
        tilesweep("fetch", sweep, "--source", srv.template(scheme="wms"), "--super", "4", "-q")
    assert c["wrong_size"] == SUPER_GROUPS  # each refused once, never cut
    assert c["area_requests"] == SUPER_GROUPS + len(TILES)  # then every tile alone
    assert assert_complete(sweep, expected)["fetch_retries"] == 0


def test_a_super_tile_that_keeps_failing_falls_back_to_single_tiles(srv, sweep, expected):
    """Retries spent on a super-tile (5xx here; timeouts and byte-budget cuts alike) do not
    fail its tiles: each alone may work (it does here), so they are asked for one by one."""
    with Counted(srv) as c:
        srv.area_faults = Faults(http_500=1.0)
        tilesweep("fetch", sweep, "--source", srv.template(scheme="wms"), "--super", "4", "-q",
                  "--retries", "1", "--max-attempts", "1")
    assert c["http_500"] == SUPER_GROUPS * 2  # 2 attempts each, then tile by tile
    assert c["area_requests"] == SUPER_GROUPS * 2 + len(TILES)
    assert_complete(sweep, expected)


def test_a_non_image_super_tile_falls_back_at_once(srv):
    """A 200 that is no image for an area (a WMS ServiceException over MAXSIZE) is not
    retried as a super-tile: its tiles are asked for alone, and all are ok."""
    tiles = [Tile(ZOOM, X0 + i, Y0 + j) for j in range(2) for i in range(2)]  # one 2 x 2 super-tile

    async def go():
        src = parse_source(srv.template(scheme="wms"), supertile=2)
        async with SuperTileFetcher(src, FetchSettings(retries=2, backoff_base_s=0.001)) as f:
            return [r.status async for r in f.fetch_many(tiles)], f.fallbacks

    with Counted(srv) as c:
        srv.area_faults = Faults(wrong_type=1.0)
        statuses, fallbacks = asyncio.run(go())
    assert statuses == ["ok"] * 4 and fallbacks == 1
    assert c["wrong_type"] == 1 and c["area_requests"] == 1 + 4


@lossless_jpeg
def test_truncated_super_tiles_are_retried_whole(srv, sweep, expected):
    with Counted(srv) as c:
        srv.area_faults = Faults(truncate=0.3, seed=2)
        tilesweep("fetch", sweep, "--source", srv.template(scheme="wms"), "--super", "4", "-q")
    assert c["truncate"] > 0
    st = assert_complete(sweep, expected)
    assert st["fetch_retries"] == c["truncate"] and c["area_requests"] == SUPER_GROUPS + 2 + c["truncate"]


@lossless_jpeg
def test_static_image_route_cuts_and_counts_requests(srv, expected):
    """The static-image placeholders ({bbox_4326}), and the fetcher's accounting in process:
    requests, attempts, and requests (not tiles) in flight."""

    async def go():
        src = parse_source(srv.template(scheme="static"), supertile=4)
        async with SuperTileFetcher(src, FetchSettings(concurrency=4)) as f:
            got = {r.tile: r async for r in f.fetch_many(TILES)}
            return got, f.stats.snapshot(), f.super_requests

    with Counted(srv) as c:
        got, st, supers = asyncio.run(go())
    assert {t: r.data for t, r in got.items()} == expected
    assert st["requests"] == supers + 2 == SUPER_GROUPS + 2 == c["requests"]
    assert st["ok"] == len(TILES) and sum(r.attempts for r in got.values()) == st["requests"]
    assert st["max_in_flight"] == 4  # concurrency counts requests: a super-tile's tiles share one slot


def test_bbox_placeholders_and_the_recorded_config(monkeypatch):
    monkeypatch.setenv("K", "v")
    src = parse_source("https://wms.example/ows?SRS=EPSG:3857&BBOX={bbox}&WIDTH={width}&HEIGHT={height}&k=${K}", supertile=8)
    minx, miny, maxx, maxy = xy_bounds(Tile(18, 137312, 91872))
    url = src.area_url(Tile(18, 137312, 91872), 8)
    box = [float(v) for v in url.split("BBOX=")[1].split("&")[0].split(",")]
    side = maxx - minx
    assert box == pytest.approx([minx, maxy - 8 * side, minx + 8 * side, maxy], abs=1e-6)
    assert "WIDTH=2048&HEIGHT=2048" in url
    assert Source.from_config(src.to_config()) == src
    assert "supertile" not in parse_source("http://h/{z}/{x}/{y}.png").to_config()  # tile sources keep their config


@pytest.mark.parametrize("template, n, words", [
    ("http://h/{z}/{x}/{y}.jpg", 4, "needs a bbox template"),
    ("http://h/wms?BBOX={bbox}", 1, "and {width} and {height}"),
    ("http://h/{bbox}/{z}/{width}/{height}", 1, "mixes {z} with a bbox placeholder"),
    ("http://h/{bbox}/{width}/{height}", 3, "super-tile size 3 is not one of 1, 2, 4, 8, 16"),
])
def test_bad_bbox_templates(template, n, words):
    with pytest.raises(UsageError) as e:
        parse_source(template, supertile=n)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_super_tiles_larger_than_the_blocks_are_refused():
    """`fetch` calls this before it records the source (one line, exit 2)."""
    src = parse_source("http://127.0.0.1:9/wms?BBOX={bbox}&W={width}&H={height}", supertile=8)
    check_blocks(src, ZOOM, ZOOM - 3)  # 8 x 8 blocks: fits
    with pytest.raises(UsageError) as e:
        check_blocks(src, ZOOM, ZOOM - 2)  # 4 x 4 blocks (plan --block-zoom 16)
    assert "--super 8 needs blocks of at least 8 x 8 tiles; this sweep's blocks are 4 x 4" in str(e.value)


def test_png_and_the_jpeg_fallback_keep_the_pixels(expected):
    """PNG is cut without loss of pixels; JPEG without libturbojpeg is re-encoded at 95
    (close, not exact). The lossless JPEG crop is the byte-for-byte tests above."""
    import numpy as np

    from tilesweep.decode import decode
    from tilesweep.sim.world import encode
    from tilesweep.tilecut import CutError, _jpeg_reencoded, cut

    tiles = [Tile(ZOOM, X0 + i, Y0 + j) for j in range(2) for i in range(2)]
    pixels = [decode(expected[t]) for t in tiles]
    mosaic = np.concatenate([np.concatenate(pixels[:2], axis=1), np.concatenate(pixels[2:], axis=1)], axis=0)
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    for got, want in zip(cut(encode(mosaic, "png"), 256, cells), pixels):
        assert got[:8] == b"\x89PNG\r\n\x1a\n" and np.array_equal(decode(got), want)
    boxes = [(c * 256, r * 256, 256, 256) for c, r in cells]
    for got, want in zip(_jpeg_reencoded(encode(mosaic, "jpeg", 95), boxes), pixels):
        assert np.abs(decode(got).astype(int) - want).mean() < 3
    with pytest.raises(CutError):
        cut(b"GIF89a" + bytes(100), 256, cells)


def test_a_refused_super_tile_counts_once_towards_the_auth_stop(sweep):
    """401 to a super-tile fails its 16 tiles at once, but it is one refusal (one request),
    not 16: seven refused requests stay under auth_failures_to_stop=10 (the block dies)."""
    from helpers.hostile import hostile_server

    from tilesweep.worker import Worker, WorkerSettings

    def refuse(handler):
        handler.send_response(401)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with hostile_server("refuse", _refuse=refuse) as (template, counts):
        base = template.split("/{z}")[0]
        with Sweep.open(sweep) as sw:
            src = sw.bind_source(parse_source(base + "/wms?SRS=EPSG:3857&BBOX={bbox}&WIDTH={width}&HEIGHT={height}", supertile=4))
        fetch = FetchSettings(auth_failures_to_stop=10, retries=1, backoff_base_s=0.001)
        Worker(sweep, ZOOM, ZOOM - 4, src, fetch, WorkerSettings(probe_blocks=0, max_attempts=1)).run()
    assert counts["requests"] == SUPER_GROUPS + 2  # each refused once, not retried
    st = status_json(sweep)
    assert st["blocks_dead"] == 1 and "401" in st["dead_blocks"][0]["error"], st


def test_cut_tiles_carry_no_markers_and_are_bounded_in_bytes(expected):
    """A super-tile's APPn/COM markers (an ICC profile, EXIF, XMP) are not copied into each
    tile, and a cut tile over max tile bytes is a CutError (the super-tile falls back)."""
    import numpy as np

    from tilesweep.decode import decode
    from tilesweep.sim.world import encode
    from tilesweep.tilecut import CutError, cut

    tiles = [Tile(ZOOM, X0 + i, Y0 + j) for j in range(2) for i in range(2)]
    pixels = [decode(expected[t]) for t in tiles]
    mosaic = encode(np.concatenate([np.concatenate(pixels[:2], axis=1), np.concatenate(pixels[2:], axis=1)], axis=0), "jpeg", 90)
    com = b"\xff\xfe" + (60002).to_bytes(2, "big") + b"x" * 60000  # a 60 kB comment, twice
    fat = mosaic[:2] + com + com + mosaic[2:]
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    plain, cut_fat = cut(mosaic, 256, cells), cut(fat, 256, cells)
    assert [len(b) for b in cut_fat] == [len(b) for b in plain] and max(map(len, plain)) < 60000
    assert all(np.array_equal(decode(a), decode(b)) for a, b in zip(cut_fat, plain))
    with pytest.raises(CutError, match=r"tile has [\d,]+ bytes, over 1,024"):
        cut(mosaic, 256, cells, max_bytes=1024)


def test_a_super_tile_body_counts_in_flight_until_it_is_cut(srv, monkeypatch):
    """The body waiting for (and in) the cutter is still in the in-flight byte budget."""
    import tilesweep.supertile as supertile

    seen, fetchers = [], []
    real_cut = supertile.cut

    def cut_seen(body, *args):  # the real cut, noting the bytes in flight as it starts
        seen.append((fetchers[0]._transport.inflight_bytes, len(body)))
        return real_cut(body, *args)

    monkeypatch.setattr(supertile, "cut", cut_seen)
    tiles = [Tile(ZOOM, X0 + i, Y0 + j) for j in range(2) for i in range(2)]

    async def go():
        async with SuperTileFetcher(parse_source(srv.template(scheme="wms"), supertile=2)) as f:
            fetchers.append(f)
            return [r.status async for r in f.fetch_many(tiles)], f._transport.inflight_bytes

    statuses, after = asyncio.run(go())
    assert statuses == ["ok"] * 4 and after == 0
    assert len(seen) == 1 and seen[0][0] >= seen[0][1] > 0, seen


def test_single_requests_of_a_fallback_have_one_tiles_body_limit():
    """Tiles asked for alone may have max tile bytes, not the super-tile's n * n times that:
    an 8 MB answer to a tile is cut from its Content-Length before it is read."""
    from helpers.hostile import hostile_server

    def answer(handler):
        if "WIDTH=512" in handler.path:  # the super-tile: refused (it falls back)
            handler.send_response(400)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        else:
            handler._zeros()

    tiles = [Tile(ZOOM, X0 + i, Y0 + j) for j in range(2) for i in range(2)]
    with hostile_server("answer", _answer=answer, body_bytes=8 * 2**20) as (template, counts):
        src = parse_source(template.split("/{z}")[0] + "/wms?BBOX={bbox}&WIDTH={width}&HEIGHT={height}", supertile=2)

        async def go():
            async with SuperTileFetcher(src, FetchSettings(max_tile_bytes=3 * 2**20, retries=0)) as f:
                got = [r async for r in f.fetch_many(tiles)]
                return got, f._transport.max_inflight_bytes_seen

        got, seen = asyncio.run(go())
    assert counts["requests"] == 1 + 4 and [r.status for r in got] == ["failed"] * 4
    assert all("body over 3,145,728 bytes" in r.error for r in got), got[0].error
    assert seen < 2**20  # nothing of the 8 MB bodies was received


def test_super_tiles_in_flight_are_bounded_by_the_byte_budget(srv):
    """--concurrency counts requests, but a super-tile carries n * n tiles' bytes: no more
    are in flight than the in-flight budget holds (here 512 KiB / (4 x 64 KiB) = 2)."""
    from tilesweep.supertile import EXPECTED_TILE_BYTES

    async def go():
        src = parse_source(srv.template(scheme="wms"), supertile=2)
        fs = FetchSettings(concurrency=16, max_tile_bytes=256 * 2**10, max_inflight_bytes=8 * EXPECTED_TILE_BYTES)
        async with SuperTileFetcher(src, fs) as f:
            got = [r.status async for r in f.fetch_many(TILES)]
            return got, f.stats.max_in_flight, f.max_super_in_flight, f.super_requests

    with Counted(srv) as c:
        srv.area_faults = Faults(latency_ms=30)
        statuses, peak, cap, supers = asyncio.run(go())
    assert statuses == ["ok"] * len(TILES) and cap == 2 and supers == c["area_requests"] == 15
    assert peak == 2


def test_a_sparse_sample_leases_blocks_as_for_single_tiles(tmp_path, srv):
    """A twentieth of each block is too sparse to form super-tiles (0.8 of 16 per 4 x 4 cell):
    requests are single tiles, so the worker leases as many blocks as for a tile source
    (2 * ceil(16 / tiles per block)), not 16 times that."""
    from tilesweep.area import load_area
    from tilesweep.plan import PlanSpec
    from tilesweep.worker import Worker, WorkerSettings

    w, _, _, n = bounds(Tile(ZOOM, X0, Y0))
    _, s, e, _ = bounds(Tile(ZOOM, X0 + 31, Y0 + 15))  # two blocks
    d = (e - w) / 128
    sweep = tmp_path / "sample"
    area = load_area(f"{w + d:.7f},{s + d:.7f},{e - d:.7f},{n - d:.7f}")
    sw, _ = Sweep.plan(sweep, area, PlanSpec(zoom=ZOOM, block_zoom=ZOOM - 4, fraction=0.05))
    with sw:
        src = sw.bind_source(parse_source(srv.template(scheme="wms"), supertile=4))
    worker = Worker(sweep, ZOOM, ZOOM - 4, src, FetchSettings(concurrency=16), WorkerSettings(probe_blocks=0))
    worker.run()
    st = status_json(sweep)
    assert st["blocks_done"] == 2 and 10 < st["tiles_ok"] < 45, st
    assert worker._max_blocks == 2 * -(-16 // (st["tiles_total"] // 2))


def test_fallback_singles_take_the_workers_slots(srv, sweep, expected):
    """A super-tile that falls back asks for its tiles within the worker's --concurrency
    (its request slots), not a second --concurrency of its own."""
    from tilesweep.worker import Worker, WorkerSettings

    with Sweep.open(sweep) as sw:
        src = sw.bind_source(parse_source(srv.template(scheme="wms"), supertile=4))
    worker = Worker(sweep, ZOOM, ZOOM - 4, src, FetchSettings(concurrency=4), WorkerSettings(probe_blocks=0))
    tile_faults = srv.faults
    try:
        with Counted(srv) as c:
            srv.area_faults = Faults(wrong_size=1.0)
            srv.faults = Faults(latency_ms=20)  # single tiles take a while: they overlap
            worker.run()
    finally:
        srv.faults = tile_faults
    assert c["wrong_size"] == SUPER_GROUPS
    assert_complete(sweep, expected)
    assert worker.fetcher.stats.max_in_flight <= 4


def test_re_encoded_cuts_keep_greyscale_and_lossy_webp():
    """The re-encoding cuts keep what the source is: a greyscale JPEG stays greyscale (the
    fallback without libturbojpeg), a lossy WebP stays lossy (not ~4x its bytes lossless)."""
    import io

    import numpy as np
    import simplejpeg
    from PIL import Image

    from tilesweep.tilecut import _jpeg_reencoded, cut

    rng = np.random.default_rng(1)
    grey = (rng.random((512, 512, 1)) * 60 + np.linspace(0, 180, 512)[None, :, None]).astype(np.uint8)
    gjpeg = simplejpeg.encode_jpeg(grey, colorspace="GRAY", colorsubsampling="Gray")
    tiles = _jpeg_reencoded(gjpeg, [(0, 0, 256, 256), (256, 256, 256, 256)])
    assert [simplejpeg.decode_jpeg_header(t)[2] for t in tiles] == ["Gray", "Gray"]
    buf = io.BytesIO()
    Image.fromarray(np.repeat(grey, 3, axis=2)).save(buf, "WEBP", quality=80)
    webp = buf.getvalue()
    parts = cut(webp, 256, [(0, 0), (1, 0), (0, 1), (1, 1)])
    assert all(p[12:16] == b"VP8 " for p in parts) and sum(map(len, parts)) < 2 * len(webp)
