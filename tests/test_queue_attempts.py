"""Which leases count against a block (issue 16): failed attempts, not owners that
vanished. Real SQLite files, including one made by the schema of before the change."""

import sqlite3
import time

from tilesweep.queue import Block, SqliteQueue, State


def one_block(q):
    q.put([(Block(10, 500, 300, 256), 0)])


def test_expired_leases_are_lost_not_failed(tmp_path):
    """8 owners that die holding the block (their leases expire) do not make it dead under
    max_attempts=5; it still leases, and one real failure is the first failed attempt."""
    with SqliteQueue(tmp_path / "q.sqlite", max_attempts=5) as q:
        one_block(q)
        for i in range(8):
            (lease,) = q.lease(1, ttl=0.02, owner=f"killed{i}")
            time.sleep(0.04)
        assert q.requeue_expired() == 1
        row = q.get(lease.block.id)
        assert row["state"] is State.PENDING and row["lost"] == 8 and row["failures"] == 0, row
        (lease,) = q.lease(1, ttl=60, owner="w")
        assert q.nack(lease.block.id, "boom") is State.PENDING
        assert q.get(lease.block.id)["failures"] == 1


def test_expire_of_a_known_dead_owner_counts_a_lost_lease(tmp_path):
    with SqliteQueue(tmp_path / "q.sqlite", max_attempts=1) as q:
        one_block(q)
        for i in range(3):
            (lease,) = q.lease(1, ttl=60, owner=f"gone{i}")
            assert q.expire(f"gone{i}") == 1
        q.requeue_expired()
        assert q.get(lease.block.id)["state"] is State.PENDING  # max_attempts=1, yet alive


def test_a_block_that_crashes_its_worker_every_time_still_ends_dead_and_says_so(tmp_path):
    with SqliteQueue(tmp_path / "q.sqlite", max_attempts=5, max_lost=4) as q:
        one_block(q)
        for i in range(4):
            (lease,) = q.lease(1, ttl=0.02, owner=f"crashed{i}")
            time.sleep(0.04)
            q.requeue_expired()
        (dead,) = list(q.dead())
        assert "lease lost 4 times" in dead.error and "crashes its worker" in dead.error, dead.error
        assert q.retry_dead() == 1
        row = q.get(lease.block.id)
        assert row["state"] is State.PENDING and row["lost"] == row["failures"] == 0


def test_failed_attempts_still_kill_after_max_attempts(tmp_path):
    with SqliteQueue(tmp_path / "q.sqlite", max_attempts=2) as q:
        one_block(q)
        (lease,) = q.lease(1, ttl=0.02, owner="killed")  # a lost lease in between
        time.sleep(0.04)
        for n in (1, 2):
            (lease,) = q.lease(1, ttl=60, owner="w")
            state = q.nack(lease.block.id, f"boom {n}")
        assert state is State.DEAD and next(q.dead()).error == "boom 2"


def test_a_queue_of_schema_1_opens_and_keeps_its_blocks(tmp_path):
    """A sweep planned before the change (schema 1: no failures/lost columns) opens, keeps
    every block and state, and follows the new rule from then on."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE blocks (id INTEGER PRIMARY KEY, z INTEGER NOT NULL, x INTEGER NOT NULL, y INTEGER NOT NULL,
            tiles INTEGER NOT NULL, mask BLOB, priority INTEGER NOT NULL, state INTEGER NOT NULL DEFAULT 0,
            owner TEXT, lease_until REAL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, done_at REAL,
            n_ok INTEGER, n_empty INTEGER, n_failed INTEGER, n_bytes INTEGER, n_retries INTEGER);
        CREATE INDEX blocks_pending ON blocks(priority) WHERE state = 0;
        CREATE INDEX blocks_leased ON blocks(lease_until) WHERE state = 1;
        CREATE INDEX blocks_done ON blocks(done_at) WHERE state = 2;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value);
        INSERT INTO blocks (id, z, x, y, tiles, priority, state, attempts) VALUES (1, 10, 1, 1, 256, 0, 0, 4);
        INSERT INTO blocks (id, z, x, y, tiles, priority, state, attempts, done_at, n_ok, n_empty, n_failed, n_bytes, n_retries)
            VALUES (2, 10, 1, 2, 256, 1, 2, 1, 1.0, 256, 0, 0, 10, 0);
        PRAGMA user_version = 1;
    """)
    db.close()
    with SqliteQueue(path, max_attempts=5) as q:
        assert q.count(State.PENDING) == 1 and q.count(State.DONE) == 1
        assert q.get(2)["n_ok"] == 256
        for i in range(6):  # 4 attempts already, 6 lost leases more: still not dead
            (lease,) = q.lease(1, ttl=0.02, owner=f"k{i}")
            time.sleep(0.04)
        q.requeue_expired()
        assert q.get(1)["state"] is State.PENDING and q.get(1)["lost"] == 6
    with SqliteQueue(path) as q:  # opening again changes nothing
        assert q.get(1)["lost"] == 6
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
