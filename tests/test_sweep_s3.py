"""A whole sweep on object storage: SWEEP is ``s3://bucket/prefix`` on a real SeaweedFS,
the queue a real PostgreSQL, tiles from the simulator over loopback HTTP."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from helpers import seaweed
from helpers.cli import tilesweep

BBOX = "8.500,47.300,8.508,47.305"  # zoom 18: 42 tiles


def _env(s3_server, pg_server, tmp_path, name: str = "m1") -> dict[str, str]:
    """One "machine": the bucket's credentials, the queue's password, its own state and
    staging folders (local disk)."""
    env = s3_server.env(PGPASSWORD=os.environ["PGPASSWORD"], TILESWEEP_STATE_DIR=str(tmp_path / name / "state"),
                        TMPDIR=str(tmp_path / name / "tmp"))
    (tmp_path / name / "tmp").mkdir(parents=True)
    return env


def _url() -> str:
    return f"s3://{seaweed.BUCKET}/sweep-{uuid.uuid4().hex[:10]}"


def _objects(s3_server, monkeypatch, url: str) -> list[str]:
    from tilesweep.storage import open_storage

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return sorted(o.key for o in open_storage(url).list())


def _at_once(fn, args, timeout: float = 120.0) -> None:
    """Run ``fn(a)`` for each of ``args`` in threads of their own (they meet at a barrier
    inside ``fn``) and wait for them all."""
    import threading

    threads = [threading.Thread(target=fn, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def _query(sql: str, url: str, env: dict[str, str], out) -> list[dict[str, str]]:
    import csv

    tilesweep("query", sql, "--sweep", url, "-o", out, env=env)
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_plan_run_status_query_export_on_s3(s3_server, pg_server, tmp_path, monkeypatch):
    """plan -> run --keep-tiles (shards and the model's parts published to the bucket, the
    ledger in the queue's schema) -> status -> query, all on the URL; then a second
    "machine" (fresh state and staging folders, nothing of the sweep on its disk) queries,
    summarizes, gets a tile, exports detections and a PMTiles archive from the same URL."""
    from tilesweep import query
    from tilesweep.area import load_area
    from tilesweep.plan import PlanSpec
    from tilesweep.sim import World, run_in_thread
    from tilesweep.summarize import summarize_zoom
    from tilesweep.sweep import Sweep

    env = _env(s3_server, pg_server, tmp_path)
    url = _url()
    r = tilesweep("plan", BBOX, url, "--zoom", 18, "--block-zoom", 16, "--queue", pg_server.url(), "--json", env=env)
    planned = json.loads(r.stdout)
    assert planned["created"] and planned["queue"].startswith("postgresql://") and "password" not in planned["queue"]
    assert _objects(s3_server, monkeypatch, url) == [f"area-{planned['fingerprint']}.geojson", "sweep.toml"]
    monkeypatch.setenv("TILESWEEP_STATE_DIR", env["TILESWEEP_STATE_DIR"])
    again, created = Sweep.plan(url, load_area(BBOX), PlanSpec(zoom=18, block_zoom=16), queue=pg_server.url())
    assert not created and again.queue_url == planned["queue"]  # the same plan: a no-op
    again.close()

    with run_in_thread(World(seed=3)) as sim:
        tilesweep("run", url, "--source", sim.template(), "--model", "demo", "--keep-tiles", "--quiet", env=env)
    st = json.loads(tilesweep("status", url, "--json", env=env).stdout)
    assert st["mismatch"] is None and st["tiles_done"] == st["tiles_total"] == planned["tiles"] > 20
    keys = _objects(s3_server, monkeypatch, url)
    shards = [k for k in keys if k.startswith("tiles/") and k.endswith(".shard")]
    parts = [k for k in keys if k.startswith("predictions/") and k.endswith(".parquet")]
    assert len(shards) == planned["blocks"] and parts, keys
    assert not [k for k in keys if k.endswith(".partial")]
    sql = ("SELECT (SELECT count(*) FROM predictions) AS n, (SELECT count(DISTINCT block) FROM predictions) AS b, "
           "(SELECT count(*) FROM tiles WHERE status = 'ok') AS ok")
    want = {"n": st["tiles_ok"], "b": planned["blocks"], "ok": st["tiles_ok"]}
    assert _query(sql, url, env, tmp_path / "q.csv") == [{k: str(v) for k, v in want.items()}]

    other = _env(s3_server, pg_server, tmp_path, "m2")  # another machine: nothing of the sweep on its disk
    monkeypatch.setenv("TILESWEEP_STATE_DIR", other["TILESWEEP_STATE_DIR"])
    rel = query(sql, url)
    assert dict(zip(rel.columns, rel.fetchall()[0])) == want
    with Sweep.open(url) as sweep:  # its status counts the predictions in the bucket, not a local ledger
        (m,) = sweep.status().predictions
    assert (m["model"], m["rows"], m["blocks"], m["parts"]) == ("demo", st["tiles_ok"], planned["blocks"], len(parts))
    z, x, y = query("SELECT z, x, y FROM tiles WHERE status = 'ok' LIMIT 1", url).fetchall()[0]
    per_block = summarize_zoom(url, 16).df()  # the plan (the queue on PostgreSQL) joined with the parts
    assert len(per_block) == planned["blocks"] and per_block["planned"].sum() == planned["tiles"]
    assert per_block["fetched"].sum() == st["tiles_ok"]
    tilesweep("tiles", "get", url, f"{z}/{x}/{y}", "-o", tmp_path / "t.jpg", env=other)
    assert (tmp_path / "t.jpg").read_bytes()[:2] == b"\xff\xd8"
    tilesweep("detections", url, "-o", tmp_path / "d.geojson", "--threshold", 0.0, env=other)
    assert len(json.loads((tmp_path / "d.geojson").read_text())["features"]) == st["tiles_ok"]
    tilesweep("export", url, tmp_path / "a.pmtiles", env=other)
    assert (tmp_path / "a.pmtiles").stat().st_size > 1000


def test_bad_sweep_urls_are_one_line_exit_2_and_write_nothing(s3_server, pg_server, tmp_path, monkeypatch):
    env = _env(s3_server, pg_server, tmp_path)
    url = _url()
    cases = [
        (("plan", BBOX, url, "--zoom", 18), {}, "its queue cannot be SQLite"),
        (("plan", BBOX, "s3://no-such-bucket/p", "--zoom", 18, "--queue", pg_server.url()), {},
         "bucket 'no-such-bucket' does not exist"),
        (("plan", BBOX, url, "--zoom", 18, "--queue", pg_server.url()), {"AWS_SECRET_ACCESS_KEY": "wrong"},
         "credentials refused"),
        (("plan", BBOX, "ftp://host/p", "--zoom", 18, "--queue", pg_server.url()), {}, "unsupported scheme 'ftp'"),
        (("view", url), {}, "`view` serves a local sweep folder only"),
        (("status", "s3://"), {}, "bad sweep URL 's3://': names no bucket"),
    ]
    for args, over, want in cases:
        r = tilesweep(*args, env={**env, **over}, check=False)
        assert r.returncode == 2 and want in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    from tilesweep.area import load_area
    from tilesweep.errors import UsageError
    from tilesweep.plan import PlanSpec
    from tilesweep.sweep import Sweep

    assert _objects(s3_server, monkeypatch, url) == []  # (and the AWS_* variables are set here now)
    monkeypatch.setenv("TILESWEEP_STATE_DIR", env["TILESWEEP_STATE_DIR"])
    for where, want in ((url, "holds no plan"), ("file://elsewhere/p", "names host 'elsewhere'")):
        with pytest.raises(UsageError, match=want):
            Sweep.open(where)

    sweep, created = Sweep.plan(f"file://{tmp_path}/fs", load_area(BBOX), PlanSpec(zoom=18, block_zoom=16))
    assert created and not sweep.remote and (tmp_path / "fs" / "queue.sqlite").is_file()  # file:// is a folder
    sweep.close()


def test_two_machines_racing_on_one_block_publish_it_once(s3_server, pg_server, tmp_path, monkeypatch):
    """Machine A is stopped (SIGSTOP) while it holds the sweep's one block; its lease
    expires and machine B fetches and publishes the block. A then wakes up, finishes the
    same block, loses the create-if-absent publication and keeps B's shard: both exit 0,
    the shard's bytes are B's, A's staging holds nothing, the accounting adds up. Then a
    flipped byte in the bucket's shard: ``verify(repair=True)`` moves it aside."""
    import signal
    import subprocess
    import sys
    import time

    from helpers.cli import ENV

    from tilesweep.sim import Faults, World, run_in_thread
    from tilesweep.storage import open_storage

    env_a, env_b = _env(s3_server, pg_server, tmp_path, "a"), _env(s3_server, pg_server, tmp_path, "b")
    url = _url()
    planned = json.loads(tilesweep("plan", BBOX, url, "--zoom", 18, "--block-zoom", 12, "--queue", pg_server.url(),
                                   "--json", env=env_a).stdout)
    assert planned["blocks"] == 1
    with run_in_thread(World(seed=3), Faults(latency_ms=60, seed=3)) as sim:
        args = ["fetch", url, "--source", sim.template(), "--concurrency", 4, "--lease-ttl", 3, "--quiet"]
        a = subprocess.Popen([sys.executable, "-m", "tilesweep", *map(str, args)], env={**ENV, **env_a},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        staging_a = tmp_path / "a" / "tmp" / "tilesweep-staging"
        try:
            deadline = time.monotonic() + 60
            while not list(staging_a.rglob("*.shard.partial")):  # A writes the block
                assert a.poll() is None and time.monotonic() < deadline, a.communicate()
                time.sleep(0.02)
            a.send_signal(signal.SIGSTOP)
            tilesweep("fetch", url, "--lease-ttl", 3, "--concurrency", 4, "--quiet", env=env_b)  # takes it once expired
            for k, v in s3_server.env().items():
                monkeypatch.setenv(k, v)
            tiles = open_storage(f"{url}/tiles")
            (key,) = [o.key for o in tiles.list()]
            published = tiles.read(key)
        finally:
            a.send_signal(signal.SIGCONT)
        out, err = a.communicate(timeout=120)
    assert a.returncode == 0, err
    assert [o.key for o in tiles.list()] == [key] and tiles.read(key) == published  # B's shard stands
    assert not [p for p in staging_a.rglob("*") if p.is_file() and p.name.endswith(".partial")], "A dropped its copy"
    from tilesweep.sweep import Sweep

    monkeypatch.setenv("TILESWEEP_STATE_DIR", env_a["TILESWEEP_STATE_DIR"])
    with Sweep.open(url) as sweep:  # in process: a command's start-up costs a second or two
        st = sweep.status()
        assert st.mismatch is None and st.blocks["done"] == 1 and st.tiles["done"] == planned["tiles"]
        # a flipped byte in the bucket: verify --repair moves the shard aside (no rename there)
        bad = bytearray(published)
        bad[40] ^= 0xFF  # in the first tile's bytes
        tiles.put(key, bytes(bad), replace=True)
        report = sweep.store.verify(repair=True)
    assert report.checked == 1 and len(report.corrupt) == 1
    assert [o.key for o in tiles.list()] == [f"{key}.corrupt"] and tiles.read(f"{key}.corrupt") == bytes(bad)


def test_two_plans_racing_on_one_url_leave_one_plan(s3_server, pg_server, tmp_path, monkeypatch):
    """Two different plans started together into one new URL: exactly one is published
    (sweep.toml create-if-absent), the other is refused in one line and leaves nothing:
    no second area object, its queue's schema dropped."""
    import threading

    import psycopg

    from tilesweep.area import load_area
    from tilesweep.errors import UsageError
    from tilesweep.plan import PlanSpec
    from tilesweep.sweep import Sweep

    url = _url()
    _objects(s3_server, monkeypatch, url)  # sets the AWS_* variables here
    monkeypatch.setenv("TILESWEEP_STATE_DIR", str(tmp_path / "state"))

    def schemas() -> int:
        with psycopg.connect(pg_server.admin_dsn + " dbname=tilesweep", autocommit=True) as db:
            return int(db.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tilesweep%'").fetchone()[0])

    before = schemas()
    start = threading.Barrier(2)
    results: dict[int, object] = {}

    def plan(zoom: int) -> None:
        start.wait()
        try:
            sweep, created = Sweep.plan(url, load_area(BBOX), PlanSpec(zoom=zoom, block_zoom=14), queue=pg_server.url())
            results[zoom] = (sweep.zoom, created)
            sweep.close()
        except UsageError as exc:
            results[zoom] = exc

    _at_once(plan, (17, 18))
    won = [z for z, r in results.items() if r == (z, True)]
    lost = [r for r in results.values() if isinstance(r, UsageError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "another plan was published there" in str(lost[0]) or "different plan" in str(lost[0])
    with Sweep.open(url) as sweep:
        assert sweep.zoom == won[0]
        fp = sweep.plan_config["fingerprint"]
    assert _objects(s3_server, monkeypatch, url) == [f"area-{fp}.geojson", "sweep.toml"]
    assert schemas() == before + 1


def test_two_machines_binding_different_sources_at_once_one_is_refused(s3_server, pg_server, tmp_path, monkeypatch):
    """Two machines opened the sweep before either recorded a source (both see none), then
    bind different sources at once: sweep.toml is updated conditionally (If-Match on its
    ETag), so one source is recorded and the other machine is refused in one line naming
    the URL; a later update (unbind) keeps what the other recorded."""
    import threading

    from tilesweep.area import load_area
    from tilesweep.errors import UsageError
    from tilesweep.plan import PlanSpec
    from tilesweep.sources import parse_source
    from tilesweep.sweep import Sweep

    url = _url()
    _objects(s3_server, monkeypatch, url)  # sets the AWS_* variables here
    monkeypatch.setenv("TILESWEEP_STATE_DIR", str(tmp_path / "state"))
    Sweep.plan(url, load_area(BBOX), PlanSpec(zoom=17, block_zoom=14), queue=pg_server.url())[0].close()
    machines = [Sweep.open(url), Sweep.open(url)]
    sources = [parse_source(f"http://127.0.0.1:9/{name}/{{z}}/{{x}}/{{y}}.png") for name in ("a", "b")]
    start = threading.Barrier(2)
    results: dict[int, object] = {}

    def bind(i: int) -> None:
        start.wait()
        try:
            results[i] = machines[i].bind_source(sources[i]).template
        except UsageError as exc:
            results[i] = exc

    _at_once(bind, (0, 1))
    won = [i for i, r in results.items() if r == sources[i].template]
    lost = [r for r in results.values() if isinstance(r, UsageError)]
    assert len(won) == 1 and len(lost) == 1, results
    msg = str(lost[0])
    assert "mixing sources in one sweep is refused" in msg and url in msg and "\n" not in msg, msg
    with Sweep.open(url) as sweep:
        assert sweep.source is not None and sweep.source.template == sources[won[0]].template
    loser = machines[1 - won[0]]
    loser.unbind_source()  # it recorded nothing: the winner's source stays
    with Sweep.open(url) as sweep:
        assert sweep.source is not None and sweep.source.template == sources[won[0]].template
    for m in machines:
        m.close()


def test_a_failed_plan_deletes_only_an_area_it_created(s3_server, pg_server, tmp_path, monkeypatch):
    """An identical plan racing this one has put its area object (area-{fingerprint}) and
    not yet its sweep.toml: this plan fails (here: interrupted while planning) and must
    leave that area in place (it did not create it)."""
    from tilesweep.area import load_area
    from tilesweep.plan import PlanSpec
    from tilesweep.storage import open_storage
    from tilesweep.sweep import Sweep, plan_fingerprint

    url = _url()
    _objects(s3_server, monkeypatch, url)  # sets the AWS_* variables here
    monkeypatch.setenv("TILESWEEP_STATE_DIR", str(tmp_path / "state"))
    area, spec = load_area(BBOX), PlanSpec(zoom=17, block_zoom=14)
    key = f"area-{plan_fingerprint(area, spec)}.geojson"

    def interrupt(chunk) -> None:
        raise RuntimeError("interrupted")

    open_storage(url).put(key, b"{}")  # the racing identical plan's area
    with pytest.raises(RuntimeError):
        Sweep.plan(url, area, spec, on_chunk=interrupt, queue=pg_server.url())
    assert _objects(s3_server, monkeypatch, url) == [key]
    sweep, created = Sweep.plan(url, area, spec, queue=pg_server.url())  # the racing plan goes on: its area is there
    assert created and sweep.area_path.read_bytes() == b"{}"
    sweep.close()


def test_the_state_folder_of_a_bucket_is_keyed_by_its_endpoint(tmp_path, monkeypatch):
    """One bucket name on two S3 endpoints (a local SeaweedFS and AWS) never shares a state
    or staging folder (its lock, densify rounds, unfinished shards)."""
    from tilesweep.storage import endpoint_parts
    from tilesweep.sweep import state_folder

    monkeypatch.setenv("TILESWEEP_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("AWS_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    aws = state_folder("s3://b/p")
    assert aws == tmp_path / "s3" / "b" / "p"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    local = state_folder("s3://b/p")
    assert local == tmp_path / "s3" / "@127.0.0.1_8333" / "b" / "p" and endpoint_parts("s3") == ["@127.0.0.1_8333"]
