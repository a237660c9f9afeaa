"""`tilesweep predict` end to end: the simulator over loopback, a real fetch through the
CLI, real Parquet parts read back with pyarrow.

The strongest test kills the predict process with SIGKILL at random instants and runs it
again: the parts must end up holding every fetched tile exactly once."""

import csv
import math
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.cli import popen, status_json, tilesweep

from tilesweep.model.evaluate import precision_recall
from tilesweep.predict import BlockRows, PredictionSink
from tilesweep.queue import State
from tilesweep.sim import World, run_in_thread
from tilesweep.store import Status, TileStore
from tilesweep.sweep import open_sweep_queue
from tilesweep.tiles import Tile, bounds

TESTS = Path(__file__).parent
ZOOM = 18
WORLD_SEED = 5  # the demo model was trained on world seed 0
TOWER_BBOX = "8.505,47.340,8.531,47.354"  # 320 zoom-18 tiles, 47 of them hold a tower (seed 5)
SMALL_BBOX = "8.500,47.300,8.516,47.310"  # 156 tiles in 16 blocks at zoom 16


@pytest.fixture(scope="module")
def sim():
    with run_in_thread(World(seed=WORLD_SEED)) as srv:
        yield srv


def fetched(tmp_path, sim, bbox, block_zoom, name="s"):
    sweep = tmp_path / name
    tilesweep("plan", bbox, sweep, "--zoom", ZOOM, "--block-zoom", block_zoom)
    tilesweep("fetch", sweep, "--source", sim.template(), "--quiet")
    return sweep


def ok_tiles(sweep, block_zoom):
    store = TileStore(sweep / "tiles", ZOOM, block_zoom)
    tiles = {t for t, _ in store.iter_tiles(Status.OK)}
    store.close()
    return tiles


