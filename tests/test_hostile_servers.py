"""Hostile servers (issue 16): huge bodies behind image magic, bodies that trickle, a source
that answers 404 (or empty 200s) for everything, a refused port, an unknown host. Real
HTTP on loopback (tests/helpers/hostile.py), real processes for the CLI, no mocks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib

import pytest
from helpers.cli import ENV, status_json, tilesweep
from helpers.hostile import hostile_server, refused_template

from tilesweep import tiles as T
from tilesweep.errors import UsageError
from tilesweep.fetch import FetchSettings, Fetcher
from tilesweep.imageformat import image_size, tile_sized
from tilesweep.sim import World, run_in_thread
from tilesweep.sources import parse_source

pytestmark = pytest.mark.timeout(300)

BBOX = "8.500,47.300,8.516,47.310"  # 156 tiles at zoom 18, 16 blocks at zoom 16
ZOOM, BLOCK_ZOOM = 18, 16
ORIGIN = T.Tile(18, 137316, 91872)
AREA = [T.Tile(18, ORIGIN.x + i, ORIGIN.y + j) for j in range(4) for i in range(4)]  # 16 tiles
QUICK = dict(backoff_base_s=0.005, backoff_max_s=0.02)


def fetch_all(template: str, settings: FetchSettings, tiles=AREA):
    async def main():
        async with Fetcher(parse_source(template), settings) as f:
            results = [r async for r in f.fetch_many(tiles)]
            return results, f.stats, f._transport.max_inflight_bytes_seen

    return asyncio.run(main())


def plan(tmp_path, name="s"):
    sweep = tmp_path / name
    tilesweep("plan", BBOX, sweep, "--zoom", ZOOM, "--block-zoom", BLOCK_ZOOM)
    return sweep


# --- bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_50_mb_of_zeros_behind_jpeg_magic_is_cut_at_the_tile_limit(chunked):
    with hostile_server("zeros", body_bytes=50 * 2**20, chunked=chunked) as (template, counts):
        results, stats, peak = fetch_all(template, FetchSettings(retries=2, **QUICK))
    assert [r.status for r in results] == ["failed"] * 16
    assert all("body over 4,194,304 bytes" in r.error and "not retried" in r.error for r in results), results[0].error
    assert all(r.attempts == 1 for r in results) and counts["requests"] == 16
    assert peak <= 16 * 4 * 2**20  # never more than the limit per tile in flight


def test_jpeg_magic_then_zeros_is_no_tile_even_when_small():
    with hostile_server("zeros", body_bytes=3000) as (template, _):
        results, stats, _ = fetch_all(template, FetchSettings(retries=1, **QUICK))
    assert [r.status for r in results] == ["failed"] * 16
    assert stats.by_reason == {"bad image header": 32}


def test_a_raised_tile_limit_lets_big_tiles_through():
    body = World(0).render(ORIGIN)
    with hostile_server("zeros", prefix=body, body_bytes=5 * 2**20) as (template, _):
        results, _, _ = fetch_all(template, FetchSettings(max_tile_bytes=8 * 2**20, max_inflight_bytes=64 * 2**20, **QUICK), AREA[:2])
    assert [r.status for r in results] == ["ok"] * 2 and len(results[0].data) == len(body) + 5 * 2**20


def test_the_bytes_in_flight_stay_under_the_budget():
    """8 bodies of 600 KB at once against a 1.5 MiB budget: transfers that would pass it are
    cut and tried again later; every tile ends ok, and never more than the budget was held."""
    body = World(0).render(ORIGIN)
    budget = 3 * 2**19
    settings = FetchSettings(concurrency=8, retries=200, max_tile_bytes=2**20, max_inflight_bytes=budget, **QUICK)
    with hostile_server("zeros", prefix=body, body_bytes=600_000, pace_s=0.01) as (template, _):
        results, stats, peak = fetch_all(template, settings)
    assert [r.status for r in results] == ["ok"] * 16
    assert stats.by_reason.get("bodies in flight over the byte budget", 0) > 0, stats.by_reason
    assert 0 < peak <= budget


def test_image_headers_give_their_size():
    import io

    from PIL import Image

    for fmt, kw in [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("WEBP", {}), ("WEBP", {"lossless": True}), ("GIF", {})]:
        buf = io.BytesIO()
        Image.new("RGB", (256, 512)).save(buf, fmt, **kw)
        assert image_size(buf.getvalue()) == (256, 512), (fmt, kw)
        assert tile_sized(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (8000, 8)).save(buf, "PNG")
    assert not tile_sized(buf.getvalue())  # no map tile is 8,000 px wide
    assert not tile_sized(b"\xff\xd8\xff\xe0" + bytes(5000)) and not tile_sized(b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_settings_and_cli_refuse_bad_byte_limits(tmp_path):
    with pytest.raises(UsageError, match="max tile bytes"):
        FetchSettings(max_tile_bytes=10)
    with pytest.raises(UsageError, match="in-flight"):
        FetchSettings(max_tile_bytes=2**20, max_inflight_bytes=1000)
    sweep = plan(tmp_path)
    res = tilesweep("fetch", sweep, "--source", "http://127.0.0.1:9/{z}/{x}/{y}.jpg", "--max-tile-bytes", "lots", check=False)
    assert res.returncode == 2 and "--max-tile-bytes 'lots'" in res.stderr
    assert "source" not in tomllib.loads((sweep / "sweep.toml").read_text())


def test_fetch_memory_does_not_grow_with_the_size_of_the_answers(tmp_path):
    """156 tiles of 50 MB each, all in flight (chunked: no length to refuse up front): the fetch cuts each
    at 4 MiB, stores nothing as ok, and its peak RSS stays flat (822 MB for 16 tiles before; 690 MB
    with the limit alone, as pooled handles kept their last body: 201 MB now, 163 MB of it imports)."""
    sweep = plan(tmp_path)
    with hostile_server("zeros", body_bytes=50 * 2**20, chunked=True) as (template, counts):
        probe = (
            "import resource, subprocess, sys; "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stderr, file=sys.stderr)"
        )
        res = subprocess.run(
            [sys.executable, "-c", probe, sys.executable, "-m", "tilesweep", "fetch", str(sweep), "--source", template,
             "--concurrency", "156", "--retries", "0", "--quiet"],
            capture_output=True, text=True, env=ENV, timeout=240,
        )
    code, rss_kb = map(int, res.stdout.split())
    assert code == 2, res.stderr  # no image at all: the source is unusable (see below)
    assert "body over 4,194,304 bytes" in res.stderr and "check the template" in res.stderr
    assert rss_kb < 300 * 1024, f"peak RSS {rss_kb / 1024:.0f} MB"
    st = status_json(sweep)
    assert st["tiles_ok"] == 0 and st["blocks_done"] == 0


# --- sources that give nothing ---------------------------------------------------------------


def assert_stopped_and_nothing_locked(res, sweep, *words):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "check the template" in res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    st = status_json(sweep)
    assert st["blocks_done"] == st["blocks_dead"] == st["blocks_leased"] == 0, st
    assert st["blocks_pending"] == 16
    assert "source" not in tomllib.loads((sweep / "sweep.toml").read_text())
    assert not list((sweep / "tiles").rglob("*.partial")) if (sweep / "tiles").exists() else True


@pytest.mark.parametrize("mode, answer", [("not_found", "http 404"), ("empty", "http 200 empty body")])
def test_a_source_with_nothing_but_empty_answers_stops_and_locks_nothing(tmp_path, mode, answer):
    sweep = plan(tmp_path)
    with hostile_server(mode) as (template, _):
        res = tilesweep("fetch", sweep, "--source", template, check=False)
    assert_stopped_and_nothing_locked(res, sweep, answer)
    # the right template is not refused as a second source, and the sweep completes
    with run_in_thread(World(seed=5)) as srv:
        tilesweep("fetch", sweep, "--source", srv.template(), "--quiet")
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and st["tiles_ok"] == 156


def test_run_with_a_404_source_stops_too(tmp_path):
    sweep = plan(tmp_path)
    with hostile_server("not_found") as (template, _):
        res = tilesweep("run", sweep, "--model", "demo", "--source", template, "--quiet", check=False)
    assert_stopped_and_nothing_locked(res, sweep, "http 404")
    assert not list((sweep / "predictions").rglob("*.parquet")) if (sweep / "predictions").exists() else True


def test_a_refused_port_stops_with_one_line(tmp_path):
    sweep = plan(tmp_path)
    res = tilesweep("fetch", sweep, "--source", refused_template(), "--retries", 1, "--workers", 2, check=False)
    assert_stopped_and_nothing_locked(res, sweep, "cannot connect")


def test_an_unknown_host_stops_with_one_line(tmp_path):
    sweep = plan(tmp_path)
    res = tilesweep("fetch", sweep, "--source", "http://no-such-host.invalid/{z}/{x}/{y}.jpg", "--retries", 1, check=False)
    assert_stopped_and_nothing_locked(res, sweep, "cannot resolve host")


def test_sparse_coverage_is_not_mistaken_for_a_wrong_template(tmp_path):
    """Most blocks empty (coverage of one corner) but some images: the sweep goes on."""
    from tilesweep.sim import Faults

    corner = (8.49, 47.29, 8.503, 47.303)
    sweep = plan(tmp_path)
    with run_in_thread(World(seed=5), Faults(coverage=corner)) as srv:
        tilesweep("fetch", sweep, "--source", srv.template(), "--quiet")
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and 0 < st["tiles_ok"] < st["tiles_empty"]


# --- changing a sweep's source -----------------------------------------------------------------


def test_replace_source_refuses_to_mix_imagery_unless_told(tmp_path):
    sweep = plan(tmp_path)
    with run_in_thread(World(seed=5)) as srv:
        tilesweep("fetch", sweep, "--source", srv.template(), "--quiet")
        res = tilesweep("fetch", sweep, "--source", srv.template("png"), check=False)
        assert res.returncode == 2 and "--replace-source" in res.stderr
        res = tilesweep("fetch", sweep, "--source", srv.template("png"), "--replace-source", check=False)
        assert res.returncode == 2 and "--mix-sources" in res.stderr and "156 tiles" in res.stderr
        assert srv.template() in (sweep / "sweep.toml").read_text()
        tilesweep("fetch", sweep, "--source", srv.template("png"), "--replace-source", "--mix-sources")
        assert srv.template("png") in (sweep / "sweep.toml").read_text()


def test_replace_source_fetches_again_the_blocks_an_old_wrong_template_left_empty(tmp_path):
    """A sweep made before the probe existed: every block done with only 404s and the
    wrong template recorded. --replace-source queues those blocks again, deletes their
    shards, and the sweep completes from the right source."""
    from tilesweep.sweep import Sweep
    from tilesweep.worker import Worker, WorkerSettings

    sweep = plan(tmp_path)
    with hostile_server("not_found") as (template, _):
        with Sweep.open(sweep) as sw:
            src = sw.bind_source(parse_source(template))
        Worker(sweep, ZOOM, BLOCK_ZOOM, src, FetchSettings(**QUICK), WorkerSettings(probe_blocks=0)).run()
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and st["tiles_empty"] == 156
    with run_in_thread(World(seed=5)) as srv:
        res = tilesweep("fetch", sweep, "--source", srv.template(), "--replace-source", "--quiet")
    assert "16 done blocks with no image queued again" in res.stderr
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and st["tiles_ok"] == 156 and st["tiles_empty"] == 0


# --- one bad tile: a bounded cost --------------------------------------------------------------


def test_a_trickling_tile_costs_at_most_its_budget_per_attempt_of_the_block(tmp_path):
    """The source serves images, but one tile trickles in at 2 bytes/s. With a 2 s tile
    budget and 2 attempts per block, that block goes dead after at most 2 leases of one
    budget each; the server sees a bounded number of requests for that tile, and status
    names the tile and the budget."""
    import mercantile

    sweep = plan(tmp_path)
    w, s, e, n = map(float, BBOX.split(","))
    planned = sorted(T.Tile(t.z, t.x, t.y) for t in mercantile.tiles(w, s, e, n, ZOOM))
    bad = planned[40]
    world = {"*": World(seed=5).render(bad)}  # one image for every good tile: the test is about time
    with hostile_server("mostly_ok", world=world, bad_paths={f"/{bad.z}/{bad.x}/{bad.y}.jpg"}, trickle_bps=2.0) as (template, counts):
        res = tilesweep("fetch", sweep, "--source", template, "--tile-budget", 2, "--max-attempts", 2, "--retries", 6,
                        "--concurrency", 32, check=False)
        bad_requests = counts[f"/{bad.z}/{bad.x}/{bad.y}.jpg"]
    assert res.returncode == 1, res.stderr
    st = status_json(sweep)
    assert st["blocks_dead"] == 1 and st["blocks_done"] == 15
    # each lease: attempts cut to what is left of 2 s (at 30 s of read timeout, one); 2 leases
    assert 1 <= bad_requests <= 2 * 2, (bad_requests, res.stdout, res.stderr, st)
    dead = st["dead_blocks"]
    assert len(dead) == 1 and f"{bad.z}/{bad.x}/{bad.y}" in dead[0]["error"] and "tile budget of 2 s" in dead[0]["error"]
    shown = tilesweep("status", sweep, check=False)
    assert "tile budget of 2 s" in shown.stderr and "1 dead blocks" in shown.stderr
