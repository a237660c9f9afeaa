"""The prediction sink: Parquet parts with group commit, and the ledger of predicted blocks.

Layout under ``SWEEP/predictions/``::

    ledger.sqlite                 which blocks are predicted, by which model, in which part
    .lock                         flock held by the one process writing predictions
    {model-slug}/part-*.parquet   rows of many blocks, one row per fetched (OK) tile
    {model-slug}/*.partial        a part being written (deleted on the next open)

**Group commit.** :meth:`PredictionSink.add` buffers the rows of whole blocks; when the
buffer holds ``part_rows`` rows (or ``part_seconds`` passed) :meth:`commit` writes them
as one part, published through the storage seam (:mod:`tilesweep.storage`: temp file,
fsync, atomic create-if-absent rename, fsync of the folder); then it records the part and
all its blocks in the ledger (the commit record) in one SQLite transaction. A block is *predicted*
iff the ledger says so.

**Crash argument.** A crash before the rename leaves a ``.partial`` file: deleted on the
next open, its blocks are not in the ledger, so they are predicted again. A crash after the
rename but before the ledger commit leaves an *orphan* part: complete (it was renamed only
after fsync) and self-describing (its Parquet key-value metadata lists its blocks with
their counts). The next open **adopts** it: it records the orphan's blocks in the ledger,
unless one of them is recorded already (impossible with the single-writer lock, handled by
deleting the orphan). Parts are only written for blocks that are not in the ledger, and
recovery runs under the lock before any block is chosen, so no block's rows are ever in two
live parts: no duplicates, no missing rows. A part the ledger names but that is gone from
disk (deleted by hand) is forgotten, and its blocks are predicted again.

**Accounting.** Empty (404/204) and failed tiles have no row; the ledger keeps their count
per block, so for every predicted block ``rows + empty + failed`` = its planned tiles, and
``rows`` = its fetched (OK) tiles. A fetched tile whose bytes do not decode still gets a row,
with null scores and a null ``label`` (counted as ``undecodable``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..durable import fsync_dir
from ..errors import UsageError
from ..block import BlockResult
from ..queue import Queue
from ..storage import LocalStorage, Storage
from ..tiles import centres_array as centres  # noqa: F401 - re-exported: tile math lives in tilesweep.tiles

PREDICTIONS_DIR = "predictions"
LEDGER_FILE = "ledger.sqlite"
LOCK_FILE = ".lock"
PART_FORMAT = 1
META_KEY = b"tilesweep.predictions"
BASE_COLUMNS = ("z", "x", "y", "block", "lon", "lat", "label", "model", "model_digest", "time")

_SCHEMA = """
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
"""


def model_key(name: str, digest: str) -> str:
    """The ledger's key of a model: its weights digest, or its name when it has none
    (Python callables)."""
    return f"sha256:{digest}" if digest else f"name:{name}"


def model_folder(name: str, digest: str) -> str:
    """The part folder of a model: a file-name-safe slug of its name plus its digest."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    return f"{slug[:60]}-{digest[:12]}" if digest else slug[:60]


class BlockRows(NamedTuple):
    """The predictions of one block: its fetched tiles' ``x``, ``y`` (int64), their
    ``scores`` (float32[n, C], NaN for an undecodable tile) and the block's counts."""

    block_id: int
    block_z: int
    x: np.ndarray
    y: np.ndarray
    scores: np.ndarray
    empty: int
    failed: int
    at: float
    undecodable: np.ndarray | None = None  # bool[n]: tiles that did not decode; other NaN rows are the model's


@dataclass
class CommitStats:
    parts: int = 0
    rows: int = 0
    blocks: int = 0
    positives: int = 0
    empty: int = 0
    failed: int = 0
    undecodable: int = 0
    model_nan: int = 0  # rows whose tile decoded but the model returned NaN
    bytes: int = 0
    adopted_parts: int = 0
    deleted_orphans: int = 0
    forgotten_parts: int = 0
    busy_s: float = 0.0


