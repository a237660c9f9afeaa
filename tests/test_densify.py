"""Densify around detections, and traced lines, on a real sampled sweep: the simulator over
loopback, the demo model, `tilesweep` subprocesses killed with SIGKILL mid-round.

The accounting must hold whatever is killed when: every planned tile (the sample's and
each round's) is predicted exactly once, `status` adds up, and each tile's round is known."""

import json
import math
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from helpers.cli import popen, tilesweep

from tilesweep.densify import DensifySettings, densify, plan_round
from tilesweep.errors import UsageError
from tilesweep.queue import SqliteQueue
from tilesweep.sim import Faults, World, run_in_thread
from tilesweep.sweep import Sweep

TOWER_BBOX = "8.505,47.340,8.531,47.354"  # 320 zoom-18 tiles, 47 of them hold a tower (seed 5)


@pytest.fixture(scope="module")
def sim():
    # a little latency per tile, so that a run lasts long enough to be killed in the middle
    with run_in_thread(World(seed=5), Faults(latency_ms=60, seed=3)) as srv:
        yield srv


def rows(sweep: Path):
    parts = sorted((sweep / "predictions").glob("*/part-*.parquet"))
    return ds.dataset(parts, format="parquet").to_table(columns=["z", "x", "y", "block", "label"]).to_pylist() if parts else []


def planned(sweep: Path):
    """Every planned tile -> its block id, from the queue's blocks and their tile sets."""
    with SqliteQueue(sweep / "queue.sqlite") as q:
        return {tuple(t): b.id for b in q.blocks() for t in b.tile_list(18)}


def status(sweep):
    """What `tilesweep status --json` prints (the same call, in this process: cheaper)."""
    with Sweep.open(sweep) as sw:
        return sw.status().to_json()


def run_args(sweep, sim):
    return ["run", sweep, "--source", sim.template(), "--model", "demo", "--concurrency", "4", "--quiet"]


def test_densify_after_kill_9_mid_round_predicts_every_tile_once(tmp_path, sim):
    sweep = tmp_path / "s"
    tilesweep("plan", TOWER_BBOX, sweep, "--zoom", 18, "--fraction", 0.2, "--seed", 1)
    tilesweep(*run_args(sweep, sim))
    sample = planned(sweep)
    assert 40 <= len(sample) <= 90
    detected = sum(r["label"] for r in rows(sweep))
    assert detected >= 3

    # same sweep, same predictions: same round (a pure function of them)
    with Sweep.open(sweep) as sw:
        first, _ = plan_round(sw, settings=DensifySettings(radius=1, along=True))
        again, _ = plan_round(sw, settings=DensifySettings(radius=1, along=True))
    assert first.blocks == again.blocks and first.blocks and first.detections == detected

    # a round killed -9 between its record and its queue put: status says so, densify completes it
    res = tilesweep("densify", sweep, "--radius", 1, "--along", check=False, env={"TILESWEEP_TEST_KILL_DENSIFY": "recorded"})
    assert res.returncode == -signal.SIGKILL
    st = status(sweep)
    assert "densify" in st["mismatch"] and st["tiles_total"] == len(sample) + first.tiles
    res = tilesweep("densify", sweep, "--radius", 1, "--along")
    assert "completed an earlier round cut short" in res.stdout and "no new tiles" in res.stdout
    db = sqlite3.connect(sweep / "densify.sqlite")
    blocks_a = db.execute("SELECT * FROM round_blocks ORDER BY id").fetchall()
    assert [(b[2], b[3], b[4], b[5], b[6]) for b in blocks_a] == [tuple(b) for b in first.blocks]
    st = status(sweep)
    (r1,) = st["densify"]
    assert r1["round"] == 1 and r1["detections"] == detected and r1["tiles"] == sum(b[5] for b in blocks_a)
    assert st["tiles_total"] == len(sample) + r1["tiles"] and st["tiles_pending"] == r1["tiles"] and st["mismatch"] is None

    # the round's tiles are all new, each in one of its blocks; the sample's are untouched
    plan = planned(sweep)
    new = {t: b for t, b in plan.items() if t not in sample}
    assert len(new) == r1["tiles"] and set(plan) >= set(sample)
    assert {b[0] for b in blocks_a} == set(new.values())

    # run the round, killed -9 at random moments, then to the end
    rng, kills = random.Random(12), 0
    for _ in range(2):
        p = popen(*run_args(sweep, sim))
        lock, deadline = sweep / "predictions" / ".lock", time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline and (not lock.exists() or f"(pid {p.pid})" not in lock.read_text()):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.3, 1.5))
        if p.poll() is not None:
            break
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 1
    # the same command goes on, and with --densify plans and runs the next round too
    res = tilesweep(*run_args(sweep, sim), "--densify", 1, "--densify-along", "--densify-rounds", 2)
    st = status(sweep)
    assert [r["round"] for r in st["densify"]] == [1, 2] and "densify round 2:" in res.stdout, res.stdout
    plan = planned(sweep)
    assert st["mismatch"] is None and st["tiles_done"] == st["tiles_total"] == len(plan) == len(sample) + sum(r["tiles"] for r in st["densify"])
    got = rows(sweep)
    keys = [(r["z"], r["x"], r["y"]) for r in got]
    assert len(keys) == len(set(keys)) == len(plan), "a tile predicted twice or not at all"
    assert {(r["z"], r["x"], r["y"]): r["block"] for r in got} == plan
    assert st["predictions"][0]["blocks"] == st["blocks_total"]
    with Sweep.open(sweep) as sw:  # --rounds 2: the sweep has its two rounds
        assert densify(sw, settings=DensifySettings(radius=1, along=True), max_rounds=2).tiles == 0

    out = tmp_path / "lines.geojson"
    res = tilesweep("lines", sweep, "-o", out)
    doc = json.loads(out.read_text())
    assert doc["features"] and {f["geometry"]["type"] for f in doc["features"]} == {"LineString"}
    assert f"wrote {len(doc['features'])} lines (" in res.stdout


