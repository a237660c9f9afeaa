"""The prediction ledger with many writers (issue 11): two sinks on one sweep and model at
once, both scoring a block whose lease was lost, count it once; the query sees each tile
once; an orphan adopted by a second writer while its own writer records it stays whole.

Real parts: two :class:`PredictionSink` objects over one real ``ledger.sqlite`` (each its
own connection, as two processes have), real Parquet parts, the real DuckDB view. One
contract, parametrised by backend: the ledger lives beside the queue, in
``predictions/ledger.sqlite`` or in the queue's schema on the session's real PostgreSQL
server (tests/helpers/pgserver.py)."""

import time

import numpy as np
import pytest

import tilesweep as ts
from tilesweep.predict import BlockRows, PredictionSink, ledger_totals
from tilesweep.area import parse_bbox
from tilesweep.plan import PlanSpec
from tilesweep.sweep import Sweep
from tilesweep.predict.ledger import part_sources

ZOOM = 18
BBOX = "8.500,47.300,8.516,47.310"


def rows(block_id, xs, score):
    xs = np.asarray(xs, np.int64)
    return BlockRows(block_id, 16, xs, np.full(len(xs), 7, np.int64), np.full((len(xs), 1), score, np.float32), 1, 0, time.time())


@pytest.fixture(params=["sqlite", "postgres"])
def sweep(request, tmp_path):
    """A planned sweep whose queue (and so its ledger) is of the backend under test."""
    path = tmp_path / "s"
    queue = None if request.param == "sqlite" else request.getfixturevalue("pg_server").url()
    Sweep.plan(path, parse_bbox(BBOX), PlanSpec(zoom=ZOOM, block_zoom=16), queue=queue)[0].close()
    return path


def ledger_file(sweep):
    return sweep / "predictions" / "ledger.sqlite"


def query(sweep, sql):
    return ts.query(sql, sweep).fetchall()


def test_two_writers_score_one_block_and_it_counts_once(sweep):
    a = PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5)
    b = PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5)  # beside it: writers share the lock
    try:
        a.add(rows(1, [10, 11], 0.9))
        a.add(rows(2, [20, 21, 22], 0.9))
        b.add(rows(2, [20, 21, 22], 0.1))  # block 2's lease was lost: both scored it
        b.add(rows(3, [30], 0.1))
        assert sorted(a.commit()) == [1, 2]
        assert sorted(b.commit()) == [2, 3]  # durable (predicted), so its runner acks it too
        assert a.stats.blocks == 2 and a.stats.lost_blocks == 0
        assert b.stats.blocks == 1 and b.stats.lost_blocks == 1 and b.stats.rows == 1
        # a part that wins nothing is not kept; a block without rows counts once too
        a.add(rows(4, [], 0.9))
        assert a.commit() == [4] and a.stats.blocks == 3
        b.add(rows(1, [10, 11], 0.1))
        b.add(rows(4, [], 0.1))
        assert sorted(b.commit()) == [1, 4] and b.stats.parts == 1 and b.stats.blocks == 1 and b.stats.lost_blocks == 3
    finally:
        a.close()
        b.close()
    parts = part_sources(sweep)
    assert len(parts) == 2 and sorted(p.lost for p in parts) == [(), (2,)]
    assert len(list((sweep / "predictions").glob("*/part-*.parquet"))) == 2
    got = query(sweep, "SELECT block, x, score FROM predictions ORDER BY block, x")
    # block 2's rows are the first writer's (it recorded first), once each
    assert [(b, x) for b, x, _ in got] == [(1, 10), (1, 11), (2, 20), (2, 21), (2, 22), (3, 30)]
    assert all(abs(s - 0.9) < 1e-6 for b, _, s in got if b in (1, 2))
    with PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5) as again:  # a later writer changes nothing
        assert again.predicted_ids() == {1, 2, 3, 4} and again.stats.adopted_parts == 0
    totals = ledger_totals(sweep, "m", "abc")
    assert totals is not None and (totals.blocks, totals.rows, totals.empty, totals.parts) == (4, 6, 4, 2)
    assert ledger_file(sweep).exists() == ("postgresql" not in (sweep / "sweep.toml").read_text())


def test_an_orphan_adopted_by_a_second_writer_while_its_writer_records_it(sweep, monkeypatch):
    a = PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5)
    try:
        record = a.ledger.record
        seen = {}

        def publish_then_a_second_writer_opens(*args, **kw):
            # between a's publish and its record: a second writer opens and adopts the part
            with PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5) as b:
                seen["adopted"] = b.stats.adopted_parts
            return record(*args, **kw)

        monkeypatch.setattr(a.ledger, "record", publish_then_a_second_writer_opens)
        a.add(rows(5, [50, 51], 0.9))
        assert a.commit() == [5]
    finally:
        a.close()
    assert seen["adopted"] == 1 and a.stats.blocks == 1 and a.stats.lost_blocks == 0
    assert query(sweep, "SELECT COUNT(*), COUNT(DISTINCT x) FROM predictions") == [(2, 2)]
    assert [p.lost for p in part_sources(sweep)] == [()]


