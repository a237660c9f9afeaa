"""The prediction sink: Parquet parts with group commit, and the ledger of predicted blocks.

Layout under ``SWEEP/predictions/``::

    ledger.sqlite                 which blocks are predicted, by which model, in which part
                                  (beside a SQLite queue; a PostgreSQL queue's schema holds it)
    .lock                         flock: every writer holds it shared, ``drop`` alone
    {model-slug}/part-*.parquet   rows of many blocks, one row per fetched (OK) tile
    {model-slug}/*.partial        a part being written (deleted by the next writer alone)

**Group commit.** :meth:`PredictionSink.add` buffers the rows of whole blocks; when the
buffer holds ``part_rows`` rows (or ``part_seconds`` passed) :meth:`commit` writes them
as one part, published through the storage seam (:mod:`tilesweep.storage`: temp file,
fsync, atomic create-if-absent rename, fsync of the folder); then it records the part and
all its blocks in the ledger (the commit record, :mod:`.ledger`) in one transaction. A
block is *predicted* iff the ledger says so.

**Many writers.** Any number of sinks may write one sweep and model at once (``run``
processes, ``run --dask``'s tasks): part names are unique, and the ledger arbitrates a
block that two of them scored: the first record wins it, the later part's rows of it are
*lost* and skipped by every reader (:func:`.ledger.part_sources`). Both writers report
the block durable, so both runners ack it.

**Crash argument.** A crash before the rename leaves a ``.partial`` file: deleted by the
next writer that opens with no other beside it (others' staging files are live); its
blocks are not in the ledger, so they are predicted again. A crash after the rename but
before the ledger commit leaves an *orphan* part: complete (it was renamed only after
fsync) and self-describing (its Parquet key-value metadata lists its blocks with their
counts). The next open **adopts** it with the same arbitrated record (idempotent: adopting
the part of a live writer between its publish and its record is safe); an orphan that wins
no rows is deleted. Every block's winning rows are in the one part its ledger row names:
no duplicates, no missing rows, in what readers see. A part the ledger names but that is
gone from disk (deleted by hand) is forgotten, and its blocks are predicted again.

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._arrow import from_numpy, repeated_string
from ..durable import fsync_dir
from ..errors import UsageError
from ..block import BlockResult
from ..queue import Queue, State
from ..storage import LocalStorage, Storage, StorageError
from ..tiles import centres_array as centres  # noqa: F401 - re-exported: tile math lives in tilesweep.tiles
from ..tiles import points_array as tile_points
from .ledger import LEDGER_FILE as LEDGER_FILE, Ledger, open_ledger
from .ledger import ledger_summary as ledger_summary  # re-exported: its home before
from .ledger import PREDICTIONS_DIR as PREDICTIONS_DIR  # defined there: reading the ledger imports no Arrow

LOCK_FILE = ".lock"
PART_FORMAT = 1
META_KEY = b"tilesweep.predictions"
BASE_COLUMNS = ("z", "x", "y", "block", "lon", "lat", "label", "model", "model_digest", "time")

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
    lost_blocks: int = 0  # blocks this writer scored that another writer had recorded first
    skipped_parts: int = 0  # unknown parts left alone at open: unreadable now, or another model's
    busy_s: float = 0.0


class PredictionSink:
    """Group-committed prediction parts of one model in one sweep (see the module doc).

    Opening takes the sweep's prediction lock shared (any number of writers run at once;
    ``drop`` takes it alone) and recovers from a crash of an earlier writer. ``labels``/``threshold`` describe the
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
        positions: Iterable[str] = (),
    ) -> None:
        self.labels = tuple(labels)
        self.positions = tuple(positions)
        clash = [lb for lb in self.labels if lb in BASE_COLUMNS]
        if clash or len(set(self.labels)) != len(self.labels):
            raise UsageError(f"model {model_name}: label names {self.labels} clash with prediction columns {BASE_COLUMNS} or repeat")
        self.position_columns = tuple(f"{lb}_{c}" for lb in self.positions for c in ("lon", "lat"))
        taken = [c for c in self.position_columns if c in BASE_COLUMNS or c in self.labels]
        if taken or any(lb not in self.labels for lb in self.positions):
            raise UsageError(f"model {model_name}: positions {self.positions} must be labels, and {taken} clash with its columns")
        if part_rows < 1:
            raise UsageError(f"part rows {part_rows} must be >= 1")
        self.root = Path(sweep_path) / PREDICTIONS_DIR
        self.zoom = int(zoom)
        self.model_name = model_name
        self.digest = digest
        self.key = model_key(model_name, digest)
        self.folder_name = model_folder(model_name, digest)
        self.folder = self.root / self.folder_name
        # parts are its objects, keyed "{folder}/part-*.parquet" (a sweep's storage seam, or its folder)
        self.storage: Storage = storage if storage is not None else LocalStorage(self.root)
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
        # Many writers (module doc): each holds the lock shared; `drop` takes it alone. The
        # first writer to find none beside it also clears the staging files of dead ones.
        self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._alone = True
        except BlockingIOError:
            self._alone = False
        if not self._alone:  # waits only while another writer recovers, or a `drop` runs
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        _claim_lock(self._lock_fd, holder)
        try:  # beside the queue: the SQLite file here, or the queue's PostgreSQL schema
            ledger = open_ledger(sweep_path, write=True)
        except BaseException:
            os.close(self._lock_fd)
            raise
        assert ledger is not None
        self.ledger: Ledger = ledger
        self.ledger.add_model(self.key, model_name, digest, self.folder_name, self.labels, self.threshold)
        fields: list[tuple[str, pa.DataType]] = [
            ("z", pa.int8()), ("x", pa.int32()), ("y", pa.int32()), ("block", pa.int64()),
            ("lon", pa.float64()), ("lat", pa.float64()),
        ]
        fields += [(lb, pa.float32()) for lb in self.labels]
        fields += [(c, pa.float64()) for c in self.position_columns]  # where in the tile (model.base: Positions)
        fields += [("label", pa.bool_()), ("model", pa.string()), ("model_digest", pa.string()),
                   ("time", pa.timestamp("ms", tz="UTC"))]
        self._schema = pa.schema(fields)
        self.recover()
        if self._alone:  # writers beside us from here on
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    # --- reading the ledger ---------------------------------------------------------------

    def predicted_ids(self) -> set[int]:
        """Ids of the blocks this model has predicted (durably)."""
        return self.ledger.predicted_ids(self.key)

    def block_result(self, block_id: int) -> BlockResult | None:
        """:func:`ledger_block_result` of this sink's model (safe from any thread)."""
        return ledger_block_result(self.root / LEDGER_FILE, self.key, block_id)

    # --- recovery -------------------------------------------------------------------------

    def recover(self) -> None:
        """Delete temp files (only with no other writer running: theirs are live), adopt
        orphan parts, forget parts that are gone (module doc)."""
        if self._alone:
            for stale in self.folder.glob("*.partial"):
                stale.unlink()
        known = self.ledger.part_names(self.key)
        on_disk = {o.key: o.size for o in self.storage.list(f"{self.folder_name}/part-") if o.key.endswith(".parquet")}
        gone = known - on_disk.keys()
        if gone:
            self.ledger.forget(self.key, gone)
            self.stats.forgotten_parts += len(gone)
        for name in sorted(on_disk.keys() - known):
            try:
                with self.storage.open_read(name) as f:
                    schema = pq.read_schema(f)
            except (OSError, StorageError):  # the store did not answer (a 503, a timeout), or it went
                self.stats.skipped_parts += 1  # away: never delete what may be a live writer's part;
                continue                       # the next open tries it again
            except Exception:  # noqa: BLE001 - read whole but not Parquet: a published part is whole, so foreign
                self._delete_part(name)
                self.stats.deleted_orphans += 1
                continue
            try:
                meta = json.loads((schema.metadata or {})[META_KEY])
                part_key = meta["model_key"]
                blocks = {int(k): v for k, v in meta["blocks"].items()}
                rows = int(meta["rows"])
            except (KeyError, TypeError, ValueError, AttributeError):  # a Parquet file that is no part of ours
                self._delete_part(name)
                self.stats.deleted_orphans += 1
                continue
            if part_key != self.key:  # another model whose folder slug is the same: its part, not ours
                self.stats.skipped_parts += 1
                continue
            # An orphan of a dead writer, or the part of a live one between its publish and
            # its record: recording is idempotent, so adopting either is safe.
            if self.ledger.record(self.key, name, rows, on_disk[name], blocks, adopted=True).kept:
                self.stats.adopted_parts += 1
            else:  # every block of it was predicted already
                self._delete_part(name)
                self.stats.deleted_orphans += 1

    def _delete_part(self, name: str) -> None:
        try:
            self.storage.delete(name)
        except FileNotFoundError:
            pass
        local = self.storage.local_path(name)
        if local is not None:
            fsync_dir(local.parent)

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

    def commit(self) -> "Durable":
        """Write the buffered blocks as one part and record them, in that order. Returns
        the ids of the blocks now durable (a :class:`Durable`: for the blocks another
        writer recorded first, also the counts the ledger kept, the winner's)."""
        if not self._buffer:
            return Durable()
        t0 = time.perf_counter()
        buf, self._buffer, self._buffered_rows, self._first_at = self._buffer, [], 0, None
        self._commits += 1
        blocks: dict[int, list[int]] = {}
        for b in buf:
            sc = b.scores[:, : len(self.labels)]  # then any positions
            valid = ~np.isnan(sc).any(axis=1) if len(b.x) else np.zeros(0, bool)
            pos = int(np.sum((sc[valid] >= self.threshold).any(axis=1))) if len(b.x) else 0
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
        rec = self.ledger.record(self.key, name, rows, size, blocks, adopted=False)
        if name is not None and not rec.kept:  # another writer predicted all of them first
            self._delete_part(name)
            name, size = None, 0
        s = self.stats
        s.lost_blocks += len(rec.lost)
        blocks = {b: blocks[b] for b in rec.won}  # the stats count what this writer's rows won
        rows = sum(v[0] for v in blocks.values())
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
        out = Durable([*rec.won, *rec.lost])  # all durable: predicted, by this writer or another
        for lost in rec.lost:  # the ledger keeps the first record's counts: those are what the queue acks
            got = self.block_result(lost)  # the Ledger protocol has no block_result: read it as done_result does
            if got is not None:
                out.winners[int(lost)] = (got.ok, got.empty, got.failed)
        return out

    def _table(self, buf: list[BlockRows]) -> pa.Table:
        x = np.concatenate([b.x for b in buf]).astype(np.int32)
        y = np.concatenate([b.y for b in buf]).astype(np.int32)
        scores = np.concatenate([b.scores for b in buf]).astype(np.float32)
        block = np.concatenate([np.full(len(b.x), b.block_id, np.int64) for b in buf])
        at = np.concatenate([np.full(len(b.x), int(b.at * 1000), np.int64) for b in buf])
        lon, lat = centres(self.zoom, x, y)
        c = len(self.labels)
        where, scores = scores[:, c:], scores[:, :c]
        invalid = np.asarray(np.isnan(scores).any(axis=1))
        n = len(x)
        # from numpy buffers, not pa.array(): that imports pandas where it is installed (tilesweep._arrow)
        cols: list[pa.Array[Any]] = [
            from_numpy(np.full(n, self.zoom, np.int8)), from_numpy(x), from_numpy(y), from_numpy(block),
            from_numpy(lon), from_numpy(lat),
        ]
        for i in range(len(self.labels)):
            cols.append(from_numpy(scores[:, i], mask=invalid))
        for k in range(len(self.positions)):  # fractions of the tile -> degrees
            plon, plat = tile_points(self.zoom, x, y, where[:, 2 * k], where[:, 2 * k + 1])
            cols += [from_numpy(plon, mask=invalid), from_numpy(plat, mask=invalid)]
        cols += [
            from_numpy(np.asarray((scores >= self.threshold).any(axis=1)), mask=invalid),
            repeated_string(self.model_name, n),
            repeated_string(self.digest, n),
            from_numpy(at, pa.timestamp("ms", tz="UTC")),
        ]
        return pa.Table.from_arrays(cols, schema=self._schema)

    def close(self) -> None:
        """Close the ledger and release the lock (buffered, uncommitted rows are dropped:
        their blocks are not predicted and will be done again)."""
        self._buffer = []
        try:
            self.ledger.close()
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


