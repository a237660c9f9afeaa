"""SQL over a sweep, and over any CSV / Parquet / JSON file, out of core (DuckDB).

:func:`connect` opens a DuckDB connection with the settings every query here runs under:
extensions are never installed or loaded behind the user's back (DuckDB does both by
default, which needs the network), a memory limit, a thread count and a private spill
folder. :func:`query` runs SQL and returns a lazy :class:`duckdb.DuckDBPyRelation`
(``.df()``, ``.pl()``, ``.arrow()``, ``.fetchmany()``, ``.write_parquet()`` ...).

With a sweep, four names are defined (built when a query first names them, so a query of
``predictions`` never reads the store):

``predictions``  every model's Parquet parts (the ledger's list), ``union_by_name``: one row
                 per fetched tile per model, with its ``model`` column (docs/predict.md)
``tiles``        the store's index: z, x, y, block, status ('ok' | 'empty' | 'failed'), bytes
``blocks``       the queue: block (its id), z, x, y, tiles, state, attempts, last_error,
                 owner, lease_until, done_at, ok, empty, failed, bytes, retries
``plan``         the planned tiles: z, x, y, block

``tiles``, ``blocks`` and ``plan`` are streamed from the shards and the queue (read-only,
through Python's sqlite3: no DuckDB extension) into temporary DuckDB tables, which spill to
disk under the memory limit like any other DuckDB data.

Without a sweep, DuckDB's own file scans apply: ``FROM 'trips*.csv'``,
``FROM read_parquet('p/*.parquet')``, ``FROM 'x.json'``.

Errors (bad SQL, an unknown table or column, a missing file, a memory limit too small for
the query) become :class:`tilesweep.errors.UsageError` with DuckDB's first line.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sqlite3
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, TypedDict

from .errors import UsageError

if TYPE_CHECKING:
    import duckdb
    import numpy as np
    import pyarrow as pa

    from .sweep import Sweep

# numpy and pyarrow are imported by the functions that use them: `tilesweep query -o`
# and `tilesweep convert` need neither (DuckDB writes the file). DuckDB too: `tilesweep
# status` reads the ledger's models (models()) and needs no DuckDB (~0.1 s a start).

DUCKDB_CONFIG = {
    "autoinstall_known_extensions": "false",
    "autoload_known_extensions": "false",
}
"""Settings every connection opens with: no extension is downloaded or loaded on demand."""

SWEEP_TABLES = ("predictions", "tiles", "blocks", "plan")
BATCH_ROWS = 65_536
_STATES = {0: "pending", 1: "leased", 2: "done", 3: "dead"}
_TILE_STATUS = ("ok", "empty", "failed")  # pa.array() of it imports pandas: made when used
_MISSING_TABLE = re.compile(r"Table with name (\S+) does not exist", re.IGNORECASE)


def connect(memory_limit: str | None = None, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection: extensions off, ``memory_limit`` (e.g. ``"2GB"``;
    default DuckDB's, 80% of RAM or of the cgroup's limit), ``threads`` (default: all
    cores), spilling to a private temporary folder removed with the connection."""
    import duckdb

    if threads is not None and not 1 <= int(threads) <= 1024:
        raise UsageError(f"threads {threads} must be in 1..1024")
    spill = tempfile.mkdtemp(prefix="tilesweep-duckdb-")
    config: dict[str, str | bool | int | float | list[str]] = {**DUCKDB_CONFIG, "temp_directory": spill}
    try:
        con = duckdb.connect(":memory:", config=config)
    except duckdb.Error as exc:  # pragma: no cover - a broken DuckDB install
        shutil.rmtree(spill, ignore_errors=True)
        raise UsageError(f"DuckDB cannot start: {_first_line(exc)}") from None
    weakref.finalize(con, shutil.rmtree, spill, True)
    try:
        if memory_limit is not None:
            if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]?i?B\s*", str(memory_limit), re.IGNORECASE):
                raise UsageError(f"memory limit {memory_limit!r} is not a size like 2GB or 512MB")
            con.execute(f"SET memory_limit = '{memory_limit}'")
        if threads is not None:
            con.execute(f"SET threads = {int(threads)}")
    except duckdb.Error as exc:
        con.close()
        raise UsageError(f"memory limit {memory_limit!r}: {_first_line(exc)}") from None
    con.execute("SET preserve_insertion_order = false")
    try:  # tracked for query_progress(), never printed (in Jupyter DuckDB wants ipywidgets for it)
        con.execute("SET enable_progress_bar_print = false")
        con.execute("SET enable_progress_bar = true")
    except duckdb.Error:
        pass
    return con


