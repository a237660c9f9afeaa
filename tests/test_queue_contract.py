"""The queue contract: every backend passes these same tests unchanged (issue 10/11).

Parametrised by backend: ``sqlite`` (a file in tmp_path) and ``postgres`` (a fresh schema
on the session's real PostgreSQL server, tests/helpers/pgserver.py; skipped, saying why,
where its binaries are absent). Each test opens queues through ``open_queue(url)`` only."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tilesweep.plan import pack_mask
from tilesweep.queue import Block, BlockResult, State, open_queue, stage_queue

WORKER = Path(__file__).parent / "helpers" / "queue_worker.py"


def make_blocks(n, z=10, tiles=256):
    return [(Block(z, 500 + i % 40, 300 + i // 40, tiles), (i * 7919) % n) for i in range(n)]


@pytest.fixture(params=["sqlite", "postgres"])
def queue_url(request, tmp_path):
    """The URL of a new, empty queue of the backend under test."""
    if request.param == "sqlite":
        staged = stage_queue("sqlite:///" + str(tmp_path / "q.sqlite").lstrip("/"), tmp_path)
    else:
        server = request.getfixturevalue("pg_server")
        staged = stage_queue(server.url(), tmp_path)
    staged.publish()
    yield staged.url
    staged.discard()


@pytest.fixture
def make(queue_url):
    """``make(**options)``: a connection to the test's queue; closed after the test."""
    opened = []

    def make(**options):
        q = open_queue(queue_url, **options)
        opened.append(q)
        return q

    yield make
    for q in opened:
        q.close()


def test_put_lease_in_priority_order_never_twice(make):
    q = make()
    items = make_blocks(50)
    assert q.put(iter(items)) == 50 and q.put(iter(items)) == 0
    st = q.stats()
    assert st.blocks[State.PENDING] == 50 and st.tiles[State.PENDING] == 50 * 256
    got = []
    while leases := q.lease(8, ttl=60, owner="w"):
        got += [lease.block.id for lease in leases]
        assert all(lease.attempt == 1 and lease.owner == "w" and lease.until > time.time() + 50 for lease in leases)
    assert got == [b.id for b, _ in sorted(items, key=lambda bp: bp[1])]
    assert q.owners() == {"w": 50} and q.count(State.LEASED) == 50


def test_owner_stats_count_each_owners_leases_and_acks(make):
    """What `status` groups by machine: leases now and acks in the window, per owner."""
    q = make()
    q.put(make_blocks(5))
    a = [lease.block.id for lease in q.lease(3, ttl=60, owner="m1:10:aa")]
    b = [lease.block.id for lease in q.lease(2, ttl=60, owner="m2:20:bb")]
    q.ack(a[:2])
    st = {o.owner: o for o in q.owner_stats(window=300)}
    assert set(st) == {"m1:10:aa", "m2:20:bb"} and st["m1:10:aa"].host == "m1"
    assert (st["m1:10:aa"].leased, st["m1:10:aa"].done_blocks, st["m1:10:aa"].done_tiles) == (1, 2, 512)
    assert (st["m2:20:bb"].leased, st["m2:20:bb"].done_blocks) == (2, 0)
    q.ack(a[2:] + b)
    assert sum(o.done_tiles for o in q.owner_stats(window=300)) == 5 * 256 and not q.owners()


def test_blocks_keep_their_mask_and_records_have_every_field(make):
    q = make()
    mask = np.zeros((4, 4), bool)
    mask[0, 1] = mask[3, 3] = True
    block = Block(12, 100, 200, 2, pack_mask(mask))
    q.put([(block, 0), (Block(12, 101, 200, 16), 1)])
    first, second = q.lease(2, ttl=60, owner="w")
    assert first.block == block and second.block.mask is None
    assert list(q.blocks()) == sorted([block, second.block], key=lambda b: b.id)
    rec = q.get(block.id)
    assert rec["mask"] == block.mask and rec["state"] is State.LEASED and rec["owner"] == "w"
    assert [r["id"] for r in q.records()] == sorted([block.id, second.block.id]) and q.get(12345) is None


def test_group_ack_records_results_and_is_idempotent(make):
    q = make()
    q.put(make_blocks(4))
    ids = [lease.block.id for lease in q.lease(4, ttl=60, owner="w")]
    res = {ids[0]: BlockResult(250, 6, 0, 5_000_000, 3, 1), ids[1]: BlockResult(200, 50, 0, 10, 0, 0)}
    assert q.ack(ids[:3], res) == 3
    assert q.ack(ids[:3], res) == 0
    st = q.stats()
    assert st.blocks[State.DONE] == 3 and st.blocks[State.LEASED] == 1
    assert st.results == BlockResult(450, 56, 0, 5_000_010, 3)
    assert st.unbalanced == 1  # 200 + 50 + 0 != 256 planned tiles
    assert dict(q.results()) == {**res, ids[2]: None}
    assert [b.id for b in q.blocks(State.DONE, kept=False)] == [ids[1]]
    assert sorted(b.id for b in q.blocks(State.DONE, kept=True)) == sorted([ids[0], ids[2]])
    rec = q.get(ids[0])
    assert rec["state"] is State.DONE and rec["done_at"] is not None and rec["owner"] is None and rec["n_retries"] == 3


