"""Corruption on the read side: every read that hands tile bytes to a user or a model checks
their crc32, and a corrupt or missing shard is one line naming it and `verify --repair`,
never silent, never a traceback (issue 16). Real processes, real HTTP to the simulator,
real shards with bytes flipped on disk."""


import numpy as np
import pytest
from helpers.cli import status_json, tilesweep

from tilesweep.queue import State

from tilesweep.sweep import open_sweep_queue
from tilesweep.sim import World, run_in_thread
from tilesweep.store import ShardReader, Status, TileStore
from tilesweep.tiles import Tile, from_tile_id

BBOX = "8.500,47.300,8.516,47.310"  # 156 tiles at zoom 18, 16 blocks at zoom 16
ZOOM, BLOCK_ZOOM = 18, 16
SEED = 5  # the world most tests of this bbox use: its tiles are rendered once a session (sim cache)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sim():
    with run_in_thread(World(seed=SEED)) as srv:
        yield srv


@pytest.fixture(scope="module")
def fetched(tmp_path_factory, sim):
    """A sweep fetched once with its tiles kept; tests copy it."""
    sweep = tmp_path_factory.mktemp("fetched") / "s"
    tilesweep("plan", BBOX, sweep, "--zoom", ZOOM, "--block-zoom", BLOCK_ZOOM)
    tilesweep("fetch", sweep, "--source", sim.template(), "--quiet")
    return sweep


@pytest.fixture
def sweep(fetched, tmp_path):
    import shutil

    dest = tmp_path / "s"
    shutil.copytree(fetched, dest)
    return dest


def store_of(sweep):
    return TileStore(sweep / "tiles", ZOOM, BLOCK_ZOOM)


def flip_tiles(shard, n=1):
    """Flip one byte inside each of the first ``n`` OK tiles of ``shard``; returns them."""
    with ShardReader(shard) as r:
        ok = np.nonzero(r.records["status"] == Status.OK)[0][:n]
        spots = [(from_tile_id(int(r.ids[i])), int(r.records["offset"][i]) + 7) for i in ok]
    raw = bytearray(shard.read_bytes())
    for _, off in spots:
        raw[off] ^= 0x5A
    shard.write_bytes(bytes(raw))
    return [t for t, _ in spots]


def biggest_shard(sweep):
    return max((sweep / "tiles").rglob("*.shard"), key=lambda p: p.stat().st_size)


def one_line_error(res, *words):
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)


def test_tiles_get_of_a_flipped_tile_fails_with_one_line(sweep):
    shard = biggest_shard(sweep)
    (bad,) = flip_tiles(shard)
    res = tilesweep("tiles", "get", sweep, f"{bad.z}/{bad.x}/{bad.y}", check=False)
    assert res.returncode == 1 and res.stdout == ""
    one_line_error(res, str(shard), f"{bad.z}/{bad.x}/{bad.y}", "crc", f"tilesweep verify {sweep} --repair")
    out = sweep.parent / "t.jpg"
    res = tilesweep("tiles", "get", sweep, f"{bad.z}/{bad.x}/{bad.y}", "-o", out, check=False)
    assert res.returncode == 1 and not out.exists()
    # a good tile of the same shard still reads
    with ShardReader(shard) as r:
        ok = [from_tile_id(int(r.ids[i])) for i in np.nonzero(r.records["status"] == Status.OK)[0]]
    good = next(t for t in ok if t != bad)
    res = tilesweep("tiles", "get", sweep, f"{good.z}/{good.x}/{good.y}", "-o", out)
    assert out.read_bytes() == World(seed=SEED).render(good)


def test_the_store_api_checks_crcs_on_every_read(sweep):
    from tilesweep.store import CorruptShardError

    shard = biggest_shard(sweep)
    bad = flip_tiles(shard, 2)
    store = store_of(sweep)
    for t in bad:
        with pytest.raises(CorruptShardError) as e:
            store.get(t)
        assert e.value.path == shard and e.value.tile == t
        with pytest.raises(CorruptShardError):
            store.get_record(t)
    assert store.get(bad[0], check=False) is not None  # the raw read stays for those who check
    with pytest.raises(CorruptShardError):
        list(store.iter_tiles())
    store.close()


@pytest.mark.parametrize("name", ["out.pmtiles", "out.mbtiles"])
def test_export_of_a_shard_with_two_bad_tiles_fails_and_writes_nothing(sweep, name):
    shard = biggest_shard(sweep)
    flip_tiles(shard, 2)
    out = sweep.parent / name
    res = tilesweep("export", sweep, out, check=False)
    assert res.returncode == 1
    one_line_error(res, str(shard), "crc", "verify", "--repair")
    assert not out.exists() and not list(sweep.parent.glob(name + "*"))


