"""The `tilesweep` command, run as a real subprocess: plan, status, retry, bad input."""

import json
import sqlite3

import pytest
from helpers.cli import status_json, tilesweep

BBOX = "7.40,46.90,7.45,46.93"  # about 3.8 x 3.3 km near Bern: 323 tiles at zoom 17 (mercantile agrees)


def test_plan_then_status(tmp_path):
    sweep = tmp_path / "s"
    res = tilesweep("plan", BBOX, sweep, "--zoom", 17)
    assert "tiles at zoom 17" in res.stdout and "estimate" in res.stdout
    assert {p.name for p in sweep.iterdir()} == {"sweep.toml", "queue.sqlite", "area.geojson"}
    st = status_json(sweep)
    assert st["tiles_total"] == st["tiles_pending"] == 323
    assert st["blocks_total"] == st["blocks_pending"] > 1
    assert st["blocks_leased"] == st["blocks_done"] == st["blocks_dead"] == 0
    assert st["mismatch"] is None
    table = tilesweep("status", sweep).stdout
    assert "pending" in table and f"{st['tiles_total']:,}" in table


def test_plan_json_and_sampling(tmp_path):
    full = json.loads(tilesweep("plan", BBOX, tmp_path / "a", "-z", 17, "--json").stdout)
    half = json.loads(tilesweep("plan", BBOX, tmp_path / "b", "-z", 17, "--fraction", 0.5, "--seed", 4, "--json").stdout)
    exact = json.loads(tilesweep("plan", BBOX, tmp_path / "c", "-z", 17, "--max-tiles", 100, "--json").stdout)
    assert 0.35 * full["tiles"] < half["tiles"] < 0.65 * full["tiles"]
    assert exact["tiles"] == 100
    assert full["blocks"] >= half["blocks"]


def test_plan_again_is_a_no_op_and_a_different_plan_is_refused(tmp_path):
    sweep = tmp_path / "s"
    tilesweep("plan", BBOX, sweep, "-z", 17)
    before = (sweep / "sweep.toml").read_text()
    again = tilesweep("plan", BBOX, sweep, "-z", 17)
    assert "already planned" in again.stdout
    assert (sweep / "sweep.toml").read_text() == before
    res = tilesweep("plan", BBOX, sweep, "-z", 16, check=False)
    assert res.returncode == 2
    assert "already holds a different plan" in res.stderr and "Traceback" not in res.stderr
    assert (sweep / "sweep.toml").read_text() == before


def test_retry_dead_puts_blocks_back(tmp_path):
    sweep = tmp_path / "s"
    tilesweep("plan", BBOX, sweep, "-z", 17)
    # Kill two blocks the way workers do, through the queue's own API.
    from tilesweep.sweep import open_sweep_queue

    with open_sweep_queue(sweep, max_attempts=1) as q:
        for lease in q.lease(2, 60.0, "test-worker"):
            q.nack(lease.block.id, "HTTP 500 three times")
    st = status_json(sweep)
    assert st["blocks_dead"] == 2
    assert "2 dead blocks queued again" in tilesweep("retry", sweep, "--dead").stdout
    st = status_json(sweep)
    assert st["blocks_dead"] == 0 and st["blocks_pending"] == st["blocks_total"]


BAD = [
    (["plan", "7.5,46.9,7.4,47.0", "{dir}", "-z", "17"], "west 7.5 must be less than east 7.4"),
    (["plan", "7.4,46.9,7.5,97", "{dir}", "-z", "17"], "latitude 97"),
    (["plan", "7.4,46.9,7.5", "{dir}", "-z", "17"], "not four numbers"),
    (["plan", BBOX, "{dir}", "-z", "25"], "zoom 25 is outside 0..24"),
    (["plan", BBOX, "{dir}", "-z", "17", "--block-zoom", "18"], "block zoom 18"),
    (["plan", BBOX, "{dir}", "-z", "17", "--fraction", "0"], "fraction 0 is outside"),
    (["plan", BBOX, "{dir}", "-z", "17", "--fraction", "1.5"], "fraction 1.5 is outside"),
    (["plan", "missing.geojson", "{dir}", "-z", "17"], "missing.geojson"),
    (["plan", "{bad_geojson}", "{dir}", "-z", "17"], "not valid JSON"),
    (["plan", BBOX, "{dir}", "-z", "17", "--max-tiles", "0"], "max tiles 0"),
    (["plan", BBOX, "{dir}", "-z", "17", "--queue", "mysql://u@h/db"], "queue URL 'mysql://u@h/db' is not one of"),
    (["plan", BBOX, "{dir}", "-z", "17", "--queue", "postgresql://u:secret@h:5432"], "queue URL 'postgresql://u@h:5432' names no database"),
    (["plan", BBOX, "{dir}", "-z", "17", "--queue", "sqlite:///{dir}-nowhere/q.sqlite"], "-nowhere' does not exist"),
    (["status", "{dir}"], "holds no plan"),
    (["retry", "{dir}"], "needs --dead"),
]


@pytest.mark.parametrize("args, words", BAD, ids=[w for _, w in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, words):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    target = tmp_path / "sweep"
    args = [a.format(dir=target, bad_geojson=bad) for a in args]
    res = tilesweep(*args, check=False)
    assert res.returncode == 2, res
    assert words in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not target.exists()


def test_plan_refuses_a_non_empty_folder_that_is_not_a_sweep(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    res = tilesweep("plan", BBOX, tmp_path, "-z", 17, check=False)
    assert res.returncode == 2 and "not empty" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_queue_file_is_a_real_sqlite_database_in_wal_mode(tmp_path):
    sweep = tmp_path / "s"
    tilesweep("plan", BBOX, sweep, "-z", 17)
    con = sqlite3.connect(sweep / "queue.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