def read_predictions(sweep):
    """All rows of all parts of the one model folder, as a pyarrow table."""
    folders = [p for p in (sweep / "predictions").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    parts = sorted(folders[0].glob("*.parquet"))
    assert parts and not list(folders[0].glob("*.partial")), "only whole parts remain"
    return pq.read_table(folders[0]), parts


def assert_exactly_once(table, expected):
    keys = list(zip(table["x"].to_pylist(), table["y"].to_pylist()))
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicate rows"
    assert {Tile(ZOOM, x, y) for x, y in keys} == expected


def kill_at_random(args, sweep, rng, times=6, wait=(0.8, 2.0)):
    """Start `tilesweep ARGS` (cwd tests/, so `helpers.*` models import) and SIGKILL its
    process group after a random wait, up to ``times`` times or until a run ends by itself.
    Returns the number of kills and the ledger's block count after each."""
    kills, progress = 0, []
    for _ in range(times):
        p = popen(*args, cwd=TESTS)
        # the clock starts once it is at work (it holds the prediction lock, which names
        # its pid): a loaded machine can take seconds to import, and a kill there tests nothing
        lock, deadline = sweep / "predictions" / ".lock", time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline and (
            not lock.exists() or f"(pid {p.pid})" not in lock.read_text()
        ):
            time.sleep(0.05)
        time.sleep(rng.uniform(*wait))
        if p.poll() is not None:
            break
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        progress.append(ledger(sweep)[0] if (sweep / "predictions" / "ledger.sqlite").exists() else 0)
        if progress[-1] == 16:
            break
    return kills, progress


def ledger(sweep):
    db = sqlite3.connect(sweep / "predictions" / "ledger.sqlite")
    try:
        return db.execute("SELECT COUNT(*), SUM(rows), SUM(empty), COUNT(DISTINCT part) FROM predicted").fetchone()
    finally:
        db.close()


def test_demo_model_finds_the_towers_of_a_fetched_sweep(fetched_copy):
    sweep = fetched_copy(TOWER_BBOX, ZOOM, 14, WORLD_SEED)  # fetched once per session (tests/conftest.py)
    res = tilesweep("predict", sweep, "--model", "demo", "--quiet")
    expected = ok_tiles(sweep, 14)
    assert len(expected) == 320
    assert "320 tiles scored" in res.stdout and "1 part written" in res.stdout, res.stdout
    assert "predictions in" in res.stdout and "model busy" in res.stdout

    table, parts = read_predictions(sweep)
    assert len(parts) == 1  # group commit: every block of the run in one part
    assert table.column_names == ["z", "x", "y", "block", "lon", "lat", "tower", "tower_lon", "tower_lat", "label", "model",
                                  "model_digest", "time"]
    assert_exactly_once(table, expected)
    world = World(seed=WORLD_SEED)
    rows = table.to_pylist()
    truth = [world.tile_has_tower(Tile(ZOOM, r["x"], r["y"])) for r in rows]
    assert sum(truth) >= 30
    pr = precision_recall([r["label"] for r in rows], truth)
    assert pr.precision >= 0.9 and pr.recall >= 0.9, str(pr)
    assert all(r["label"] == (r["tower"] >= 0.5) and r["model"] == "demo" for r in rows)
    r = rows[0]
    from tilesweep.tiles import center

    assert (r["lon"], r["lat"]) == pytest.approx(center(Tile(ZOOM, r["x"], r["y"])))
    # where in the tile the demo model placed the tower (its heatmap's peak), against the truth
    off, centre_off = [], []
    for r in rows:
        towers = world.towers_in_tile(Tile(ZOOM, r["x"], r["y"]))
        if r["label"] and len(towers) == 1:
            k = 111_320.0 * math.cos(math.radians(r["lat"]))
            t = towers[0]
            off.append(math.hypot((r["tower_lon"] - t.lon) * k, (r["tower_lat"] - t.lat) * 111_320.0))
            centre_off.append(math.hypot((r["lon"] - t.lon) * k, (r["lat"] - t.lat) * 111_320.0))
    assert len(off) >= 25
    assert sorted(off)[len(off) // 2] < 15 and max(off) < 40, sorted(off)
    assert sorted(centre_off)[len(off) // 2] > 25, "the tile centre is a coarser point"
    assert ledger(sweep)[:3] == (len({r["block"] for r in rows}), 320, 0)

    # Running it again predicts nothing and writes nothing.
    again = tilesweep("predict", sweep, "--model", "demo", "--quiet")
    assert "0 tiles scored" in again.stdout and "320 rows" in again.stdout
    assert sorted(read_predictions(sweep)[1]) == parts
    st = status_json(sweep)
    assert st["mismatch"] is None and st["tiles_ok"] == 320


def test_a_model_that_places_one_of_its_labels_gives_detections_at_those_points(fetched_copy):
    # helpers.models:darkest_spot: labels dark and bright, a position for dark only
    sweep = fetched_copy(SMALL_BBOX, ZOOM, 16, WORLD_SEED)
    tilesweep("predict", sweep, "--model", "helpers.models:darkest_spot", "--quiet", env={"PYTHONPATH": str(TESTS)})
    table, _ = read_predictions(sweep)
    assert [c for c in table.column_names if c.endswith(("_lon", "_lat"))] == ["dark_lon", "dark_lat"]
    rows = table.to_pylist()
    for r in rows:
        w, s_, e, n = bounds(Tile(ZOOM, r["x"], r["y"]))
        assert w <= r["dark_lon"] <= e and s_ <= r["dark_lat"] <= n
    out = sweep.parent / "dark.csv"
    tilesweep("detections", sweep, "-o", out)
    got = {(int(d["x"]), int(d["y"])): d for d in csv.DictReader(open(out))}
    assert len(got) == len(rows) > 10  # dark or bright: one of them is >= 0.5 in every tile
    kinds = set()
    for r in rows:
        d = got[(r["x"], r["y"])]
        want = (r["dark_lon"], r["dark_lat"]) if r["dark"] >= r["bright"] else (r["lon"], r["lat"])
        kinds.add(d["label"])
        assert (float(d["lon"]), float(d["lat"])) == pytest.approx(want, abs=1e-9), (d, r)
        assert tuple(float(v) for v in d["geometry"][7:-1].split()) == pytest.approx(want, abs=1e-7)  # WKT rounds
    assert kinds == {"dark", "bright"}, "both kinds of rows are checked"


def test_sigkill_at_random_instants_then_resume(fetched_copy):
    sweep = fetched_copy(SMALL_BBOX, ZOOM, 16, WORLD_SEED)  # fetched once per session (tests/conftest.py)
    expected = ok_tiles(sweep, 16)
    rng = random.Random(7)
    args = ("predict", sweep, "--model", "helpers.slow_model:score", "--batch", 4, "--threads", 1, "--part-rows", 8, "--quiet")
    kills, progress = kill_at_random(args, sweep, rng)
    assert kills >= 3 and progress[2] < 16, f"predict finished before it was killed 3 times ({progress}): slow the model down"
    assert progress[-1] > 0, "the killed runs committed nothing"
    res = tilesweep("predict", *args[1:], env={"PYTHONPATH": str(TESTS), "TILESWEEP_TEST_SLEEP": "0"})
    assert "predictions in" in res.stdout
    table, parts = read_predictions(sweep)
    assert len(parts) > 3
    assert_exactly_once(table, expected)
    assert ledger(sweep)[:2] == (16, len(expected))
    # The scores are those of the model, whichever run wrote them.
    assert all(0 < v < 1 for v in table["green"].to_pylist())


def test_a_part_renamed_but_not_recorded_is_adopted_not_duplicated(tmp_path, sim, monkeypatch):
    """A crash between a part's rename and its ledger commit: the next open records it."""
    sweep = tmp_path / "s"
    (sweep).mkdir()
    rows = BlockRows(123, 16, np.array([10, 11]), np.array([20, 20]), np.array([[0.9], [0.1]], np.float32), 3, 0, time.time())
    sink = PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5)
    monkeypatch.setattr(sink.ledger, "record", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    sink.add(rows)
    with pytest.raises(OSError):
        sink.commit()
    sink.close()
    monkeypatch.undo()
    assert len(list(sweep.glob("predictions/*/part-*.parquet"))) == 1
    with PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5) as again:
        assert again.stats.adopted_parts == 1 and again.predicted_ids() == {123}
    assert ledger(sweep)[:3] == (1, 2, 3)
    # A recorded part deleted by hand is forgotten: its blocks are predicted again.
    next(sweep.glob("predictions/*/part-*.parquet")).unlink()
    with PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5) as again:
        assert again.stats.forgotten_parts == 1 and again.predicted_ids() == set()


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, sim):
    sweep = tmp_path / "s"
    tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
    cases = [
        ((sweep, "--model", "no-such-model"), "no-such-model"),
        ((sweep, "--model", "missing.onnx"), "missing.onnx"),
        ((sweep, "--model", "helpers.models:wrong_shape"), "wrong_shape"),
        ((sweep, "--model", "helpers.nope:fn"), "helpers.nope"),
        ((sweep, "--model", "demo", "--batch", 0), "batch"),
        ((sweep, "--model", "demo", "--threads", 0), "threads"),
        ((tmp_path / "nowhere", "--model", "demo"), "nowhere"),
    ]
    for args, needle in cases:
        res = tilesweep("predict", *args, check=False, env={"PYTHONPATH": str(TESTS)})
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr
    assert not (sweep / "predictions").exists()
    # A planned but unfetched sweep is not an error: nothing to predict yet.
    res = tilesweep("predict", sweep, "--model", "demo", "--quiet")
    assert "0 tiles scored" in res.stdout and "not fetched yet" in res.stdout


