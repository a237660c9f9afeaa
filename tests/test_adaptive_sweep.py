"""A sparse sample end to end (issue 15): planned into adaptive blocks of several zooms,
fetched from the simulator, and read back by status, tiles ls / get, export, verify,
predict and run exactly as a dense sweep is."""

import os
import sqlite3
from pathlib import Path

import pytest
from helpers.cli import status_json, tilesweep

from tilesweep.plan import tile_hash
from tilesweep.sweep import open_sweep_queue
from tilesweep.sim import World, run_in_thread
from tilesweep.sweep import Sweep
from tilesweep.tiles import Tile

BBOX = "8.50,47.30,8.70,47.45"  # ~22,000 tiles at zoom 18
ZOOM, FRACTION, SEED, N = 18, 0.01, 4, 64
WORLD_SEED = 3
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}  # helpers.models


@pytest.fixture(scope="module")
def sim():
    with run_in_thread(World(seed=WORLD_SEED)) as srv:
        yield srv


@pytest.fixture(scope="module")
def sparse(tmp_path_factory, sim):
    sweep = tmp_path_factory.mktemp("adaptive") / "s"
    tilesweep("plan", BBOX, sweep, "--zoom", ZOOM, "--fraction", FRACTION, "--seed", SEED, "--block-tiles", N)
    tilesweep("fetch", sweep, "--source", sim.template(), "--concurrency", 16, "-q")
    return sweep


def planned(sweep):
    with open_sweep_queue(sweep) as q:
        blocks = list(q.blocks())
    return blocks, {t for b in blocks for t in b.tile_list(ZOOM)}


def test_the_sample_lands_in_few_full_blocks_of_several_zooms(sparse):
    blocks, tiles = planned(sparse)
    import mercantile

    w, s, e, n = map(float, BBOX.split(","))
    expected = {Tile(t.z, t.x, t.y) for t in mercantile.tiles(w, s, e, n, ZOOM)}
    assert tiles == {t for t in expected if tile_hash(SEED, t) < FRACTION * 2**64}
    assert all(0 < b.tiles <= N for b in blocks)
    assert len({b.z for b in blocks}) >= 2 and max(b.z for b in blocks) < ZOOM - 3
    assert len(tiles) / len(blocks) >= N / 4
    cfg = Sweep.open(sparse).plan_config
    assert cfg["block_tiles"] == N and cfg["block_zoom_min"] == min(b.z for b in blocks) and cfg["block_zoom"] == max(b.z for b in blocks)
    # one shard per block, in the block's own zoom folder; about N times fewer than tiles
    shards = sorted((sparse / "tiles").rglob("*.shard"))
    assert len(shards) == len(blocks) <= 2 * len(tiles) / N + 2
    assert {p.relative_to(sparse / "tiles").parts[0] for p in shards} == {str(b.z) for b in blocks}


def test_status_tiles_ls_get_and_verify_work_unchanged(sparse):
    blocks, tiles = planned(sparse)
    st = status_json(sparse)
    assert st["mismatch"] is None and st["tiles_done"] == st["tiles_total"] == len(tiles)
    assert st["blocks_done"] == st["blocks_total"] == len(blocks) and st["tiles_ok"] == len(tiles)
    lines = tilesweep("tiles", "ls", sparse).stdout.splitlines()
    listed = [Tile(*map(int, line.split("\t")[0].split("/"))) for line in lines]
    assert set(listed) == tiles and len(listed) == len(tiles)
    from tilesweep.tiles import tile_id

    assert [tile_id(t) for t in listed] == sorted(tile_id(t) for t in listed), "global Hilbert order across zooms"
    world = World(seed=WORLD_SEED)
    for t in sorted(tiles)[:: max(1, len(tiles) // 5)]:
        got = tilesweep("tiles", "get", sparse, f"{t.z}/{t.x}/{t.y}", "-o", sparse.parent / "t.jpg")
        assert got.returncode == 0 and (sparse.parent / "t.jpg").read_bytes() == world.render(t)
    res = tilesweep("verify", sparse)
    assert f"checked {len(blocks):,} shards: {len(blocks):,} ok" in res.stdout


def test_export_holds_every_tile(sparse, tmp_path):
    _, tiles = planned(sparse)
    out = tmp_path / "s.mbtiles"
    tilesweep("export", sparse, out)
    with sqlite3.connect(out) as db:
        rows = db.execute("SELECT zoom_level, tile_column, tile_row FROM tiles").fetchall()
    assert {Tile(z, x, (1 << z) - 1 - r) for z, x, r in rows} == tiles
    pm = tmp_path / "s.pmtiles"
    tilesweep("export", sparse, pm)
    from pmtiles.reader import MmapSource, all_tiles

    with open(pm, "rb") as f:
        got = {Tile(*zxy) for zxy, _ in all_tiles(MmapSource(f))}
    assert got == tiles


def test_predict_and_run_score_every_tile_once(sparse, tmp_path, sim):
    _, tiles = planned(sparse)
    tilesweep("predict", sparse, "--model", "helpers.models:greenness", "--quiet", env=ENV)
    import pyarrow.dataset as ds

    rows = ds.dataset(sparse / "predictions" / "helpers.models_greenness", format="parquet").to_table(columns=["z", "x", "y"]).to_pylist()
    assert sorted(Tile(r["z"], r["x"], r["y"]) for r in rows) == sorted(tiles)
    # run (streamed: fetch straight into the model) on a fresh sweep of the same plan
    other = tmp_path / "r"
    tilesweep("plan", BBOX, other, "--zoom", ZOOM, "--fraction", FRACTION, "--seed", SEED, "--block-tiles", N)
    tilesweep("run", other, "--model", "helpers.models:greenness", "--source", sim.template(), "--concurrency", 16, "--quiet", env=ENV)
    rows = ds.dataset(other / "predictions" / "helpers.models_greenness", format="parquet").to_table(columns=["z", "x", "y"]).to_pylist()
    assert sorted(Tile(r["z"], r["x"], r["y"]) for r in rows) == sorted(tiles)
    st = status_json(other)
    assert st["mismatch"] is None and st["tiles_done"] == len(tiles)