class PredictionSink:
    """Group-committed prediction parts of one model in one sweep (see the module doc).

    Opening takes the sweep's prediction lock (a second writer gets :class:`UsageError`)
    and recovers from a crash of the previous writer. ``labels``/``threshold`` describe the
    score columns; ``part_rows`` and ``part_seconds`` bound a part's size and age.
    ``first_part_s``: the k-th part of this writer is due once its oldest rows are
    ``first_part_s * (2**k - 1)`` seconds old (0, 1, 3, 7, ... for 1.0), until that reaches
    ``part_seconds``: what a kill loses early in a run is bounded by seconds, not a minute.
    ``holder`` names this writer in the lock file, so a refused second writer is told
    what is running."""

    def __init__(
        self,
        sweep_path: Path,
        zoom: int,
        model_name: str,
        digest: str,
        labels: Iterable[str],
        threshold: float,
        part_rows: int = 65536,
        part_seconds: float = 60.0,
        first_part_s: float | None = None,
        holder: str = "tilesweep predict",
        storage: Storage | None = None,
    ) -> None:
        self.labels = tuple(labels)
        clash = [lb for lb in self.labels if lb in BASE_COLUMNS]
        if clash or len(set(self.labels)) != len(self.labels):
            raise UsageError(f"model {model_name}: label names {self.labels} clash with prediction columns {BASE_COLUMNS} or repeat")
        if part_rows < 1:
            raise UsageError(f"part rows {part_rows} must be >= 1")
        self.root = Path(sweep_path) / PREDICTIONS_DIR
        self.zoom = int(zoom)
        self.model_name = model_name
        self.digest = digest
        self.key = model_key(model_name, digest)
        self.folder_name = model_folder(model_name, digest)
        self.folder = self.root / self.folder_name
        # parts are its objects, keyed "{folder}/part-*.parquet" (a sweep on object storage
        # passes its bucket's predictions/, staged in this folder; the ledger stays here)
        self.storage = LocalStorage(self.root) if storage is None else storage
        self.threshold = float(threshold)
        self.part_rows = int(part_rows)
        self.part_seconds = float(part_seconds)
        self.first_part_s = first_part_s
        self._commits = 0  # commits by this writer (the growing age limit of first_part_s)
        self.stats = CommitStats()
        self._buffer: list[BlockRows] = []
        self._buffered_rows = 0
        self._first_at: float | None = None

        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_by = _lock_holder(self._lock_fd)
            os.close(self._lock_fd)
            raise UsageError(f"{held_by} is writing predictions of {str(sweep_path)!r}; wait for it or stop it") from None
        _claim_lock(self._lock_fd, holder)
        ledger = self.root / LEDGER_FILE
        fresh = not ledger.exists()
        self.db = sqlite3.connect(ledger, isolation_level=None, check_same_thread=False, timeout=60)
        try:
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        except sqlite3.Error:  # e.g. a full disk: leave no empty ledger behind
            self.db.close()
            if fresh:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{ledger}{suffix}").unlink(missing_ok=True)
            os.close(self._lock_fd)
            raise
        with _txn(self.db):  # ledgers written before model_nan was kept
            if "model_nan" not in {r[1] for r in self.db.execute("PRAGMA table_info(predicted)")}:
                self.db.execute("ALTER TABLE predicted ADD COLUMN model_nan INTEGER NOT NULL DEFAULT 0")
        self.db.execute(
            "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?)",
            (self.key, model_name, digest, self.folder_name, ",".join(self.labels), self.threshold),
        )
        fields: list[tuple[str, pa.DataType]] = [
            ("z", pa.int8()), ("x", pa.int32()), ("y", pa.int32()), ("block", pa.int64()),
            ("lon", pa.float64()), ("lat", pa.float64()),
        ]
        fields += [(lb, pa.float32()) for lb in self.labels]
        fields += [("label", pa.bool_()), ("model", pa.string()), ("model_digest", pa.string()),
                   ("time", pa.timestamp("ms", tz="UTC"))]
        self._schema = pa.schema(fields)
        self.recover()

    # --- reading the ledger ---------------------------------------------------------------

    def predicted_ids(self) -> set[int]:
        """Ids of the blocks this model has predicted (durably)."""
        return {int(r[0]) for r in self.db.execute("SELECT block_id FROM predicted WHERE model_key = ?", (self.key,))}

    def block_result(self, block_id: int) -> BlockResult | None:
        """:func:`ledger_block_result` of this sink's model (safe from any thread)."""
        return ledger_block_result(self.root / LEDGER_FILE, self.key, block_id)

    # --- recovery -------------------------------------------------------------------------

    def recover(self) -> None:
        """Delete temp files, adopt orphan parts, forget parts that are gone (module doc)."""
        for stale in self.folder.glob("*.partial"):
            stale.unlink()
        known = {r[0] for r in self.db.execute("SELECT name FROM parts WHERE model_key = ?", (self.key,))}
        on_disk = {o.key: o.size for o in self.storage.list(f"{self.folder_name}/part-") if o.key.endswith(".parquet")}
        gone = known - on_disk.keys()
        if gone:
            with _txn(self.db):
                for name in gone:
                    self.db.execute("DELETE FROM predicted WHERE model_key = ? AND part = ?", (self.key, name))
                    self.db.execute("DELETE FROM parts WHERE name = ?", (name,))
            self.stats.forgotten_parts += len(gone)
        for name in sorted(on_disk.keys() - known):
            try:
                with self.storage.open_read(name) as f:
                    meta = json.loads(pq.read_schema(f).metadata[META_KEY])
                if meta["model_key"] != self.key:
                    raise ValueError("another model's part")
                blocks = {int(k): v for k, v in meta["blocks"].items()}
                rows = int(meta["rows"])
            except Exception:  # not ours or unreadable: a published part is whole, so this is foreign
                self.storage.delete(name)
                self.stats.deleted_orphans += 1
                continue
            ids = list(blocks)
            clash = any(
                self.db.execute("SELECT 1 FROM predicted WHERE model_key = ? AND block_id = ?", (self.key, b)).fetchone()
                for b in ids
            )
            if clash:
                self.storage.delete(name)
                fsync_dir(self.folder)
                self.stats.deleted_orphans += 1
                continue
            with _txn(self.db):
                self._record(name, rows, on_disk[name], blocks, adopted=True)
            self.stats.adopted_parts += 1

    # --- writing --------------------------------------------------------------------------

    def add(self, rows: BlockRows) -> list[int]:
        """Buffer one block's rows; commit when the buffer is full or old. Returns the ids
        of the blocks it committed (empty when it did not commit)."""
        self._buffer.append(rows)
        self._buffered_rows += len(rows.x)
        if self._first_at is None:
            self._first_at = time.monotonic()
        if self.due():
            return self.commit()
        return []

    def due(self) -> bool:
        """True when the buffer should be committed now (full, or older than its age limit)."""
        if not self._buffer:
            return False
        return self._buffered_rows >= self.part_rows or (
            self._first_at is not None and time.monotonic() - self._first_at >= self.age_limit()
        )

    def age_limit(self) -> float:
        """Seconds the oldest buffered rows may wait: ``part_seconds``, or less for the
        first parts of a writer with ``first_part_s`` (class doc)."""
        if self.first_part_s is None:
            return self.part_seconds
        return min(self.part_seconds, self.first_part_s * (2.0 ** min(self._commits, 30) - 1.0))

    def commit(self) -> list[int]:
        """Write the buffered blocks as one part and record them, in that order. Returns
        the ids of the blocks now durable."""
        if not self._buffer:
            return []
        t0 = time.perf_counter()
        buf, self._buffer, self._buffered_rows, self._first_at = self._buffer, [], 0, None
        self._commits += 1
        blocks: dict[int, list[int]] = {}
        for b in buf:
            valid = ~np.isnan(b.scores).any(axis=1) if len(b.x) else np.zeros(0, bool)
            pos = int(np.sum((b.scores[valid] >= self.threshold).any(axis=1))) if len(b.x) else 0
            undecodable = int(np.sum(~valid)) if b.undecodable is None else int(np.sum(b.undecodable & ~valid))
            blocks[b.block_id] = [len(b.x), b.empty, b.failed, undecodable, pos, int(np.sum(~valid)) - undecodable]
        rows = sum(v[0] for v in blocks.values())
        name: str | None = None
        size = 0
        if rows:
            table = self._table(buf)
            meta = {"format": PART_FORMAT, "model_key": self.key, "model": self.model_name, "digest": self.digest,
                    "labels": list(self.labels), "threshold": self.threshold, "rows": rows,
                    "blocks": {str(k): v for k, v in blocks.items()}}
            table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
            stem = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
            name = f"{self.folder_name}/{stem}.parquet"
            tmp = self.storage.staging_path(name, unique=False)  # {stem}.parquet.partial beside it
            pq.write_table(table, tmp, compression="zstd")
            self.storage.publish(tmp, name)  # create-if-absent: a part is never overwritten
            size = self.storage.size(name)
        with _txn(self.db):
            self._record(name, rows, size, blocks, adopted=False)
        s = self.stats
        s.parts += name is not None
        s.rows += rows
        s.blocks += len(blocks)
        s.positives += sum(v[4] for v in blocks.values())
        s.empty += sum(v[1] for v in blocks.values())
        s.failed += sum(v[2] for v in blocks.values())
        s.undecodable += sum(v[3] for v in blocks.values())
        s.model_nan += sum(v[5] for v in blocks.values())
        s.bytes += size
        s.busy_s += time.perf_counter() - t0
        return list(blocks)

    def _record(self, name: str | None, rows: int, size: int, blocks: dict[int, list[int]], adopted: bool) -> None:
        now = time.time()
        if name is not None:
            self.db.execute(
                "INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, ?)", (name, self.key, rows, len(blocks), size, now, int(adopted))
            )
        self.db.executemany(
            "INSERT INTO predicted (model_key, block_id, part, rows, empty, failed, undecodable, positives, at, model_nan) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(self.key, bid, name if v[0] else None, v[0], v[1], v[2], v[3], v[4], now, v[5] if len(v) > 5 else 0)
             for bid, v in blocks.items()],
        )

    def _table(self, buf: list[BlockRows]) -> pa.Table:
        x = np.concatenate([b.x for b in buf]).astype(np.int32)
        y = np.concatenate([b.y for b in buf]).astype(np.int32)
        scores = np.concatenate([b.scores for b in buf]).astype(np.float32)
        block = np.concatenate([np.full(len(b.x), b.block_id, np.int64) for b in buf])
        at = np.concatenate([np.full(len(b.x), int(b.at * 1000), np.int64) for b in buf])
        lon, lat = centres(self.zoom, x, y)
        invalid = np.asarray(np.isnan(scores).any(axis=1))
        n = len(x)
        cols: list[pa.Array[Any]] = [
            pa.array(np.full(n, self.zoom, np.int8)), pa.array(x), pa.array(y), pa.array(block),
            pa.array(lon), pa.array(lat),
        ]
        for i in range(len(self.labels)):
            cols.append(pa.array(scores[:, i], mask=invalid))
        cols += [
            pa.array(np.asarray((scores >= self.threshold).any(axis=1)), mask=invalid),
            pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([self.model_name])).cast(pa.string()),
            pa.array([self.digest] * n, pa.string()) if n else pa.array([], pa.string()),
            pa.array(at).cast(pa.timestamp("ms", tz="UTC")),
        ]
        return pa.Table.from_arrays(cols, schema=self._schema)

    def close(self) -> None:
        """Close the ledger and release the lock (buffered, uncommitted rows are dropped:
        their blocks are not predicted and will be done again)."""
        self._buffer = []
        try:
            self.db.close()
        finally:
            os.close(self._lock_fd)

    def __enter__(self) -> "PredictionSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _claim_lock(fd: int, holder: str) -> None:
    """Write who holds the prediction lock into the lock file (it is ours now)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()})\n".encode(), 0)
    except OSError:  # a read-only or full disk: the lock still holds, only its label is lost
        pass


def _lock_holder(fd: int) -> str:
    """Who holds the prediction lock, as its holder wrote it (e.g. "tilesweep run (pid
    812)"), or a plain description when it wrote nothing."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    m = re.fullmatch(r"(tilesweep [a-z ]+) \(pid (\d+)\)", text)
    return f"`{m[1]}` (pid {m[2]})" if m else "another tilesweep process"


