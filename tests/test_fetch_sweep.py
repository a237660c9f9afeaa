"""`tilesweep fetch` end to end: real processes, real HTTP to the simulator, real shards.

The strongest test here kills the fetch with SIGKILL at random instants and restarts the
same command: the store must end with every planned tile exactly once, with the source's
bytes."""

import os
import random
import signal
import time

import pytest
from helpers.cli import popen, status_json, tilesweep

from tilesweep.sweep import open_sweep_queue
from tilesweep.sim import Faults, World, run_in_thread
from tilesweep.store import Status, TileStore
from tilesweep.tiles import Tile

BBOX = "8.500,47.300,8.516,47.310"  # 156 tiles at zoom 18 (13 x 12), 16 blocks at zoom 16
ZOOM, BLOCK_ZOOM = 18, 16
SEED = 5  # the world most tests of this bbox use: its tiles are rendered once a session (sim cache)


@pytest.fixture(scope="module")
def expected():
    """The source's bytes for every planned tile, rendered independently of the server."""
    import mercantile

    w, s, e, n = map(float, BBOX.split(","))
    world = World(seed=SEED)
    tiles = [Tile(t.z, t.x, t.y) for t in mercantile.tiles(w, s, e, n, ZOOM)]
    return {t: world.render(t) for t in tiles}


@pytest.fixture(scope="module")
def sim():
    with run_in_thread(World(seed=SEED)) as srv:
        yield srv


def plan(tmp_path, name="s"):
    sweep = tmp_path / name
    tilesweep("plan", BBOX, sweep, "--zoom", ZOOM, "--block-zoom", BLOCK_ZOOM)
    return sweep


def stored(sweep):
    """{tile: (status, bytes)} for every record of every finished shard, counting repeats."""
    store = TileStore(sweep / "tiles", ZOOM, BLOCK_ZOOM)
    seen: dict = {}
    repeats = 0
    for block in store.blocks():
        reader = store.reader(block)
        for tile, status, data in reader.iter_records(status=None):
            repeats += tile in seen
            seen[tile] = (status, data)
    store.close()
    return seen, repeats


def assert_complete(sweep, expected):
    st = status_json(sweep)
    assert st["blocks_done"] == st["blocks_total"] and st["tiles_done"] == st["tiles_total"] == len(expected), st
    assert st["blocks_leased"] == st["blocks_pending"] == st["blocks_dead"] == 0
    assert st["mismatch"] is None and st["tiles_ok"] + st["tiles_empty"] == st["tiles_total"]
    seen, repeats = stored(sweep)
    assert repeats == 0
    assert set(seen) == set(expected)
    bad = [t for t, (status, data) in seen.items() if status != Status.OK or data != expected[t]]
    assert not bad, f"{len(bad)} tiles differ from the source, e.g. {bad[:3]}"
    kept = [p.name for p in (sweep / "tiles").rglob("*") if p.is_file() and ".corrupt" not in p.name]
    assert sorted(kept) == sorted(
        f"{p.stem}.shard" for p in (sweep / "tiles").rglob("*.shard")
    ), "only finished shards remain: no partials, no sidecars (corrupt ones moved aside are kept)"
    return st


def test_fetch_stores_every_tile_with_the_sources_bytes(tmp_path, sim, expected):
    sweep = plan(tmp_path)
    res = tilesweep("fetch", sweep, "--source", sim.template(), "--concurrency", 32)
    assert f"{len(expected)} tiles" in res.stdout
    st = assert_complete(sweep, expected)
    assert st["bytes_fetched"] == sum(len(b) for b in expected.values())
    files = [p for p in (sweep / "tiles").rglob("*") if p.is_file()]
    assert len(files) == st["blocks_total"] == 16  # files = blocks, not tiles
    # Fetching a finished sweep again does nothing and still succeeds.
    again = tilesweep("fetch", sweep)
    assert "0 tiles" in again.stdout


def test_faults_of_every_kind_are_retried_until_every_tile_is_there(tmp_path, expected):
    faults = Faults(
        http_500=0.04, http_503=0.04, http_429=0.04, reset=0.03, truncate=0.03, wrong_type=0.02,
        retry_after=0.05, seed=11,
    )  # 20% of requests fail, of every kind
    with run_in_thread(World(seed=SEED), faults) as srv:
        sweep = plan(tmp_path)
        tilesweep("fetch", sweep, "--source", srv.template(), "--concurrency", 16, "--workers", 2)
        served = dict(srv.stats)
    st = assert_complete(sweep, expected)
    assert st["fetch_retries"] > 10
    for kind in ("http_500", "http_503", "http_429", "reset", "truncate", "wrong_type"):
        assert served.get(kind, 0) > 0, f"fault {kind} never happened: {served}"