class Durable(list[int]):
    """The ids of blocks a commit made durable (a list), with ``winners``: for the blocks
    another writer recorded first, the ledger's ``(rows, empty, failed)`` of that record
    (the runner acks those counts, not its own fetch's)."""

    def __init__(self, ids: Iterable[int] = ()) -> None:
        super().__init__(ids)
        self.winners: dict[int, tuple[int, int, int]] = {}


def ledger_block_result(ledger: Path, key: str, block_id: int) -> BlockResult | None:
    """A predicted block's counts as the fetch queue records them (``ok`` = rows; bytes
    and retries are not kept), or None when the model ``key`` has not predicted it (or
    there is no ledger). ``ledger``: the sweep's ``predictions/ledger.sqlite`` path (the
    sweep's ledger is found from it, wherever it lives). Read-only, on one cached reader
    connection per process and sweep (thread-safe: calls take turns on it), reopened after
    a failure; a PostgreSQL server that is unreachable (a restart) is retried for up to
    ``PostgresLedger.reconnect_s`` seconds (60), as the writer's operations are, before
    its :class:`UsageError`."""
    from .ledger import PostgresLedger

    sweep = Path(ledger).parent.parent
    deadline = time.monotonic() + PostgresLedger.reconnect_s
    delay = 0.05
    with _readers_lock:
        while True:
            try:
                db = _cached_reader(sweep)
                if db is None:
                    return None
                row = db.block_result(key, block_id)
                break
            except Exception as exc:
                _drop_reader(sweep)  # reopened on the next try or call
                if (_readers_kind.get(_reader_key(sweep)) != "postgresql" or not _transient(exc)
                        or time.monotonic() >= deadline):
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    return None if row is None else BlockResult(*row)


