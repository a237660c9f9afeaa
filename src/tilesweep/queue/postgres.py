"""The shared queue: one PostgreSQL schema per sweep, leased by workers on many machines.

Same contract, counters and schema semantics as :class:`tilesweep.queue.SqliteQueue`
(schema 2): ``pending -> leased(owner, until) -> done``, ``failures`` (nacks) against
``max_attempts``, ``lost`` (expired leases) against ``max_lost``, dead blocks with their
last error, results recorded by (group) acks. A lease is ``WITH picked AS MATERIALIZED
(SELECT id ... ORDER BY priority LIMIT n FOR UPDATE SKIP LOCKED) UPDATE ... FROM picked
WHERE state = pending``: the pick runs exactly once (materialised, whatever plan the
planner chooses), concurrent leasers skip each other's rows instead of waiting, and never
share a block. Expired leases are returned
with ``SKIP LOCKED`` too, and acks lock their rows in id order, so no two workers can
deadlock. Lease times are the server's clock (``clock_timestamp()``), so machines whose
clocks disagree still agree on expiry.

Connections: one per queue object (open one per process: a connection is never used
across ``fork``). A dropped connection (a server restart, ``pg_terminate_backend``, a
network cut) is reconnected and the operation retried for up to ``reconnect_s`` seconds:
an interrupted transaction was rolled back by the server, and every operation is safe to
repeat (acks and releases are idempotent, a nack given its owner is too, and a repeated
lease returns what its first try leased). Owners' heartbeats (``owners_seen``) are kept in an ``owners`` table, updated by
every lease and extend.

The password is never in a URL tilesweep records or prints: libpq reads it from
``PGPASSWORD``, ``~/.pgpass`` (``PGPASSFILE``) or a service file.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from ..errors import UsageError
from .base import RECORD_FIELDS, Block, BlockRecord, BlockResult, DeadBlock, Lease, OwnerStats, QueueStats, State
from .url import QueueURL, StagedQueue

try:
    import psycopg
    from psycopg import sql
except ImportError:  # the `postgres` extra is not installed
    psycopg = None  # type: ignore[assignment]
    sql = None  # type: ignore[assignment]

SCHEMA_VERSION = 2
MAX_LOST = 20
_EXPIRED_ERROR = "lease expired (worker died or stalled)"
_T = TypeVar("_T")
_KEEP_ALIVE: list[Any] = []  # connections inherited across fork: never closed by the child

_TABLES = f"""
CREATE TABLE blocks (
    id          BIGINT PRIMARY KEY,       -- PMTiles Hilbert id of the block tile
    z           SMALLINT NOT NULL,
    x           INTEGER NOT NULL,
    y           INTEGER NOT NULL,
    tiles       INTEGER NOT NULL,
    mask        BYTEA,
    priority    BIGINT NOT NULL,
    state       SMALLINT NOT NULL DEFAULT {State.PENDING},
    owner       TEXT,
    lease_until DOUBLE PRECISION,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    done_at     DOUBLE PRECISION,
    n_ok        INTEGER,
    n_empty     INTEGER,
    n_failed    INTEGER,
    n_bytes     BIGINT,
    n_retries   INTEGER,
    failures    INTEGER NOT NULL DEFAULT 0,
    lost        INTEGER NOT NULL DEFAULT 0,
    stored      SMALLINT,
    done_by     TEXT                      -- the owner whose lease it was when acked (status per machine)
);
CREATE INDEX blocks_pending ON blocks(priority) WHERE state = {State.PENDING};
CREATE INDEX blocks_leased ON blocks(lease_until) WHERE state = {State.LEASED};
CREATE INDEX blocks_done ON blocks(done_at) WHERE state = {State.DONE};
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE owners (owner TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL, last_lease TEXT, last_ids BIGINT[]);
INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}')
"""
_NOW = "extract(epoch from clock_timestamp())::float8"
_BLOCK_COLS = "z, x, y, tiles, mask"
_RECORD_COLS = ", ".join(RECORD_FIELDS)


def _need_psycopg() -> None:
    if psycopg is None:
        raise UsageError("a postgresql:// queue needs psycopg: pip install 'tilesweep[postgres]'")


def _one_line(exc: BaseException) -> str:
    """A libpq error as one line (its messages span lines and repeat 'connection failed')."""
    text = "; ".join(" ".join(line.split()) for line in str(exc).splitlines() if line.strip())
    text = re.sub(r"^connection failed: ", "", text)
    return text or type(exc).__name__


def _connect(u: QueueURL, schema: str | None) -> Any:
    """A connection to ``u``'s server with ``search_path`` set to ``schema``; a
    :class:`UsageError` naming the (redacted) URL when it cannot be made."""
    _need_psycopg()
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in (u.conninfo or ""):
        kwargs["connect_timeout"] = 10
    try:
        conn = psycopg.connect(u.conninfo or "", **kwargs)
    except psycopg.Error as exc:
        raise UsageError(f"queue {u.text!r}: cannot connect: {_one_line(exc)}") from None
    if schema is not None:
        conn.execute(_ident("SET search_path TO {}", schema))
    return conn


def _ensure_done_by(db: Any) -> None:
    """Add ``blocks.done_by`` to a queue planned before it existed (idempotent)."""
    if db.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                  "AND table_name = 'blocks' AND column_name = 'done_by'").fetchone() is None:
        db.execute("ALTER TABLE blocks ADD COLUMN IF NOT EXISTS done_by TEXT")


def _ident(statement: str, *names: str) -> Any:
    """``statement`` with its ``{}`` replaced by ``names`` quoted as identifiers (a schema
    named like a reserved word, ``user`` or ``select``, is then a name like any other)."""
    return sql.SQL(statement).format(*map(sql.Identifier, names))


def _schema_exists(conn: Any, schema: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


class PostgresQueue:
    """A durable lease queue of blocks in one PostgreSQL schema (see the module's docstring).

    ``url``: a parsed :class:`tilesweep.queue.url.QueueURL` with a schema (see
    :func:`tilesweep.queue.open_queue`). ``max_attempts`` (>= 1): failed attempts before a
    block is dead; ``max_lost`` (>= 1): leases it may lose; ``reconnect_s`` (>= 0): how long
    an operation keeps reconnecting to a server that went away before it raises."""

    def __init__(self, url: QueueURL, max_attempts: int = 5, max_lost: int = MAX_LOST, reconnect_s: float = 60.0,
                 _schema: str | None = None):
        if max_attempts < 1 or max_lost < 1:
            raise ValueError(f"max_attempts {max_attempts} and max_lost {max_lost} must be >= 1")
        if reconnect_s < 0:
            raise ValueError(f"reconnect_s {reconnect_s} must be >= 0")
        self._u = url
        self.url = url.text
        self.schema = _schema or url.schema
        assert self.schema is not None
        self.max_attempts = max_attempts
        self.max_lost = max_lost
        self.reconnect_s = reconnect_s
        self._pid = os.getpid()
        self._db = _connect(url, None)
        try:
            if not _schema_exists(self._db, self.schema):
                raise UsageError(f"queue {self.url!r}: schema {self.schema!r} does not exist on the server "
                                 "(never planned there, or dropped)")
            self._db.execute(_ident("SET search_path TO {}", self.schema))
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except BaseException:
            self._db.close()
            raise
        version = int(row[0]) if row else 0
        if version != SCHEMA_VERSION:
            self._db.close()
            raise UsageError(f"queue {self.url!r} has queue schema {version}, not {SCHEMA_VERSION} (this tilesweep)")
        (has,) = self._db.execute(
            """SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = %s AND table_name = 'owners'
               AND column_name IN ('last_lease', 'last_ids')""", (self.schema,)).fetchone()
        if has < 2:  # planned before leases recorded their token: add the columns (idempotent)
            self._db.execute("ALTER TABLE owners ADD COLUMN IF NOT EXISTS last_lease TEXT, "
                             "ADD COLUMN IF NOT EXISTS last_ids BIGINT[]")
        self._run(_ensure_done_by)

    # --- connections ----------------------------------------------------------------------

    def _conn(self) -> Any:
        if os.getpid() != self._pid:  # a forked child: the parent's session is not ours
            _KEEP_ALIVE.append(self._db)
            self._pid = os.getpid()
            self._db = _connect(self._u, self.schema)
        elif self._db.closed:
            self._db = _connect(self._u, self.schema)
        return self._db

    def _run(self, op: Callable[[Any], _T]) -> _T:
        """Run ``op(connection)``; on a lost connection, reconnect and run it again, for up
        to ``reconnect_s`` seconds (the server rolled an interrupted transaction back); a
        transaction the server rolled back (deadlock, serialisation) is run again too."""
        deadline = time.monotonic() + self.reconnect_s
        delay = 0.05
        while True:
            try:
                return op(self._conn())
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):  # rolled back: again
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(delay, 0.5))
                delay = min(delay * 2, 2.0)
                continue
            except psycopg.OperationalError:
                if not (self._db.closed or self._db.broken) or time.monotonic() >= deadline:
                    raise
            except UsageError:  # reconnecting: the server is not back yet
                if time.monotonic() >= deadline:
                    raise
            try:
                self._db.close()
            except Exception:  # noqa: BLE001 - it is broken already
                pass
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)

    def _txn(self, op: Callable[[Any], _T]) -> _T:
        def in_txn(db: Any) -> _T:
            with db.transaction():
                return op(db)

        return self._run(in_txn)

    # --- the protocol ---------------------------------------------------------------------

    def put(self, items: Iterable[tuple[Block, int]], batch: int = 20_000) -> int:
        """Add ``(block, priority)`` pairs; blocks already queued are left as they are.
        Returns how many were inserted. Streams: one statement per ``batch`` blocks."""
        inserted = 0
        cols: list[list[Any]] = [[] for _ in range(7)]

        def flush() -> int:
            def op(db: Any) -> int:
                cur = db.execute(
                    """INSERT INTO blocks (id, z, x, y, tiles, mask, priority)
                       SELECT * FROM unnest(%s::bigint[], %s::smallint[], %s::int[], %s::int[], %s::int[], %s::bytea[], %s::bigint[])
                       ON CONFLICT (id) DO NOTHING""",
                    cols,
                )
                return int(cur.rowcount)

            n = self._txn(op)
            for c in cols:
                c.clear()
            return n

        for block, priority in items:
            for c, v in zip(cols, (block.id, block.z, block.x, block.y, block.tiles, block.mask, int(priority))):
                c.append(v)
            if len(cols[0]) >= batch:
                inserted += flush()
        if cols[0]:
            inserted += flush()
        return inserted

    def lease(self, n: int, ttl: float, owner: str) -> list[Lease]:
        """Lease up to ``n`` pending blocks for ``ttl`` seconds, lowest priority first;
        expired leases are returned to pending first.

        Each call has a token, recorded with the ids it leased in the owner's row (same
        statement): a call repeated after its reply was lost returns the blocks its first
        try leased (those the owner still holds) instead of leasing a second batch."""
        if n < 1 or ttl <= 0:
            raise ValueError(f"lease needs n >= 1 and ttl > 0 (got n={n}, ttl={ttl})")
        token = secrets.token_hex(8)
        tries = []

        def op(db: Any) -> list[tuple[Any, ...]]:
            tries.append(1)
            if len(tries) > 1:  # the first try may have committed before its reply was lost
                row = db.execute("SELECT last_ids FROM owners WHERE owner = %s AND last_lease = %s",
                                 (owner, token)).fetchone()
                if row is not None:
                    return db.execute(
                        f"""SELECT {_BLOCK_COLS}, attempts, priority, lease_until FROM blocks
                            WHERE id = ANY(%s) AND state = {State.LEASED} AND owner = %s""",
                        (row[0] or [], owner),
                    ).fetchall()
            # Two statements, each atomic on its own (autocommit): expired leases back to
            # pending, then the lease with the owner's heartbeat (one round trip each).
            self._expire(db, None)
            return db.execute(
                f"""WITH picked AS MATERIALIZED (
                        SELECT id FROM blocks WHERE state = {State.PENDING} ORDER BY priority LIMIT %(n)s
                        FOR UPDATE SKIP LOCKED),
                    leased AS (
                        UPDATE blocks b SET state = {State.LEASED}, owner = %(owner)s, lease_until = {_NOW} + %(ttl)s,
                            attempts = b.attempts + 1
                        FROM picked WHERE b.id = picked.id AND b.state = {State.PENDING}
                        RETURNING {_BLOCK_COLS}, attempts, priority, lease_until, b.id AS id),
                    seen AS (INSERT INTO owners
                             SELECT %(owner)s, {_NOW}, %(token)s, COALESCE((SELECT array_agg(id) FROM leased), '{{}}')
                             ON CONFLICT (owner) DO UPDATE SET seen_at = EXCLUDED.seen_at,
                                 last_lease = EXCLUDED.last_lease, last_ids = EXCLUDED.last_ids),
                    first AS (INSERT INTO meta SELECT 'first_lease_at', {_NOW}::text WHERE EXISTS (SELECT 1 FROM leased)
                              ON CONFLICT DO NOTHING)
                    SELECT {_BLOCK_COLS}, attempts, priority, lease_until FROM leased""",
                {"owner": owner, "ttl": float(ttl), "n": int(n), "token": token},
            ).fetchall()

        rows = self._run(op)
        rows.sort(key=lambda r: r[6])
        return [Lease(_block(r), owner, float(r[7]), int(r[5])) for r in rows]

    @staticmethod
    def _seen(db: Any, owner: str, now: float) -> None:
        db.execute("INSERT INTO owners (owner, seen_at) VALUES (%s, %s) ON CONFLICT (owner) DO UPDATE SET seen_at = EXCLUDED.seen_at",
                   (owner, now))

    def ack(self, ids: Iterable[int], results: Mapping[int, BlockResult] | None = None) -> int:
        """Mark blocks done in one transaction (group commit), with their results;
        idempotent, and whatever their state (their outputs are durable by now)."""
        results = results or {}
        rows = sorted({int(i) for i in ids})
        if not rows:
            return 0
        cols: list[list[Any]] = [rows] + [[] for _ in BlockResult._fields]
        for i in rows:
            r = results.get(i)
            for c, v in zip(cols[1:], r if r is not None else (None,) * len(BlockResult._fields)):
                c.append(v)

        def op(db: Any) -> int:
            db.execute("SELECT id FROM blocks WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (rows,))  # lock order: no deadlock
            cur = db.execute(
                f"""UPDATE blocks b SET state = {State.DONE}, done_at = {_NOW}, done_by = b.owner, owner = NULL, lease_until = NULL,
                    n_ok = v.ok, n_empty = v.empty, n_failed = v.failed, n_bytes = v.bytes, n_retries = v.retries,
                    stored = v.stored, last_error = NULL
                    FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::int[], %s::bigint[], %s::int[], %s::smallint[])
                         AS v(id, ok, empty, failed, bytes, retries, stored)
                    WHERE b.id = v.id AND b.state != {State.DONE}""",
                cols,
            )
            return int(cur.rowcount)

        return self._txn(op)

    def nack(self, block_id: int, error: str, owner: str | None = None) -> State:
        """Give a block back after a failure with ``error`` kept: pending again, or dead once
        ``max_attempts`` attempts have failed. Returns the new state (DONE if it was done).
        With ``owner``, only while ``owner`` holds its lease (so a repeated nack, or one
        after the lease was lost, changes nothing and returns the block's state)."""
        held = "" if owner is None else f" AND state = {State.LEASED} AND owner = %s"

        def op(db: Any) -> State:
            row = db.execute(
                f"""UPDATE blocks SET state = CASE WHEN failures + 1 >= %s THEN {State.DEAD} ELSE {State.PENDING} END,
                    failures = failures + 1, owner = NULL, lease_until = NULL, last_error = %s
                    WHERE id = %s AND state != {State.DONE}{held} RETURNING state""",
                (self.max_attempts, error, int(block_id), *(() if owner is None else (owner,))),
            ).fetchone()
            if row is None:
                exists = db.execute("SELECT state FROM blocks WHERE id = %s", (int(block_id),)).fetchone()
                if exists is None:
                    raise KeyError(f"block id {block_id} is not in the queue")
                return State(exists[0])
            return State(row[0])

        return self._txn(op)

    def extend(self, ids: Iterable[int], ttl: float, owner: str) -> list[int]:
        """Push the leases that ``owner`` still holds on ``ids`` to ``ttl`` s from now;
        returns the ids still held (a missing one was lost: drop its work)."""
        wanted = sorted({int(i) for i in ids})

        def op(db: Any) -> list[int]:
            (now,) = db.execute(f"SELECT {_NOW}").fetchone()
            self._seen(db, owner, now)
            if not wanted:
                return []
            rows = db.execute(
                f"""UPDATE blocks SET lease_until = %s WHERE id = ANY(%s) AND state = {State.LEASED} AND owner = %s
                    RETURNING id""",
                (now + ttl, wanted, owner),
            ).fetchall()
            return sorted(int(r[0]) for r in rows)

        return self._txn(op)

    def release(self, owner: str) -> int:
        """Give back every lease of ``owner`` unfinished; the attempt is not counted."""
        return self._txn(lambda db: int(db.execute(
            f"""UPDATE blocks SET state = {State.PENDING}, owner = NULL, lease_until = NULL,
                attempts = GREATEST(attempts - 1, 0) WHERE state = {State.LEASED} AND owner = %s""",
            (owner,),
        ).rowcount))

    def owners(self) -> dict[str, int]:
        """Owners of current leases and how many blocks each holds."""
        rows = self._run(lambda db: db.execute(
            f"SELECT owner, COUNT(*) FROM blocks WHERE state = {State.LEASED} GROUP BY owner").fetchall())
        return {str(o): int(n) for o, n in rows}

    def owners_seen(self) -> dict[str, float]:
        """Every owner that ever leased here and when it was last seen (Unix seconds,
        server clock): its last lease or extend, i.e. its heartbeat."""
        rows = self._run(lambda db: db.execute("SELECT owner, seen_at FROM owners ORDER BY owner").fetchall())
        return {str(o): float(t) for o, t in rows}

    def owner_stats(self, window: float = 300.0) -> list[OwnerStats]:
        """Owners leasing now or that acked in the last ``window`` seconds (server clock),
        with their heartbeats."""
        def op(db: Any) -> tuple[list[Any], list[Any]]:
            leased = db.execute(f"SELECT owner, COUNT(*) FROM blocks WHERE state = {State.LEASED} GROUP BY owner").fetchall()
            done = db.execute(
                f"""SELECT done_by, COUNT(*), COALESCE(SUM(tiles), 0) FROM blocks
                    WHERE state = {State.DONE} AND done_at >= {_NOW} - %s AND done_by IS NOT NULL GROUP BY done_by""",
                (float(window),)).fetchall()
            return leased, done

        leased_rows, done_rows = self._run(op)
        leased = {str(o): int(n) for o, n in leased_rows}
        done = {str(o): (int(nb), int(nt)) for o, nb, nt in done_rows}
        seen = self.owners_seen()
        return [OwnerStats(o, leased.get(o, 0), *done.get(o, (0, 0)), seen.get(o))
                for o in sorted(set(leased) | set(done))]

    def expire(self, owner: str) -> int:
        """End ``owner``'s leases now, as if they had expired (each a lost lease)."""

        def op(db: Any) -> int:
            n = int(db.execute(
                f"UPDATE blocks SET lease_until = 0 WHERE state = {State.LEASED} AND owner = %s", (owner,)).rowcount)
            if n:
                (now,) = db.execute(f"SELECT {_NOW}").fetchone()
                self._expire(db, now)
            return n

        return self._txn(op)

    def count(self, state: State) -> int:
        """Blocks in ``state``."""
        return int(self._run(lambda db: db.execute(
            "SELECT COUNT(*) FROM blocks WHERE state = %s", (int(state),)).fetchone()[0]))

    def requeue_expired(self) -> int:
        """Return expired leases to pending (or to dead after ``max_lost``)."""

        def op(db: Any) -> int:
            (now,) = db.execute(f"SELECT {_NOW}").fetchone()
            return self._expire(db, now)

        return self._txn(op)

    def _expire(self, db: Any, now: float | None) -> int:
        """Expired leases go back to pending, counted as lost; dead after ``max_lost``.
        Rows another transaction holds are skipped (it is expiring or acking them)."""
        cur = db.execute(
            f"""WITH picked AS MATERIALIZED (
                    SELECT id FROM blocks WHERE state = {State.LEASED} AND lease_until < COALESCE(%s, {_NOW})
                    FOR UPDATE SKIP LOCKED)
                UPDATE blocks b SET state = CASE WHEN lost + 1 >= %s THEN {State.DEAD} ELSE {State.PENDING} END,
                lost = lost + 1, owner = NULL, lease_until = NULL,
                last_error = CASE WHEN lost + 1 >= %s
                    THEN 'lease lost ' || (lost + 1) || ' times: its worker died, crashed or stalled each time '
                         || 'it held this block (a block that crashes its worker?); last error before: '
                         || COALESCE(NULLIF(last_error, %s), 'none')
                    ELSE %s END
                FROM picked WHERE b.id = picked.id AND b.state = {State.LEASED}""",
            (now, self.max_lost, self.max_lost, _EXPIRED_ERROR, _EXPIRED_ERROR),
        )
        return int(cur.rowcount)

    def requeue(self, ids: Iterable[int], error: str | None = None) -> int:
        """Put the given blocks back to pending whatever their state, attempts and results
        reset. Returns how many were found."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return 0
        return self._txn(lambda db: int(db.execute(
            f"""UPDATE blocks SET state = {State.PENDING}, owner = NULL, lease_until = NULL, attempts = 0,
                failures = 0, lost = 0, stored = NULL, done_at = NULL, n_ok = NULL, n_empty = NULL, n_failed = NULL,
                n_bytes = NULL, n_retries = NULL, last_error = %s WHERE id = ANY(%s)""",
            (error, wanted),
        ).rowcount))

    def retry_dead(self) -> int:
        """Put every dead block back to pending with its attempts reset; returns how many."""
        return self._txn(lambda db: int(db.execute(
            f"UPDATE blocks SET state = {State.PENDING}, attempts = 0, failures = 0, lost = 0 WHERE state = {State.DEAD}"
        ).rowcount))

    def _stream(self, sql: str, params: tuple[Any, ...] = (), rows: int = 10_000) -> Iterator[tuple[Any, ...]]:
        """Rows of ``sql`` through a server-side cursor (memory stays flat), on a
        connection of its own so the queue stays usable meanwhile."""
        _need_psycopg()
        db = _connect(self._u, self.schema)
        try:
            with db.transaction(), db.cursor(name="tilesweep_stream") as cur:
                cur.execute(sql, params)
                while batch := cur.fetchmany(rows):
                    yield from batch
        finally:
            db.close()

    def dead(self) -> Iterator[DeadBlock]:
        """Dead blocks with their attempts and last error, in id order (streams)."""
        for row in self._stream(f"SELECT {_BLOCK_COLS}, attempts, last_error FROM blocks WHERE state = {State.DEAD} ORDER BY id"):
            yield DeadBlock(_block(row), int(row[5]), row[6])

    def get(self, block_id: int) -> BlockRecord | None:
        """One block's record, or None."""
        row = self._run(lambda db: db.execute(f"SELECT {_RECORD_COLS} FROM blocks WHERE id = %s", (int(block_id),)).fetchone())
        return None if row is None else _record(row)

    def records(self, lo: int | None = None, hi: int | None = None) -> Iterator[BlockRecord]:
        """Every block's record in id order (streams), or those with ids in ``[lo, hi)``."""
        lo_, hi_ = (-1 if lo is None else int(lo)), ((1 << 62) if hi is None else int(hi))
        for row in self._stream(f"SELECT {_RECORD_COLS} FROM blocks WHERE id >= %s AND id < %s ORDER BY id", (lo_, hi_)):
            yield _record(row)

    def results(self) -> Iterator[tuple[int, BlockResult | None]]:
        """``(block id, results)`` of every done block in id order (streams)."""
        for row in self._stream(
            f"SELECT id, n_ok, n_empty, n_failed, n_bytes, n_retries, stored FROM blocks WHERE state = {State.DONE} ORDER BY id"
        ):
            yield int(row[0]), (None if row[1] is None else BlockResult(*row[1:]))

    def blocks(self, state: State | None = None, kept: bool | None = None) -> Iterator[Block]:
        """Blocks (optionally of one state) in id order (streams); ``kept`` as in the protocol."""
        conds = [] if state is None else [f"state = {int(state)}"]
        if kept is not None:
            conds.append("stored IS DISTINCT FROM 0" if kept else "stored = 0")
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        for row in self._stream(f"SELECT {_BLOCK_COLS} FROM blocks {where} ORDER BY id"):
            yield _block(row)

    def stats(self, window: float = 300.0) -> QueueStats:
        """Counts by state in blocks and tiles, attempts, and what was done in the last
        ``window`` seconds (one snapshot)."""

        def op(db: Any) -> QueueStats:
            (now,) = db.execute(f"SELECT {_NOW}").fetchone()
            blocks = {s: 0 for s in State}
            tiles = {s: 0 for s in State}
            attempts = 0
            for state, nb, nt, na in db.execute(
                "SELECT state, COUNT(*), COALESCE(SUM(tiles), 0), COALESCE(SUM(attempts), 0) FROM blocks GROUP BY state"
            ).fetchall():
                blocks[State(state)] = int(nb)
                tiles[State(state)] = int(nt)
                attempts += int(na)
            nb, nt = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(tiles), 0) FROM blocks WHERE state = {State.DONE} AND done_at >= %s",
                (now - window,),
            ).fetchone()
            first = db.execute("SELECT value FROM meta WHERE key = 'first_lease_at'").fetchone()
            effective = window if first is None else max(1e-3, min(window, now - float(first[0])))
            sums = db.execute(
                f"""SELECT COALESCE(SUM(n_ok), 0), COALESCE(SUM(n_empty), 0), COALESCE(SUM(n_failed), 0),
                    COALESCE(SUM(n_bytes), 0), COALESCE(SUM(n_retries), 0) FROM blocks WHERE state = {State.DONE}"""
            ).fetchone()
            (unbalanced,) = db.execute(
                f"""SELECT COUNT(*) FROM blocks WHERE state = {State.DONE} AND n_ok IS NOT NULL
                    AND n_ok + n_empty + n_failed != tiles"""
            ).fetchone()
            return QueueStats(blocks, tiles, attempts, (int(nb), int(nt), float(effective)),
                              BlockResult(*map(int, sums)), int(unbalanced))

        def snapshot(db: Any) -> QueueStats:
            with db.transaction():
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return op(db)

        return self._run(snapshot)

    def close(self) -> None:
        if os.getpid() == self._pid:
            self._db.close()

    def __enter__(self) -> "PostgresQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def blocks_by_id(self, ids: Iterable[int]) -> Iterator[Block]:
        """The queued blocks among ``ids`` (any state), in id order; ids not queued are
        left out (densify: which cells are taken)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return
        rows = self._run(lambda db: db.execute(
            f"SELECT {_BLOCK_COLS} FROM blocks WHERE id = ANY(%s) ORDER BY id", (wanted,)).fetchall())
        for row in rows:
            yield _block(row)


def _block(row: tuple[Any, ...]) -> Block:
    mask = row[4]
    return Block(int(row[0]), int(row[1]), int(row[2]), int(row[3]), None if mask is None else bytes(mask))


def _record(row: tuple[Any, ...]) -> BlockRecord:
    out = dict(zip(RECORD_FIELDS, row))
    out["state"] = State(out["state"])
    if out["mask"] is not None:
        out["mask"] = bytes(out["mask"])
    return out  # type: ignore[return-value]


def stage(u: QueueURL) -> StagedQueue:
    """A new, empty queue for a plan at ``u`` (its schema must not exist yet): filled in
    ``<schema>_partial``, published by renaming that schema (atomic), dropped on discard.
    One plan at a time per schema: a session advisory lock on the schema's name is held
    from here to publish or discard, and a second plan meanwhile is a :class:`UsageError`."""
    assert u.schema is not None
    final, partial = u.schema, u.schema + "_partial"
    admin = _connect(u, None)
    try:
        # Held by this session until publish or discard closes it: a second plan of the same
        # schema fails now, instead of dropping this one's partial schema and both writing
        # into the new one. It also makes dropping a partial left by a killed plan safe.
        (mine,) = admin.execute("SELECT pg_try_advisory_lock(hashtext(%s))", ("tilesweep.stage." + final,)).fetchone()
        if not mine:
            raise UsageError(f"queue {u.text!r}: another plan is creating schema {final!r} right now")
        if _schema_exists(admin, final):
            raise UsageError(f"queue {u.text!r}: schema {final!r} already holds a queue (another sweep's?)")
        with admin.transaction():
            admin.execute(_ident("DROP SCHEMA IF EXISTS {} CASCADE", partial))  # a plan killed earlier
            admin.execute(_ident("CREATE SCHEMA {}", partial))
            admin.execute(_ident("SET LOCAL search_path TO {}", partial))
            for stmt in filter(str.strip, _TABLES.split(";")):
                admin.execute(stmt)
    except psycopg.Error as exc:
        admin.close()
        raise UsageError(f"queue {u.text!r}: cannot create schema {partial!r}: {_one_line(exc)}") from None
    except BaseException:
        admin.close()
        raise
    q = PostgresQueue(u, _schema=partial)
    published = []

    def publish() -> None:
        try:
            admin.execute(_ident("ALTER SCHEMA {} RENAME TO {}", partial, final))
            published.append(True)
        finally:
            admin.close()

    def discard() -> None:
        db = admin if not admin.closed and not admin.broken else _connect(u, None)
        try:
            db.execute(_ident("DROP SCHEMA IF EXISTS {} CASCADE", partial))
            if published:
                db.execute(_ident("DROP SCHEMA IF EXISTS {} CASCADE", final))
        finally:
            db.close()
            admin.close()

    return StagedQueue(u.text, q, publish, discard)