def test_tiles_outside_coverage_are_recorded_empty_not_retried(tmp_path, expected):
    n = len(expected)
    west_half = (8.49, 47.29, 8.508, 47.32)
    with run_in_thread(World(seed=SEED), Faults(coverage=west_half)) as srv:
        sweep = plan(tmp_path)
        tilesweep("fetch", sweep, "--source", srv.template())
        served = dict(srv.stats)
    st = status_json(sweep)
    assert st["blocks_done"] == 16 and 0 < st["tiles_empty"] < n and st["tiles_ok"] + st["tiles_empty"] == n
    assert served["requests"] == n  # one request per tile: a 404 is an answer, not a fault
    seen, _ = stored(sweep)
    assert sum(status == Status.EMPTY for status, _ in seen.values()) == st["tiles_empty"]


def test_sigkill_at_random_instants_then_resume(tmp_path, expected):
    """Kill the whole fetch (parent and workers) with SIGKILL many times, restart it each
    time; then let it finish. Every tile ends stored once with the source's bytes."""
    rng = random.Random(5)
    # ~200 ms a tile, 4 in flight: ~20 tiles/s, so 156 tiles outlast the kills below even
    # when the machine is idle, and every run is cut in the middle of some block.
    with run_in_thread(World(seed=SEED), Faults(latency_ms=150, jitter_ms=100, seed=2)) as srv:
        sweep = plan(tmp_path)
        # A kill costs the blocks in progress a lost lease, not a failed attempt (issue 16;
        # tests/test_signals.py runs this at the default --max-attempts).
        args = ("fetch", sweep, "--source", srv.template(), "--concurrency", 4, "--workers", 2, "--lease-ttl", 3,
                "--max-attempts", 20)
        kills = 0
        for _ in range(8):
            p = popen(*args)
            # once it is at work (a loaded machine can take seconds to start), at a random instant
            _wait_for_live_leases(sweep, p)
            time.sleep(rng.uniform(0.2, 1.5))
            if p.poll() is not None:
                break
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
        assert kills >= 3, "the fetch finished before it could be killed: slow the source down"
        partial = status_json(sweep)
        assert partial["blocks_done"] < partial["blocks_total"]
        # The restart frees the leases of the killed workers (same host, pid gone) at once.
        tilesweep("fetch", sweep, "--max-attempts", 20, timeout=600)
    assert_complete(sweep, expected)
    with open_sweep_queue(sweep) as q:
        assert any(q.get(b.id)["attempts"] > 1 for b in q.blocks()), "no lease was ever taken over"


def _wait_for_live_leases(sweep, p, deadline_s=60.0):
    """Until a live process holds a lease of ``sweep`` (the fetch is at work), or ``p`` ended."""
    from tilesweep.worker import _alive

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and p.poll() is None:
        with open_sweep_queue(sweep) as q:
            if any(_alive(int(o.split(":")[1])) for o in q.owners()):
                return
        time.sleep(0.05)


def test_ctrl_c_releases_leases_and_resume_finishes(tmp_path, expected):
    with run_in_thread(World(seed=SEED), Faults(latency_ms=50, seed=1)) as srv:
        sweep = plan(tmp_path)
        p = popen("fetch", sweep, "--source", srv.template(), "--concurrency", 4)
        _wait_for_live_leases(sweep, p)  # at work: a loaded machine can take seconds to start
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 130, stderr
        assert "resume" in stderr
        st = status_json(sweep)
        assert st["blocks_leased"] == 0 and st["blocks_done"] < 16
        assert st["attempts_total"] == st["blocks_done"]  # released leases are not counted as attempts
        tilesweep("fetch", sweep)
    assert_complete(sweep, expected)


def test_bad_sources_are_one_line_exit_2_and_change_nothing(tmp_path, sim):
    sweep = plan(tmp_path)
    before = (sweep / "sweep.toml").read_text()
    cases = [
        (("--source", "ftp://example.com/{z}/{x}/{y}.jpg"), "ftp"),
        (("--source", "http://127.0.0.1:1/{z}/{x}.jpg"), "{y}"),
        (("--source", "http://127.0.0.1:1/{z}/{x}/{y}.jpg?key=${TILESWEEP_NO_SUCH_VAR}"), "TILESWEEP_NO_SUCH_VAR"),
        (("--source", sim.template(), "--workers", 0), "workers"),
        (("--source", sim.template(), "--concurrency", 0), "concurrency"),
        (("--source", sim.template(), "--header", "no colon here"), "header"),
    ]
    for extra, needle in cases:
        res = tilesweep("fetch", sweep, *extra, check=False)
        assert res.returncode == 2, (extra, res.stderr)
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr
    assert (sweep / "sweep.toml").read_text() == before
    assert not (sweep / "tiles").exists()
    res = tilesweep("fetch", sweep, check=False)
    assert res.returncode == 2 and "--source" in res.stderr
    res = tilesweep("fetch", tmp_path / "nowhere", "--source", sim.template(), check=False)
    assert res.returncode == 2 and "nowhere" in res.stderr