def queue_rows(sweep):
    """(id, state, n_ok, n_empty, n_failed) of every block of the fetch queue."""
    with open_sweep_queue(sweep) as q:
        return sorted((r["id"], int(r["state"]), r["n_ok"], r["n_empty"], r["n_failed"]) for r in q.records())


def planned_tiles(sweep, block_zoom):
    """Every planned tile of a sweep (the world is cloud-free: every planned tile is ok)."""

    with open_sweep_queue(sweep) as q:
        return {t for b in q.blocks() for t in b.tile_list(ZOOM)}


RUN_MODES = {
    "streamed": (),
    "streamed-2-processes": ("--workers", 2),
    "keep-tiles": ("--keep-tiles", "--workers", 2),
}


@pytest.mark.parametrize("mode", list(RUN_MODES))
def test_run_fetches_and_predicts_in_one_go_and_resumes(tmp_path, mode):
    """`tilesweep run`: tiles stream from the source into the model (fetched in a thread,
    or by worker processes), or, with --keep-tiles, each worker process stores a block's
    shard and then hands the block to the model; killed mid-way and run again, every tile ends
    predicted exactly once and the fetch queue agrees with the ledger. The source is
    slowed so that the kill lands mid-run."""
    from tilesweep.sim import Faults

    with run_in_thread(World(seed=WORLD_SEED), Faults(latency_ms=40, jitter_ms=40, seed=3)) as srv:
        sweep = tmp_path / "r"
        tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
        keep = mode == "keep-tiles"
        args = ("run", sweep, "--model", "demo", "--source", srv.template(), "--concurrency", 4,
                "--part-seconds", 0.5, "--quiet", *RUN_MODES[mode])
        p = popen(*args)
        time.sleep(3.0)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        res = tilesweep(*args)
    expected = planned_tiles(sweep, 16)
    assert len(expected) == 156
    if keep:
        assert ok_tiles(sweep, 16) == expected
    else:
        assert not (sweep / "tiles").exists(), "streamed tiles are not stored"
    table, parts = read_predictions(sweep)
    assert_exactly_once(table, expected)
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and st["tiles_ok"] == 156 and st["mismatch"] is None
    assert "16 of 16 fetched blocks predicted by demo (156 rows" in res.stdout, res.stdout
    assert ledger(sweep)[:2] == (16, 156)


