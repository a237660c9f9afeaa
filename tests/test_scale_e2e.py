"""Issue 11's end-to-end test: one sweep on many machines' parts at once.

The sweep lives in a bucket of a real S3 server (SeaweedFS), its queue and prediction
ledger in a real PostgreSQL, and `run --dask local:2` (a Dask LocalCluster of two worker
processes, each fetching and predicting with the model loaded there) sweeps it against
the simulator with faults (latency, 503s, connection resets). One Dask worker process is
SIGKILLed while it holds a lease. In the end every planned tile is predicted exactly
once, `status` adds up, and the killed worker's lease was counted lost, not failed."""

from __future__ import annotations

import json
import os
import signal
import uuid

import pytest
from helpers import seaweed
from helpers.cli import tilesweep
from test_signals import _alive, finish, start, wait_for

from tilesweep.sim import Faults, World, run_in_thread

pytest.importorskip("distributed", reason="the dask extra (distributed) is not installed")

BBOX = "7.4300,46.9400,7.4400,46.9450"  # zoom 18: ~75 tiles in a few blocks of zoom 16


def test_a_sweep_on_s3_and_postgresql_run_by_dask_survives_a_killed_worker(s3_server, pg_server, tmp_path, monkeypatch):
    env = s3_server.env(PGPASSWORD=os.environ["PGPASSWORD"], TILESWEEP_STATE_DIR=str(tmp_path / "state"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{seaweed.BUCKET}/e2e-{uuid.uuid4().hex[:10]}"
    planned = json.loads(tilesweep("plan", BBOX, url, "--zoom", 18, "--block-zoom", 17, "--queue", pg_server.url(),
                                   "--json", env=env).stdout)
    assert planned["blocks"] >= 4, planned

    from tilesweep.sweep import Sweep

    faults = Faults(latency_ms=150, http_503=0.03, reset=0.02, seed=3)
    with run_in_thread(World(seed=5), faults) as sim, Sweep.open(url) as sweep:
        p = start("run", url, "--model", "demo", "--source", sim.template(), "--dask", "local:2",
                  "--concurrency", 4, "--lease-ttl", 3, "--quiet", env=env)
        victims: list[int] = []

        def a_loop_holds_a_lease() -> bool:
            if p.poll() is not None:
                return True
            victims[:] = [int(o.split(":")[1]) for o in sweep.queue.owners() if _alive(int(o.split(":")[1]))]
            return bool(victims)

        wait_for(a_loop_holds_a_lease, every=0.05)
        assert victims and p.poll() is None, "no loop held a lease before the end: slow the source down"
        os.kill(victims[0], signal.SIGKILL)  # a Dask worker process, mid-block
        err = finish(p, timeout=180)
        assert p.returncode == 0, err
        lost = sum(r["lost"] for r in sweep.queue.records())

    st = json.loads(tilesweep("status", url, "--json", env=env).stdout)
    assert st["mismatch"] is None
    assert st["tiles_done"] == st["tiles_total"] == planned["tiles"] and st["blocks_dead"] == 0
    assert st["blocks_leased"] == 0
    assert st["tiles_ok"] + st["tiles_empty"] + st["tiles_failed"] == st["tiles_total"]
    (model,) = st["predictions"]
    assert model["blocks"] == st["blocks_total"] and model["rows"] == st["tiles_ok"]
    assert lost >= 1, "the killed worker's lease was not counted lost"
    # exactly once in what queries read, from the bucket's parts and the ledger's winners
    from tilesweep import query

    assert query("SELECT COUNT(*), COUNT(DISTINCT (x, y)) FROM predictions", url).fetchall() == [(st["tiles_ok"],) * 2]
