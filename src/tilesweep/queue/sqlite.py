"""The embedded queue: one SQLite file in WAL mode, safe for many processes at once.

Every state change is one short ``BEGIN IMMEDIATE`` transaction, so writers serialise on
SQLite's lock and never see each other's half-done work; readers (``status``) never block
writers in WAL mode. A lease is an ``UPDATE ... RETURNING`` over the pending index, so two
processes can never lease the same block. Durability: ``synchronous=NORMAL`` in WAL mode
survives any process crash (``kill -9``); after a power cut the last acks may be lost, which
only means those blocks are done again (outputs are idempotent by name).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .base import RECORD_FIELDS, Block, BlockRecord, BlockResult, DeadBlock, Lease, OwnerStats, QueueStats, State

SCHEMA_VERSION = 2
_EXPIRED_ERROR = "lease expired (worker died or stalled)"
MAX_LOST = 20  # leases a block may lose (its worker died or stalled) before it is dead

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS blocks (
    id          INTEGER PRIMARY KEY,      -- PMTiles Hilbert id of the block tile
    z           INTEGER NOT NULL,
    x           INTEGER NOT NULL,
    y           INTEGER NOT NULL,
    tiles       INTEGER NOT NULL,         -- planned tiles in the block
    mask        BLOB,                     -- packed bit mask of planned tiles, NULL = all
    priority    INTEGER NOT NULL,         -- seeded shuffle: lower is leased first
    state       INTEGER NOT NULL DEFAULT {State.PENDING},
    owner       TEXT,
    lease_until REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,   -- leases taken (a released lease is not counted)
    last_error  TEXT,
    done_at     REAL,
    n_ok        INTEGER,                  -- results recorded by ack
    n_empty     INTEGER,
    n_failed    INTEGER,
    n_bytes     INTEGER,
    n_retries   INTEGER,
    failures    INTEGER NOT NULL DEFAULT 0,   -- attempts that failed (nack): max_attempts
    lost        INTEGER NOT NULL DEFAULT 0,   -- leases that expired (owner died or stalled): max_lost
    stored      INTEGER,                  -- 1: tiles kept in a shard, 0: streamed (not kept), NULL: unknown
    done_by     TEXT                      -- the owner whose lease it was when acked (status per machine)
);
CREATE INDEX IF NOT EXISTS blocks_pending ON blocks(priority) WHERE state = {State.PENDING};
CREATE INDEX IF NOT EXISTS blocks_leased ON blocks(lease_until) WHERE state = {State.LEASED};
CREATE INDEX IF NOT EXISTS blocks_done ON blocks(done_at) WHERE state = {State.DONE};
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""

_BLOCK_COLS = "z, x, y, tiles, mask"
# Schema 1 -> 2: failed attempts and lost leases are counted apart (a kill is not a failure).
# Old blocks start both counts at 0: their `attempts` mixed the two.
_MIGRATE_1_TO_2 = """
ALTER TABLE blocks ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE blocks ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
"""


def _block(row: tuple) -> Block:  # type: ignore[type-arg]
    return Block(int(row[0]), int(row[1]), int(row[2]), int(row[3]), row[4])


_RECORD_COLS = ", ".join(RECORD_FIELDS)


def _record(row: tuple) -> BlockRecord:  # type: ignore[type-arg]
    out = dict(zip(RECORD_FIELDS, row))
    out["state"] = State(out["state"])
    return out  # type: ignore[return-value]


class SqliteQueue:
    """A durable lease queue of blocks in one SQLite file.

    ``max_attempts``: failed attempts (nacks) a block may have before it goes to dead (>= 1).
    ``max_lost``: leases a block may lose before it goes to dead: a lease that expires
    (its owner was killed, crashed or stalled) is not a failure of the block, so kills do
    not kill blocks, but a block that crashes its worker every time still ends dead.
    ``timeout``: seconds a process waits for SQLite's write lock before giving up.
    Open one per process (connections are not shared across ``fork``)."""

    def __init__(self, path: str | os.PathLike[str], max_attempts: int = 5, timeout: float = 60.0, max_lost: int = MAX_LOST):
        if max_attempts < 1 or max_lost < 1:
            raise ValueError(f"max_attempts {max_attempts} and max_lost {max_lost} must be >= 1")
        self.path = Path(path)
        self.url = "sqlite:///" + str(self.path.resolve()).lstrip("/")
        self.max_attempts = max_attempts
        self.max_lost = max_lost
        self._pid = os.getpid()
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has queue schema {version}, newer than this tilesweep ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            self._migrate()
        self._ensure_stored_column()

    def _ensure_stored_column(self) -> None:
        """Add ``blocks.stored`` and ``blocks.done_by`` to a queue made before they existed
        (idempotent; checked again under the write lock, so concurrent openers are safe)."""
        def missing() -> list[str]:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(blocks)")}
            return [c for c in ("stored INTEGER", "done_by TEXT") if c.split()[0] not in have]

        if not missing():
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for column in missing():
                self._db.execute(f"ALTER TABLE blocks ADD COLUMN {column}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        """Create the schema, or bring an older one up to date, in one transaction: the
        version is read again under the write lock, so concurrent openers are safe."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            has_blocks = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'blocks'").fetchone()
            if version == 1 and has_blocks:
                for stmt in filter(str.strip, _MIGRATE_1_TO_2.split(";")):
                    self._db.execute(stmt)
            if version < SCHEMA_VERSION:
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # --- transactions -------------------------------------------------------------------

    class _Txn:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
            if not self.db.in_transaction:
                return
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _write(self) -> "SqliteQueue._Txn":
        return SqliteQueue._Txn(self._db)

    # --- the protocol -------------------------------------------------------------------

    def put(self, items: Iterable[tuple[Block, int]], batch: int = 50_000) -> int:
        """Add ``(block, priority)`` pairs; blocks already queued are left as they are.
        Returns how many were inserted. Streams: ``items`` may be a generator of any size."""
        inserted = 0
        rows: list[tuple] = []  # type: ignore[type-arg]

        def flush() -> int:
            with self._write() as db:
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO blocks (id, z, x, y, tiles, mask, priority) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                n = db.total_changes - before
            rows.clear()
            return n

        for block, priority in items:
            rows.append((block.id, block.z, block.x, block.y, block.tiles, block.mask, int(priority)))
            if len(rows) >= batch:
                inserted += flush()
        if rows:
            inserted += flush()
        return inserted

    def lease(self, n: int, ttl: float, owner: str) -> list[Lease]:
        """Lease up to ``n`` pending blocks for ``ttl`` seconds, lowest priority first.

        Expired leases are returned to pending first, so a dead worker's blocks are picked
        up by the next lease call of any process."""
        if n < 1 or ttl <= 0:
            raise ValueError(f"lease needs n >= 1 and ttl > 0 (got n={n}, ttl={ttl})")
        now = time.time()
        until = now + ttl
        with self._write() as db:
            self._expire(db, now)
            rows = db.execute(
                f"""UPDATE blocks SET state = {State.LEASED}, owner = ?, lease_until = ?, attempts = attempts + 1
                    WHERE id IN (SELECT id FROM blocks WHERE state = {State.PENDING} ORDER BY priority LIMIT ?)
                    RETURNING {_BLOCK_COLS}, attempts, priority""",
                (owner, until, n),
            ).fetchall()
            if rows:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('first_lease_at', ?)", (now,))
        rows.sort(key=lambda r: r[6])
        return [Lease(_block(r), owner, until, int(r[5])) for r in rows]

    def ack(self, ids: Iterable[int], results: Mapping[int, BlockResult] | None = None) -> int:
        """Mark blocks done, in one transaction (group commit). Idempotent: acking a done
        block changes nothing. A block is acked whatever its state, because its outputs are
        durable by the time it is acked (a lease that expired meanwhile does not matter)."""
        now = time.time()
        results = results or {}
        rows = []
        for i in ids:
            r = results.get(i)
            rows.append((now, *(r if r is not None else (None,) * len(BlockResult._fields)), int(i)))
        if not rows:
            return 0
        with self._write() as db:
            before = db.total_changes
            db.executemany(
                f"""UPDATE blocks SET state = {State.DONE}, done_at = ?, done_by = owner, owner = NULL, lease_until = NULL,
                    n_ok = ?, n_empty = ?, n_failed = ?, n_bytes = ?, n_retries = ?, stored = ?, last_error = NULL
                    WHERE id = ? AND state != {State.DONE}""",
                rows,
            )
            return db.total_changes - before

    def nack(self, block_id: int, error: str, owner: str | None = None) -> State:
        """Give a block back after a failure with ``error`` kept: pending again, or dead once
        ``max_attempts`` attempts have failed. Returns the new state (DONE if it was done).
        With ``owner``, only while ``owner`` holds its lease (a repeated or late nack changes
        nothing and returns the block's state)."""
        held = "" if owner is None else f" AND state = {State.LEASED} AND owner = ?"
        with self._write() as db:
            row = db.execute(
                f"""UPDATE blocks SET state = CASE WHEN failures + 1 >= ? THEN {State.DEAD} ELSE {State.PENDING} END,
                    failures = failures + 1, owner = NULL, lease_until = NULL, last_error = ?
                    WHERE id = ? AND state != {State.DONE}{held} RETURNING state""",
                (self.max_attempts, error, int(block_id), *(() if owner is None else (owner,))),
            ).fetchone()
            if row is None:
                exists = db.execute("SELECT state FROM blocks WHERE id = ?", (int(block_id),)).fetchone()
                if exists is None:
                    raise KeyError(f"block id {block_id} is not in the queue")
                return State(exists[0])
        return State(row[0])

    def extend(self, ids: Iterable[int], ttl: float, owner: str) -> list[int]:
        """Push the leases that ``owner`` still holds on ``ids`` to ``ttl`` s from now.
        Returns the ids still held; a missing id means the lease was lost (expired and
        taken by another worker), and its work should be dropped."""
        until = time.time() + ttl
        held: list[int] = []
        with self._write() as db:
            for i in ids:
                row = db.execute(
                    f"UPDATE blocks SET lease_until = ? WHERE id = ? AND state = {State.LEASED} AND owner = ? RETURNING id",
                    (until, int(i), owner),
                ).fetchone()
                if row is not None:
                    held.append(int(row[0]))
        return held

    def release(self, owner: str) -> int:
        """Give back every lease of ``owner`` unfinished (a clean stop, e.g. Ctrl-C); the
        attempt is not counted against the block."""
        with self._write() as db:
            cur = db.execute(
                f"""UPDATE blocks SET state = {State.PENDING}, owner = NULL, lease_until = NULL,
                    attempts = MAX(attempts - 1, 0) WHERE state = {State.LEASED} AND owner = ?""",
                (owner,),
            )
            return cur.rowcount

    def owners(self) -> dict[str, int]:
        """Owners of current leases and how many blocks each holds."""
        rows = self._db.execute(f"SELECT owner, COUNT(*) FROM blocks WHERE state = {State.LEASED} GROUP BY owner")
        return {str(o): int(n) for o, n in rows}

    def owner_stats(self, window: float = 300.0) -> list[OwnerStats]:
        """Owners leasing now or that acked in the last ``window`` seconds (no heartbeat kept)."""
        leased = dict(self.owners())
        done = {str(o): (int(nb), int(nt)) for o, nb, nt in self._db.execute(
            f"""SELECT done_by, COUNT(*), COALESCE(SUM(tiles), 0) FROM blocks
                WHERE state = {State.DONE} AND done_at >= ? AND done_by IS NOT NULL GROUP BY done_by""",
            (time.time() - window,))}
        return [OwnerStats(o, leased.get(o, 0), *done.get(o, (0, 0))) for o in sorted(set(leased) | set(done))]

    def expire(self, owner: str) -> int:
        """End ``owner``'s leases now, as if they had expired (the owner is known to be
        dead): they go back to pending at once, each counting a lost lease (not a failed
        attempt). Returns how many."""
        with self._write() as db:
            n = db.execute(
                f"UPDATE blocks SET lease_until = 0 WHERE state = {State.LEASED} AND owner = ?", (owner,)
            ).rowcount
            if n:
                self._expire(db, time.time())
            return n

    def count(self, state: State) -> int:
        """Blocks in ``state``."""
        return int(self._db.execute("SELECT COUNT(*) FROM blocks WHERE state = ?", (int(state),)).fetchone()[0])

    def requeue_expired(self) -> int:
        """Return expired leases to pending (or to dead after max attempts)."""
        with self._write() as db:
            return self._expire(db, time.time())

    def _expire(self, db: sqlite3.Connection, now: float) -> int:
        """Expired leases go back to pending, counted as lost (not failed); a block that
        has lost ``max_lost`` leases is dead, and its last error says so."""
        cur = db.execute(
            f"""UPDATE blocks SET state = CASE WHEN lost + 1 >= ? THEN {State.DEAD} ELSE {State.PENDING} END,
                lost = lost + 1, owner = NULL, lease_until = NULL,
                last_error = CASE WHEN lost + 1 >= ?
                    THEN 'lease lost ' || (lost + 1) || ' times: its worker died, crashed or stalled each time '
                         || 'it held this block (a block that crashes its worker?); last error before: '
                         || COALESCE(NULLIF(last_error, ?), 'none')
                    ELSE ? END
                WHERE state = {State.LEASED} AND lease_until < ?""",
            (self.max_lost, self.max_lost, _EXPIRED_ERROR, _EXPIRED_ERROR, now),
        )
        return cur.rowcount

    def requeue(self, ids: Iterable[int], error: str | None = None) -> int:
        """Put the given blocks back to pending whatever their state, attempts reset (their
        outputs were found missing or corrupt). Returns how many were found."""
        with self._write() as db:
            n = 0
            for i in ids:
                n += db.execute(
                    f"""UPDATE blocks SET state = {State.PENDING}, owner = NULL, lease_until = NULL, attempts = 0,
                        failures = 0, lost = 0, stored = NULL, done_at = NULL, n_ok = NULL, n_empty = NULL, n_failed = NULL, n_bytes = NULL, n_retries = NULL,
                        last_error = ? WHERE id = ?""",
                    (error, int(i)),
                ).rowcount
            return n

    def retry_dead(self) -> int:
        """Put every dead block back to pending with its attempts reset; returns how many."""
        with self._write() as db:
            return db.execute(
                f"UPDATE blocks SET state = {State.PENDING}, attempts = 0, failures = 0, lost = 0 WHERE state = {State.DEAD}"
            ).rowcount

    def dead(self) -> Iterator[DeadBlock]:
        """Dead blocks with their attempts and last error, in id order (streams)."""
        cur = self._db.execute(
            f"SELECT {_BLOCK_COLS}, attempts, last_error FROM blocks WHERE state = {State.DEAD} ORDER BY id"
        )
        for row in cur:
            yield DeadBlock(_block(row), int(row[5]), row[6])

    def get(self, block_id: int) -> BlockRecord | None:
        """One block's record (for inspection and tests), or None."""
        row = self._db.execute(f"SELECT {_RECORD_COLS} FROM blocks WHERE id = ?", (int(block_id),)).fetchone()
        return None if row is None else _record(row)

    def records(self, lo: int | None = None, hi: int | None = None) -> Iterator[BlockRecord]:
        """Every block's record in id order (streams), or those with ids in ``[lo, hi)``."""
        lo_, hi_ = (-1 if lo is None else int(lo)), ((1 << 62) if hi is None else int(hi))
        for row in self._db.execute(f"SELECT {_RECORD_COLS} FROM blocks WHERE id >= ? AND id < ? ORDER BY id", (lo_, hi_)):
            yield _record(row)

    def results(self) -> Iterator[tuple[int, BlockResult | None]]:
        """``(block id, results)`` of every done block in id order (streams)."""
        for row in self._db.execute(
            f"SELECT id, n_ok, n_empty, n_failed, n_bytes, n_retries, stored FROM blocks WHERE state = {State.DONE} ORDER BY id"
        ):
            yield int(row[0]), (None if row[1] is None else BlockResult(*row[1:]))

    def blocks(self, state: State | None = None, kept: bool | None = None) -> Iterator[Block]:
        """Blocks (optionally of one state) in id order, i.e. Hilbert order (streams).
        ``kept``: True, only blocks whose tiles are meant to be in a shard (stored, or not
        known: acked before this was recorded); False, only blocks streamed without keeping
        their tiles; None, both."""
        where = "" if state is None else f"WHERE state = {int(state)}"
        if kept is not None:
            cond = "stored IS NOT 0" if kept else "stored IS 0"
            where = f"{where} AND {cond}" if where else f"WHERE {cond}"
        for row in self._db.execute(f"SELECT {_BLOCK_COLS} FROM blocks {where} ORDER BY id"):
            yield _block(row)

    def stats(self, window: float = 300.0) -> QueueStats:
        """Counts by state in blocks and tiles, attempts, and what was done in the last
        ``window`` seconds."""
        now = time.time()
        blocks = {s: 0 for s in State}
        tiles = {s: 0 for s in State}
        attempts = 0
        for state, nb, nt, na in self._db.execute(
            "SELECT state, COUNT(*), COALESCE(SUM(tiles), 0), COALESCE(SUM(attempts), 0) FROM blocks GROUP BY state"
        ):
            blocks[State(state)] = int(nb)
            tiles[State(state)] = int(nt)
            attempts += int(na)
        nb, nt = self._db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(tiles), 0) FROM blocks WHERE state = {State.DONE} AND done_at >= ?",
            (now - window,),
        ).fetchone()
        first = self._db.execute("SELECT value FROM meta WHERE key = 'first_lease_at'").fetchone()
        effective = window if first is None else max(1e-3, min(window, now - float(first[0])))
        sums = self._db.execute(
            f"""SELECT COALESCE(SUM(n_ok), 0), COALESCE(SUM(n_empty), 0), COALESCE(SUM(n_failed), 0),
                COALESCE(SUM(n_bytes), 0), COALESCE(SUM(n_retries), 0) FROM blocks WHERE state = {State.DONE}"""
        ).fetchone()
        (unbalanced,) = self._db.execute(
            f"""SELECT COUNT(*) FROM blocks WHERE state = {State.DONE} AND n_ok IS NOT NULL
                AND n_ok + n_empty + n_failed != tiles"""
        ).fetchone()
        return QueueStats(
            blocks, tiles, attempts, (int(nb), int(nt), float(effective)),
            BlockResult(*map(int, sums)), int(unbalanced),
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SqliteQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blocks_by_id(self, ids: Iterable[int], batch: int = 500) -> Iterator[Block]:
        """The queued blocks among ``ids`` (any state), in id order within each batch of
        ``batch`` ids; ids not queued are left out (densify: which cells are taken)."""
        ids = sorted({int(i) for i in ids})
        for start in range(0, len(ids), batch):
            part = ids[start : start + batch]
            marks = ", ".join("?" * len(part))
            for row in self._db.execute(f"SELECT {_BLOCK_COLS} FROM blocks WHERE id IN ({marks}) ORDER BY id", part):
                yield _block(row)
