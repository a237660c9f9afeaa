"""Processes and signals (issue 16): orphaned workers, SIGTERM, a signal to the parent
alone, what a stop keeps, what kills cost, and `run` beside a `fetch`.

Real processes of the `tilesweep` command, real signals, real HTTP to the simulator on
loopback, real SQLite. Waits are deadlines for something to happen, never timings."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import ENV, status_json, tilesweep

from tilesweep.queue import State

from tilesweep.sweep import open_sweep_queue
from tilesweep.sim import Faults, World, run_in_thread
from tilesweep.worker import _alive

TESTS = Path(__file__).parent
BBOX = "8.500,47.300,8.516,47.310"  # 156 tiles at zoom 18 in 16 blocks at zoom 16
ZOOM, BLOCK_ZOOM = 18, 16


def plan(tmp_path, name="s"):
    sweep = tmp_path / name
    tilesweep("plan", BBOX, sweep, "--zoom", ZOOM, "--block-zoom", BLOCK_ZOOM)
    return sweep


def start(*args, env=None):
    """`tilesweep ARGS` in its own session (cwd tests/, so `helpers.*` models import)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tilesweep", *map(str, args)], env={**ENV, **(env or {})}, cwd=TESTS,
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def children(pid):
    """Pids of the live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def wait_for(predicate, deadline_s=90.0, every=0.05):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def queue_counts(sweep):
    with open_sweep_queue(sweep) as q:
        return {int(s): n for s, n in q.stats(window=1.0).blocks.items() if n}


def live_owners(sweep):
    """Lease owners (host:pid:...) whose process is alive."""
    with open_sweep_queue(sweep) as q:
        return [o for o in q.owners() if _alive(int(o.split(":")[1]))]


def done_blocks(sweep):
    return queue_counts(sweep).get(int(State.DONE), 0)


def ledger_blocks(sweep):
    path = sweep / "predictions" / "ledger.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM predicted").fetchone()[0]
    finally:
        db.close()


def finish(p, timeout=90):
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError("the command did not end after the signal") from None
    return err


@pytest.fixture(scope="module")
def slow_sim():
    # ~300 ms a tile: 4 in flight take ~12 s for the 156 tiles, 1 in flight ~50 s
    with run_in_thread(World(seed=5), Faults(latency_ms=300, seed=3)) as srv:
        yield srv


# --- orphans ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("fetch",), ("run", "--model", "demo")])
def test_workers_orphaned_during_start_up_exit_and_hold_nothing(tmp_path, slow_sim, command):
    """SIGKILL to the parent of `--workers 2` while its workers are still starting (they
    are orphaned before their imports end): they must notice at once, lease nothing or
    release it, and exit, not fetch the rest of the sweep and hang at exit."""
    sweep = plan(tmp_path)
    p = start(*command, sweep, "--source", slow_sim.template(), "--workers", 2, "--concurrency", 2, "--quiet")
    assert wait_for(lambda: len(children(p.pid)) >= 2 or p.poll() is not None, every=0.005)
    kids = children(p.pid)
    os.kill(p.pid, signal.SIGKILL)  # the parent alone, its workers in mid start-up
    p.wait()  # not communicate(): orphans that live on hold its pipes open
    assert len(kids) >= 2, kids
    gone = wait_for(lambda: not any(_alive(k) for k in kids), deadline_s=45)
    for k in kids:
        if _alive(k):
            os.kill(k, signal.SIGKILL)
    assert gone, "orphaned workers lived on"
    counts = queue_counts(sweep)
    assert counts.get(int(State.LEASED), 0) == 0, counts
    assert counts.get(int(State.DONE), 0) < 16, "orphans fetched the sweep"


# --- SIGTERM and SIGINT, to the parent alone ---------------------------------------------


MODES = {
    "fetch": ("fetch",),
    "fetch-2-workers": ("fetch", "--workers", 2),
    "run": ("run", "--model", "demo", "--part-rows", 1),
    "run-2-workers": ("run", "--model", "demo", "--workers", 2, "--part-rows", 1),
    "run-keep-tiles": ("run", "--model", "demo", "--keep-tiles", "--workers", 2),
}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_stop_signal_to_the_parent_alone_stops_cleanly(tmp_path, slow_sim, mode, sig):
    """SIGTERM (systemd, Docker, Kubernetes) or SIGINT (`kill -INT PID`) to the command's
    process alone, never to its workers: it stops like Ctrl-C (stop leasing, keep what is
    complete, release the rest) and exits 128 + the signal: 143 or 130."""
    sweep = plan(tmp_path)
    command = MODES[mode]
    p = start(*command, sweep, "--source", slow_sim.template(), "--concurrency", 4, "--quiet")
    assert wait_for(lambda: done_blocks(sweep) >= 1 or p.poll() is not None)
    assert p.poll() is None and done_blocks(sweep) < 16, "it finished before the signal: slow the source down"
    kids = children(p.pid)
    os.kill(p.pid, getattr(signal, sig))
    err = finish(p)
    assert p.returncode == 128 + getattr(signal, sig), err
    assert "stopped:" in err and "Traceback" not in err, err
    assert "unfinished leases were released" in err and "still leased" not in err, err
    # (the children include multiprocessing's resource tracker, which ends just after us)
    assert wait_for(lambda: not any(_alive(k) for k in kids), deadline_s=20), "a worker outlived its parent's stop"
    st = status_json(sweep)
    assert st["blocks_leased"] == 0 and 1 <= st["blocks_done"] < 16 and st["blocks_dead"] == 0, st
    if command[0] == "run" and "--keep-tiles" not in command:
        assert ledger_blocks(sweep) == st["blocks_done"], "every block the stop committed is acked, and only those"


def test_a_stop_signal_during_start_up_stops_the_workers_started_so_far(tmp_path, slow_sim):
    """SIGINT to `fetch --workers 2` as soon as its workers exist (still importing): exit
    130 with nothing leased; the workers do not fetch the sweep to its end."""
    sweep = plan(tmp_path)
    p = start("fetch", sweep, "--source", slow_sim.template(), "--workers", 2, "--concurrency", 2, "--quiet")
    assert wait_for(lambda: len(children(p.pid)) >= 1 or p.poll() is not None, every=0.005)
    os.kill(p.pid, signal.SIGINT)
    err = finish(p)
    assert p.returncode == 130, err
    st = status_json(sweep)
    assert st["blocks_leased"] == 0 and st["blocks_done"] < 16, st


def test_the_stop_message_says_only_what_is_true(tmp_path, slow_sim):
    """A block leased by another live process stays leased after our stop, and the stop's
    message says so instead of claiming every lease was released."""
    import socket

    sweep = plan(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with open_sweep_queue(sweep) as q:
            (held,) = q.lease(1, ttl=600, owner=f"{socket.gethostname()}:{other.pid}:other")
        p = start("fetch", sweep, "--source", slow_sim.template(), "--workers", 2, "--concurrency", 4, "--quiet")
        assert wait_for(lambda: len(live_owners(sweep)) >= 2 or p.poll() is not None)
        assert p.poll() is None
        os.kill(p.pid, signal.SIGINT)
        err = finish(p)
        assert p.returncode == 130, err
        assert "still leased by other processes: 1 block" in err, err
        with open_sweep_queue(sweep) as q:
            assert q.owners() == {held.owner: 1}  # ours released, the other's kept
    finally:
        other.kill()
        other.wait()


# --- what a stop keeps, what a kill loses ------------------------------------------------


def test_a_graceful_stop_of_predict_commits_the_blocks_it_scored(tmp_path, slow_sim):
    """Parts commit every 600 s here: a Ctrl-C after some batches must still keep the
    blocks scored whole (before the fix it kept nothing)."""
    with run_in_thread(World(seed=5)) as fast:
        sweep = plan(tmp_path)
        tilesweep("fetch", sweep, "--source", fast.template(), "--quiet")
    marks = tmp_path / "marks"
    env = {"TILESWEEP_TEST_MARKS": str(marks), "TILESWEEP_TEST_SLEEP": "0.3"}
    p = start("predict", sweep, "--model", "helpers.marking_model:score", "--batch", 4, "--threads", 1,
              "--part-seconds", 600, "--quiet", env=env)
    # 12 batches of 4 = 48 tiles: the first blocks (about 10 tiles each) are scored whole
    assert wait_for(lambda: marks.exists() and len(marks.read_text().split()) >= 12 or p.poll() is not None)
    assert p.poll() is None, "predict finished before the signal: slow the model down"
    os.kill(p.pid, signal.SIGINT)
    err = finish(p)
    assert p.returncode == 130, err
    assert ledger_blocks(sweep) >= 2, "the stop kept none of the scored blocks"
    tilesweep("predict", sweep, "--model", "helpers.marking_model:score", "--quiet", env={"TILESWEEP_TEST_SLEEP": "0", "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))})
    assert ledger_blocks(sweep) == 16


def test_the_first_parts_of_a_run_come_within_seconds(tmp_path, slow_sim):
    """With --part-seconds 600, a run's first blocks are still committed (and acked)
    while it runs: a kill -9 then keeps them."""
    sweep = plan(tmp_path)
    p = start("run", sweep, "--model", "demo", "--source", slow_sim.template(), "--concurrency", 2,
              "--part-seconds", 600, "--quiet")
    # seen with blocks still to do: not the commit at the end of the run
    seen = wait_for(lambda: 1 <= done_blocks(sweep) < 16 or p.poll() is not None) and 1 <= done_blocks(sweep) < 16
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    assert seen, "no block was committed while the run ran"
    assert ledger_blocks(sweep) >= done_blocks(sweep) >= 1


def test_kill_9_again_and_again_does_not_kill_blocks(tmp_path, slow_sim):
    """8 SIGKILLs of `fetch --workers 2` at the default --max-attempts (5): the leases
    the killed workers held are lost leases, not failed attempts, so no block is dead."""
    import random

    rng = random.Random(7)
    sweep = plan(tmp_path)
    args = ("fetch", sweep, "--source", slow_sim.template(), "--concurrency", 4, "--workers", 2, "--lease-ttl", 3, "--quiet")
    kills = 0
    for _ in range(8):
        p = start(*args)
        wait_for(lambda: live_owners(sweep) or p.poll() is not None)  # noqa: B023 - called at once; at work, holding leases
        time.sleep(rng.uniform(0.2, 1.5))  # then kill it at a random instant of its work
        if p.poll() is not None:
            break
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        kills += 1
    assert kills >= 6, "the fetch finished before it could be killed: slow the source down"
    assert status_json(sweep)["blocks_dead"] == 0
    with open_sweep_queue(sweep) as q:
        assert any(q.get(b.id)["lost"] > 0 for b in q.blocks()), "no kill ever cost a lease"
    tilesweep("fetch", sweep, "--quiet", timeout=600)
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and st["blocks_dead"] == 0


# --- run beside fetch, and two runs at once ----------------------------------------------


def test_run_beside_a_fetch_is_refused_and_two_runs_share_a_sweep(tmp_path, slow_sim):
    sweep = plan(tmp_path)
    fetch = start("fetch", sweep, "--source", slow_sim.template(), "--concurrency", 2, "--quiet")
    try:
        assert wait_for(lambda: queue_counts(sweep).get(int(State.LEASED), 0) > 0)
        res = tilesweep("run", sweep, "--model", "demo", check=False)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "`tilesweep fetch` is running" in res.stderr, res.stderr
        assert not (sweep / "predictions").exists()
        # a second fetch beside it is fine: the queue shares the blocks out
        assert tilesweep("fetch", sweep, "--concurrency", 2, "--quiet", check=False, timeout=600).returncode == 0
    finally:
        os.kill(fetch.pid, signal.SIGINT)
        finish(fetch)
    # Two runs at once on one sweep (issue 11: many prediction writers): both lease from
    # the queue and write parts; the ledger counts every block once. A fetch beside them
    # is still refused (it would leave the blocks it holds unpredicted).
    sweep2 = plan(tmp_path, "r")
    args = ("--model", "demo", "--source", slow_sim.template(), "--concurrency", 4, "--lease-ttl", 5, "--quiet")
    runs = [start("run", sweep2, *args), start("run", sweep2, *args)]
    try:
        assert wait_for(lambda: queue_counts(sweep2).get(int(State.LEASED), 0) > 0 or runs[0].poll() is not None)
        res = tilesweep("fetch", sweep2, check=False)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "`tilesweep run` (pid " in res.stderr and "is running" in res.stderr, res.stderr
        errs = [finish(r, timeout=120) for r in runs]
    finally:
        for r in runs:
            if r.poll() is None:
                os.kill(r.pid, signal.SIGTERM)
                finish(r)
    assert [r.returncode for r in runs] == [0, 0], errs
    st = status_json(sweep2)
    assert st["mismatch"] is None and st["blocks_leased"] == 0 and st["blocks_dead"] == 0
    assert st["tiles_done"] == st["tiles_total"] == 156
    (model,) = st["predictions"]
    assert model["blocks"] == st["blocks_total"] and model["rows"] == st["tiles_ok"]
    (machine,) = st["machines"]
    assert len(machine["owners"]) >= 2, "one run did all the blocks: they did not run at once"
    # each tile once in what queries read, though a block may sit in both runs' parts
    import tilesweep as ts

    assert ts.query("SELECT COUNT(*), COUNT(DISTINCT (x, y)) FROM predictions", sweep2).fetchall() == [(st["tiles_ok"],) * 2]
