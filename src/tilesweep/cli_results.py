"""The results commands of ``tilesweep``: query, convert, detections, summarize.

Registered on the main app by :func:`register` (one line in :mod:`tilesweep.cli`). Bad
input raises :class:`tilesweep.errors.UsageError` (one line, exit 2) before any output
file exists; outputs are written to a temporary name and renamed when whole.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console

from .errors import UsageError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

out = Console()
err = Console(stderr=True)

MEMORY_HELP = "DuckDB memory limit, e.g. 2GB (default: 80% of RAM or of the cgroup's limit); spills to disk beyond it."
THREADS_HELP = "DuckDB threads (default: all cores)."


def register(app: typer.Typer) -> None:
    """Add the results commands to ``app``."""
    app.command("query")(query)
    app.command("convert")(convert)
    app.command("detections")(detections)
    app.command("summarize")(summarize)


def query(
    sql: str = typer.Argument(..., help="SQL. With --sweep: predictions, tiles, blocks, plan; else files in quotes, FROM 'trips*.csv'."),
    sweep_dir: Optional[str] = typer.Option(None, "--sweep", "-s", help="Sweep folder or URL whose tables the SQL may name."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the whole result to a .csv, .parquet, .json or .geojson file."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help=MEMORY_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    limit: int = typer.Option(20, "--limit", "-n", help="Rows shown on the terminal (the count is of all rows)."),
) -> None:
    """Run SQL over a sweep's results or over CSV / Parquet / JSON files, out of core (DuckDB).

    Prints the first rows with the total row count and time, or writes the whole result
    to -o FILE, streamed."""
    from .geoout import check_writable, output_format, write_relation
    from .sql import SweepTables, connect, run

    if limit < 0:
        raise UsageError(f"limit {limit} must be >= 0")
    if output is not None:
        output_format(output)
        check_writable(output)
    started = time.perf_counter()
    con = connect(memory_limit, threads)
    try:
        tables = None
        if sweep_dir is not None:
            from .sweep import Sweep

            tables = SweepTables(con, Sweep.open(sweep_dir))
        rel = run(con, sql, tables)
        if output is not None:
            n = write_relation(con, rel, output)
            out.print(f"wrote {n:,} rows to {output} in {time.perf_counter() - started:.2f} s", highlight=False)
        else:
            show_result(rel, limit, started)
    finally:
        con.close()


def show_result(rel: Any, limit: int, started: float, title: str | None = None) -> int:
    """Print the first ``limit`` rows of a relation as a table, then the row count of the
    whole result and the time; the rest of the rows stream past uncounted in memory."""
    import pyarrow as pa
    from rich.table import Table

    from .sql import stream

    shown: list[dict[str, Any]] = []
    total = 0
    schema: pa.Schema | None = None
    for batch in stream(rel):
        schema = batch.schema
        if len(shown) < limit:
            shown.extend(batch.slice(0, limit - len(shown)).to_pylist())
        total += batch.num_rows
    table = Table(title=title)
    names = list(schema.names) if schema is not None else list(rel.columns)
    for name, field in zip(names, schema or []):
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_decimal(field.type)
        table.add_column(name, justify="right" if numeric else "left", min_width=min(len(name), 12), overflow="fold")
    for row in shown:
        table.add_row(*(_cell(row[n]) for n in names))
    if names:
        out.print(table)
    more = f" (first {len(shown):,} shown)" if total > len(shown) else ""
    out.print(f"{total:,} rows{more} in {time.perf_counter() - started:.2f} s", highlight=False)
    return total


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return str(v)


def convert(
    paths: list[str] = typer.Argument(..., help="Input CSV files (globs allowed), then the output .parquet file."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="DuckDB memory limit (default 512MB: the whole process stays under 1 GB; a conversion streams, more does not make it faster)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Convert CSV files to one typed, zstd-compressed Parquet file, streamed.

    Several files (or a glob) are concatenated by column name; column types are inferred
    over every row, not a sample."""
    from .convert import convert as do_convert

    if len(paths) < 2:
        raise UsageError("convert needs input CSV file(s) and an output .parquet file: tilesweep convert IN... OUT.parquet")
    *inputs, output = paths
    with _Progress(quiet, "converting") as bar:
        report = do_convert(inputs, output, memory_limit=memory_limit, threads=threads, on_progress=bar.update)
    types = ", ".join(f"{n} {t}" for n, t in report.columns)
    out.print(
        f"wrote {output}: {report.rows:,} rows from {report.files:,} file(s) ({_mb(report.bytes_in)} CSV -> "
        f"{_mb(report.bytes_out)} Parquet) in {report.seconds:.1f} s\n  columns: {types}",
        highlight=False,
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class _Progress:
    """A progress bar on stderr (only on a terminal and unless quiet), 0..100."""

    def __init__(self, quiet: bool, what: str) -> None:
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        if not quiet and err.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn(what), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                TimeElapsedColumn(), console=err, transient=True)

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=100)
        return self

    def update(self, pct: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=pct)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def detections(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL with predictions."),
    output: Path = typer.Option(..., "--output", "-o", help="A .geojson (RFC 7946), .parquet (GeoParquet 1.1) or .csv file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model (its name in `tilesweep status`); default: the only one."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Score in 0..1 at or above which a tile is a detection; default: the model's own label."),
    geometry: str = typer.Option("point", "--geometry", help="point (where the model placed the detection in its tile, for a model with positions such as demo; else the tile centre) or tile (its square)."),
    area: Optional[str] = typer.Option(None, "--area", help="Only inside this W,S,E,N bbox or GeoJSON / WKT file."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help=MEMORY_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Write the tiles a model detected as a map layer: GeoJSON, GeoParquet or CSV, streamed.

    Properties: z, x, y, lon, lat, score (the highest label score), label (its name), each
    label's score, model."""
    from .detections import export_detections

    report = export_detections(sweep_dir, output, model=model, threshold=threshold, geometry=geometry, area=area,
                               memory_limit=memory_limit, threads=threads)
    rule = "its own label" if report.threshold is None else f"score >= {report.threshold:g}"
    out.print(f"wrote {report.rows:,} detections of {report.model} ({rule}) to {output} in {report.seconds:.2f} s", highlight=False)


def summarize(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    by: Optional[Path] = typer.Option(None, "--by", help="GeoJSON file of polygons (districts, grid cells): one row per polygon."),
    by_zoom: Optional[int] = typer.Option(None, "--by-zoom", help="One row per parent tile at this zoom instead."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to a .csv, .parquet, .json or .geojson file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model whose predictions and detections count; default: the only one."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Detection score in 0..1; default: the model's own label."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help=MEMORY_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    limit: int = typer.Option(50, "--limit", "-n", help="Rows shown on the terminal."),
) -> None:
    """Count tiles planned, fetched, predicted and detections per polygon (--by) or per
    parent tile (--by-zoom)."""
    from .geoout import check_writable, output_format, write_batches, write_relation
    from .sql import connect
    from .summarize import summarize_areas, summarize_zoom

    if (by is None) == (by_zoom is None):
        raise UsageError("summarize needs one of --by AREAS.geojson or --by-zoom Z")
    fmt = None
    if output is not None:
        fmt = output_format(output)
        check_writable(output)
    started = time.perf_counter()
    con = connect(memory_limit, threads)
    try:
        if by is not None:
            table = summarize_areas(sweep_dir, by, model=model, threshold=threshold, memory_limit=memory_limit, threads=threads)
            plain = table.drop_columns(["geometry"])
            if fmt in ("geojson", "parquet"):
                n = write_batches(iter(table.to_batches()), table.column_names, output,  # type: ignore[arg-type]
                                  "geoparquet" if fmt == "parquet" else "geojson")
            elif output is not None:
                n = write_relation(con, con.from_arrow(plain), output)
            else:
                show_result(con.from_arrow(plain), limit, started)
                return
        else:
            rel = summarize_zoom(sweep_dir, by_zoom, model=model, threshold=threshold, con=con)  # type: ignore[arg-type]
            if output is None:
                show_result(rel, limit, started)
                return
            n = write_relation(con, rel, output, geometry="tile") if fmt != "parquet" else write_relation(con, rel, output)
    finally:
        con.close()
    out.print(f"wrote {n:,} rows to {output} in {time.perf_counter() - started:.2f} s", highlight=False)

