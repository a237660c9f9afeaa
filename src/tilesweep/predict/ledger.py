"""The prediction ledger: which blocks each model has predicted, in which part, with many
writers at once.

The ledger is the commit record of :mod:`.sink`: a Parquet part becomes visible only when
the ledger records it, and a block is *predicted* iff the ledger has a row for it. Several
writers (``tilesweep run`` processes, Dask tasks) may run sinks on one sweep and model at
once; each publishes its own uniquely named parts, then calls :meth:`Ledger.record` with
the blocks its part holds. The ledger is the arbiter: in one transaction the blocks are
inserted with ``ON CONFLICT DO NOTHING``; a block whose lease was lost and that two writers
both scored keeps the row of whichever recorded first (it **won**), and the later part's
rows of that block are **lost**: the ``lost`` table names them, and every reader of parts
(:func:`part_sources`, which ``sql.py``'s ``predictions`` view and ``view/`` use) skips them.
A part that won none of its blocks' rows is not kept: its record is rolled back in the same
transaction and the writer deletes the file. A part's ``lost`` set is written in the
transaction that makes the part visible and never changes after, so a reader that caches
parts (the map viewer's overlay) stays right.

Recording is idempotent: recording the same part twice (its writer and a second writer that
adopted it as an orphan while the first was between publish and record) gives the same
winners, since a block's winner is the part named in its row.

Where it lives (:func:`open_ledger`) is where the queue lives, so every machine that can
lease a block can record it: :class:`SqliteLedger` (``SWEEP/predictions/ledger.sqlite``
beside a SQLite queue: WAL mode, ``BEGIN IMMEDIATE`` transactions, any number of
processes on the machine that holds the folder) or :class:`PostgresLedger` (tables
``models``, ``parts``, ``predicted``, ``lost`` in the PostgreSQL schema of the sweep's
queue, next to its ``blocks``). Both run the same statements (:class:`_SqlLedger`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, NamedTuple, Protocol, Sequence, TypeVar, cast

from ..errors import UsageError

PREDICTIONS_DIR = "predictions"  # the sweep's folder of parts and ledger (also tilesweep.predict.sink's)
LEDGER_FILE = "ledger.sqlite"
_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS parts (
    name        TEXT PRIMARY KEY,    -- path relative to predictions/
    model_key   TEXT NOT NULL,
    rows        INTEGER NOT NULL,
    blocks      INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    written_at  REAL NOT NULL,
    adopted     INTEGER NOT NULL DEFAULT 0   -- 1: recovered after a crash before its commit
);
CREATE TABLE IF NOT EXISTS predicted (
    model_key   TEXT NOT NULL,
    block_id    INTEGER NOT NULL,    -- PMTiles Hilbert id of the block (the queue's key)
    part        TEXT,                -- NULL when the block has no row (no fetched tile)
    rows        INTEGER NOT NULL,    -- fetched tiles = rows in the part
    empty       INTEGER NOT NULL,
    failed      INTEGER NOT NULL,
    undecodable INTEGER NOT NULL,
    positives   INTEGER NOT NULL,
    at          REAL NOT NULL,
    PRIMARY KEY (model_key, block_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS models (
    model_key   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    folder      TEXT NOT NULL,
    labels      TEXT NOT NULL,
    threshold   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lost (
    part        TEXT NOT NULL,       -- a part whose rows of this block another part won
    block_id    INTEGER NOT NULL,
    PRIMARY KEY (part, block_id)
) WITHOUT ROWID;
"""


class Recorded(NamedTuple):
    """What :meth:`Ledger.record` decided: the blocks of the part that it won (their rows
    count), those another part had won first (``lost``: their rows in this part are
    skipped by readers), and ``kept``: False when the part won no rows, so its record was
    not kept and its writer deletes the file."""

    won: list[int]
    lost: list[int]
    kept: bool