def test_a_ledger_file_of_a_postgresql_sweep_is_read_then_migrated(sweep):
    """Sweeps predicted before the ledger moved beside the queue: readers read the file
    until the first writer copies it into the queue's schema and renames it."""
    if "postgresql" not in (sweep / "sweep.toml").read_text():
        pytest.skip("the SQLite backend's ledger is that file")
    from tilesweep.predict.ledger import SqliteLedger, open_ledger

    # the old layout: the file, as earlier versions wrote it (a block without fetched tiles)
    (sweep / "predictions" / "m").mkdir(parents=True)
    old = SqliteLedger(ledger_file(sweep))
    old.add_model("name:m", "m", "", "m", ["score"], 0.5)
    old.record("name:m", None, 0, 0, {9: [0, 4, 0, 0, 0, 0]}, adopted=False)
    old.close()
    reader = open_ledger(sweep)
    assert isinstance(reader, SqliteLedger) and reader.predicted_ids("name:m") == {9}
    reader.close()
    with PredictionSink(sweep, ZOOM, "m", "", ["score"], 0.5) as s:  # key name:m
        assert s.predicted_ids() == {9}
    assert not ledger_file(sweep).exists() and ledger_file(sweep).with_name("ledger.sqlite.migrated").exists()
    assert ledger_totals(sweep, "m", "")[:3] == (1, 0, 4)


def test_a_writer_reconnects_after_its_connection_is_cut(sweep, request):
    """A server restart or pg_terminate_backend between two commits: the next commit
    reconnects and goes on (its record is safe to repeat)."""
    if "postgresql" not in (sweep / "sweep.toml").read_text():
        pytest.skip("a SQLite ledger has no connection to lose")
    server = request.getfixturevalue("pg_server")
    with PredictionSink(sweep, ZOOM, "m", "abc", ["score"], 0.5) as s:
        s.add(rows(1, [10], 0.9))
        assert s.commit() == [1]
        assert server.terminate() >= 1
        s.add(rows(2, [20], 0.9))
        assert s.commit() == [2] and s.predicted_ids() == {1, 2}
    assert query(sweep, "SELECT COUNT(*) FROM predictions") == [(2,)]
    # `predictions drop` is refused while a writer on another machine runs (its session
    # holds the writers' lock: the local flock does not reach it), and works after
    from tilesweep.errors import UsageError
    from tilesweep.predict.ledger import open_ledger
    from tilesweep.predict.sink import drop_predictions

    remote = open_ledger(sweep, write=True)
    with pytest.raises(UsageError, match="another machine"):
        drop_predictions(sweep, "m")
    remote.close()
    assert drop_predictions(sweep, "m").blocks == 2
    assert query(sweep, "SELECT COUNT(*) FROM predictions") == [(0,)]