def test_densify_and_lines_bad_input_is_one_line_and_writes_nothing(tmp_path):
    sweep = tmp_path / "s"
    tilesweep("plan", TOWER_BBOX, sweep, "--zoom", 18, "--fraction", 0.2)
    for args, message in [
        (["--radius", "17"], "radius 17 is outside 0..16"),
        ([], "has no predictions yet"),
    ]:
        res = tilesweep("densify", sweep, *args, check=False)
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
    for kw, message in [({"radius": 0}, "radius 0 without --along"), ({"extend": 5}, "extend 5 is outside 0..4"),
                        ({"pair_m": 100}, "pair distances")]:
        with pytest.raises(UsageError, match=message):
            DensifySettings(**kw)
    with Sweep.open(sweep) as sw, pytest.raises(UsageError, match="rounds 0 must be at least 1"):
        densify(sw, max_rounds=0)
    assert not (sweep / "densify.sqlite").exists()
    for out, message in [("l.geojson", "no predictions yet")]:
        res = tilesweep("lines", sweep, "-o", tmp_path / out, check=False)
        assert res.returncode == 2 and message in res.stderr and not (tmp_path / out).exists(), res.stderr


def test_a_round_whose_cells_are_all_taken_goes_below_the_block_zoom(tmp_path):
    """Many rounds over one place take every ancestor cell of a tile, up to zoom 0: the next
    round's block is a finer cell (down to the tile itself), still sharing no tile."""
    from tilesweep.densify import group_blocks
    from tilesweep.plan import pack_tiles
    from tilesweep.queue import Block

    z, x, y = 18, 137316, 91872
    with SqliteQueue(tmp_path / "q.sqlite") as q:
        other = (x ^ 1, y)  # each taken cell holds another tile, never (x, y)
        q.put((Block(bz, x >> (z - bz), y >> (z - bz), 1,
                     pack_tiles(z - bz, (x >> (z - bz)) << (z - bz), (y >> (z - bz)) << (z - bz), [other[0]], [other[1]])), 0)
              for bz in range(0, 16))
        (block,) = group_blocks(q, z, np.array([x]), np.array([y]), 14, set())
    assert (block.z, block.x, block.y, block.tiles) == (16, x >> 2, y >> 2, 1)
    assert [tuple(t) for t in block.tile_list(z)] == [(z, x, y)]


def test_nested_round_shards_are_read_and_exported_in_tile_order(tmp_path):
    """A store whose shards nest (a sample's coarse block, rounds' finer blocks inside it,
    tile-disjoint): every tile reads back from its own shard, and the PMTiles export is in
    global tile-id order (a reader's binary search finds every tile)."""
    from pmtiles.reader import MmapSource, Reader

    from tilesweep.store import Status, TileStore, export_pmtiles
    from tilesweep.tiles import Tile, children

    outer = Tile(6, 33, 22)
    mid, inner = children(outer, 8)[5], children(outer, 10)[77]
    owner = {}
    for t in children(outer, 12):
        owner[t] = inner if t in set(children(inner, 12)) and t.x % 2 else mid if t in set(children(mid, 12)) and t.y % 3 else outer
        if owner[t] is outer and (t.x + t.y) % 5:
            del owner[t]  # a sparse sample
    store = TileStore(tmp_path / "tiles", 12, 10, coarsest=6)
    want = {t: b"\xff\xd8\xff" + f"{t.x},{t.y}".encode() for t in owner}
    for block in (outer, mid, inner):
        w = store.writer(block)
        for t in sorted((t for t in owner if owner[t] == block), key=lambda t: (t.y, t.x)):
            w.append(t, Status.OK, want[t])
        w.finish()
    assert {owner[t] for t in owner} == {outer, mid, inner}
    assert all(store.get(t) == want[t] for t in want)
    out = tmp_path / "nested.pmtiles"
    assert export_pmtiles(store, out, run_length=False)["tiles"] == len(want)
    with open(out, "rb") as f:
        r = Reader(MmapSource(f))
        assert all(r.get(t.z, t.x, t.y) == want[t] for t in want)


