"""Worker loops on Dask (issue 11): `run --dask local:2` against the simulator with faults,
each Dask worker fetching and predicting (the model loaded there), one Dask worker
process SIGKILLed mid-run; bad --dask values.

Real processes: the command starts a LocalCluster (2 worker processes on 127.0.0.1), the
loops lease from the sweep's real queue and fetch over real HTTP; the test kills the Dask
worker process that holds a lease (its pid is in the lease's owner, host:pid:random)."""

import os
import signal
import sqlite3

import pytest
from helpers.cli import status_json, tilesweep
from test_signals import finish, live_owners, plan, start, wait_for

import tilesweep as ts
from tilesweep.cluster import parse_dask_address
from tilesweep.errors import UsageError
from tilesweep.sim import Faults, World, run_in_thread

pytest.importorskip("distributed", reason="the dask extra (distributed) is not installed")


@pytest.fixture(scope="module")
def faulty_sim():
    # ~150 ms a tile, some 503s and resets: 2 loops x 4 in flight take a few seconds
    with run_in_thread(World(seed=5), Faults(latency_ms=150, http_503=0.03, reset=0.02, seed=3)) as srv:
        yield srv


def test_run_on_dask_survives_a_killed_worker_and_predicts_every_tile_once(tmp_path, faulty_sim):
    sweep = plan(tmp_path)  # 156 tiles in 16 blocks
    p = start("run", sweep, "--model", "demo", "--source", faulty_sim.template(), "--dask", "local:2",
              "--concurrency", 4, "--lease-ttl", 3, "--quiet")
    victims: list[int] = []

    def a_loop_holds_a_lease() -> bool:
        if p.poll() is not None:
            return True
        victims[:] = [int(o.split(":")[1]) for o in live_owners(sweep)]
        return bool(victims)

    wait_for(a_loop_holds_a_lease, every=0.02)
    assert victims and p.poll() is None, "no loop held a lease before the end: slow the source down"
    os.kill(victims[0], signal.SIGKILL)  # a Dask worker process, mid-block
    err = finish(p, timeout=120)
    assert p.returncode == 0, err

    st = status_json(sweep)
    assert st["mismatch"] is None
    assert st["tiles_done"] == st["tiles_total"] == 156 and st["blocks_dead"] == 0
    assert st["tiles_ok"] + st["tiles_empty"] + st["tiles_failed"] == st["tiles_total"]
    # per machine: this host's loops acked every tile (how many of them did depends on how
    # soon the nanny's restarted worker acks one; the kill landing mid-block is the lost
    # lease checked below)
    (machine,) = st["machines"]
    assert machine["tiles_done"] == st["tiles_done"] and len(machine["owners"]) >= 1 and machine["blocks_leased"] == 0
    (model,) = st["predictions"]
    assert model["blocks"] == st["blocks_total"] and model["rows"] == st["tiles_ok"]
    # predicted on the workers: the tiles were streamed, not stored
    assert not list(sweep.glob("tiles/**/*.shard"))
    # every fetched tile has exactly one row in what queries read (the killed loop's block
    # too, though two loops may both have scored it: the ledger counts the first record)
    assert ts.query("SELECT COUNT(*), COUNT(DISTINCT (x, y)) FROM predictions", sweep).fetchall() == [(st["tiles_ok"],) * 2]
    # the killed loop's leases were lost leases, not failed attempts
    with sqlite3.connect(sweep / "queue.sqlite") as db:
        assert db.execute("SELECT SUM(lost) FROM blocks").fetchone()[0] >= 1


@pytest.mark.parametrize("value, says", [
    ("spark://host:7077", "is not local:N"),
    ("local:zero", "is not local:N"),
    ("local:0", "local workers must be in 1..256"),
    ("tcp://scheduler", "a scheduler address is tcp://host:port"),
])
def test_bad_dask_addresses_name_the_value(value, says):
    with pytest.raises(UsageError, match=says) as exc:
        parse_dask_address(value)
    assert repr(value) in str(exc.value)


@pytest.mark.parametrize("value, extra, says", [
    ("spark://host:7077", (), "is not local:N"),
    ("tcp://127.0.0.1:9", (), "the scheduler cannot be reached"),
    ("local:2", ("--workers", "3"), "--workers 3 with --dask"),
])
def test_a_bad_dask_value_is_one_line_and_exit_2(tmp_path, value, extra, says):
    sweep = plan(tmp_path)
    before = (sweep / "sweep.toml").read_text()
    res = tilesweep("fetch", sweep, "--source", "http://127.0.0.1:9/{z}/{x}/{y}.jpg", "--dask", value, *extra, check=False,
                    env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and repr(value) in lines[0], res.stderr
    assert (sweep / "sweep.toml").read_text() == before  # no source recorded