def query(
    sql: str,
    sweep: "Sweep | str | os.PathLike[str] | None" = None,
    *,
    memory_limit: str | None = None,
    threads: int | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> duckdb.DuckDBPyRelation:
    """Run ``sql`` and return its lazy relation. With ``sweep`` (a :class:`Sweep` or its
    folder), the names ``predictions``, ``tiles``, ``blocks`` and ``plan`` are defined
    (module doc). Raises :class:`UsageError` for bad SQL, unknown names, missing files."""
    con = con if con is not None else connect(memory_limit, threads)
    tables = SweepTables(con, _open_sweep(sweep)) if sweep is not None else None
    return run(con, sql, tables)


def run(con: duckdb.DuckDBPyConnection, sql: str, tables: "SweepTables | None" = None) -> duckdb.DuckDBPyRelation:
    """``con.sql(sql)`` that builds the sweep's tables a query names on first use and turns
    DuckDB errors into :class:`UsageError`. A statement that returns no rows (``SET``,
    ``CREATE``) returns an empty relation."""
    import duckdb

    if not sql.strip():
        raise UsageError("the SQL is empty")
    for _ in range(len(SWEEP_TABLES) + 1):
        try:
            rel = con.sql(sql)
            return rel if rel is not None else con.sql("SELECT 'ok' AS result WHERE false")
        except duckdb.CatalogException as exc:
            m = _MISSING_TABLE.search(str(exc))
            name = m.group(1).strip('"').lower() if m else None
            if tables is None or name is None or not tables.build(name):
                raise _usage(exc, tables) from None
        except duckdb.Error as exc:
            raise _usage(exc, tables) from None
    raise UsageError(f"the SQL names tables that cannot be built: {sql[:80]!r}")  # pragma: no cover


def _usage(exc: Exception, tables: "SweepTables | None" = None) -> UsageError:
    import duckdb

    msg = _first_line(exc)
    if isinstance(exc, duckdb.OutOfMemoryException):
        return UsageError(f"the memory limit is too small for this query ({msg}); raise --memory-limit")
    if isinstance(exc, duckdb.CatalogException) and "does not exist" in msg:
        known = ", ".join(SWEEP_TABLES) if tables is not None else "files named in quotes, e.g. FROM 'data/*.csv'"
        msg = f"{msg.split('!')[0]} (known: {known})"
    return UsageError(msg)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def as_usage_error(exc: Exception) -> UsageError:
    """A DuckDB error raised while a relation executes (``COPY``, fetching), as one line."""
    return _usage(exc)


def _open_sweep(sweep: "Sweep | str | os.PathLike[str]") -> "Sweep":
    from .sweep import Sweep

    return sweep if isinstance(sweep, Sweep) else Sweep.open(sweep)


class SweepTables:
    """Builds a sweep's tables in a connection, each once, when first named."""

    def __init__(self, con: duckdb.DuckDBPyConnection, sweep: "Sweep") -> None:
        self.con = con
        self.sweep = sweep
        self.built: set[str] = set()
        self.build("predictions")  # a view over files: cheap, and what most queries want

    def build(self, name: str) -> bool:
        """Create ``name`` if it is one of the sweep's and not built yet; False otherwise."""
        import pyarrow as pa

        if name not in SWEEP_TABLES or name in self.built:
            return False
        if name == "predictions":
            self._view_predictions()
        else:
            schema, batches = {"tiles": tiles_batches, "blocks": blocks_batches, "plan": plan_batches}[name](self.sweep)
            reader = pa.RecordBatchReader.from_batches(schema, batches)
            self.con.register("_tilesweep_source", reader)
            try:
                self.con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM _tilesweep_source")
            finally:
                self.con.unregister("_tilesweep_source")
        self.built.add(name)
        return True

    def _view_predictions(self) -> None:
        from .predict.ledger import part_sources, winning_rows_sql

        if self.sweep.remote and self._view_remote_predictions():
            return
        # the ledger's winning rows only: a block two writers scored counts once
        body = None if self.sweep.remote else winning_rows_sql(part_sources(self.sweep.path))
        if body is None:
            body = (
                "SELECT NULL::TINYINT AS z, NULL::INTEGER AS x, NULL::INTEGER AS y, NULL::BIGINT AS block, "
                "NULL::DOUBLE AS lon, NULL::DOUBLE AS lat, NULL::BOOLEAN AS label, NULL::VARCHAR AS model, "
                "NULL::VARCHAR AS model_digest, NULL::TIMESTAMPTZ AS time WHERE false"
            )
        self.con.execute(f"CREATE TEMP VIEW predictions AS {body}")

    def _view_remote_predictions(self) -> bool:
        """``predictions`` of a sweep on object storage: the parts its ledger records (in
        the queue's schema, shared by every machine), read from the bucket through the
        storage seam as pyarrow datasets (ranged reads; DuckDB scans them lazily, with
        projections and filters pushed down, no extension). The ledger's winning rows only,
        as :func:`tilesweep.predict.ledger.winning_rows_sql`. False when nothing is recorded."""
        import pyarrow as pa
        import pyarrow.dataset as pds
        import pyarrow.parquet as pq

        from .predict.ledger import open_ledger
        from .storage import arrow_filesystem

        ledger = open_ledger(self.sweep.path)
        if ledger is None:
            return False
        try:
            recorded = ledger.parts(None)
        finally:
            ledger.close()
        storage = self.sweep.predictions_storage
        sizes = {o.key: o.size for o in storage.list("") if o.key.endswith(".parquet")}
        parts = [(name, lost) for name, lost in recorded if name in sizes]  # missing ones left out, as on disk
        if not parts:
            return False
        fs = arrow_filesystem(storage, sizes)
        schemas, seen = [], set()
        for name, _ in parts:  # one schema per model folder (its label columns): union by name
            folder = name.split("/", 1)[0]
            if folder not in seen:
                seen.add(folder)
                with storage.open_read(name) as f:
                    schemas.append(pq.read_schema(f).remove_metadata())
        schema = pa.unify_schemas(schemas)
        self._datasets = []  # DuckDB scans them lazily: they must outlive this call
        selects = []
        clean = [name for name, lost in parts if not lost]
        groups = ([(clean, ())] if clean else []) + [([name], lost) for name, lost in parts if lost]
        for i, (names, lost) in enumerate(groups):
            ds = pds.dataset(names, schema=schema, format="parquet", filesystem=fs)
            self._datasets.append(ds)
            self.con.register(f"_tilesweep_parts_{i}", ds)
            where = f" WHERE block NOT IN ({', '.join(str(int(b)) for b in lost)})" if lost else ""
            selects.append(f"SELECT * FROM _tilesweep_parts_{i}{where}")
        self.con.execute(f"CREATE TEMP VIEW predictions AS {' UNION ALL '.join(selects)}")
        return True


# --- the sources of the tables -----------------------------------------------------------


def prediction_parts(sweep_path: Path) -> list[Path]:
    """The Parquet parts the ledger records, every model (read-only); [] without a ledger.
    A part may hold rows of blocks another part won: read them through
    :func:`tilesweep.predict.ledger.part_sources` (the ``predictions`` view does)."""
    from .predict.ledger import part_sources

    return [p.path for p in part_sources(sweep_path)]


class LedgerModel(TypedDict):
    """One model of a sweep's prediction ledger (see :func:`models`)."""

    name: str
    digest: str
    folder: str
    labels: list[str]
    threshold: float


def models(sweep_path: "Path | Sweep") -> list[LedgerModel]:
    """The models of a sweep's ledger: name, digest, folder, labels (list), threshold. A
    :class:`Sweep` may be passed (one on object storage: its ledger is the queue's)."""
    from .predict.ledger import model_rows
    from .sweep import Sweep

    rows = model_rows(sweep_path.path if isinstance(sweep_path, Sweep) else sweep_path)
    return [
        LedgerModel(name=n, digest=d, folder=f, labels=[x for x in str(lb).split(",") if x], threshold=float(t))
        for _, n, d, f, lb, t in rows
    ]


@functools.cache
def _schema(name: str) -> pa.Schema:
    """The Arrow schema of the ``tiles``, ``plan`` or ``blocks`` table (also the module
    attributes TILES_SCHEMA, PLAN_SCHEMA, BLOCKS_SCHEMA)."""
    import pyarrow as pa

    cols: list[tuple[str, pa.DataType]]
    if name == "tiles":
        cols = [("z", pa.int8()), ("x", pa.int32()), ("y", pa.int32()), ("block", pa.int64()),
                ("status", pa.string()), ("bytes", pa.int64())]
    elif name == "plan":
        cols = [("z", pa.int8()), ("x", pa.int32()), ("y", pa.int32()), ("block", pa.int64())]
    else:
        cols = [
            ("block", pa.int64()), ("z", pa.int8()), ("x", pa.int32()), ("y", pa.int32()), ("tiles", pa.int32()),
            ("state", pa.string()), ("attempts", pa.int32()), ("last_error", pa.string()), ("owner", pa.string()),
            ("lease_until", pa.timestamp("ms", tz="UTC")), ("done_at", pa.timestamp("ms", tz="UTC")),
            ("ok", pa.int32()), ("empty", pa.int32()), ("failed", pa.int32()), ("bytes", pa.int64()), ("retries", pa.int32()),
        ]
    return pa.schema(cols)


def __getattr__(name: str) -> object:
    if name in ("TILES_SCHEMA", "PLAN_SCHEMA", "BLOCKS_SCHEMA"):
        return _schema(name.split("_")[0].lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiles_batches(sweep: "Sweep") -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The store's index as record batches: one shard open at a time, no tile bytes read."""
    import numpy as np

    from .store.shard import ShardReader
    from .tiles import tile_id

    store = sweep.store
    zoom = sweep.zoom

    def gen() -> Iterator[pa.RecordBatch]:
        buf: list[tuple[np.ndarray, ...]] = []
        n = 0
        for block in store.blocks():  # on object storage: a HEAD and the index's ranged reads
            with (store.open_shard(block) if store.storage is not None else ShardReader(store.shard_path(block))) as r:
                xs, ys = r.coords()
                recs = r.records
                buf.append((xs, ys, np.full(len(xs), tile_id(block), np.int64),
                            recs["status"].astype(np.int32), recs["length"].astype(np.int64)))
            n += len(xs)
            if n >= BATCH_ROWS:
                yield _tiles_batch(zoom, buf)
                buf, n = [], 0
        if buf:
            yield _tiles_batch(zoom, buf)

    return _schema("tiles"), gen()


def _tiles_batch(zoom: int, buf: list[tuple[np.ndarray, ...]]) -> pa.RecordBatch:
    import numpy as np
    import pyarrow as pa

    x, y, block, status, length = (np.concatenate([b[i] for b in buf]) for i in range(5))
    return pa.RecordBatch.from_arrays(
        [pa.array(np.full(len(x), zoom, np.int8)), pa.array(x.astype(np.int32)), pa.array(y.astype(np.int32)),
         pa.array(block), pa.array(_TILE_STATUS).take(pa.array(status)), pa.array(length)],
        schema=_schema("tiles"),
    )


def _queue_rows(sweep: "Sweep", columns: str) -> Iterator[list[tuple[Any, ...]]]:
    """The queue's ``columns`` (comma-separated record fields) of every block in id order,
    in lists of rows: read-only from the folder's SQLite file, or through the queue's
    ``records()`` on any other backend."""
    from .queue import DEFAULT_URL
    from .sweep import QUEUE_FILE

    if sweep.queue_url != DEFAULT_URL:
        names = [c.strip() for c in columns.split(",")]
        q = sweep.open_queue()
        try:
            rows: list[tuple[Any, ...]] = []
            for r in q.records():
                rec: Mapping[str, object] = r  # read by the names the caller gives
                rows.append(tuple(rec[n] for n in names))
                if len(rows) >= BATCH_ROWS // 8:
                    yield rows
                    rows = []
            if rows:
                yield rows
        finally:
            q.close()
        return
    path = sweep.path / QUEUE_FILE
    if not path.is_file():
        raise UsageError(f"sweep folder {str(sweep.path)!r} has no {QUEUE_FILE}")
    # DuckDB pulls the batches on a thread of its own.
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60, check_same_thread=False)
    try:
        cur = db.execute(f"SELECT {columns} FROM blocks ORDER BY id")
        while batch := cur.fetchmany(BATCH_ROWS // 8):
            yield batch
    finally:
        db.close()


def blocks_batches(sweep: "Sweep") -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The queue's rows as record batches, read-only, in block id order."""
    import pyarrow as pa

    sql = ("id, z, x, y, tiles, state, attempts, last_error, owner, lease_until, done_at, "
           "n_ok, n_empty, n_failed, n_bytes, n_retries")

    def gen() -> Iterator[pa.RecordBatch]:
        for rows in _queue_rows(sweep, sql):
            cols = list(zip(*rows))
            arrays = []
            for i, field in enumerate(_schema("blocks")):
                vals = list(cols[i])
                if i == 5:
                    vals = [_STATES.get(v, str(v)) for v in vals]
                elif field.name in ("lease_until", "done_at"):
                    vals = [None if v is None else int(v * 1000) for v in vals]
                    arrays.append(pa.array(vals, pa.int64()).cast(field.type))
                    continue
                arrays.append(pa.array(vals, field.type))
            yield pa.RecordBatch.from_arrays(arrays, schema=_schema("blocks"))

    return _schema("blocks"), gen()


def plan_batches(sweep: "Sweep") -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The planned tiles (every block's masked descendants) as record batches."""
    import numpy as np
    import pyarrow as pa

    zoom = sweep.zoom
    return _schema("plan"), (
        pa.RecordBatch.from_arrays(
            [pa.array(np.full(len(x), zoom, np.int8)), pa.array(x.astype(np.int32)), pa.array(y.astype(np.int32)),
             pa.array(b)], schema=_schema("plan"))
        for x, y, b in planned_tiles(sweep)
    )


def planned_tiles(sweep: "Sweep") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(x, y, block id)`` int64 arrays of the planned tiles, about BATCH_ROWS at a time,
    in block id order (read-only from the queue). Blocks may sit at several zooms
    (adaptive blocks): each one's descendants are taken at the sweep's zoom."""
    import numpy as np

    from .plan import mask_cells

    zoom = sweep.zoom
    grids: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    bs: list[np.ndarray] = []
    n = 0
    for rows in _queue_rows(sweep, "id, z, x, y, mask"):
        for bid, bz, bx, by, mask in rows:
            levels = zoom - int(bz)
            cells = mask_cells(mask, levels)  # (rows, cols) of a bit mask or tile list; None: all
            if cells is None:
                if levels not in grids:  # a whole block: small (it holds at most a block's tiles)
                    side = 1 << levels
                    dy_all, dx_all = np.divmod(np.arange(side * side, dtype=np.int64), side)
                    grids[levels] = (dx_all, dy_all)
                dx, dy = grids[levels]
            else:
                dy, dx = cells
            xs.append((int(bx) << levels) + dx)
            ys.append((int(by) << levels) + dy)
            bs.append(np.full(len(dx), int(bid), np.int64))
            n += len(dx)
            if n >= BATCH_ROWS:
                yield np.concatenate(xs), np.concatenate(ys), np.concatenate(bs)
                xs, ys, bs, n = [], [], [], 0
    if xs:
        yield np.concatenate(xs), np.concatenate(ys), np.concatenate(bs)


def stream(rel: duckdb.DuckDBPyRelation, rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The relation's result as Arrow record batches of about ``rows`` rows, streamed (the
    whole result never sits in memory; an empty result is one empty batch, with its
    schema); DuckDB errors become :class:`UsageError`."""
    import duckdb

    import pyarrow as pa

    try:
        reader = rel.to_arrow_reader(rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch(rows)
        seen = False
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                if not seen:  # an empty result still has its columns
                    yield pa.RecordBatch.from_pylist([], schema=reader.schema)
                return
            seen = True
            yield batch
    except duckdb.Error as exc:
        raise _usage(exc) from None
    except pa.ArrowException as exc:
        raise UsageError(_first_line(exc)) from None


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"

