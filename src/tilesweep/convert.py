"""CSV to typed, compressed Parquet, streamed (``tilesweep convert``).

DuckDB reads the CSV files (globs, several files concatenated by column name) and writes
one zstd Parquet file; memory stays under its limit whatever the input's size. Types are
inferred over **every row** of every file (``sample_size = -1``), not a sample: a column
that is empty for a million rows and then holds a value, or whose numbers turn into text
halfway, gets the type that fits all of it (pandas and Dask guess from the first rows and
fail later, or read such a column as float). Later queries then read only the columns
they need, decoded from compressed column chunks.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import duckdb

from .errors import UsageError
from .geoout import atomic_output, check_writable
from .sql import as_usage_error, connect, quote_literal


DEFAULT_MEMORY_LIMIT = "512MB"
"""DuckDB's memory limit for a conversion unless one is given. The limit covers DuckDB's
buffer manager only; the whole process (Python, the CSV reader's and the Parquet writer's
buffers) peaked at ~0.6 GB with it on two 1.4 GB CSVs, and at ~1.15 GB with a 1 GB limit.
A conversion streams: more memory does not make it faster."""


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion did: input files and bytes, rows, output bytes, seconds, and
    the columns with their inferred types."""

    files: int
    bytes_in: int
    rows: int
    bytes_out: int
    seconds: float
    columns: list[tuple[str, str]]


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files that ``inputs`` name (globs expanded, in sorted order within a glob);
    :class:`UsageError` for a name or glob that matches no file."""
    out: list[Path] = []
    for spec in inputs:
        text = str(spec)
        if glob.has_magic(text):
            found = sorted(p for p in glob.glob(text) if os.path.isfile(p))
            if not found:
                raise UsageError(f"no file matches {text!r}")
            out.extend(Path(p) for p in found)
        elif os.path.isfile(text):
            out.append(Path(text))
        else:
            raise UsageError(f"input {text!r} does not exist" if not os.path.exists(text) else f"input {text!r} is not a file")
    if not out:
        raise UsageError("convert needs at least one input CSV file")
    return out


def csv_source(files: Sequence[Path], types: Sequence[tuple[str, str]] | None = None) -> str:
    """The DuckDB table expression that reads ``files`` as one table, types inferred over
    all rows; with ``types`` (name, type) those types, inferred before (the dialect is
    then sniffed from a sample: one pass over the files instead of two)."""
    names = ", ".join(quote_literal(str(f)) for f in files)
    if types is None:
        return f"read_csv([{names}], union_by_name = true, sample_size = -1)"
    typed = ", ".join(f"{quote_literal(n)}: {quote_literal(t)}" for n, t in types)
    return f"read_csv([{names}], union_by_name = true, types = {{{typed}}})"


def convert(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    memory_limit: str | None = None,
    threads: int | None = None,
    row_group_size: int = 1_000_000,
    on_progress: Callable[[float], None] | None = None,
) -> ConvertReport:
    """Convert CSV ``inputs`` to one Parquet file ``output`` (written to a temporary name
    and renamed at the end). ``memory_limit`` defaults to :data:`DEFAULT_MEMORY_LIMIT`.
    ``on_progress`` gets DuckDB's progress, 0..100, a few times a second."""
    out = Path(output)
    if out.suffix.lower() != ".parquet":
        raise UsageError(f"output {str(out)!r} must end in .parquet")
    files = expand_inputs(inputs)
    if any(f.resolve() == out.resolve() for f in files):
        raise UsageError(f"output {str(out)!r} is also an input")
    check_writable(out)
    if row_group_size < 1:
        raise UsageError(f"row group size {row_group_size} must be >= 1")
    con = connect(DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit, threads)
    started = time.perf_counter()
    try:
        try:  # binding sniffs the types, over all rows, once; the write is given them (else
            # it would sniff every row again: three passes over the input instead of two)
            rel = con.sql(f"SELECT * FROM {csv_source(files)}")
            columns = [(str(n), str(t)) for n, t in zip(rel.columns, rel.types)]
            rel = con.sql(f"SELECT * FROM {csv_source(files, columns)}")
        except duckdb.Error as exc:
            raise as_usage_error(exc) from None
        with atomic_output(out) as tmp:
            _run_with_progress(con, lambda: rel.to_parquet(str(tmp), compression="zstd", row_group_size=int(row_group_size)),
                               on_progress)
        row = con.execute("SELECT sum(num_rows) FROM parquet_file_metadata(?)", [str(out)]).fetchone()
        rows = int(row[0] or 0) if row is not None else 0
    finally:
        con.close()
    return ConvertReport(len(files), sum(f.stat().st_size for f in files), rows, out.stat().st_size,
                         time.perf_counter() - started, columns)


def _run_with_progress(con: duckdb.DuckDBPyConnection, write: Callable[[], object], on_progress: Callable[[float], None] | None) -> None:
    result: dict[str, BaseException] = {}

    def work() -> None:
        try:
            write()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            result["error"] = exc

    t = threading.Thread(target=work, name="tilesweep-convert", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.25)
            if on_progress is not None and t.is_alive():
                try:
                    p = float(con.query_progress())
                except duckdb.Error:
                    p = -1.0
                if p >= 0:
                    on_progress(min(100.0, p))
    except KeyboardInterrupt:
        con.interrupt()
        t.join()
        raise
    error = result.get("error")
    if isinstance(error, duckdb.Error):
        raise as_usage_error(error)
    if error is not None:
        raise error
    if on_progress is not None:
        on_progress(100.0)