def test_keep_tiles_is_the_python_apis_too(tmp_path, sim):
    """`run --keep-tiles` from Python: predict_sweep(stream=StreamFetch(..., keep_tiles=True))
    packs every tile into the store and predicts each once (one runner tees each block: its
    shard, then the model); report.fetch holds the fetch's final counters."""
    from tilesweep.fetch import FetchSettings
    from tilesweep.model import load_model
    from tilesweep.predict import StreamFetch, predict_sweep
    from tilesweep.sources import parse_source
    from tilesweep.sweep import Sweep

    folder = tmp_path / "k"
    tilesweep("plan", SMALL_BBOX, folder, "--zoom", ZOOM, "--block-zoom", 16)
    with Sweep.open(folder) as sweep:
        src = sweep.bind_source(parse_source(sim.template(), []))
        report = predict_sweep(sweep, load_model("demo"), stream=StreamFetch(src, FetchSettings(concurrency=8), keep_tiles=True))
    expected = planned_tiles(folder, 16)
    assert ok_tiles(folder, 16) == expected
    table, _ = read_predictions(folder)
    assert_exactly_once(table, expected)
    assert report.tiles == len(expected) and report.fetch is not None and report.fetch.tiles_ok == len(expected)
    assert status_json(folder)["blocks_done"] == 16


def test_streamed_run_survives_sigkill_at_random_instants(tmp_path):
    """Kill the streaming `run` with SIGKILL again and again (blocks leased, parts half
    written, parts written but not acked in the queue): the runs that follow finish the
    sweep with every tile predicted once and every block acked with its counts."""
    from tilesweep.sim import Faults

    rng = random.Random(11)
    with run_in_thread(World(seed=WORLD_SEED), Faults(latency_ms=30, jitter_ms=60, http_503=0.05, seed=4)) as srv:
        sweep = tmp_path / "k"
        tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
        args = ("run", sweep, "--model", "helpers.slow_model:score", "--source", srv.template(), "--concurrency", 8,
                "--batch", 8, "--part-rows", 20, "--lease-ttl", 3, "--max-attempts", 20, "--quiet")  # kills cost attempts
        # counted from when it is at work; its first parts come within a second (issue 16)
        kills, progress = kill_at_random(args, sweep, rng, wait=(0.3, 1.2))
        assert kills >= 3 and progress[2] < 16, f"run finished before 3 kills ({progress}): slow it down"
        res = tilesweep(*args, env={"PYTHONPATH": str(TESTS), "TILESWEEP_TEST_SLEEP": "0"})
    table, _ = read_predictions(sweep)
    assert_exactly_once(table, planned_tiles(sweep, 16))
    assert ledger(sweep)[:3] == (16, 156, 0)
    rows = queue_rows(sweep)
    assert all(state == State.DONE for _, state, *_ in rows), rows
    assert sum(r[2] for r in rows) == 156  # acked with the counts of the ledger
    assert status_json(sweep)["mismatch"] is None and "predictions in" in res.stdout
    assert not (sweep / "tiles").exists()


