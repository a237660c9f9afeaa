"""`--decode threads|processes` end to end (issue 13): the same scores from either, decode
processes that die are replaced by decoding in the run's own process, a stop leaves no
shared memory behind, and bad values are one line.

A real simulator over loopback, real `tilesweep` processes, the parts read back."""

import os
import shutil
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.cli import popen, tilesweep

from tilesweep.predict.shmring import SHM_PREFIX
from tilesweep.sim import World, run_in_thread

TESTS = Path(__file__).parent
BBOX = "8.505,47.340,8.512,47.345"  # 36 zoom-18 tiles in 4 blocks of zoom 16 (world seed 5)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("decode") / "s"
    with run_in_thread(World(seed=5)) as sim:
        tilesweep("plan", BBOX, sweep, "--zoom", 18, "--block-zoom", 16)
        tilesweep("fetch", sweep, "--source", sim.template(), "--quiet")
    return sweep


def scores(sweep):
    folder = next(p for p in (sweep / "predictions").iterdir() if p.is_dir())
    t = pq.read_table(folder).sort_by([("x", "ascending"), ("y", "ascending")])
    return list(zip(t["x"].to_pylist(), t["y"].to_pylist(), t["tower"].to_pylist()))


def segments(pid):
    return list(Path("/dev/shm").glob(f"{SHM_PREFIX}{pid}-*"))


def test_decode_processes_give_the_scores_of_decode_threads_even_when_they_die(tmp_path, fetched):
    runs = {}
    # each decode process exits (status 3, as a bug would) when its second job comes: the
    # first blocks are decoded in the processes, the rest in the run's own process
    for mode, env in (("threads", {}), ("processes", {"TILESWEEP_TEST_DECODE_CRASH": "1"})):
        sweep = tmp_path / mode
        shutil.copytree(fetched, sweep)
        res = tilesweep("predict", sweep, "--model", "demo", "-q", "--decode", mode, "--decode-processes", 2, "--batch", 8, env=env)
        runs[mode] = (scores(sweep), res.stdout)
    want, out = runs["threads"]
    assert len(want) == 36 and len({s for _, _, s in want}) > 10
    assert "decode threads (asked for)" in out and "model waits for input" in out
    # which of the two a run says depends on how busy its least stage was (a loaded machine
    # waits on the source more): both name the stage of least capacity
    assert "bounds the run at" in out or "no stage bounds the run" in out, out
    got, out = runs["processes"]
    assert got == want, "decode processes score exactly as decode threads"
    assert "decode processes (asked for)" in out
    assert out.count("warning: decode process") == 2 and "(exit status 3)" in out, out


def test_a_stopped_run_leaves_no_shared_memory(tmp_path, fetched):
    sweep = tmp_path / "s"
    shutil.copytree(fetched, sweep)
    # 1 s a batch: the run (5 batches) is still scoring when the SIGTERM comes 1 s after its
    # ring appears (at 0.15 s a batch it could finish first: exit 0, a race seen here)
    p = popen("predict", sweep, "--model", "helpers.slow_model:score", "-q", "--decode", "processes",
              "--decode-processes", 2, "--batch", 8, "--part-seconds", 0.5, cwd=TESTS,
              env={"TILESWEEP_TEST_SLEEP": "1.0"})
    lock, deadline = sweep / "predictions" / ".lock", time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline and not segments(p.pid):
        time.sleep(0.05)
    assert segments(p.pid), "the run made its ring"
    time.sleep(1.0)
    os.kill(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, (out, err)
    assert "stopped: committed parts are durable" in err and "Traceback" not in err
    assert segments(p.pid) == [], "SIGTERM unlinks the ring"
    assert lock.exists()


def test_a_bad_decode_value_is_one_line(tmp_path, fetched):
    # (--precision's bad values: tests/test_gpu_paths.py, through load_model)
    res = tilesweep("predict", fetched, "--model", "demo", "--decode", "fast", check=False)
    assert res.returncode == 2 and res.stderr.strip().endswith("decode 'fast' is not auto, threads, processes or gpu"), res.stderr
    assert "Traceback" not in res.stderr and not (fetched / "predictions").exists()


def test_the_bound_line_names_the_stage_of_least_capacity_and_by_how_much():
    from tilesweep.predict import FlowMeter, PredictReport, StageMeter

    r = PredictReport(wall_s=10.0)
    fetch = FlowMeter("fetch", tiles=60_000)
    fetch.blocked(8.0)  # busy 20%: could fetch 30,000 tiles/s
    decode = StageMeter("decode", threads=6, tiles=60_000, busy_s=54.0, processes=True)  # 90% of 6: 6,667/s
    model = StageMeter("model", tiles=60_000, busy_s=2.5)  # 24,000/s
    model.waited(7.0)
    r.stages = {"fetch": fetch, "decode": decode, "model": model, "sink": StageMeter("sink", tiles=60_000, busy_s=0.5)}
    assert r.bound_line() == ("decode bounds the run at 6,667 tiles/s (90% busy over 6 processes); "
                              "next model at 24,000 tiles/s (3.6x); model waits for input 70%")
    decode.busy_s = 12.0  # now every stage waits for tiles
    assert r.bound_line().startswith("no stage bounds the run, each waits for tiles (the least capacity: model at 24,000 tiles/s, 25% busy)")
