"""The SQLite block queue in one process: states, attempts, idempotence, stats."""

import time

import numpy as np
import pytest

from tilesweep.plan import pack_mask
from tilesweep.queue import Block, BlockResult, SqliteQueue, State
from tilesweep.tiles import Tile, tile_id


def make_blocks(n, z=10, tiles=256):
    return [(Block(z, 500 + i % 40, 300 + i // 40, tiles), (i * 7919) % n) for i in range(n)]


@pytest.fixture
def q(tmp_path):
    with SqliteQueue(tmp_path / "q.sqlite", max_attempts=3) as queue:
        yield queue


def test_put_is_idempotent_and_streams(q):
    items = make_blocks(100)
    assert q.put(iter(items), batch=7) == 100
    assert q.put(iter(items)) == 0
    st = q.stats()
    assert st.blocks[State.PENDING] == 100 and st.tiles[State.PENDING] == 25_600


def test_lease_follows_priority_and_never_repeats(q):
    items = make_blocks(50)
    q.put(items)
    by_priority = [b.id for b, p in sorted(items, key=lambda bp: bp[1])]
    got = []
    while leases := q.lease(8, ttl=60, owner="w"):
        got += [lease.block.id for lease in leases]
        assert all(lease.attempt == 1 and lease.owner == "w" for lease in leases)
    assert got == by_priority
    assert q.stats().blocks[State.LEASED] == 50


def test_block_id_is_the_hilbert_id_and_tile_list_honours_the_mask():
    mask = np.zeros((4, 4), bool)
    mask[0, 1] = mask[3, 3] = True
    b = Block(12, 100, 200, 2, pack_mask(mask))
    assert b.id == tile_id(Tile(12, 100, 200))
    assert b.tile_list(14) == [Tile(14, 401, 800), Tile(14, 403, 803)]
    assert len(Block(12, 100, 200, 16).tile_list(14)) == 16


def test_ack_is_idempotent_and_records_results(q):
    q.put(make_blocks(4))
    leases = q.lease(4, ttl=60, owner="w")
    ids = [lease.block.id for lease in leases]
    res = {ids[0]: BlockResult(250, 6, 0, 5_000_000)}
    assert q.ack(ids[:2], res) == 2
    assert q.ack(ids[:2], res) == 0
    st = q.stats()
    assert st.blocks[State.DONE] == 2 and st.blocks[State.LEASED] == 2
    assert st.results == BlockResult(250, 6, 0, 5_000_000)
    assert q.get(ids[0])["state"] is State.DONE


def test_nack_counts_attempts_and_kills_after_max(q):
    q.put(make_blocks(1))
    for attempt in (1, 2, 3):
        (lease,) = q.lease(1, ttl=60, owner="w")
        assert lease.attempt == attempt
        state = q.nack(lease.block.id, f"boom {attempt}")
        assert state is (State.DEAD if attempt == 3 else State.PENDING)
    assert q.lease(1, ttl=60, owner="w") == []
    (dead,) = list(q.dead())
    assert dead.attempts == 3 and dead.error == "boom 3"
    assert q.retry_dead() == 1
    (lease,) = q.lease(1, ttl=60, owner="w")
    assert lease.attempt == 1


def test_nack_of_a_done_block_keeps_it_done_and_unknown_ids_raise(q):
    q.put(make_blocks(1))
    (lease,) = q.lease(1, ttl=60, owner="w")
    q.ack([lease.block.id])
    assert q.nack(lease.block.id, "late failure") is State.DONE
    with pytest.raises(KeyError):
        q.nack(12345, "x")


def test_expired_leases_return_and_die_after_max_lost(tmp_path):
    # Issue 16: an expired lease (its owner died) is a lost lease, not a failed attempt:
    # it counts against the separate max_lost cap, not max_attempts (tests/test_queue_attempts.py).
    with SqliteQueue(tmp_path / "lost.sqlite", max_attempts=1, max_lost=3) as q:
        q.put(make_blocks(1))
        for attempt in (1, 2, 3):
            (lease,) = q.lease(1, ttl=0.05, owner=f"w{attempt}")
            assert lease.attempt == attempt
            time.sleep(0.08)
        assert q.requeue_expired() == 1
        (dead,) = list(q.dead())
        assert "lease lost 3 times" in dead.error


def test_extend_keeps_only_own_live_leases(q):
    q.put(make_blocks(2))
    a, b = q.lease(2, ttl=0.05, owner="a")
    assert q.extend([a.block.id], ttl=60, owner="a") == [a.block.id]
    time.sleep(0.08)
    (again,) = q.lease(2, ttl=60, owner="b")  # b's expired lease is taken over
    assert again.block.id == b.block.id and again.attempt == 2
    assert q.extend([a.block.id, b.block.id], ttl=60, owner="a") == [a.block.id]


def test_release_gives_back_without_counting_an_attempt(q):
    q.put(make_blocks(3))
    q.lease(2, ttl=60, owner="a")
    q.lease(1, ttl=60, owner="b")
    assert q.release("a") == 2
    st = q.stats()
    assert st.blocks[State.PENDING] == 2 and st.blocks[State.LEASED] == 1
    assert all(lease.attempt == 1 for lease in q.lease(5, ttl=60, owner="c"))


def test_requeue_resets_done_blocks(q):
    q.put(make_blocks(2))
    leases = q.lease(2, ttl=60, owner="w")
    q.ack([lease.block.id for lease in leases], {leases[0].block.id: BlockResult(1, 0, 0, 10)})
    assert q.requeue([leases[0].block.id], "corrupt shard") == 1
    row = q.get(leases[0].block.id)
    assert row["state"] is State.PENDING and row["last_error"] == "corrupt shard" and row["n_ok"] is None


def test_stats_window_measures_recent_throughput(q):
    q.put(make_blocks(10))
    leases = q.lease(10, ttl=60, owner="w")
    q.ack([lease.block.id for lease in leases[:4]])
    blocks, tiles, window = q.stats(window=300).done_last_window
    assert (blocks, tiles) == (4, 1024)
    assert 0 < window < 300  # shortened to the time since the first lease


def test_reopen_keeps_everything(tmp_path):
    path = tmp_path / "q.sqlite"
    with SqliteQueue(path) as q:
        q.put(make_blocks(5))
        (lease,) = q.lease(1, ttl=60, owner="w")
        q.ack([lease.block.id])
    with SqliteQueue(path) as q:
        st = q.stats()
        assert st.blocks[State.DONE] == 1 and st.blocks[State.PENDING] == 4
        assert q.get(lease.block.id)["done_at"] is not None


def test_bad_arguments(tmp_path, q):
    with pytest.raises(ValueError):
        SqliteQueue(tmp_path / "x.sqlite", max_attempts=0)
    with pytest.raises(ValueError):
        q.lease(0, ttl=10, owner="w")


def test_queue_urls_hide_every_password_and_check_the_schema_name_whole():
    from tilesweep.errors import UsageError
    from tilesweep.queue.url import parse_queue_url, redact

    u = parse_queue_url("postgresql://bob:s3cret@db/ts?sslpassword=k3y&PGPassword=p4ss&schema=s1&sslmode=require")
    for shown in (u.text, repr(u), redact("postgresql://db/ts?sslpassword=k3y")):
        assert "s3cret" not in shown and "k3y" not in shown and "p4ss" not in shown, shown
    assert "sslmode=require" in u.text and "s3cret" in u.conninfo  # libpq still gets it
    for bad in ("abc%0A", "pg_temp_1", "Abc", "1abc"):  # %0A: a newline once decoded
        with pytest.raises(UsageError, match="schema"):
            parse_queue_url(f"postgresql://db/ts?schema={bad}")