def test_a_second_source_is_refused(tmp_path, sim):
    sweep = plan(tmp_path)
    tilesweep("fetch", sweep, "--source", sim.template())
    res = tilesweep("fetch", sweep, "--source", sim.template("png"), check=False)
    assert res.returncode == 2 and "mixing sources" in res.stderr


def test_read_export_and_verify_from_the_command_line(tmp_path, sim, expected):
    from pmtiles.reader import MmapSource, Reader, all_tiles

    sweep = plan(tmp_path)
    tilesweep("fetch", sweep, "--source", sim.template())
    tile = sorted(expected)[7]
    out = tmp_path / "t.jpg"
    tilesweep("tiles", "get", sweep, f"{tile.z}/{tile.x}/{tile.y}", "-o", out)
    assert out.read_bytes() == expected[tile]
    res = tilesweep("tiles", "get", sweep, "18/1/1", check=False)
    assert res.returncode == 1 and "not fetched" in res.stderr
    listed = tilesweep("tiles", "ls", sweep).stdout.splitlines()
    assert len(listed) == len(expected) and all(line.endswith(str(len(expected[Tile(*map(int, line.split()[0].split("/")))])))for line in listed)

    archive = tmp_path / "out.pmtiles"
    tilesweep("export", sweep, archive)
    with open(archive, "rb") as f:
        got = {Tile(*zxy): data for zxy, data in all_tiles(MmapSource(f))}
        assert Reader(MmapSource(f)).header()["tile_type"].name == "JPEG"
    assert got == expected
    res = tilesweep("export", sweep, archive, check=False)
    assert res.returncode == 2 and "--force" in res.stderr

    shard = next((sweep / "tiles").rglob("*.shard"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    res = tilesweep("verify", sweep, check=False)
    assert res.returncode == 1 and "corrupt shard" in res.stderr
    res = tilesweep("verify", sweep, "--repair")
    assert "1 blocks queued again" in res.stdout
    assert status_json(sweep)["blocks_pending"] == 1
    tilesweep("fetch", sweep)
    assert "0 corrupt" in tilesweep("verify", sweep).stdout
    assert_complete(sweep, expected)


def test_a_source_that_refuses_every_tile_stops_with_one_line(tmp_path):
    """A wrong token (403 on every tile) stops the run with exit 2 and one line, instead of
    spending every block's attempts; the blocks stay pending for a corrected run."""
    from helpers.servers import forbidden_server

    with forbidden_server() as template:
        sweep = plan(tmp_path)
        template += "?token=${TILESWEEP_TEST_TOKEN}"
        res = tilesweep("fetch", sweep, "--source", template, "--workers", 2, check=False, env={"TILESWEEP_TEST_TOKEN": "s3cret"})
    assert res.returncode == 2, res.stderr
    assert "403" in res.stderr and "token" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "s3cret" not in res.stderr + res.stdout
    st = status_json(sweep)
    assert st["blocks_dead"] == st["blocks_leased"] == 0 and st["blocks_done"] == 0, {k: v for k, v in st.items() if k.startswith("blocks")}


def test_a_refusal_of_workers_that_exited_before_it_was_read_is_raised(tmp_path):
    """Both workers refuse (403) and exit while the parent is still busy with an earlier
    message (its progress callback waits for them to exit): their Refused, read only in
    the final drain, still stops the run with the one-line UsageError, not a clean end."""
    import multiprocessing as mp

    from helpers.servers import forbidden_server

    from tilesweep.errors import UsageError
    from tilesweep.fetch import FetchSettings
    from tilesweep.sources import parse_source
    from tilesweep.sweep import Sweep
    from tilesweep.worker import WorkerSettings, run_workers

    def wait_for_the_workers_to_exit(counters):
        for p in mp.active_children():
            p.join(60)

    with forbidden_server() as template:
        sweep = plan(tmp_path)
        with Sweep.open(sweep) as sw:
            src = sw.bind_source(parse_source(template))
        with pytest.raises(UsageError, match="403"):
            run_workers(sweep, ZOOM, BLOCK_ZOOM, src, FetchSettings(), WorkerSettings(), 2,
                        on_progress=wait_for_the_workers_to_exit)
    st = status_json(sweep)
    assert st["blocks_dead"] == st["blocks_leased"] == st["blocks_done"] == 0


def test_a_rate_limited_server_makes_the_fetch_cut_its_concurrency(tmp_path, expected):
    """The simulator allows 150 requests/s per client; 64 in flight trip its 429s, the
    worker cuts its concurrency (AIMD) and still ends with every tile."""
    with run_in_thread(World(seed=SEED), Faults(rate_limit=150, rate_burst=20, retry_after=0.2, seed=4)) as srv:
        sweep = plan(tmp_path)
        res = tilesweep("fetch", sweep, "--source", srv.template(), "--concurrency", 64, "--quiet")
        served = dict(srv.stats)
    assert served["rate_limited"] > 0
    assert "concurrency cut to" in res.stdout, res.stdout
    assert_complete(sweep, expected)
    assert status_json(sweep)["fetch_retries"] >= served["rate_limited"]
