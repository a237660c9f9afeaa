"""Shards and the TileStore: round trips, ordering, resume, crash safety, verify."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tilesweep.errors import UsageError
from tilesweep.store import (
    CorruptShardError,
    ShardBusyError,
    ShardReader,
    ShardSummary,
    Status,
    TileStore,
    VerifyReport,
)
from tilesweep.store.shard import RECORD_SIZE
from tilesweep.tiles import Tile, children, tile_id

# Deterministic payloads, shared with the crash-test child process.
PAYLOAD_SRC = textwrap.dedent(
    """
    import random as _random
    from tilesweep.store import Status as _Status
    from tilesweep.tiles import tile_id as _tile_id

    def payload(tile):
        tid = _tile_id(tile)
        if tid % 11 == 0:
            return _Status.EMPTY, None
        if tid % 13 == 0:
            return _Status.FAILED, None
        r = _random.Random(tid)
        return _Status.OK, b"\\xff\\xd8\\xff" + r.randbytes(20 + tid % 1500)
    """
)
_ns: dict = {}
exec(PAYLOAD_SRC, _ns)
payload = _ns["payload"]


def jpeg(rng: random.Random, n: int = 40) -> bytes:
    return b"\xff\xd8\xff" + rng.randbytes(n)


def fill(store: TileStore, block: Tile, skip: set[Tile] = frozenset()) -> dict[Tile, tuple[Status, bytes | None]]:
    """Write every descendant of ``block`` (but ``skip``) with :func:`payload`; finish."""
    want = {}
    w = store.writer(block)
    for t in children(block, store.zoom):
        if t in skip:
            continue
        st, data = payload(t)
        w.append(t, st, data)
        want[t] = (st, data)
    w.finish()
    return want


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_get_and_summary(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 14, 10)
    block = Tile(10, 500, 300)
    assert not store.is_complete(block)
    assert store.shard_path(block) == tmp_path / "tiles" / "10" / "500" / "300.shard"
    want = fill(store, block)
    assert store.is_complete(block)
    assert not store.shard_path(block).with_name("300.shard.partial").exists()
    assert not store.shard_path(block).with_name("300.idx.partial").exists()
    for t, (st, data) in want.items():
        assert store.get(t) == (data if st == Status.OK else None)
        assert store.get_record(t) == (st, data if st == Status.OK else None)
    sts = [st for st, _ in want.values()]
    s = store.stats()
    assert (s["ok"], s["empty"], s["failed"]) == (sts.count(Status.OK), sts.count(Status.EMPTY), sts.count(Status.FAILED))
    assert s["empty"] > 0 and s["failed"] > 0 and s["shards"] == 1 and s["tiles"] == 256
    assert s["bytes"] == sum(len(d) for st, d in want.values() if st == Status.OK)
    # finish is idempotent, also through a new writer on the finished block
    w = store.writer(block)
    assert w.finished and len(w.done_ids) == 256
    assert w.finish() == ShardSummary(s["ok"], s["empty"], s["failed"], s["bytes"])
    with pytest.raises(RuntimeError):
        w.append(Tile(14, 500 * 16, 300 * 16), Status.OK, b"x")


def test_get_absent(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 14, 10)
    block = Tile(10, 500, 300)
    assert store.get(Tile(14, 8000, 4800)) is None  # no store folder at all yet
    inside = children(block, 14)
    fill(store, block, skip={inside[7]})
    assert store.get(inside[7]) is None and store.get_record(inside[7]) is None
    assert store.get(Tile(14, 0, 0)) is None  # another block, never written
    w = store.writer(Tile(10, 1, 1))  # an unfinished shard is not readable
    w.append(Tile(14, 16, 16), Status.OK, b"\xff\xd8\xffabc")
    w.flush()
    assert store.get(Tile(14, 16, 16)) is None
    w.abort()
    with pytest.raises(ValueError):
        store.get(Tile(13, 0, 0))


def test_blocks_and_iter_tiles_in_hilbert_order(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 12, 9)
    blocks = [Tile(9, x, y) for x in range(100, 104) for y in range(200, 203)]
    random.Random(3).shuffle(blocks)
    want = {}
    for b in blocks:
        want.update(fill(store, b))
    got_blocks = list(store.blocks())
    assert sorted(got_blocks) == sorted(blocks)
    assert [tile_id(b) for b in got_blocks] == sorted(tile_id(b) for b in blocks)
    ok = list(store.iter_tiles())
    ids = [tile_id(t) for t, _ in ok]
    assert ids == sorted(ids)
    assert ids == sorted(tile_id(t) for t, (st, _) in want.items() if st == Status.OK)
    assert all(want[t] == (Status.OK, d) for t, d in ok)
    empty = [t for t, d in store.iter_tiles(Status.EMPTY)]
    assert empty == sorted((t for t, (st, _) in want.items() if st == Status.EMPTY), key=tile_id)
    everything = [tile_id(t) for t, _ in store.iter_tiles(None)]
    assert everything == sorted(tile_id(t) for t in want)


def test_tile_of_another_block_is_rejected(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 14, 10)
    w = store.writer(Tile(10, 5, 5))
    with pytest.raises(ValueError, match="14/96/80"):
        w.append(Tile(14, 96, 80), Status.OK, b"\xff\xd8\xff1")
    with pytest.raises(ValueError):
        w.append(Tile(13, 40, 40), Status.OK, b"\xff\xd8\xff1")  # right area, wrong zoom
    with pytest.raises(ValueError):
        w.append(Tile(14, 80, 80), Status.OK, b"")  # OK needs bytes
    with pytest.raises(ValueError):
        w.append(Tile(14, 80, 80), Status.EMPTY, b"abc")
    w.abort()
    with pytest.raises(ValueError):
        store.shard_path(Tile(9, 2, 2))


def test_bad_zooms_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="25"):
        TileStore(tmp_path, 25, 20)
    with pytest.raises(UsageError, match="19"):
        TileStore(tmp_path, 18, 19)


def test_duplicates_keep_the_first_record(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 14, 10)
    block = Tile(10, 7, 9)
    a, b, c = children(block, 14)[:3]
    w = store.writer(block)
    assert w.append(a, Status.OK, b"\xff\xd8\xff first")
    assert not w.append(a, Status.OK, b"\xff\xd8\xff second")  # buffered duplicate
    assert w.append(b, Status.EMPTY, None)
    w.flush()
    assert w.done_ids == {tile_id(a), tile_id(b)}
    assert not w.append(a, Status.FAILED, None)  # durable duplicate
    assert not w.append(b, Status.OK, b"\xff\xd8\xff late")
    w.abort()
    w = store.writer(block)  # resumed: duplicates still ignored
    assert w.done_ids == {tile_id(a), tile_id(b)}
    assert not w.append(a, Status.OK, b"\xff\xd8\xff third")
    assert w.append(c, Status.OK, b"\xff\xd8\xff c")
    assert w.finish() == ShardSummary(2, 1, 0, len(b"\xff\xd8\xff first") + len(b"\xff\xd8\xff c"))
    assert store.get(a) == b"\xff\xd8\xff first"
    assert store.get_record(b) == (Status.EMPTY, None)
    with ShardReader(store.shard_path(block)) as r:
        assert len(r) == 3 and len(set(r.ids.tolist())) == 3


def test_abort_keeps_only_flushed_tiles(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 14, 10)
    block = Tile(10, 7, 9)
    ts = children(block, 14)
    w = store.writer(block)
    for t in ts[:10]:
        w.append(t, *payload(t))
    w.flush()
    for t in ts[10:20]:
        w.append(t, *payload(t))
    w.abort()
    w = store.writer(block)
    assert w.done_ids == {tile_id(t) for t in ts[:10]}
    for t in ts:
        if tile_id(t) not in w.done_ids:
            w.append(t, *payload(t))
    w.finish()
    for t in ts:
        st, data = payload(t)
        assert store.get(t) == data


def test_second_writer_on_a_busy_block_is_refused(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 14, 10)
    w = store.writer(Tile(10, 1, 2))
    with pytest.raises(ShardBusyError):
        store.writer(Tile(10, 1, 2))
    w.abort()
    store.writer(Tile(10, 1, 2)).abort()  # free again


def test_many_shards_bounded_open_readers(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 10, 8, max_open=3)
    want = {}
    for x in range(4):
        for y in range(3):
            want.update(fill(store, Tile(8, x, y)))
    keys = list(want)
    random.Random(1).shuffle(keys)
    for t in keys:
        assert store.get(t) == want[t][1]
        assert len(store._readers) <= 3
    store.close()


# --- crash safety --------------------------------------------------------------------------

CHILD_SRC = PAYLOAD_SRC + textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from tilesweep.store import TileStore
    from tilesweep.tiles import Tile, children

    store = TileStore(Path(sys.argv[1]), 16, 10)
    block = Tile(10, 300, 400)
    tiles = children(block, 16)
    rng = random.Random(int(sys.argv[2]))
    rng.shuffle(tiles)
    w = store.writer(block)
    print("ready", len(w.done_ids), flush=True)
    for i, t in enumerate(tiles):
        st, data = payload(t)
        w.append(t, st, data)
        if i % 7 == 3:
            w.append(t, st, b"\\xff\\xd8\\xff duplicate" if data else None)  # ignored
        if i % 5 == 4:
            w.flush()
    w.finish()
    print("finished", flush=True)
    """
)