def test_fetch_processes_stop_when_the_run_process_is_killed(tmp_path):
    """SIGKILL to the run process alone (its fetch processes live on): they notice, stop,
    release their leases and exit, even while waiting to hand a block over."""
    from tilesweep.sim import Faults
    from tilesweep.worker import _alive

    with run_in_thread(World(seed=WORLD_SEED), Faults(latency_ms=100, seed=3)) as srv:
        sweep = tmp_path / "orphans"
        tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
        p = popen("run", sweep, "--model", "helpers.slow_model:score", "--source", srv.template(), "--workers", 2,
                  "--concurrency", 8, "--batch", 4, "--quiet", cwd=TESTS)
        deadline = time.monotonic() + 60
        owners = {}
        while time.monotonic() < deadline and p.poll() is None:
            with open_sweep_queue(sweep) as q:
                owners = q.owners()
            if len(owners) == 2:
                break
            time.sleep(0.1)
        assert p.poll() is None and len(owners) == 2, f"both fetch processes should hold leases: {owners}"
        time.sleep(2.0)  # the slow model backs the blocks up: the fetch processes wait to hand over
        p.kill()  # the run process only, not its group
        p.wait()
        pids = [int(o.split(":")[1]) for o in owners]
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "fetch processes outlived the run process"
    assert status_json(sweep)["blocks_leased"] == 0


def test_a_block_predicted_but_not_acked_is_acked_without_fetching(tmp_path, sim):
    """The crash window between a part's commit and the fetch queue's ack: the next run
    finds the block in the ledger and acks it with the ledger's counts, fetching nothing
    (its source is now dead)."""
    sweep = tmp_path / "a"
    tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
    tilesweep("run", sweep, "--model", "demo", "--source", sim.template(), "--quiet")
    before = queue_rows(sweep)
    with open_sweep_queue(sweep) as q:
        assert q.requeue([b.id for b in q.blocks()][:5]) == 5
    toml = sweep / "sweep.toml"
    toml.write_text(toml.read_text().replace(sim.template(), "http://127.0.0.1:9/{z}/{x}/{y}.jpg"))
    res = tilesweep("run", sweep, "--model", "demo", "--retries", 0, "--timeout", 2, "--quiet")
    assert "0 tiles scored" in res.stdout, res.stdout
    assert queue_rows(sweep) == before


def test_keep_tiles_tees_after_a_crash_between_shard_and_predictions(tmp_path, sim):
    """`run --keep-tiles` acks a block once its shard *and* its predictions are durable
    (runner.Tee). The two crash windows, made by hand: blocks stored but not predicted
    (a kill after the shard's rename) are handed to the model from their shards, blocks
    stored and predicted (a kill before the ack) are acked at once; neither is fetched
    (the source is now dead), and every tile is predicted once."""
    from tilesweep.model import load_model
    from tilesweep.predict import StreamFetch, predict_sweep
    from tilesweep.fetch import FetchSettings
    from tilesweep.sweep import Sweep

    sweep = fetched(tmp_path, sim, SMALL_BBOX, 16)
    before = queue_rows(sweep)
    with open_sweep_queue(sweep) as q:
        ids = [b.id for b in q.blocks()]
        assert q.requeue(ids[:5]) == 5  # stored, not predicted
    with Sweep.open(sweep) as sw:
        assert predict_sweep(sw, load_model("demo")).blocks == 11  # the done ones, from the store
    with open_sweep_queue(sweep) as q:
        assert q.requeue(ids[5:8]) == 3  # stored and predicted, the ack lost
    toml = sweep / "sweep.toml"
    toml.write_text(toml.read_text().replace(sim.template(), "http://127.0.0.1:9/{z}/{x}/{y}.jpg"))
    with open_sweep_queue(sweep) as q:
        handed = sum(b.tiles for b in q.blocks() if b.id in ids[:5])
    with Sweep.open(sweep) as sw:
        report = predict_sweep(sw, load_model("demo"), stream=StreamFetch(sw.bind_source(None), FetchSettings(retries=0), keep_tiles=True))
    assert report.blocks == 5 and report.tiles == handed and report.fetch is not None and report.fetch.tiles_ok == 0
    assert queue_rows(sweep) == before
    table, _ = read_predictions(sweep)
    assert_exactly_once(table, planned_tiles(sweep, 16))