def test_along_follows_a_line_from_a_lone_detection_and_from_a_pair():
    """The tile sets of --along on a synthetic line (pure functions): a lone detection
    gets the ring where its next tower stands (one spacing out, either way) and not the
    tiles next to it; two detections one spacing apart get the band through them, on past
    each by a spacing, and no ring; two 1.5 km apart (two lines, or a gap) get neither."""
    from tilesweep.densify import _tile_metres, candidate_tiles

    z, x0, y0 = 18, 137_000, 91_600
    tile_m = float(_tile_metres(z, np.array([y0]))[0])
    step = round(350 / tile_m)  # one tower spacing east, in tiles
    settings = DensifySettings(radius=0, along=True)

    def tiles(xs, ys):
        cx, cy = candidate_tiles(z, np.array(xs), np.array(ys), settings)
        return {(int(a), int(b)) for a, b in zip(cx, cy)}

    lone = tiles([x0], [y0])
    dist = {(x, y): np.hypot(x - x0, y - y0) * tile_m for x, y in lone}
    assert (x0 + step, y0) in lone and (x0 - step, y0) in lone and (x0, y0 + step) in lone
    assert (x0 + 1, y0) not in lone and all(220 <= d <= 480 for xy, d in dist.items() if xy != (x0, y0))
    assert 40 <= len(lone) <= 90  # a ring, not the (2 * 5 + 1)**2 square that reaches as far

    pair = tiles([x0, x0 + step], [y0, y0])
    assert {(x, y0) for x in range(x0 - step, x0 + 2 * step + 1)} <= pair  # the band and a spacing past each
    assert (x0, y0 + step) not in pair and (x0 + step, y0 - step) not in pair  # no ring: the line's direction is known
    bend = round(step * math.sin(math.radians(20)))  # the next tower after a 20-degree bend, past either end
    assert (x0 + 2 * step, y0 + bend) in pair and (x0 - step, y0 - bend) in pair
    beyond = {(x, y): max(0, x0 - x, x - x0 - step) for x, y in pair}  # tiles past the nearer end
    assert all(abs(y - y0) <= 1.5 + (b + 1) * math.tan(math.radians(25)) for (x, y), b in beyond.items())  # within 25 degrees

    far = round(1500 / tile_m)
    apart = tiles([x0, x0 + far], [y0, y0])
    assert (x0 + far // 2, y0) not in apart  # no band between detections too far apart for one span
    assert (x0 + step, y0) in apart and (x0 + far - step, y0) in apart  # each is lone: its ring


def test_along_draws_through_where_a_model_placed_its_detections():
    """With points (a model with positions: where in the tile the tower stands), the band
    runs through the towers themselves and the ring is centred on the tower: a line that
    climbs almost a tile per spacing is followed onto the rows it reaches, which the band
    through the two tile centres (one row) never touches."""
    from tilesweep.densify import _tile_metres, candidate_tiles

    z, x0, y0 = 18, 137_000, 91_600
    tile_m = float(_tile_metres(z, np.array([y0]))[0])
    step = round(350 / tile_m)
    settings = DensifySettings(radius=0, along=True)
    xs, ys = np.array([x0, x0 + step]), np.array([y0, y0])
    points = np.array([[x0 + 0.5, y0 + 0.05], [x0 + step + 0.5, y0 + 0.95]])

    def tiles(pts):
        cx, cy = candidate_tiles(z, xs, ys, settings, pts)
        return {(int(a), int(b)) for a, b in zip(cx, cy)}

    placed, centred = tiles(points), tiles(None)
    assert centred == tiles(np.column_stack([xs + 0.5, ys + 0.5])), "no points: the tile centres"
    # a spacing past each end the line stands 0.9 tiles further up or down
    assert (x0 + 2 * step, y0 + 2) in placed and (x0 - step, y0 - 2) in placed
    assert (x0 + 2 * step, y0 + 2) not in centred and (x0 - step, y0 - 2) not in centred

    # a lone detection at its tile's east edge: the ring around the point, not the tile centre
    pt = np.array([[x0 + 0.95, y0 + 0.5]])
    ring = {(int(a), int(b)) for a, b in zip(*candidate_tiles(z, xs[:1], ys[:1], settings, pt))} - {(x0, y0)}
    dist = [np.hypot(x + 0.5 - pt[0, 0], y + 0.5 - pt[0, 1]) * tile_m for x, y in ring]
    assert ring and all(300 - 0.71 * tile_m <= d <= 400 + 0.71 * tile_m for d in dist)
    assert ring != tiles_lone_centre(z, x0, y0, settings)


def tiles_lone_centre(z, x0, y0, settings):
    from tilesweep.densify import candidate_tiles

    cx, cy = candidate_tiles(z, np.array([x0]), np.array([y0]), settings)
    return {(int(a), int(b)) for a, b in zip(cx, cy)} - {(x0, y0)}