class _txn:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def ledger_block_result(ledger: Path, key: str, block_id: int) -> BlockResult | None:
    """A predicted block's counts as the fetch queue records them (``ok`` = rows; bytes
    and retries are not kept), or None when the model ``key`` has not predicted it (or
    there is no ledger). Read-only, on a connection of its own."""
    if not Path(ledger).is_file():
        return None
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=60)
    try:
        row = db.execute(
            "SELECT rows, empty, failed FROM predicted WHERE model_key = ? AND block_id = ?", (key, int(block_id))
        ).fetchone()
    finally:
        db.close()
    return None if row is None else BlockResult(int(row[0]), int(row[1]), int(row[2]))


class PredictionTotals(NamedTuple):
    """What the ledger holds for one model: blocks, rows (fetched tiles), empty, failed,
    undecodable tiles, positives, and parts."""

    blocks: int
    rows: int
    empty: int
    failed: int
    undecodable: int
    positives: int
    parts: int


def ledger_totals(sweep_path: Path, name: str, digest: str) -> PredictionTotals | None:
    """Totals of a model's predictions in a sweep, read-only (None when there is no ledger)."""
    path = Path(sweep_path) / PREDICTIONS_DIR / LEDGER_FILE
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        key = model_key(name, digest)
        r = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(rows),0), COALESCE(SUM(empty),0), COALESCE(SUM(failed),0), "
            "COALESCE(SUM(undecodable),0), COALESCE(SUM(positives),0) FROM predicted WHERE model_key = ?", (key,)
        ).fetchone()
        (parts,) = db.execute("SELECT COUNT(*) FROM parts WHERE model_key = ?", (key,)).fetchone()
    finally:
        db.close()
    blocks, rows, empty, failed, undecodable, positives = (int(v) for v in r)
    return PredictionTotals(blocks, rows, empty, failed, undecodable, positives, int(parts))