# ledger_block_result's readers: (pid, sweep) -> (which ledger it reads, its connection);
# the pid keeps a forked child off its parent's connection
_readers_lock = threading.Lock()
_readers: dict[tuple[int, str], tuple[str, Any]] = {}
_readers_kind: dict[tuple[int, str], str] = {}  # the sweep's queue kind, once read
_MAX_READERS = 4


def _reset_readers_lock() -> None:  # a fork while another thread held it: the child's is free
    global _readers_lock
    _readers_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_readers_lock)


def _reader_key(sweep: Path) -> tuple[int, str]:
    return os.getpid(), str(sweep)


def _cached_reader(sweep: Path) -> Any:
    """The cached read-only ledger of ``sweep`` (opened on first use; None while nothing
    was predicted, not cached). A PostgreSQL sweep's not yet migrated ``ledger.sqlite`` is
    read until a writer migrates it, then the schema's tables."""
    from .ledger import _queue_url

    k = _reader_key(sweep)
    if k not in _readers_kind:
        if len(_readers_kind) >= 64:
            _readers_kind.clear()
        _readers_kind[k] = str(_queue_url(sweep).kind)
    try:  # the file's inode: a ledger.sqlite replaced or removed is reopened
        which = f"file:{(sweep / PREDICTIONS_DIR / LEDGER_FILE).stat().st_ino}"
    except FileNotFoundError:
        which = "postgresql" if _readers_kind[k] == "postgresql" else "none"
    got = _readers.get(k)
    if got is not None and got[0] == which:
        return got[1]
    _drop_reader(sweep)
    db = open_ledger(sweep)
    if db is not None:
        while len(_readers) >= _MAX_READERS:  # a process reads one sweep or a few: the oldest go
            oldest = next(iter(_readers))
            _drop_reader(Path(oldest[1]), oldest)
        _readers[k] = (which, db)
    return db