def test_nack_counts_failures_then_dead_with_error_and_retry_dead(make):
    q = make(max_attempts=3)
    q.put(make_blocks(1))
    for attempt in (1, 2, 3):
        (lease,) = q.lease(1, ttl=60, owner="w")
        assert lease.attempt == attempt
        assert q.nack(lease.block.id, f"boom {attempt}") is (State.DEAD if attempt == 3 else State.PENDING)
    assert q.lease(1, ttl=60, owner="w") == []
    (dead,) = list(q.dead())
    assert dead.attempts == 3 and dead.error == "boom 3" and q.get(dead.block.id)["failures"] == 3
    assert q.retry_dead() == 1
    (lease,) = q.lease(1, ttl=60, owner="w")
    assert lease.attempt == 1
    q.ack([lease.block.id])
    assert q.nack(lease.block.id, "late failure") is State.DONE
    with pytest.raises(KeyError):
        q.nack(12345, "x")


def test_lost_leases_are_not_failed_attempts_but_max_lost_ends_a_block(make):
    """Kills do not kill blocks (docs/architecture.md): expired leases count `lost`, not
    `failures`; a block that loses max_lost leases is dead and says why."""
    q = make(max_attempts=1, max_lost=4)
    q.put(make_blocks(2))
    for i in range(3):
        (lease,) = q.lease(1, ttl=0.05, owner=f"killed{i}")
        time.sleep(0.1)
    assert q.requeue_expired() == 1
    rec = q.get(lease.block.id)
    assert rec["state"] is State.PENDING and rec["lost"] == 3 and rec["failures"] == 0 and rec["attempts"] == 3
    (lease,) = q.lease(1, ttl=60, owner="gone")
    assert q.expire("gone") == 1  # an owner known dead: a lost lease at once
    assert q.get(lease.block.id)["state"] is State.DEAD  # the 4th lost lease
    (dead,) = list(q.dead())
    assert "lease lost 4 times" in dead.error and "crashes its worker" in dead.error
    assert q.retry_dead() == 1
    rec = q.get(lease.block.id)
    assert rec["state"] is State.PENDING and rec["lost"] == rec["failures"] == 0


def test_visibility_timeout_extend_and_takeover(make):
    q = make()
    q.put(make_blocks(2))
    a, b = q.lease(2, ttl=0.3, owner="a")
    assert q.extend([a.block.id], ttl=60, owner="a") == [a.block.id]
    time.sleep(0.4)
    (again,) = q.lease(2, ttl=60, owner="b")  # a's expired lease on b's block is taken over
    assert again.block.id == b.block.id and again.attempt == 2
    assert q.extend([a.block.id, b.block.id], ttl=60, owner="a") == [a.block.id]
    assert q.owners() == {"a": 1, "b": 1}
    q.ack([again.block.id])  # a late ack of the loser changes nothing more
    assert q.ack([again.block.id]) == 0


def test_release_gives_back_without_an_attempt_and_requeue_resets(make):
    q = make()
    q.put(make_blocks(3))
    q.lease(2, ttl=60, owner="a")
    (kept,) = q.lease(1, ttl=60, owner="b")
    assert q.release("a") == 2 and q.owners() == {"b": 1}
    assert all(lease.attempt == 1 for lease in q.lease(5, ttl=60, owner="c"))
    q.ack([kept.block.id], {kept.block.id: BlockResult(256, 0, 0, 10, 0, 1)})
    assert q.requeue([kept.block.id], "corrupt shard") == 1
    rec = q.get(kept.block.id)
    assert rec["state"] is State.PENDING and rec["last_error"] == "corrupt shard" and rec["n_ok"] is None
    assert rec["attempts"] == 0 and rec["stored"] is None


def test_stats_window_and_a_second_connection_sees_everything(make):
    q = make()
    q.put(make_blocks(10))
    leases = q.lease(10, ttl=60, owner="w")
    q.ack([lease.block.id for lease in leases[:4]])
    blocks, tiles, window = make().stats(window=300).done_last_window
    assert (blocks, tiles) == (4, 1024)
    assert 0 < window < 300  # shortened to the time since the first lease
    assert make().stats().attempts_total == 10


def test_concurrent_processes_never_share_a_block(queue_url, tmp_path):
    with open_queue(queue_url) as q:
        q.put(make_blocks(400))
        all_ids = sorted(b.id for b in q.blocks())
    logs = [tmp_path / f"w{i}.log" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), queue_url, f"w{i}", str(logs[i]), "--batch", "3"])
             for i in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    counts = Counter(int(x) for log in logs for x in log.read_text().split())
    assert sorted(counts) == all_ids and max(counts.values()) == 1
    with open_queue(queue_url) as q:
        st = q.stats()
        assert st.blocks[State.DONE] == 400 and st.attempts_total == 400


def test_nack_given_its_owner_is_safe_to_repeat_after_another_leased_the_block(make):
    """A's nack commits but its reply is lost; B leases the block; A's nack is repeated:
    nothing changes (B still holds it, one failure), where a nack without owner still works."""
    q = make()
    q.put(make_blocks(2))
    a, other = q.lease(2, ttl=60, owner="A")
    assert q.nack(a.block.id, "boom", owner="A") == State.PENDING
    (b,) = q.lease(1, ttl=60, owner="B")
    assert b.block.id == a.block.id
    assert q.nack(a.block.id, "boom", owner="A") == State.LEASED  # the repeat: not A's lease any more
    rec = q.get(a.block.id)
    assert rec["failures"] == 1 and rec["owner"] == "B" and q.extend([b.block.id], 60, "B") == [b.block.id]
    assert q.nack(other.block.id, "late", owner="B") == State.LEASED and q.get(other.block.id)["failures"] == 0
    assert q.nack(other.block.id, "x") == State.PENDING  # no owner: as before