class Ledger(Protocol):
    """The writer's side of a prediction ledger (one per sink); see the module doc."""

    def add_model(self, key: str, name: str, digest: str, folder: str, labels: Sequence[str], threshold: float) -> None:
        """Record a model (once; later calls change nothing)."""

    def predicted_ids(self, key: str) -> set[int]:
        """Ids of the blocks model ``key`` has predicted."""

    def part_names(self, key: str) -> set[str]:
        """Names (relative to ``predictions/``) of model ``key``'s recorded parts."""

    def record(self, key: str, name: str | None, rows: int, size: int,
               blocks: Mapping[int, Sequence[int]], adopted: bool) -> Recorded:
        """Record part ``name`` (None: blocks without a fetched tile, no part) of ``rows``
        rows and ``size`` bytes holding ``blocks`` (id -> [rows, empty, failed,
        undecodable, positives, model_nan]) in one transaction; the first record of a
        block wins it."""

    def forget(self, key: str, names: Iterable[str]) -> None:
        """Forget parts that are gone from storage: their blocks are predicted again."""

    def close(self) -> None:
        """Close the connection."""


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS parts (
    name TEXT PRIMARY KEY, model_key TEXT NOT NULL, rows BIGINT NOT NULL, blocks INTEGER NOT NULL,
    bytes BIGINT NOT NULL, written_at DOUBLE PRECISION NOT NULL, adopted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS predicted (
    model_key TEXT NOT NULL, block_id BIGINT NOT NULL, part TEXT, rows INTEGER NOT NULL, empty INTEGER NOT NULL,
    failed INTEGER NOT NULL, undecodable INTEGER NOT NULL, positives INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL,
    model_nan INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (model_key, block_id)
);
CREATE TABLE IF NOT EXISTS models (
    model_key TEXT PRIMARY KEY, name TEXT NOT NULL, digest TEXT NOT NULL, folder TEXT NOT NULL,
    labels TEXT NOT NULL, threshold DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS lost (part TEXT NOT NULL, block_id BIGINT NOT NULL, PRIMARY KEY (part, block_id));
"""

_PREDICTED_COLS = "model_key, block_id, part, rows, empty, failed, undecodable, positives, at, model_nan"


class _SqlLedger:
    """Both backends' SQL (the same tables and statements; ``?`` placeholders): the
    writer's :class:`Ledger` and the readers' queries. A subclass gives :meth:`_all`,
    :meth:`_txn` and :meth:`close`."""

    def _all(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def _txn(self) -> ContextManager[None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- the writer's side ----------------------------------------------------------------

    def add_model(self, key: str, name: str, digest: str, folder: str, labels: Sequence[str], threshold: float) -> None:
        self._all("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                  (key, name, digest, folder, ",".join(labels), float(threshold)))

    def predicted_ids(self, key: str) -> set[int]:
        return {int(r[0]) for r in self._all("SELECT block_id FROM predicted WHERE model_key = ?", (key,))}

    def part_names(self, key: str) -> set[str]:
        return {str(r[0]) for r in self._all("SELECT name FROM parts WHERE model_key = ?", (key,))}

    def record(self, key: str, name: str | None, rows: int, size: int,
               blocks: Mapping[int, Sequence[int]], adopted: bool) -> Recorded:
        now = time.time()
        # in block-id order (and so the lost rows): two writers recording overlapping
        # blocks then wait for each other's rows in one order and never deadlock
        blocks = {int(b): blocks[b] for b in sorted(blocks, key=int)}
        with self._txn():
            if name is not None:
                self._all("INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                          (name, key, rows, len(blocks), size, now, int(adopted)))
            self._many(
                f"INSERT INTO predicted ({_PREDICTED_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (model_key, block_id) DO NOTHING",
                [(key, bid, name if v[0] else None, v[0], v[1], v[2], v[3], v[4], now, v[5] if len(v) > 5 else 0)
                 for bid, v in blocks.items()],
            )
            won: list[int] = []
            lost: list[int] = []
            ids = list(blocks)
            rows_of: dict[int, tuple[Any, Any]] = {}
            for i in range(0, len(ids), 500):  # one query per 500 blocks, not one per block
                chunk = ids[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                for bid, owner, at in self._all(
                        f"SELECT block_id, part, at FROM predicted WHERE model_key = ? AND block_id IN ({marks})", (key, *chunk)):
                    rows_of[int(bid)] = (owner, at)
            for bid, v in blocks.items():
                owner, at = rows_of[bid]
                # the block's row is this record's: it names this part, or (no rows, no part) this instant
                (won if (owner == name and v[0]) or (not v[0] and owner is None and at == now) else lost).append(bid)
            kept = name is not None and any(blocks[b][0] for b in won)
            if name is not None and not kept:
                self._all("DELETE FROM parts WHERE name = ?", (name,))
                self._all("DELETE FROM lost WHERE part = ?", (name,))
            elif name is not None and lost:
                self._many("INSERT INTO lost VALUES (?, ?) ON CONFLICT DO NOTHING",
                           [(name, int(b)) for b in lost if blocks[b][0]])  # only rows in this part can be skipped
        return Recorded(won, lost, kept)

    def forget(self, key: str, names: Iterable[str]) -> None:
        with self._txn():
            for name in names:
                self._all("DELETE FROM predicted WHERE model_key = ? AND part = ?", (key, name))
                self._all("DELETE FROM parts WHERE name = ?", (name,))
                self._all("DELETE FROM lost WHERE part = ?", (name,))

    # --- the readers' side ----------------------------------------------------------------

    def models(self) -> list[tuple[str, str, str, str, str, float]]:
        """``(key, name, digest, folder, labels "a,b", threshold)`` of every model, by name."""
        return [(str(k), str(n), str(d), str(f), str(lb), float(t)) for k, n, d, f, lb, t in
                self._all("SELECT model_key, name, digest, folder, labels, threshold FROM models ORDER BY name")]

    def parts(self, key: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, lost block ids)`` of the recorded parts (of model ``key``), by name."""
        where, args = ("WHERE model_key = ?", (key,)) if key is not None else ("", ())
        names = [str(r[0]) for r in self._all(f"SELECT name FROM parts {where} ORDER BY name", args)]
        lost: dict[str, list[int]] = {}
        for part, bid in self._all("SELECT part, block_id FROM lost ORDER BY part, block_id"):
            lost.setdefault(str(part), []).append(int(bid))
        return [(n, tuple(lost.get(n, ()))) for n in names]

    def totals(self, key: str) -> tuple[int, ...]:
        """``(blocks, rows, empty, failed, undecodable, positives, parts)`` of model ``key``."""
        ((blocks, rows, empty, failed, und, pos),) = self._all(
            "SELECT COUNT(*), COALESCE(SUM(rows),0), COALESCE(SUM(empty),0), COALESCE(SUM(failed),0), "
            "COALESCE(SUM(undecodable),0), COALESCE(SUM(positives),0) FROM predicted WHERE model_key = ?", (key,))
        ((parts,),) = self._all("SELECT COUNT(*) FROM parts WHERE model_key = ?", (key,))
        return tuple(int(v) for v in (blocks, rows, empty, failed, und, pos, parts))

    def predicted_rows(self, key: str, page: int = 10_000) -> Iterator[tuple[int, int, int, int]]:
        """``(block_id, rows, empty, failed)`` of model ``key``'s blocks in id order, a page
        at a time (memory does not grow with the number of blocks)."""
        last = -1
        while True:
            got = self._all("SELECT block_id, rows, empty, failed FROM predicted WHERE model_key = ? AND block_id > ? "
                            f"ORDER BY block_id LIMIT {int(page)}", (key, last))
            for r in got:
                yield int(r[0]), int(r[1]), int(r[2]), int(r[3])
            if len(got) < page:
                return
            last = int(got[-1][0])

    def block_result(self, key: str, block_id: int) -> tuple[int, int, int] | None:
        """``(rows, empty, failed)`` of a predicted block, None when not predicted."""
        got = self._all("SELECT rows, empty, failed FROM predicted WHERE model_key = ? AND block_id = ?", (key, int(block_id)))
        return None if not got else (int(got[0][0]), int(got[0][1]), int(got[0][2]))

    def block_parts(self, block_id: int) -> list[tuple[str, str]]:
        """``(model key, part)`` holding a block's winning rows, every model."""
        return [(str(k), str(p)) for k, p in
                self._all("SELECT model_key, part FROM predicted WHERE block_id = ? AND part IS NOT NULL", (int(block_id),))]

    def predicted_by_folder(self) -> dict[str, int]:
        """Predicted blocks per model folder."""
        return {str(f): int(n) for f, n in self._all(
            "SELECT m.folder, COUNT(p.block_id) FROM models m LEFT JOIN predicted p ON p.model_key = m.model_key GROUP BY m.folder")}

    def drop(self, keys: Sequence[str]) -> int:
        """Delete models ``keys`` with their blocks, parts and lost rows in one
        transaction; returns the blocks dropped."""
        n = 0
        with self._txn():
            for key in keys:
                ((c,),) = self._all("SELECT COUNT(*) FROM predicted WHERE model_key = ?", (key,))
                n += int(c)
                self._all("DELETE FROM lost WHERE part IN (SELECT name FROM parts WHERE model_key = ?)", (key,))
                self._all("DELETE FROM predicted WHERE model_key = ?", (key,))
                self._all("DELETE FROM parts WHERE model_key = ?", (key,))
                self._all("DELETE FROM models WHERE model_key = ?", (key,))
        return n


class _txn:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception) on SQLite."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class SqliteLedger(_SqlLedger):
    """:class:`Ledger` in ``ledger.sqlite`` (module doc). Opening creates the file and its
    tables when absent and upgrades a ledger written by an earlier version (``model_nan``,
    ``lost``); a file that cannot be created (a full disk) is not left behind.
    ``readonly``: a reader's connection, which creates and changes nothing."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60, check_same_thread=False)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(predicted)")}
            if not cols:  # a writer's first open has made the file, not yet its tables
                self.db.close()
                raise LookupError(f"{self.path} holds no ledger yet")
            self._has_lost = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'lost'").fetchone() is not None
            self._has_nan = "model_nan" in cols
            return
        fresh = not self.path.exists()
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        try:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
            with _txn(self.db):  # ledgers written before model_nan was kept
                if "model_nan" not in {r[1] for r in self.db.execute("PRAGMA table_info(predicted)")}:
                    self.db.execute("ALTER TABLE predicted ADD COLUMN model_nan INTEGER NOT NULL DEFAULT 0")
        except sqlite3.Error:  # e.g. a full disk: leave no empty ledger behind
            self.db.close()
            if fresh:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            raise
        self._has_lost = self._has_nan = True

    def _all(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        if not self._has_lost and "lost" in sql.split():  # a read-only ledger from before many writers
            if sql.lstrip().upper().startswith("SELECT"):
                return []
        return self.db.execute(sql, tuple(args)).fetchall()

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.db.executemany(sql, rows)

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        with _txn(self.db):
            yield

    def close(self) -> None:
        self.db.close()


class PostgresLedger(_SqlLedger):
    """:class:`Ledger` in the PostgreSQL schema of the sweep's queue, beside its
    ``blocks``: reachable by every machine that reaches the queue. Tables are created on
    the first writer's open (under an advisory lock: writers may open at once). A sweep
    whose ledger is still ``predictions/ledger.sqlite`` (predicted before the ledger moved)
    is migrated by the first writer: its rows are copied in one transaction (``ON
    CONFLICT DO NOTHING``: a copy cut short by a crash is simply done again), then the
    file is renamed ``ledger.sqlite.migrated``, all under an advisory lock (writers on
    other machines that open at once wait, then find it migrated). One connection; the writer's operations are
    reconnected and repeated after a dropped connection (a server restart), for up to
    ``reconnect_s`` seconds.
    ``readonly``: a reader's connection; :class:`LookupError` when no writer made the
    tables yet; a server's error is a one-line :class:`UsageError` (its ``__cause__``
    the psycopg error)."""

    def __init__(self, url: Any, readonly: bool = False, migrate_from: Path | None = None) -> None:
        from ..queue.postgres import _connect

        self.url = url
        self.readonly = readonly
        self.db = _connect(url, url.schema)
        try:
            if readonly:
                if self._all("SELECT to_regclass('predicted')")[0][0] is None:
                    raise LookupError("no prediction ledger in the queue's schema yet")
                return
            with self.db.transaction():
                self.db.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.tilesweep-ledger'))")
                for stmt in filter(str.strip, _PG_SCHEMA.split(";")):
                    self.db.execute(stmt)
            self._hold_writers_lock()
            if migrate_from is not None and migrate_from.is_file():
                self._migrate(migrate_from)
        except BaseException:
            self.db.close()
            raise

    _WRITERS_LOCK = "SELECT pg_advisory_lock_shared(hashtext(current_schema() || '.tilesweep-writers'))"

    def _hold_writers_lock(self) -> None:
        """Every writer's session holds the writers' advisory lock shared (the local
        ``predictions/.lock`` does not reach other machines), so :meth:`alone` can tell
        `predictions drop` that a writer on another machine runs."""
        self.db.execute(self._WRITERS_LOCK)

    def alone(self) -> bool:
        """True when no other writer's session holds the writers' lock (it is then held
        alone by this session until it closes)."""
        (got,) = self.db.execute("SELECT pg_try_advisory_lock(hashtext(current_schema() || '.tilesweep-writers'))").fetchone()
        return bool(got)

    _MIGRATE_LOCK = "hashtext(current_schema() || '.tilesweep-migrate')"

    def _migrate(self, path: Path) -> None:
        """Copy ``path``'s rows in and rename it, serialised across machines: under an
        advisory lock of this session, held until the file is renamed (so no writer copies
        from a file being renamed), the file is looked for again; a writer that waited finds
        it migrated and does nothing."""
        self.db.execute(f"SELECT pg_advisory_lock({self._MIGRATE_LOCK})")
        try:
            if path.is_file():
                self._copy_and_rename(path)
        finally:
            if not (self.db.closed or self.db.broken):
                self.db.execute(f"SELECT pg_advisory_unlock({self._MIGRATE_LOCK})")

    def _copy_and_rename(self, path: Path) -> None:
        old = SqliteLedger(path, readonly=True)
        try:
            with self._txn():
                self._many("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           old._all("SELECT model_key, name, digest, folder, labels, threshold FROM models"))
                self._many("INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           old._all("SELECT name, model_key, rows, blocks, bytes, written_at, adopted FROM parts"))
                nan = "model_nan" if old._has_nan else "0"
                cur = old.db.execute(f"SELECT model_key, block_id, part, rows, empty, failed, undecodable, positives, at, {nan} "
                                     "FROM predicted")
                while batch := cur.fetchmany(10_000):
                    self._many(f"INSERT INTO predicted ({_PREDICTED_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                               "ON CONFLICT DO NOTHING", batch)
                if old._has_lost:
                    self._many("INSERT INTO lost VALUES (?, ?) ON CONFLICT DO NOTHING", old._all("SELECT part, block_id FROM lost"))
        finally:
            old.close()
        try:
            os.replace(path, path.with_name(path.name + ".migrated"))
        except FileNotFoundError:  # renamed by another writer (one that takes no lock: an earlier version)
            pass
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    # Every writer's operation is safe to repeat (inserts ON CONFLICT DO NOTHING, a block's
    # winner is the part its row names), so a dropped connection (a server restart) is
    # reconnected and the operation run again for up to ``reconnect_s`` seconds; a
    # transaction the server rolled back (deadlock, serialization failure) is run again.
    reconnect_s = 60.0

    def _retry(self, op: Callable[[], _T]) -> _T:
        import psycopg

        from ..queue.postgres import _connect

        deadline = time.monotonic() + self.reconnect_s
        delay = 0.05
        while True:
            try:
                return op()
            except psycopg.errors.TransactionRollback:  # a deadlock or serialization failure: rolled back, safe to repeat
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except psycopg.OperationalError:
                if not (self.db.closed or self.db.broken) or time.monotonic() >= deadline:
                    raise
            except UsageError:  # reconnecting: the server is not back yet
                if time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            try:
                self.db.close()
            except Exception:  # noqa: BLE001 - it is broken already
                pass
            try:
                self.db = _connect(self.url, self.url.schema)
                self._hold_writers_lock()
            except UsageError:
                if time.monotonic() >= deadline:
                    raise

    def add_model(self, key: str, name: str, digest: str, folder: str, labels: Sequence[str], threshold: float) -> None:
        self._retry(lambda: super(PostgresLedger, self).add_model(key, name, digest, folder, labels, threshold))

    def predicted_ids(self, key: str) -> set[int]:
        return self._retry(lambda: super(PostgresLedger, self).predicted_ids(key))

    def part_names(self, key: str) -> set[str]:
        return self._retry(lambda: super(PostgresLedger, self).part_names(key))

    def record(self, key: str, name: str | None, rows: int, size: int,
               blocks: Mapping[int, Sequence[int]], adopted: bool) -> Recorded:
        return self._retry(lambda: super(PostgresLedger, self).record(key, name, rows, size, blocks, adopted))

    def forget(self, key: str, names: Iterable[str]) -> None:
        names = list(names)
        self._retry(lambda: super(PostgresLedger, self).forget(key, names))

    def _all(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        if self.readonly:  # a reader's failure is one line (the writer's are retried: _retry)
            import psycopg

            from ..queue.postgres import _one_line

            try:
                cur = self.db.execute(sql.replace("?", "%s"), tuple(args))
                return list(cur.fetchall()) if cur.description is not None else []
            except psycopg.Error as exc:
                raise UsageError(f"prediction ledger in queue {self.url.text!r}: {_one_line(exc)}") from exc
        cur = self.db.execute(sql.replace("?", "%s"), tuple(args))
        return list(cur.fetchall()) if cur.description is not None else []

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            with self.db.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)

    def _txn(self) -> ContextManager[None]:
        return cast(ContextManager[None], self.db.transaction())

    def close(self) -> None:
        self.db.close()


def _queue_url(sweep_path: Path) -> Any:
    """The parsed queue URL of the sweep at ``sweep_path`` (sweep.toml's ``[queue] url``;
    the folder's own SQLite queue when it names none)."""
    import tomllib

    from ..queue import DEFAULT_URL, parse_queue_url

    try:
        config = tomllib.loads((Path(sweep_path) / "sweep.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        config = {}
    return parse_queue_url(str(config.get("queue", {}).get("url", DEFAULT_URL)))


def open_ledger(sweep_path: Path, write: bool = False) -> _SqlLedger | None:
    """The prediction ledger of the sweep at ``sweep_path``: in the queue's PostgreSQL
    schema for a sweep on a PostgreSQL queue (a not yet migrated ``ledger.sqlite`` is what
    readers read until a writer migrates it), else ``predictions/ledger.sqlite``.
    ``write``: the writer's (creating and migrating); else a read-only one, or None when
    nothing was predicted yet."""
    root = Path(sweep_path) / PREDICTIONS_DIR
    file = root / LEDGER_FILE
    u = _queue_url(sweep_path)
    if u.kind == "postgresql" and (write or not file.is_file()):
        if write:
            return PostgresLedger(u, migrate_from=file)
        try:
            return PostgresLedger(u, readonly=True)
        except LookupError:
            return None
    if write:
        return SqliteLedger(file)
    if not file.is_file():
        return None
    try:
        return SqliteLedger(file, readonly=True)
    except LookupError:  # created this instant by the first writer: nothing predicted yet
        return None


def model_rows(sweep_path: Path) -> list[tuple[Any, ...]]:
    """The ledger's model rows (key, name, digest, folder, labels, threshold), read-only;
    [] when nothing was predicted yet."""
    db = open_ledger(sweep_path)
    if db is None:
        return []
    try:
        return list(db.models())
    finally:
        db.close()


class PartSource(NamedTuple):
    """A recorded part to read: its ``path`` and the ``lost`` block ids whose rows in it
    do not count (empty for nearly every part)."""

    path: Path
    lost: tuple[int, ...]


def part_sources(sweep_path: Path, key: str | None = None) -> list[PartSource]:
    """The parts the ledger records (of model ``key``, or every model), by name, with the
    blocks whose rows in them lost (module doc); parts missing on disk are left out.
    Read-only; [] without a ledger."""
    root = Path(sweep_path) / PREDICTIONS_DIR
    ledger = open_ledger(sweep_path)
    if ledger is None:
        return []
    try:
        parts = ledger.parts(key)
    finally:
        ledger.close()
    return [PartSource(root / n, lost) for n, lost in parts if (root / n).is_file()]


def winning_rows_sql(sources: Sequence[PartSource], columns: str = "*") -> str | None:
    """A DuckDB ``SELECT`` of ``columns`` over the winning rows of ``sources`` (the lost
    blocks' rows of a part left out), or None when there are no parts. The parts without
    lost rows are one ``read_parquet`` list."""

    def lit(p: Path) -> str:
        return "'" + str(p).replace("'", "''") + "'"

    clean = [s.path for s in sources if not s.lost]
    selects: list[str] = []
    if clean:
        selects.append(f"SELECT {columns} FROM read_parquet([{', '.join(lit(p) for p in clean)}], union_by_name = true)")
    for s in sources:
        if s.lost:
            selects.append(f"SELECT {columns} FROM read_parquet({lit(s.path)}) "
                           f"WHERE block NOT IN ({', '.join(str(int(b)) for b in s.lost)})")
    if not selects:
        return None
    return " UNION ALL BY NAME ".join(selects) if columns == "*" else " UNION ALL ".join(selects)


__all__ = ["LEDGER_FILE", "Ledger", "PartSource", "PostgresLedger", "Recorded", "SqliteLedger", "ledger_summary", "open_ledger", "part_sources",
           "winning_rows_sql"]


def ledger_summary(sweep_path: Path) -> list[dict[str, object]]:
    """What each model has predicted in a sweep, read-only (SQLite or the queue's server, no
    Arrow: `tilesweep status` calls it): ``model``, ``digest``,
    ``folder`` (under ``predictions/``), ``blocks``, ``rows``, ``positives``,
    ``undecodable`` and ``parts``; an empty list when nothing was predicted."""
    db = open_ledger(sweep_path)
    if db is None:
        return []
    try:
        out: list[dict[str, object]] = []
        for key, name, digest, folder, _, _ in db.models():
            blocks, rows, _, _, undecodable, positives, parts = db.totals(key)
            out.append({"model": name, "digest": digest, "folder": folder, "blocks": blocks, "rows": rows,
                        "positives": positives, "undecodable": undecodable, "parts": parts})
        return out
    finally:
        db.close()