def ledger_summary(sweep_path: Path) -> list[dict[str, object]]:
    """What each model has predicted in a sweep, read-only: ``model``, ``digest``,
    ``folder`` (under ``predictions/``), ``blocks``, ``rows``, ``positives``,
    ``undecodable`` and ``parts``; an empty list when nothing was predicted."""
    path = Path(sweep_path) / PREDICTIONS_DIR / LEDGER_FILE
    if not path.is_file():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        rows = db.execute(
            """SELECT m.name, m.digest, m.folder,
                      (SELECT COUNT(*) FROM predicted p WHERE p.model_key = m.model_key),
                      (SELECT COALESCE(SUM(rows), 0) FROM predicted p WHERE p.model_key = m.model_key),
                      (SELECT COALESCE(SUM(positives), 0) FROM predicted p WHERE p.model_key = m.model_key),
                      (SELECT COALESCE(SUM(undecodable), 0) FROM predicted p WHERE p.model_key = m.model_key),
                      (SELECT COUNT(*) FROM parts t WHERE t.model_key = m.model_key)
               FROM models m ORDER BY m.name"""
        ).fetchall()
    finally:
        db.close()
    keys = ("model", "digest", "folder", "blocks", "rows", "positives", "undecodable", "parts")
    return [dict(zip(keys, r)) for r in rows]