def _drop_reader(sweep: Path, key: tuple[int, str] | None = None) -> None:
    """Forget the cached reader of ``sweep`` (or of ``key``), closing it when it is this
    process's (a forked child leaves its parent's connection alone)."""
    k = _reader_key(sweep) if key is None else key
    got = _readers.pop(k, None)
    if got is not None and k[0] == os.getpid():
        try:
            got[1].close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass


def _transient(exc: BaseException) -> bool:
    """A PostgreSQL failure worth retrying: a lost connection, a refused one (the
    :class:`UsageError` of a connect), a rolled-back transaction."""
    try:
        import psycopg
    except ImportError:
        return False
    if isinstance(exc, UsageError):  # a reader's one-line error: transient when its cause is, or a refused connect
        return exc.__cause__ is None or isinstance(exc.__cause__, psycopg.OperationalError)
    return isinstance(exc, psycopg.OperationalError)


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
    db = open_ledger(sweep_path)
    if db is None:
        return None
    try:
        return PredictionTotals(*db.totals(model_key(name, digest)))
    finally:
        db.close()


class Reconciliation(NamedTuple):
    """A model's ledger against the fetch queue: ``blocks`` predicted, ``rows`` written,
    ``fetched`` OK tiles the queue recorded for those blocks, ``done_blocks`` in the queue,
    and ``mismatched`` predicted blocks whose rows / empty / failed differ from the queue's.
    ``in_flight``: blocks the ledger holds that are still leased in the queue (another
    writer recorded them and has not acked yet, or will ack them on its next flush); they
    are in none of the other counts."""

    blocks: int
    rows: int
    fetched: int
    done_blocks: int
    mismatched: int
    in_flight: int = 0

    @property
    def message(self) -> str | None:
        if self.mismatched or self.rows != self.fetched:
            return (f"{self.mismatched} predicted blocks disagree with the fetch queue: "
                    f"{self.rows:,} prediction rows for {self.fetched:,} fetched tiles")
        return None


