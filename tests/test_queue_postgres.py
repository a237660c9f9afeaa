"""The PostgreSQL queue beyond the contract (tests/test_queue_contract.py): many processes,
a connection cut mid-transaction, a server restarted mid-sweep, and the CLI: a sweep planned
on the server records its URL without the password, and bad URLs, an unreachable server,
wrong credentials or a missing database are one line, exit 2, nothing written. A real
server on loopback (tests/helpers/pgserver.py); skipped where its binaries are absent."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from helpers.cli import tilesweep
from helpers.pgserver import PASSWORD
from tilesweep.errors import UsageError
from tilesweep.queue import Block, State, open_queue, stage_queue
from tilesweep.sim import World, run_in_thread

WORKER = Path(__file__).parent / "helpers" / "queue_worker.py"
BBOX = "7.40,46.90,7.50,47.00"
PG_ENV = {"PGPASSWORD": PASSWORD}


@pytest.fixture
def pg_url(pg_server, tmp_path):
    staged = stage_queue(pg_server.url(), tmp_path)
    staged.publish()
    yield staged.url
    staged.discard()


def fill(url, n):
    with open_queue(url) as q:
        q.put((Block(12, i % 64, i // 64, 256), (i * 7919) % n) for i in range(n))
        return sorted(b.id for b in q.blocks())


def workers(url, tmp_path, n, *args):
    logs = [tmp_path / f"w{i}.log" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), url, f"w{i}", str(logs[i]), *map(str, args)]) for i in range(n)]
    return procs, logs


def logged(logs):
    return Counter(int(x) for log in logs if log.exists() for x in log.read_text().split())


def test_eight_processes_lease_at_once_and_never_share(pg_url, tmp_path):
    all_ids = fill(pg_url, 800)
    procs, logs = workers(pg_url, tmp_path, 8, "--batch", 2)
    for p in procs:
        assert p.wait(timeout=120) == 0
    counts = logged(logs)
    assert sorted(counts) == all_ids and max(counts.values()) == 1
    assert sum(1 for log in logs if log.read_text()) >= 2
    with open_queue(pg_url) as q:
        st = q.stats()
        assert st.blocks[State.DONE] == 800 and st.attempts_total == 800
        assert set(q.owners_seen()) == {f"w{i}" for i in range(8)}  # every worker's heartbeat
        assert q.owners() == {}


def test_a_connection_cut_mid_transaction_is_retried_and_nothing_half_done(pg_server, pg_url):
    """An ack waits on a row lock inside its transaction; its session is terminated
    (pg_terminate_backend): the server rolls it back, the queue reconnects and acks."""
    import psycopg

    fill(pg_url, 4)
    schema = pg_url.rpartition("schema=")[2]
    q = open_queue(pg_url)
    (lease,) = q.lease(1, ttl=60, owner="w")
    with psycopg.connect(pg_server.admin_dsn + " dbname=tilesweep") as admin:
        admin.execute(f"SELECT id FROM {schema}.blocks WHERE id = %s FOR UPDATE", (lease.block.id,))
        done = []
        t = threading.Thread(target=lambda: done.append(q.ack([lease.block.id])))
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the ack is in its transaction, waiting for the lock
            (waiting,) = admin.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE usename = 'tilesweep' "
                                       "AND wait_event_type = 'Lock'").fetchone()
            if waiting:
                break
            time.sleep(0.05)
        assert waiting == 1
        assert admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'tilesweep' "
                             "AND wait_event_type = 'Lock'").fetchall() == [(True,)]
        time.sleep(0.3)
        assert not done  # still waiting: the retried transaction needs the lock too
    t.join(timeout=30)  # the admin's transaction ended: the lock is free
    assert done == [1]
    st = q.stats()
    assert st.blocks[State.DONE] == 1 and st.blocks[State.LEASED] == 0 and st.attempts_total == 1
    q.close()


def test_server_restarted_mid_sweep_workers_reconnect_nothing_lost(pg_server, pg_url, tmp_path):
    all_ids = fill(pg_url, 300)
    procs, logs = workers(pg_url, tmp_path, 3, "--batch", 2, "--work", 0.01)
    deadline = time.monotonic() + 60
    while sum(logged(logs).values()) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    pg_server.restart()  # every session is cut; workers retry until it is back
    for p in procs:
        assert p.wait(timeout=120) == 0
    counts = logged(logs)
    assert sorted(counts) == all_ids and 30 <= sum(counts.values()) < 2 * len(all_ids)
    with open_queue(pg_url) as q:
        st = q.stats()
        assert st.blocks[State.DONE] == 300 and st.blocks[State.LEASED] == st.blocks[State.PENDING] == 0
        repeated = {i for i, c in counts.items() if c > 1}
        assert all(q.get(i)["attempts"] > 1 or q.get(i)["lost"] == 0 for i in repeated)


def test_a_sweep_on_the_server_records_no_password_and_fetches_from_the_simulator(pg_server, tmp_path, monkeypatch):
    """plan --queue postgresql://, then `fetch --dask local:2` (the loops of a Dask
    LocalCluster lease from the server) against the simulator: every planned tile fetched
    once, `status` adds up (per machine too), `predict` records its blocks in the queue's
    schema (the ledger beside the queue, no file), the viewer reads both, and the password
    (given even inside the URL) is in no file of the sweep and no output."""
    sweep = tmp_path / "s"
    url = pg_server.url().replace("tilesweep@", f"tilesweep:{PASSWORD}@")  # even given in the URL
    res = tilesweep("plan", BBOX, sweep, "-z", 15, "--block-zoom", 13, "--queue", url, env=PG_ENV)
    recorded = tomllib.loads((sweep / "sweep.toml").read_text())["queue"]["url"]
    assert recorded.startswith(pg_server.url() + "?schema=tilesweep_") and PASSWORD not in recorded
    assert not (sweep / "queue.sqlite").exists()
    from tilesweep.area import load_area
    from tilesweep.plan import PlanSpec
    from tilesweep.sweep import Sweep

    again, created = Sweep.plan(sweep, load_area(BBOX), PlanSpec(zoom=15, block_zoom=13), queue=url)  # the same plan
    assert not created and again.queue_url == recorded
    with run_in_thread(World(seed=3)) as sim:
        dask = ("--dask", "local:2") if _has_dask() else ("--workers", 2)
        fetched = tilesweep("fetch", sweep, "--source", sim.template(), *dask, env=PG_ENV)
    # the prediction ledger lives beside the queue: in its schema, not in a file of the folder
    predicted = tilesweep("predict", sweep, "--model", "demo", "--quiet", env=PG_ENV)
    assert not (sweep / "predictions" / "ledger.sqlite").exists()
    st = json.loads(tilesweep("status", sweep, "--json", env=PG_ENV).stdout)
    assert st["blocks_done"] == st["blocks_total"] > 1 and st["mismatch"] is None
    (model,) = st["predictions"]
    assert model["blocks"] == st["blocks_total"] and model["rows"] == st["tiles_ok"]
    (machine,) = st["machines"]  # one host; its loops acked every tile, their heartbeats kept
    assert machine["tiles_done"] == st["tiles_total"] and machine["last_seen"] > 0 and len(machine["owners"]) >= 1
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    from tilesweep.view.server import Viewer

    viewer = Viewer(sweep)  # it used to read queue.sqlite: "has no queue.sqlite"
    assert viewer.progress()["blocks"]["done"] == st["blocks_total"]
    assert viewer.progress()["predicted_blocks"] == {model["folder"]: st["blocks_total"]}
    from tilesweep.tiles import tile_at
    from tilesweep.view.mvt import encode_squares

    t = tile_at(7.45, 46.95, 15)
    assert viewer.tile_info(t)["block"]["state"] == "done"
    assert viewer.blocks_tile(10, t.x >> 5, t.y >> 5) != encode_squares("blocks", [])  # the blocks of a cell
    assert st["tiles_ok"] + st["tiles_empty"] == st["tiles_total"] and st["tiles_ok"] > 0
    assert len(list((sweep / "tiles").rglob("*.shard"))) == st["blocks_total"]
    for text in [res.stdout, res.stderr, fetched.stdout, fetched.stderr, predicted.stdout, predicted.stderr,
                 *(p.read_bytes().decode("utf-8", "replace") for p in sweep.rglob("*") if p.is_file())]:
        assert PASSWORD not in text
    with open_queue(recorded) as q:
        assert q.owners() == {} and q.stats().attempts_total == st["blocks_total"]


def _has_dask() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def test_server_trouble_is_one_line_naming_it_and_nothing_written(pg_server, tmp_path, monkeypatch):
    """An unreachable server (through the CLI: one line, exit 2), wrong credentials, a
    database that does not exist (through the API: the same UsageError): nothing written,
    neither a sweep folder nor a schema, and the password in no message."""
    import socket

    from tilesweep.area import load_area
    from tilesweep.errors import UsageError
    from tilesweep.plan import PlanSpec
    from tilesweep.sweep import Sweep

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    target = tmp_path / "sweep"
    res = tilesweep("plan", BBOX, target, "-z", 15, "--queue", f"postgresql://tilesweep:{PASSWORD}@127.0.0.1:{closed}/tilesweep",
                    env=PG_ENV, check=False)
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "cannot connect" in res.stderr and str(closed) in res.stderr and PASSWORD not in res.stderr
    assert not target.exists()
    area = load_area(BBOX)
    for url, password, words in [
        (pg_server.url(), "wrong", 'password authentication failed for user "tilesweep"'),
        (pg_server.url().rsplit("/", 1)[0] + "/nosuchdb", PASSWORD, 'database "nosuchdb" does not exist'),
    ]:
        monkeypatch.setenv("PGPASSWORD", password)
        with pytest.raises(UsageError) as exc:
            Sweep.plan(target, area, PlanSpec(zoom=15), queue=url)
        assert words in str(exc.value) and "\n" not in str(exc.value) and PASSWORD not in str(exc.value)
        assert not target.exists()
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    with pytest.raises(UsageError, match="no tile at zoom 15 after sampling"):  # fails once the schema is staged
        Sweep.plan(target, area, PlanSpec(zoom=15, fraction=1e-9), queue=pg_server.url())
    assert not target.exists()
    import psycopg

    with psycopg.connect(pg_server.admin_dsn + " dbname=tilesweep") as db:  # no schema left behind by any test
        assert db.execute("SELECT COUNT(*) FROM pg_namespace WHERE nspname LIKE '%\\_partial'").fetchone() == (0,)


def test_a_password_in_the_url_is_used_and_a_reserved_word_is_a_schema_like_any_other(pg_server, tmp_path, monkeypatch):
    """No PGPASSWORD: the password given in a URL without ?schema= still reaches the
    server; a schema named `user` (a reserved word) is planned, published and opened."""
    monkeypatch.delenv("PGPASSWORD")
    staged = stage_queue(pg_server.url().replace("tilesweep@", f"tilesweep:{PASSWORD}@"), tmp_path)
    assert PASSWORD not in staged.url
    staged.discard()
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    staged = stage_queue(pg_server.url("user"), tmp_path)
    staged.queue.put([(Block(12, 1, 2, 256), 0)])
    staged.publish()
    try:
        with open_queue(staged.url) as q:
            assert [b.id for b in q.blocks()] == [Block(12, 1, 2, 256).id]
    finally:
        staged.discard()


def test_two_plans_of_one_schema_at_once_the_second_fails_and_the_first_is_intact(pg_server, tmp_path):
    first = stage_queue(pg_server.url("twice"), tmp_path)
    try:
        first.queue.put([(Block(12, i, 0, 256), i) for i in range(5)])
        res = tilesweep("plan", BBOX, tmp_path / "s2", "-z", 15, "--queue", pg_server.url("twice"), env=PG_ENV, check=False)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res
        assert "another plan" in res.stderr and "twice" in res.stderr and not (tmp_path / "s2").exists()
        first.queue.put([(Block(12, 9, 1, 256), 9)])
        first.publish()
        with open_queue(first.url) as q:
            assert q.count(State.PENDING) == 6
        with pytest.raises(UsageError, match="already holds a queue"):  # the lock ended with the plan
            stage_queue(pg_server.url("twice"), tmp_path)
    finally:
        first.discard()


def test_a_lease_whose_reply_is_lost_is_repeated_without_leasing_a_second_batch(pg_url):
    """The lease statement commits, then the connection drops before its reply (injected at
    the driver): the retried call returns the same blocks, and the owner holds only those."""
    import psycopg

    fill(pg_url, 10)
    q = open_queue(pg_url)
    conn = q._conn()
    real = conn.execute
    cut = []

    def execute(query, params=None, **kw):
        cur = real(query, params, **kw)
        if not cut and "picked" in str(query) and "leased" in str(query):
            cut.append(cur.fetchall())
            conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return cur

    conn.execute = execute
    leases = q.lease(3, ttl=60, owner="w")
    assert len(cut[0]) == 3 and sorted(lease.block.id for lease in leases) == sorted(Block(*r[:5]).id for r in cut[0])
    assert q.owners() == {"w": 3} and q.stats().attempts_total == 3
    assert len(q.lease(3, ttl=60, owner="w")) == 3 and q.owners() == {"w": 6}  # a new call leases anew
    q.close()