class Reconciliation(NamedTuple):
    """A model's ledger against the fetch queue: ``blocks`` predicted, ``rows`` written,
    ``fetched`` OK tiles the queue recorded for those blocks, ``done_blocks`` in the queue,
    and ``mismatched`` predicted blocks whose rows / empty / failed differ from the queue's."""

    blocks: int
    rows: int
    fetched: int
    done_blocks: int
    mismatched: int

    @property
    def message(self) -> str | None:
        if self.mismatched or self.rows != self.fetched:
            return (f"{self.mismatched} predicted blocks disagree with the fetch queue: "
                    f"{self.rows:,} prediction rows for {self.fetched:,} fetched tiles")
        return None


def reconcile(sweep_path: Path, queue: Queue, name: str, digest: str) -> Reconciliation:
    """Check a model's predictions against the fetch results, block by block (read-only):
    the ledger and the queue's done blocks are both read in block id order and merged, so
    memory does not grow with the number of blocks."""
    ledger = Path(sweep_path) / PREDICTIONS_DIR / LEDGER_FILE
    done_results = queue.results()
    if not ledger.is_file():
        return Reconciliation(0, 0, 0, sum(1 for _ in done_results), 0)
    blocks = rows = fetched = done = mismatched = 0
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        cur = db.execute(
            "SELECT block_id, rows, empty, failed FROM predicted WHERE model_key = ? ORDER BY block_id",
            (model_key(name, digest),),
        )
        head = next(done_results, None)
        for bid, n_rows, n_empty, n_failed in cur:
            while head is not None and head[0] < bid:  # done, not predicted by this model
                done += 1
                head = next(done_results, None)
            blocks += 1
            rows += int(n_rows)
            r = None  # not done, or done without results
            if head is not None and head[0] == bid:
                r = head[1]
                done += 1
                head = next(done_results, None)
            if r is None:
                mismatched += 1
                continue
            fetched += int(r.ok)
            mismatched += int((n_rows, n_empty, n_failed) != (r.ok, r.empty, r.failed))
        while head is not None:
            done += 1
            head = next(done_results, None)
    finally:
        db.close()
    return Reconciliation(blocks, rows, fetched, done, mismatched)