def test_a_second_model_on_a_streamed_sweep_fetches_again(tmp_path, sim):
    """Tiles streamed for one model are not stored: `predict` with another model says so
    (exit 1, naming the command that helps), and `run` with it fetches them again without
    touching the fetch queue's record."""
    sweep = tmp_path / "m"
    tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
    tilesweep("run", sweep, "--model", "demo", "--source", sim.template(), "--quiet")
    before = queue_rows(sweep)
    env = {"PYTHONPATH": str(TESTS), "TILESWEEP_TEST_SLEEP": "0"}
    res = tilesweep("predict", sweep, "--model", "helpers.slow_model:score", "--quiet", check=False, env=env)
    assert res.returncode == 1 and "16 fetched blocks have no tiles in the store" in res.stderr, res.stderr
    assert "tilesweep run" in res.stderr
    requests = sim.stats["requests"]
    res = tilesweep("run", sweep, "--model", "helpers.slow_model:score", "--quiet", env=env)
    assert "156 tiles scored" in res.stdout, res.stdout
    assert sim.stats["requests"] - requests >= 156
    assert queue_rows(sweep) == before
    db = sqlite3.connect(sweep / "predictions" / "ledger.sqlite")
    per_model = db.execute("SELECT model_key, COUNT(*), SUM(rows) FROM predicted GROUP BY model_key").fetchall()
    db.close()
    assert sorted(r[1:] for r in per_model) == [(16, 156), (16, 156)]
    shown = {m["model"]: (m["blocks"], m["rows"]) for m in status_json(sweep)["predictions"]}
    assert shown == {"demo": (16, 156), "helpers.slow_model:score": (16, 156)}, shown