def reconcile(sweep_path: Path, queue: Queue, name: str, digest: str) -> Reconciliation:
    """Check a model's predictions against the fetch results, block by block (read-only):
    the ledger and the queue's done blocks are both read in block id order and merged, so
    memory does not grow with the number of blocks.

    With many writers (two `run`s, Dask tasks), a block another writer has recorded but
    not yet acked is still leased in the queue: it is counted ``in_flight``, not as a
    mismatch. A recorded block that is pending or dead stays a mismatch (its next lease
    acks it from the ledger)."""
    done_results = queue.results()
    db = open_ledger(sweep_path)
    if db is None:
        return Reconciliation(0, 0, 0, sum(1 for _ in done_results), 0)
    blocks = rows = fetched = done = mismatched = in_flight = 0
    try:
        head = next(done_results, None)
        for bid, n_rows, n_empty, n_failed in db.predicted_rows(model_key(name, digest)):
            while head is not None and head[0] < bid:  # done, not predicted by this model
                done += 1
                head = next(done_results, None)
            r = None  # not done, or done without results
            is_done = head is not None and head[0] == bid
            if is_done:
                assert head is not None
                r = head[1]
                done += 1
                head = next(done_results, None)
            else:
                record = queue.get(bid)  # rare: only blocks recorded and not done
                if record is not None and record["state"] == State.LEASED:
                    in_flight += 1
                    continue
            blocks += 1
            rows += int(n_rows)
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
    return Reconciliation(blocks, rows, fetched, done, mismatched, in_flight)


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
    probe = open_ledger(sweep_path)
    if probe is not None:
        probe.close()
    if probe is None or not root.is_dir():
        raise UsageError(f"sweep {str(sweep_path)!r} has no predictions; nothing to drop for model {model!r}")
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{_lock_holder(fd)} is writing predictions of {str(sweep_path)!r}; wait for it or stop it") from None
        db = open_ledger(sweep_path, write=True)
        assert db is not None
        try:
            if not getattr(db, "alone", lambda: True)():  # PostgreSQL: writers on other machines hold its lock
                raise UsageError(f"a writer on another machine is writing predictions of {str(sweep_path)!r}; "
                                 "wait for it or stop it")
            models = db.models()
            found = [(k, n, f) for k, n, _, f, _, _ in models if model in (n, f)]
            if not found:
                known = ", ".join(sorted({m[1] for m in models})) or "none"
                raise UsageError(f"model {model!r} has no predictions in {str(sweep_path)!r} (models there: {known})")
            parts = 0
            for key, _, folder in found:
                for name in db.part_names(key):
                    (root / name).unlink(missing_ok=True)
                    parts += 1
                for stray in (root / folder).glob("part-*.parquet"):  # orphans: they would be adopted back
                    stray.unlink()
                if (root / folder).is_dir():
                    fsync_dir(root / folder)
            blocks = db.drop([k for k, _, _ in found])
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