class Dropped(NamedTuple):
    """What :func:`drop_predictions` removed: the models (name, folder), their predicted
    blocks and their part files."""

    models: list[tuple[str, str]]
    blocks: int
    parts: int


def drop_predictions(sweep_path: Path, model: str) -> Dropped:
    """Drop every prediction of the model named ``model`` (its name as `status` shows it,
    or its folder under ``predictions/``), so that the next `predict` / `run` does its
    blocks again. :class:`UsageError` naming ``model`` when the ledger has no such model.

    Durable and safe against a crash at any instant: under the prediction lock (no writer
    runs), the part files are deleted first (a crash then leaves ledger rows naming gone
    parts, which the next open forgets, so those blocks are predicted again), then the
    model's ledger rows go in one transaction, then its folder."""
    root = Path(sweep_path) / PREDICTIONS_DIR
    ledger = root / LEDGER_FILE
    if not ledger.is_file():
        raise UsageError(f"sweep {str(sweep_path)!r} has no predictions; nothing to drop for model {model!r}")
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{_lock_holder(fd)} is writing predictions of {str(sweep_path)!r}; wait for it or stop it") from None
        db = sqlite3.connect(ledger, isolation_level=None, timeout=60)
        try:
            found = db.execute("SELECT model_key, name, folder FROM models WHERE name = ? OR folder = ?", (model, model)).fetchall()
            if not found:
                known = ", ".join(sorted({r[0] for r in db.execute("SELECT name FROM models")})) or "none"
                raise UsageError(f"model {model!r} has no predictions in {str(sweep_path)!r} (models there: {known})")
            blocks = parts = 0
            for key, _, folder in found:
                for (name,) in db.execute("SELECT name FROM parts WHERE model_key = ?", (key,)).fetchall():
                    (root / name).unlink(missing_ok=True)
                    parts += 1
                for stray in (root / folder).glob("part-*.parquet"):  # orphans: they would be adopted back
                    stray.unlink()
                if (root / folder).is_dir():
                    fsync_dir(root / folder)
            with _txn(db):
                for key, _, _ in found:
                    (n,) = db.execute("SELECT COUNT(*) FROM predicted WHERE model_key = ?", (key,)).fetchone()
                    blocks += int(n)
                    db.execute("DELETE FROM predicted WHERE model_key = ?", (key,))
                    db.execute("DELETE FROM parts WHERE model_key = ?", (key,))
                    db.execute("DELETE FROM models WHERE model_key = ?", (key,))
            for _, _, folder in found:
                d = root / folder
                if d.is_dir():
                    for f in d.glob("*.partial"):
                        f.unlink()
                    if not any(d.iterdir()):
                        d.rmdir()
            fsync_dir(root)
        finally:
            db.close()
    finally:
        os.close(fd)
    return Dropped([(r[1], r[2]) for r in found], blocks, parts)