@pytest.mark.parametrize("workers", [1, 2])
def test_a_source_that_refuses_every_tile_stops_run_with_one_line(tmp_path, workers):
    """A wrong token (403 on every tile) stops a streaming run, in a thread or in worker
    processes, with exit 2 and one line; no block is left leased or dead."""
    from helpers.servers import forbidden_server

    with forbidden_server() as template:
        sweep = tmp_path / "f"
        tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
        res = tilesweep("run", sweep, "--model", "demo", "--source", template, "--workers", workers, check=False, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "403" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    st = status_json(sweep)
    assert st["blocks_dead"] == st["blocks_leased"] == st["blocks_done"] == 0


def test_a_streamed_run_backs_off_a_rate_limited_server(tmp_path):
    """The simulator allows 150 requests/s; `run` with 64 in flight trips its 429s, cuts
    its concurrency (AIMD) and still predicts every tile once."""
    from tilesweep.sim import Faults

    with run_in_thread(World(seed=WORLD_SEED), Faults(rate_limit=150, rate_burst=20, retry_after=0.2, seed=4)) as srv:
        sweep = tmp_path / "rl"
        tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
        res = tilesweep("run", sweep, "--model", "demo", "--source", srv.template(), "--concurrency", 64, "--quiet")
        limited = srv.stats["rate_limited"]
    assert limited > 0 and "concurrency cut to" in res.stdout, res.stdout
    table, _ = read_predictions(sweep)
    assert_exactly_once(table, planned_tiles(sweep, 16))


def test_run_names_the_bottleneck(tmp_path):
    """The stage meter: a slow source makes fetch the bottleneck; a slow model makes the
    model the bottleneck, and then the fetch waits for it (backpressure: memory stays
    bounded, requests slow down to what the model takes)."""
    from tilesweep.sim import Faults

    with run_in_thread(World(seed=WORLD_SEED), Faults(latency_ms=60, seed=3)) as srv:
        sweep = tmp_path / "slow-source"
        tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
        res = tilesweep("run", sweep, "--model", "demo", "--source", srv.template(), "--concurrency", 2, "--quiet")
    assert "bottleneck fetch" in res.stdout, res.stdout
    # 0.2 s a batch of 4 (50 ms a tile): the model busy ~94% where it must be >= 75%, on a
    # loaded 2-core machine; the fetch (tiles rendered above, read from the sim cache) runs ~2x faster
    with run_in_thread(World(seed=WORLD_SEED)) as srv:
        sweep = tmp_path / "slow-model"
        tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
        res = tilesweep("run", sweep, "--model", "helpers.slow_model:score", "--source", srv.template(), "--batch", 4,
                        "--threads", 1, "--quiet", env={"PYTHONPATH": str(TESTS), "TILESWEEP_TEST_SLEEP": "0.2"})
    assert "bottleneck model" in res.stdout, res.stdout


def test_run_refuses_a_bad_model_before_fetching(tmp_path, sim):
    sweep = tmp_path / "b"
    tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
    before = (sweep / "sweep.toml").read_text()
    res = tilesweep("run", sweep, "--model", "no_such_module:fn", "--source", sim.template(), check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no_such_module" in res.stderr
    st = status_json(sweep)
    assert st["blocks_done"] == 0 and not (sweep / "tiles").exists() and not (sweep / "predictions").exists()
    assert (sweep / "sweep.toml").read_text() == before  # the source was not recorded either
    res = tilesweep("run", sweep, "--model", "demo", "--source", sim.template(), "--workers", 0, check=False)
    assert res.returncode == 2 and "workers 0" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and (sweep / "sweep.toml").read_text() == before


def done_blocks(sweep):
    with open_sweep_queue(sweep) as q:
        return q.count(State.DONE)


@pytest.mark.parametrize("mode", list(RUN_MODES))
def test_run_stops_cleanly_on_ctrl_c(tmp_path, mode):
    """Ctrl-C while `run` fetches and predicts: leases are released, committed parts stay,
    exit 130. The signal goes to the run process alone (`kill -INT PID`), the harder case:
    its worker processes do not get it and must be stopped by it (a terminal's Ctrl-C goes
    to the whole process group, which the other tests' SIGKILLs cover). In 2 of 4 full
    test runs on 2026-11-25 this signal was lost with --keep-tiles; the likely cause,
    a Ctrl-C inside Thread.join (CPython gh-90882), is gone: the CLI no longer joins."""
    from tilesweep.sim import Faults

    # ~300 ms a tile, 4 in flight: the 156 tiles take ~12 s, well past the signal
    with run_in_thread(World(seed=WORLD_SEED), Faults(latency_ms=300, seed=3)) as srv:
        sweep = tmp_path / "i"
        tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM, "--block-zoom", 16)
        keep = mode == "keep-tiles"
        extra = RUN_MODES[mode] if keep else (*RUN_MODES[mode], "--part-rows", 1)
        p = popen("run", sweep, "--model", "demo", "--source", srv.template(), "--concurrency", 4, "--quiet", *extra)
        # Signal once the run is under way (a block fetched: the model is loaded and the
        # workers run), not while it is still starting up.
        deadline = time.monotonic() + 60
        while done_blocks(sweep) < 1 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert p.poll() is None and done_blocks(sweep) < 16, "run finished before the signal: slow the source down"
        os.kill(p.pid, signal.SIGINT)
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "unfinished leases were released" in stderr and "Traceback" not in stderr
    st = status_json(sweep)
    assert st["blocks_leased"] == 0 and 1 <= st["blocks_done"] < 16
    if not keep:  # streamed: a block is acked only once predicted (a part committed
        # in the last instant may still wait for its ack: the next run acks it)
        assert 1 <= st["blocks_done"] <= ledger(sweep)[0]
