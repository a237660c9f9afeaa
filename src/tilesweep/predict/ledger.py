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

Backends: :class:`SqliteLedger` (``SWEEP/predictions/ledger.sqlite``, WAL mode, ``BEGIN
IMMEDIATE`` transactions: any number of processes on the machine that holds the sweep's
folder, the same reach as the SQLite queue beside it). A PostgreSQL backend beside a
PostgreSQL queue is not written yet (docs/scale-out.md).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Protocol, Sequence

LEDGER_FILE = "ledger.sqlite"

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


class SqliteLedger:
    """:class:`Ledger` in ``ledger.sqlite`` (module doc). Opening creates the file and its
    tables when absent and upgrades a ledger written by an earlier version (``model_nan``,
    ``lost``); a file that cannot be created (a full disk) is not left behind."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
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

    def add_model(self, key: str, name: str, digest: str, folder: str, labels: Sequence[str], threshold: float) -> None:
        self.db.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?)",
                        (key, name, digest, folder, ",".join(labels), float(threshold)))

    def predicted_ids(self, key: str) -> set[int]:
        return {int(r[0]) for r in self.db.execute("SELECT block_id FROM predicted WHERE model_key = ?", (key,))}

    def part_names(self, key: str) -> set[str]:
        return {str(r[0]) for r in self.db.execute("SELECT name FROM parts WHERE model_key = ?", (key,))}

    def record(self, key: str, name: str | None, rows: int, size: int,
               blocks: Mapping[int, Sequence[int]], adopted: bool) -> Recorded:
        now = time.time()
        with _txn(self.db) as db:
            if name is not None:
                db.execute("INSERT OR IGNORE INTO parts VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (name, key, rows, len(blocks), size, now, int(adopted)))
            db.executemany(
                "INSERT INTO predicted (model_key, block_id, part, rows, empty, failed, undecodable, positives, at, model_nan) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model_key, block_id) DO NOTHING",
                [(key, bid, name if v[0] else None, v[0], v[1], v[2], v[3], v[4], now, v[5] if len(v) > 5 else 0)
                 for bid, v in blocks.items()],
            )
            won: list[int] = []
            lost: list[int] = []
            for bid, v in blocks.items():
                (owner,) = db.execute("SELECT part FROM predicted WHERE model_key = ? AND block_id = ?", (key, bid)).fetchone()
                if not v[0] or owner == name:
                    won.append(bid)  # a block without rows has nothing to lose: its counts are the first record's
                else:
                    lost.append(bid)
            kept = name is not None and any(blocks[b][0] for b in won)
            if name is not None and not kept:
                db.execute("DELETE FROM parts WHERE name = ?", (name,))
                db.execute("DELETE FROM lost WHERE part = ?", (name,))
            elif name is not None and lost:
                db.executemany("INSERT OR IGNORE INTO lost VALUES (?, ?)", [(name, b) for b in lost])
        return Recorded(won, lost, kept)

    def forget(self, key: str, names: Iterable[str]) -> None:
        with _txn(self.db) as db:
            for name in names:
                db.execute("DELETE FROM predicted WHERE model_key = ? AND part = ?", (key, name))
                db.execute("DELETE FROM parts WHERE name = ?", (name,))
                db.execute("DELETE FROM lost WHERE part = ?", (name,))

    def close(self) -> None:
        self.db.close()


class _txn:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class PartSource(NamedTuple):
    """A recorded part to read: its ``path`` and the ``lost`` block ids whose rows in it
    do not count (empty for nearly every part)."""

    path: Path
    lost: tuple[int, ...]


def part_sources(sweep_path: Path, key: str | None = None) -> list[PartSource]:
    """The parts the ledger records (of model ``key``, or every model), by name, with the
    blocks whose rows in them lost (module doc); parts missing on disk are left out.
    Read-only; [] without a ledger."""
    from .sink import PREDICTIONS_DIR

    root = Path(sweep_path) / PREDICTIONS_DIR
    ledger = root / LEDGER_FILE
    if not ledger.is_file():
        return []
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=60)
    try:
        where, args = ("WHERE model_key = ?", (key,)) if key is not None else ("", ())
        names = [str(r[0]) for r in db.execute(f"SELECT name FROM parts {where} ORDER BY name", args)]
        lost: dict[str, list[int]] = {}
        try:
            for part, bid in db.execute("SELECT part, block_id FROM lost ORDER BY part, block_id"):
                lost.setdefault(str(part), []).append(int(bid))
        except sqlite3.OperationalError:  # a ledger from before many writers: nothing lost
            pass
    finally:
        db.close()
    return [PartSource(root / n, tuple(lost.get(n, ()))) for n in names if (root / n).is_file()]


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


__all__ = ["LEDGER_FILE", "Ledger", "PartSource", "Recorded", "SqliteLedger", "part_sources", "winning_rows_sql"]