def test_two_postgresql_writers_recording_one_set_of_blocks_in_opposite_orders_both_finish(pg_server, tmp_path):
    """Two writers (their own connections, as two machines have) record the same 400
    blocks in opposite orders at once: no deadlock kills either; each block has one winner."""
    import threading

    from tilesweep.predict.ledger import PostgresLedger, _queue_url

    path = tmp_path / "s"
    Sweep.plan(path, parse_bbox(BBOX), PlanSpec(zoom=ZOOM, block_zoom=16), queue=pg_server.url("deadlock"))[0].close()
    u = _queue_url(path)
    a, b = PostgresLedger(u), PostgresLedger(u)
    ids = list(range(400))
    go = threading.Barrier(2)
    got: dict[str, object] = {}

    def write(ledger, name, order):
        try:
            for rnd in range(3):
                go.wait()
                got[name, rnd] = ledger.record(f"k{rnd}", f"{name}{rnd}", len(order), 1, {i: [1, 0, 0, 0, 0, 0] for i in order}, False)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            got[name] = exc
            go.abort()

    threads = [threading.Thread(target=write, args=(a, "a", ids)), threading.Thread(target=write, args=(b, "b", ids[::-1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    b.close()
    assert "a" not in got and "b" not in got, got
    for rnd in range(3):
        ra, rb = got["a", rnd], got["b", rnd]
        assert sorted(ra.won + rb.won) == ids and not set(ra.won) & set(rb.won)


def test_block_results_read_on_one_connection_through_a_server_restart(pg_server, tmp_path):
    """The per-block check of `run --workers N` (ledger_block_result) reuses one reader
    connection, and a PostgreSQL restart under it is waited out, not a UsageError."""
    import threading

    import psycopg

    from tilesweep.predict.sink import ledger_block_result

    path = tmp_path / "s"
    Sweep.plan(path, parse_bbox(BBOX), PlanSpec(zoom=ZOOM, block_zoom=16), queue=pg_server.url("reader"))[0].close()
    with PredictionSink(path, ZOOM, "m", "abc", ["score"], 0.5) as s:
        s.add(rows(1, [10, 11], 0.9))
        s.commit()
        key, file = s.key, s.root / "ledger.sqlite"

    def sessions():
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as db:
            return db.execute("SELECT sessions FROM pg_stat_database WHERE datname = 'tilesweep'").fetchone()[0]

    assert ledger_block_result(file, key, 1)[:3] == (2, 1, 0)
    before = sessions()
    for _ in range(20):
        assert ledger_block_result(file, key, 1)[:3] == (2, 1, 0) and ledger_block_result(file, key, 2) is None
    assert sessions() - before <= 1  # a connection per call was 40
    restart = threading.Thread(target=pg_server.restart)
    restart.start()
    calls = 0
    while restart.is_alive() or calls < 3:
        assert ledger_block_result(file, key, 1)[:3] == (2, 1, 0)
        calls += 1
    restart.join()


def test_an_open_deletes_neither_another_models_part_nor_one_it_cannot_read_now(tmp_path):
    """Recovery deletes an unknown part only when it is read whole and is not a part: two
    models whose folder slug is the same ("m" and "m!") keep each other's parts, and a
    part the storage fails to read (here an OS error: the entry links to a folder) is skipped."""
    path = tmp_path / "s"
    Sweep.plan(path, parse_bbox(BBOX), PlanSpec(zoom=ZOOM, block_zoom=16))[0].close()
    with PredictionSink(path, ZOOM, "m!", "", ["score"], 0.5) as other:
        assert other.folder_name == "m"
        other.add(rows(1, [10], 0.9))
        other.commit()
    (tmp_path / "a-folder").mkdir()
    (path / "predictions" / "m" / "part-unreadable.parquet").symlink_to(tmp_path / "a-folder")
    (path / "predictions" / "m" / "part-garbage.parquet").write_bytes(b"not parquet")
    with PredictionSink(path, ZOOM, "m", "", ["score"], 0.5) as s:
        assert s.stats.skipped_parts == 2 and s.stats.deleted_orphans == 1 and s.stats.adopted_parts == 0
    left = sorted(p.name for p in (path / "predictions" / "m").glob("part-*.parquet"))
    assert len(left) == 2 and "part-unreadable.parquet" in left
    assert query(path, "SELECT model, COUNT(*) FROM predictions GROUP BY model") == [("m!", 1)]


def test_writers_opening_at_once_migrate_an_old_ledger_file_once(pg_server, tmp_path):
    """The first open of a PostgreSQL sweep with an old ``ledger.sqlite`` on many machines
    at once: one copies and renames it, the others wait and find it done."""
    import threading

    from tilesweep.predict.ledger import PostgresLedger, SqliteLedger, _queue_url

    path = tmp_path / "s"
    Sweep.plan(path, parse_bbox(BBOX), PlanSpec(zoom=ZOOM, block_zoom=16), queue=pg_server.url("migrate"))[0].close()
    file = path / "predictions" / "ledger.sqlite"
    file.parent.mkdir(parents=True, exist_ok=True)
    old = SqliteLedger(file)
    old.add_model("name:m", "m", "", "m", ["score"], 0.5)
    old.record("name:m", None, 0, 0, {i: [0, 4, 0, 0, 0, 0] for i in range(3000)}, adopted=False)
    old.close()
    u = _queue_url(path)
    go = threading.Barrier(4)
    got: list[object] = []

    def open_writer():
        go.wait()
        try:
            ledger = PostgresLedger(u, migrate_from=file)
            got.append(len(ledger.predicted_ids("name:m")))
            ledger.close()
        except Exception as exc:  # noqa: BLE001 - the test reports it
            got.append(exc)

    threads = [threading.Thread(target=open_writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [3000] * 4
    assert not file.exists() and file.with_name("ledger.sqlite.migrated").is_file()


def test_a_server_error_under_a_reader_is_one_line(pg_server, tmp_path):
    """A reader (the map viewer's models) meets a PostgreSQL error: a one-line
    UsageError naming the queue, not a psycopg traceback."""
    import psycopg

    from tilesweep.errors import UsageError
    from tilesweep.view.overlay import read_models

    path = tmp_path / "s"
    Sweep.plan(path, parse_bbox(BBOX), PlanSpec(zoom=ZOOM, block_zoom=16), queue=pg_server.url("broken"))[0].close()
    with PredictionSink(path, ZOOM, "m", "abc", ["score"], 0.5) as s:
        s.add(rows(1, [10], 0.9))
        s.commit()
    assert [m.name for m in read_models(path)] == ["m"]
    with psycopg.connect(pg_server.url(), autocommit=True) as db:
        db.execute("DROP TABLE broken.models")
    with pytest.raises(UsageError, match=r"prediction ledger in queue .*models") as err:
        read_models(path)
    assert "\n" not in str(err.value)