def test_export_refuses_when_a_done_blocks_shard_is_deleted(sweep):
    shard = biggest_shard(sweep)
    shard.unlink()
    out = sweep.parent / "out.pmtiles"
    res = tilesweep("export", sweep, out, check=False)
    assert res.returncode == 1
    one_line_error(res, "1 done blocks have no shard", str(shard), "verify", "--repair")
    assert not out.exists() and not list(sweep.parent.glob("out.pmtiles*"))


def test_export_leaves_out_a_dead_blocks_shard(sweep):
    from pmtiles.reader import MmapSource, all_tiles

    shard = biggest_shard(sweep)
    with ShardReader(shard) as r:
        block = r.block
        in_block = {from_tile_id(int(i)) for i in r.ids[r.records["status"] == Status.OK]}
    # the block goes dead through the queue's own contract: leased and failed once
    q = open_sweep_queue(sweep, max_attempts=1)
    from tilesweep.tiles import tile_id

    q.requeue([tile_id(block)], "test")
    leases = q.lease(100, 60, "test-owner")
    assert [le.block.tile for le in leases] == [block]
    assert q.nack(tile_id(block), "made dead by the test") is State.DEAD
    q.close()
    assert shard.exists()
    out = sweep.parent / "out.pmtiles"
    tilesweep("export", sweep, out)
    with open(out, "rb") as f:
        got = {Tile(*zxy) for zxy, _ in all_tiles(MmapSource(f))}
    st = status_json(sweep)
    assert st["blocks_dead"] == 1
    assert got and not (got & in_block)
    assert len(got) == st["tiles_ok"]  # every tile of the done blocks, none of the dead one


def test_predict_requeues_a_corrupt_block_and_scores_the_rest(sweep, sim):
    shard = biggest_shard(sweep)
    with ShardReader(shard) as r:
        block = r.block
        n_ok = int(np.sum(r.records["status"] == Status.OK))
    flip_tiles(shard)
    total_ok = status_json(sweep)["tiles_ok"]
    res = tilesweep("predict", sweep, "--model", "demo", "--quiet", check=False)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert "1 shards failed their checks" in res.stderr and str(shard) in res.stderr
    assert f"{total_ok - n_ok:,} tiles scored" in res.stdout, res.stdout
    # the shard is moved aside, the block is pending again with the reason
    assert not shard.exists() and shard.with_name(shard.name + ".corrupt").exists()
    from tilesweep.tiles import tile_id

    q = open_sweep_queue(sweep)
    row = q.get(tile_id(block))
    q.close()
    assert row["state"] is State.PENDING and "crc mismatch" in row["last_error"]
    # fetch it again, then predict the rest: every tile scored once
    tilesweep("fetch", sweep, "--quiet")
    res = tilesweep("predict", sweep, "--model", "demo", "--quiet")
    assert f"{n_ok:,} tiles scored" in res.stdout
    import duckdb

    rows, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT (x, y)) FROM '{sweep}/predictions/**/*.parquet'").fetchall()[0]
    assert rows == distinct == status_json(sweep)["tiles_done"]  # one row per planned tile, none twice


def test_verify_on_a_streamed_sweep_expects_no_shards(tmp_path, sim):
    sweep = tmp_path / "streamed"
    tilesweep("plan", BBOX, sweep, "--zoom", ZOOM, "--block-zoom", BLOCK_ZOOM)
    tilesweep("run", sweep, "--model", "demo", "--source", sim.template(), "--quiet")
    assert not list((sweep / "tiles").rglob("*.shard")) if (sweep / "tiles").exists() else True
    res = tilesweep("verify", sweep)
    assert "0 missing" in res.stdout and "no shard" not in res.stderr
    res = tilesweep("verify", sweep, "--repair")
    assert "queued again" not in res.stdout
    assert status_json(sweep)["blocks_done"] == 16
    with open_sweep_queue(sweep) as q:
        assert sum(1 for r in q.records() if r["stored"] == 0) == 16


def test_verify_still_reports_a_kept_shard_that_is_gone(sweep):
    shard = biggest_shard(sweep)
    shard.unlink()
    res = tilesweep("verify", sweep, check=False)
    assert res.returncode == 1 and "1 done blocks have no shard" in res.stderr
    res = tilesweep("verify", sweep, "--repair")
    assert "1 blocks queued again" in res.stdout


def test_tiles_get_of_a_tile_whose_shard_is_gone_names_the_file(sweep):
    shard = biggest_shard(sweep)
    with ShardReader(shard) as r:
        t = from_tile_id(int(r.ids[np.nonzero(r.records["status"] == Status.OK)[0][0]]))
    shard.unlink()
    res = tilesweep("tiles", "get", sweep, f"{t.z}/{t.x}/{t.y}", check=False)
    assert res.returncode == 1 and res.stdout == ""
    one_line_error(res, str(shard), "missing", "verify", "--repair")
    assert "not fetched yet" not in res.stderr