def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    root = tmp_path / "tiles"
    script = tmp_path / "child.py"
    script.write_text(CHILD_SRC)
    store = TileStore(root, 16, 10)
    block = Tile(10, 300, 400)
    data_p = store.shard_path(block).with_name("400.shard.partial")
    idx_p = store.shard_path(block).with_name("400.idx.partial")
    rng = random.Random(42)
    killed_mid_write = 0
    progress = []
    for round_ in range(6):
        p = subprocess.Popen([sys.executable, str(script), str(root), str(round_)], stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        assert line.startswith("ready"), line
        progress.append(int(line.split()[1]))
        time.sleep(rng.uniform(0.02, 0.25))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            killed_mid_write += 1
        p.wait()
        p.stdout.close()
        if round_ in (2, 4) and data_p.exists():
            # torn writes: garbage after the data, half a record and a bad record in the sidecar
            with open(data_p, "ab") as f:
                f.write(rng.randbytes(3000))
            with open(idx_p, "ab") as f:
                f.write(rng.randbytes(RECORD_SIZE) + rng.randbytes(RECORD_SIZE // 2))
    assert killed_mid_write >= 3
    assert progress == sorted(progress) and progress[-1] > 0  # resumes keep what was durable
    assert not store.is_complete(block)
    assert store.stats()["partial_shards"] == 1
    w = store.writer(block)
    resumed = set(w.done_ids)
    assert len(resumed) >= progress[-1]
    all_tiles = children(block, 16)
    for t in all_tiles:
        st, data = payload(t)
        assert w.append(t, st, data) == (tile_id(t) not in resumed)
    w.finish()
    assert not data_p.exists() and not idx_p.exists()
    with ShardReader(store.shard_path(block)) as r:
        assert r.verify() is None
        assert len(r) == 4096 and len(np.unique(r.ids)) == 4096
        assert r.ids.tolist() == sorted(tile_id(t) for t in all_tiles)
    for t in all_tiles:
        st, data = payload(t)
        assert store.get_record(t) == (st, data)
    assert store.verify().corrupt == []


def test_torn_tail_is_dropped_on_resume(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 14, 10)
    block = Tile(10, 3, 3)
    ts = children(block, 14)
    w = store.writer(block)
    for t in ts[:50]:
        w.append(t, *payload(t))
    w.flush()
    for t in ts[50:60]:  # written, never indexed: the bytes are orphans
        w.append(t, *payload(t))
    w._f.flush()
    w.abort()
    data_p, idx_p = store.shard_path(block).with_name("3.shard.partial"), store.shard_path(block).with_name("3.idx.partial")
    good_size = idx_p.stat().st_size
    # a well-formed record whose tile bytes do not match (points into the orphan bytes)
    recs = np.frombuffer(idx_p.read_bytes(), dtype="V32")
    last = bytearray(recs[-1].tobytes())
    with open(idx_p, "ab") as f:
        f.write(bytes(last[:10]))  # half a record
    with open(data_p, "ab") as f:
        f.write(b"\0garbage" * 100)
    w = store.writer(block)
    assert w.done_ids == {tile_id(t) for t in ts[:50]}
    assert idx_p.stat().st_size == good_size
    w.abort()
    # a complete but bogus record (bad crc) is dropped as well
    with open(idx_p, "ab") as f:
        f.write(bytes(32))
        f.write(b"\x01" * 32)
    w = store.writer(block)
    assert len(w.done_ids) == 50
    for t in ts:
        w.append(t, *payload(t))
    w.finish()
    for t in ts:
        assert store.get_record(t) == payload(t)
    assert store.verify().ok == 1


def test_crash_during_finish_before_rename(tmp_path: Path) -> None:
    """An index + footer appended to the partial but never renamed is cut off on resume."""
    store = TileStore(tmp_path / "tiles", 14, 10)
    block = Tile(10, 3, 4)
    ts = children(block, 14)
    w = store.writer(block)
    for t in ts[:30]:
        w.append(t, *payload(t))
    w.flush()
    w._f.write(b"x" * (RECORD_SIZE * 30 + 32))  # what finish() would append
    w._f.flush()
    w.abort()
    w = store.writer(block)
    assert len(w.done_ids) == 30
    for t in ts:
        w.append(t, *payload(t))
    w.finish()
    assert all(store.get_record(t) == payload(t) for t in ts)


def test_stale_sidecar_after_rename_is_cleaned(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 14, 10)
    block = Tile(10, 3, 4)
    fill(store, block)
    idx_p = store.shard_path(block).with_name("4.idx.partial")
    idx_p.write_bytes(b"\0" * 64)  # crash between rename and unlink
    assert store.is_complete(block)
    w = store.writer(block)
    assert w.finished and not idx_p.exists()


# --- verify ------------------------------------------------------------------------------


def test_verify_finds_flipped_byte_and_truncation_and_repairs(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 12, 8)
    blocks = [Tile(8, 1, 1), Tile(8, 1, 2), Tile(8, 2, 2), Tile(8, 3, 3)]
    for b in blocks:
        fill(store, b)
    assert store.verify() == VerifyReport(4, 4, [])
    # flip one byte inside the first OK tile of block 0
    p0 = store.shard_path(blocks[0])
    with ShardReader(p0) as r:
        i = int(np.nonzero(r.records["status"] == Status.OK)[0][0])
        off = int(r.records["offset"][i])
    raw = bytearray(p0.read_bytes())
    raw[off + 5] ^= 0x40
    p0.write_bytes(bytes(raw))
    # truncate block 1 mid-index
    p1 = store.shard_path(blocks[1])
    with open(p1, "r+b") as f:
        f.truncate(p1.stat().st_size - 100)
    # flip a byte in block 2's index
    p2 = store.shard_path(blocks[2])
    raw = bytearray(p2.read_bytes())
    raw[-40] ^= 1
    p2.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError):
        ShardReader(p1)
    rep = store.verify()
    assert rep.checked == 4 and rep.ok == 1
    reasons = dict(rep.corrupt)
    assert set(reasons) == set(blocks[:3])
    assert "crc" in reasons[blocks[0]]
    assert store.is_complete(blocks[0])  # no repair yet
    rep = store.verify(repair=True)
    assert len(rep.corrupt) == 3
    for b in blocks[:3]:
        assert not store.is_complete(b)
        assert store.shard_path(b).with_name(f"{b.y}.shard.corrupt").exists()
    assert store.is_complete(blocks[3])
    assert store.verify() == VerifyReport(1, 1, [])
    # the block can be written again
    fill(store, blocks[0])
    assert store.verify() == VerifyReport(2, 2, [])


def test_local_rank_tables_match_full_tile_ids() -> None:
    """The per-symmetry rank tables used by readers equal a full-depth computation."""
    from tilesweep.store.shard import _local_ranks
    from tilesweep.tiles import descendant_id_range, tile_id_array

    rng = random.Random(5)
    for zoom, bz in ((18, 14), (12, 9), (16, 10), (5, 5)):
        for _ in range(60):
            b = Tile(bz, rng.randrange(1 << bz), rng.randrange(1 << bz))
            side = 1 << (zoom - bz)
            dy, dx = np.divmod(np.arange(side * side), side)
            full = tile_id_array(zoom, (b.x << (zoom - bz)) + dx, (b.y << (zoom - bz)) + dy)
            lo = descendant_id_range(b, zoom)[0]
            assert (_local_ranks(zoom, b) + np.uint64(lo) == full).all()
            assert _local_ranks(zoom, b).max() == side * side - 1


def test_a_journal_left_beside_a_finished_shard_is_discarded(tmp_path):
    """kill -9 between the final rename and the journal's unlink leaves {y}.idx.partial
    beside {y}.shard; the store removes it when the block is found finished."""
    from tilesweep.store import TileStore
    from tilesweep.store.shard import partial_paths

    store = TileStore(tmp_path, 18, 14)
    block = Tile(14, 8580, 5740)
    w = store.writer(block)
    t = Tile(18, 8580 << 4, 5740 << 4)
    w.append(t, Status.OK, b"\xff\xd8\xff" + b"x" * 100)
    w.flush()
    journal = partial_paths(store.shard_path(block))[1]
    saved = journal.read_bytes()
    w.finish()
    journal.write_bytes(saved)  # as if the process died before the unlink
    assert store.is_complete(block)
    store.discard_leftovers(block)
    assert not journal.exists() and store.get(t) == b"\xff\xd8\xff" + b"x" * 100
    store.close()


def test_the_store_keeps_a_quarter_of_the_descriptor_limit_mapped(monkeypatch):
    import resource

    from tilesweep.store.store import default_max_open

    monkeypatch.setattr(resource, "getrlimit", lambda what: (1024, 4096))
    assert default_max_open() == 256
    monkeypatch.setattr(resource, "getrlimit", lambda what: (100, 4096))
    assert default_max_open() == 64
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1_000_000, resource.RLIM_INFINITY))
    assert default_max_open() == 4096


