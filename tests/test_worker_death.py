"""A worker process that dies is never silent (issue 16: a stop is a stop).

`fetch --workers N` and `run --workers N` (streamed and --keep-tiles): a worker killed
from outside (SIGKILL) or crashed by an unexpected error does not stop the others, its
blocks go back to the queue at once, and the command exits 1 with one line naming the
worker, its pid and how it died. Rerunning the same command finishes the sweep.

Real processes, real signals, real HTTP to the simulator on loopback, real SQLite."""

import os
import re
import signal
import shutil
import time

import pytest
from helpers.cli import status_json, tilesweep
from test_signals import TESTS, children, finish, live_owners, plan, start, wait_for

from tilesweep.sweep import open_sweep_queue
from tilesweep.sim import Faults, World, run_in_thread

COMMANDS = {
    "fetch": ("fetch",),
    "run": ("run", "--model", "demo"),
    "run-keep-tiles": ("run", "--model", "demo", "--keep-tiles"),
}


@pytest.fixture(scope="module")
def slow_sim():
    # ~150 ms a tile: a worker holds each block's lease >= 150 ms, long enough to see it
    # and kill it there; with 16 requests each (--concurrency 32) a block is one round
    # trip, so the survivor finishes the sweep in ~3 s (2 in flight each took ~12 s)
    with run_in_thread(World(seed=5), Faults(latency_ms=150, seed=3)) as srv:
        yield srv


def _worker_holding_a_lease(p, sweep):
    """The pid of one of ``p``'s worker processes once it holds a lease (or None)."""
    found = []

    def look():
        if p.poll() is not None:
            return True
        kids = set(children(p.pid))
        found[:] = [int(o.split(":")[1]) for o in live_owners(sweep) if int(o.split(":")[1]) in kids]
        return bool(found)

    wait_for(look, every=0.02)
    return found[0] if found else None


@pytest.mark.parametrize("mode", list(COMMANDS))
def test_a_worker_killed_from_outside_is_reported_and_its_blocks_go_back(tmp_path, slow_sim, mode):
    sweep = plan(tmp_path)
    args = (*COMMANDS[mode], sweep, "--source", slow_sim.template(), "--workers", 2, "--concurrency", 32, "--quiet")
    p = start(*args)
    victim = _worker_holding_a_lease(p, sweep)
    assert victim is not None and p.poll() is None, "no worker held a lease before the end: slow the source down"
    os.kill(victim, signal.SIGKILL)
    err = finish(p, timeout=120)
    assert p.returncode == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if f"pid {victim}" in ln]
    assert len(lines) == 1, err
    assert re.search(rf"worker \d+ \(pid {victim}\) died", lines[0]) and "SIGKILL" in lines[0], err
    assert "back to the queue" in lines[0], err
    st = status_json(sweep)
    assert st["blocks_leased"] == 0 and st["blocks_dead"] == 0, st
    # the other worker carried on: the sweep is (nearly) done; a rerun finishes it
    res = tilesweep(*args, timeout=600)
    assert res.returncode == 0, res.stderr
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and st["blocks_leased"] == 0 and st["blocks_dead"] == 0, st


def _block_in_the_way(sweep):
    """A folder where the first block's shard goes: the worker that leases the block
    fails to write it (IsADirectoryError, not a full disk). Returns the folder."""
    with open_sweep_queue(sweep) as q:
        block = next(iter(q.blocks()))
    bz, x, y = block.tile
    path = sweep / "tiles" / str(bz) / str(x) / f"{y}.shard"  # TileStore.shard_path
    path.mkdir(parents=True)
    (path / "x").write_bytes(b"")  # not empty: nothing may remove it on the way
    return path


@pytest.mark.parametrize("mode", ["fetch", "run-keep-tiles"])
def test_a_worker_that_raises_says_why_in_one_line_and_nothing_hangs(tmp_path, mode):
    """Every worker that leases the bad block crashes; once all have died the command
    stops at once (exit 1) with one line naming the error, and no traceback."""
    with run_in_thread(World(seed=5)) as fast:
        sweep = plan(tmp_path)
        in_the_way = _block_in_the_way(sweep)
        args = (*COMMANDS[mode], sweep, "--source", fast.template(), "--workers", 2, "--concurrency", 4, "--quiet")
        p = start(*args)
        err = finish(p, timeout=120)
        assert p.returncode == 1, err
        assert "Traceback" not in err, err
        assert re.search(r"worker \d+ \(pid \d+\) died", err), err
        assert "IsADirectoryError" in err, err
        assert len([ln for ln in err.splitlines() if "died" in ln]) == 1, err
        st = status_json(sweep)
        assert st["blocks_leased"] == 0 and st["blocks_dead"] == 0, st
        shutil.rmtree(in_the_way)
        res = tilesweep(*args, timeout=600)
        assert res.returncode == 0, res.stderr
        st = status_json(sweep)
        assert st["blocks_done"] == 16 and st["blocks_leased"] == 0, st


def test_a_streaming_worker_that_raises_is_named_and_the_others_finish(tmp_path, slow_sim):
    """`run --workers 2`: worker 1 raises on its first block (the test hook read by
    QueueConsumer); worker 0 streams the rest of the sweep, and the run exits 1 naming
    worker 1 and its error in one line, no traceback. The same command then finishes."""
    sweep = plan(tmp_path)
    # 4 in flight each: worker 0 alone takes ~6 s, so worker 1 surely starts and leases a block
    args = (*COMMANDS["run"], sweep, "--source", slow_sim.template(), "--workers", 2, "--concurrency", 8, "--quiet")
    p = start(*args, env={"TILESWEEP_TEST_CRASH_WORKER": "1"})
    err = finish(p, timeout=180)
    assert p.returncode == 1, err
    assert "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if "died" in ln]
    assert re.search(r"worker 1 \(pid \d+\) died \(exit status 1: RuntimeError: test crash of worker 1", line), err
    st = status_json(sweep)
    assert st["blocks_leased"] == 0 and st["blocks_dead"] == 0, st
    assert st["blocks_done"] >= 8, st  # worker 0 went on
    res = tilesweep(*args, timeout=600)
    assert res.returncode == 0, res.stderr
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and st["blocks_leased"] == 0, st


def test_a_streaming_worker_killed_while_it_hands_a_block_over_does_not_hang_the_run(tmp_path):
    """`run --workers 2` with a slow model: the blocks queue is full and the workers sit
    in the middle of writing blocks (bigger than a pipe's buffer) to it. A kill -9 then
    must not leave a half message, or a lock, that hangs the run."""
    with run_in_thread(World(seed=5)) as fast:
        sweep = plan(tmp_path)
        args = ("run", sweep, "--model", "helpers.slow_model:score", "--batch", 4, "--source", fast.template(),
                "--workers", 2, "--concurrency", 4, "--quiet")
        p = start(*args, env={"TILESWEEP_TEST_SLEEP": "0.3"})
        victim = _worker_holding_a_lease(p, sweep)
        assert victim is not None and p.poll() is None
        time.sleep(2)  # the queues fill up
        os.kill(victim, signal.SIGKILL)
        err = finish(p, timeout=120)
        assert p.returncode == 1, err
        assert re.search(rf"worker \d+ \(pid {victim}\) died \(killed by SIGKILL\)", err), err
        assert status_json(sweep)["blocks_leased"] == 0
        helpers = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))  # helpers.slow_model
        res = tilesweep(*args, timeout=600, env={"TILESWEEP_TEST_SLEEP": "0", "PYTHONPATH": helpers})
        assert res.returncode == 0, res.stderr
        assert status_json(sweep)["blocks_done"] == 16