def _one_tile_shard(root: Path, block: Tile = Tile(14, 100, 200)):
    store = TileStore(root, 18, 14)
    w = store.writer(block)
    w.append(Tile(18, 100 << 4, 200 << 4), Status.OK, b"tile")
    w.flush()
    return store, block, w


def test_a_partial_left_as_a_link_of_the_shard_is_never_truncated(tmp_path):
    """A kill between the link fallback's link and unlink leaves {y}.shard.partial as a
    second name of the published shard: discard_leftovers removes it, and after the
    shard is quarantined (verify --repair) a new writer starts a fresh partial instead of
    truncating the quarantined file through that link."""
    store, block, w = _one_tile_shard(tmp_path / "s")
    w.finish()
    shard = store.shard_path(block)
    partial = w.data_path
    os.link(shard, partial)  # the crash
    store.discard_leftovers(block)
    assert not partial.exists() and store.get(Tile(18, 100 << 4, 200 << 4)) == b"tile"
    os.link(shard, partial)
    size = shard.stat().st_size
    corrupt = store.quarantine(block)
    with store.writer(block) as again:
        assert not again.finished and again.done_ids == frozenset()
    assert corrupt.stat().st_size == size and corrupt.stat().st_nlink == 1
    assert ShardReader(corrupt).get(Tile(18, 100 << 4, 200 << 4)) == b"tile"


def test_a_writer_whose_partial_is_published_between_its_open_and_flock_sees_the_shard(tmp_path, monkeypatch):
    """B opens the partial, A publishes it (renames that very file to {y}.shard), then B
    gets the lock: B must notice that the name moved on and see the finished shard, not
    fail with FileNotFoundError."""
    import fcntl

    from tilesweep.store import shard as shard_mod

    store, block, a = _one_tile_shard(tmp_path / "s")
    real = fcntl.flock
    calls = []

    def flock_after_a_finishes(fd, op):
        if not calls:
            a.finish()
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(shard_mod.fcntl, "flock", flock_after_a_finishes)
    b = TileStore(tmp_path / "s", 18, 14).writer(block)
    assert b.finished and b.finish() == a.finish() and b.finish().ok == 1
    assert sorted(p.name for p in store.shard_path(block).parent.iterdir()) == ["200.shard"]
