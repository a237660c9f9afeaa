"""Writing query results to files, streamed, whole or not at all.

Every writer here writes to a temporary name beside the output and renames it into place
at the end (fsynced, :mod:`tilesweep.durable`); a failure removes the temporary file, so a
bad query, a full disk or Ctrl-C never leaves half an output behind.

Formats by suffix: ``.csv``, ``.parquet`` (zstd), ``.json`` (one JSON array) are written by
DuckDB's ``COPY``; ``.geojson`` (an RFC 7946 FeatureCollection) and GeoParquet (1.1: a WKB
``geometry`` column plus the ``geo`` file metadata) are written here from Arrow batches,
with geometry made by shapely: no DuckDB extension.

Geometry comes from the result's columns: a ``geometry`` column (WKB, WKT or GeoJSON
text), else ``lon``/``lat`` (a point), else ``z``/``x``/``y`` (the tile's square); or as
asked (``point``: lon/lat, ``tile``: z/x/y).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import duckdb

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

from .durable import replace_durably
from .errors import UsageError
from .sql import as_usage_error, quote_ident, stream

FORMATS = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".geojson": "geojson"}
GEOPARQUET_VERSION = "1.1.0"


def output_format(path: Path, allowed: tuple[str, ...] = ("csv", "parquet", "json", "geojson")) -> str:
    """The format of an output file, from its suffix; :class:`UsageError` when it is not
    one of ``allowed``."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None or fmt not in allowed:
        names = ", ".join(f".{a}" for a in allowed)
        raise UsageError(f"cannot tell the format of {str(path)!r}: use a name ending in {names}")
    return fmt


def check_writable(path: Path) -> None:
    """:class:`UsageError` unless ``path`` can be created (its folder exists and is
    writable, and it is not a folder), checked before any work is done."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"output {str(path)!r} is a folder")
    if not parent.is_dir():
        raise UsageError(f"output folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output {str(path)!r} cannot be written (folder {str(parent)!r} is not writable)")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path`` (durably), on
    any error it is removed."""
    path = Path(path)
    check_writable(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        tmp.touch()  # fails here, before any work, where the folder cannot take a file
    except OSError as exc:
        raise UsageError(f"output {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    try:
        yield tmp
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_relation(
    con: duckdb.DuckDBPyConnection, rel: duckdb.DuckDBPyRelation, path: Path, geometry: str = "auto"
) -> int:
    """Write a relation's whole result to ``path`` in the format of its suffix, streamed.
    Returns the number of rows written."""
    fmt = output_format(path)
    if fmt == "geojson":
        return write_batches(stream(rel), rel.columns, path, "geojson", geometry, con=con, rel=rel)
    view = f"_tilesweep_out_{secrets.token_hex(4)}"
    rel.create_view(view, replace=True)
    options = {"csv": "FORMAT csv, HEADER true", "parquet": "FORMAT parquet, COMPRESSION zstd",
               "json": "FORMAT json, ARRAY true"}[fmt]
    try:
        with atomic_output(path) as tmp:
            try:
                res = con.execute(f"COPY (SELECT * FROM {view}) TO '{_sql_path(tmp)}' ({options})").fetchone()
            except duckdb.Error as exc:
                raise as_usage_error(exc) from None
    except OSError as exc:
        raise UsageError(f"output {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    finally:
        con.execute(f"DROP VIEW IF EXISTS {view}")
    return int(res[0]) if res else 0


def _sql_path(p: Path) -> str:
    return str(p).replace("'", "''")


# --- geometry ------------------------------------------------------------------------------


def tile_polygons(z: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shapely squares of XYZ tiles (counter-clockwise exterior, lon/lat degrees)."""
    import numpy as np
    import shapely

    n = np.ldexp(1.0, np.asarray(z, np.int64))
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    west = x / n * 360.0 - 180.0
    east = (x + 1) / n * 360.0 - 180.0
    north = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * y / n))))
    south = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (y + 1) / n))))
    return shapely.box(west, south, east, north)


def geometry_source(columns: list[str], geometry: str = "auto") -> str:
    """Which columns give a result its geometry: ``column`` (a geometry column), ``point``
    (lon/lat) or ``tile`` (z/x/y); :class:`UsageError` when the result has none."""
    cols = {c.lower() for c in columns}
    if geometry == "point" or (geometry == "auto" and "geometry" not in cols and {"lon", "lat"} <= cols):
        if not {"lon", "lat"} <= cols:
            raise UsageError("point geometry needs lon and lat columns")
        return "point"
    if geometry == "tile" or (geometry == "auto" and "geometry" not in cols and {"z", "x", "y"} <= cols):
        if not {"z", "x", "y"} <= cols:
            raise UsageError("tile geometry needs z, x and y columns")
        return "tile"
    if "geometry" in cols:
        return "column"
    raise UsageError("a geographic output needs a geometry column (WKB or WKT), lon and lat, or z, x and y")


def batch_geometry(batch: pa.RecordBatch, source: str) -> np.ndarray:
    """The shapely geometries of a batch's rows (None where a row has none)."""
    import numpy as np
    import pyarrow as pa
    import shapely

    names = {n.lower(): n for n in batch.schema.names}
    if source == "point":
        lon = batch.column(names["lon"]).to_numpy(zero_copy_only=False).astype(np.float64)
        lat = batch.column(names["lat"]).to_numpy(zero_copy_only=False).astype(np.float64)
        return np.asarray(shapely.points(lon, lat))
    if source == "tile":
        cols = [batch.column(names[k]).to_numpy(zero_copy_only=False) for k in ("z", "x", "y")]
        return tile_polygons(*cols)
    col = batch.column(names["geometry"])
    values = col.to_numpy(zero_copy_only=False)
    try:
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            return shapely.from_wkb(values)
        text = np.asarray([None if v is None else str(v) for v in values], dtype=object)
        is_json = np.array([v is not None and v.lstrip().startswith("{") for v in text])
        out = np.empty(len(text), dtype=object)
        if is_json.any():
            out[is_json] = shapely.from_geojson(text[is_json])
        if (~is_json).any():
            out[~is_json] = shapely.from_wkt(text[~is_json])
        return out
    except shapely.errors.GEOSException as exc:
        raise UsageError(f"the geometry column holds a value that is not WKB, WKT or GeoJSON: {exc}") from None


# --- streamed writers ----------------------------------------------------------------------


def write_batches(
    batches: Iterator[pa.RecordBatch],
    columns: list[str],
    path: Path,
    fmt: str,
    geometry: str = "auto",
    con: duckdb.DuckDBPyConnection | None = None,
    rel: duckdb.DuckDBPyRelation | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Write batches as ``geojson``, ``geoparquet`` or ``csv`` (with a WKT ``geometry``
    column) to ``path``, atomically; returns rows written."""
    source = geometry_source(columns, geometry)
    if fmt == "geojson" and con is not None and rel is not None:
        batches = _with_properties_json(con, rel, source)
    n = 0
    try:
        with atomic_output(path) as tmp:
            if fmt == "geojson":
                n = _write_geojson(batches, tmp, source, on_batch)
            elif fmt == "geoparquet":
                n = _write_geoparquet(batches, tmp, source, on_batch)
            elif fmt == "csv":
                n = _write_csv(batches, tmp, source, on_batch)
            else:  # pragma: no cover - callers choose the format
                raise ValueError(fmt)
    except OSError as exc:
        raise UsageError(f"output {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    return n


def _with_properties_json(con: duckdb.DuckDBPyConnection, rel: duckdb.DuckDBPyRelation, source: str) -> Iterator[pa.RecordBatch]:
    """The relation's rows with their properties as one JSON text column, ``_properties``,
    made by DuckDB (non-finite floats as null), beside the columns the geometry needs."""
    view = f"_tilesweep_geo_{secrets.token_hex(4)}"
    rel.create_view(view, replace=True)
    props = []
    for name, typ in zip(rel.columns, rel.types):
        if name.lower() == "geometry" and source == "column":
            continue
        q = quote_ident(name)
        t = str(typ).upper()
        expr = f"CASE WHEN isfinite({q}) THEN {q} END" if t in ("DOUBLE", "FLOAT", "REAL") else q
        props.append(f"{quote_literal_key(name)} := {expr}")
    keep = {"point": ["lon", "lat"], "tile": ["z", "x", "y"], "column": ["geometry"]}[source]
    names = {c.lower(): c for c in rel.columns}
    geo_cols = ", ".join(f"{quote_ident(names[k])} AS {k}" for k in keep)
    body = f"to_json(struct_pack({', '.join(props)}))" if props else "'{}'"
    inner = con.sql(f"SELECT {geo_cols}, {body}::VARCHAR AS _properties FROM {view}")
    try:
        yield from stream(inner)
    finally:
        con.execute(f"DROP VIEW IF EXISTS {view}")


def quote_literal_key(name: str) -> str:
    return quote_ident(name)


def _write_geojson(batches: Iterator[pa.RecordBatch], tmp: Path, source: str, on_batch: Callable[[int], None] | None) -> int:
    import shapely

    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type":"FeatureCollection","features":[\n')
        first = True
        for batch in batches:
            if not batch.num_rows:
                continue
            geoms = shapely.to_geojson(batch_geometry(batch, source))
            if "_properties" in batch.schema.names:
                props = batch.column("_properties").to_pylist()
            else:
                if source == "column":
                    batch = batch.drop_columns([n for n in batch.schema.names if n.lower() == "geometry"])
                props = [json.dumps(_finite(r), default=str, separators=(",", ":")) for r in batch.to_pylist()]
            lines = [
                f'{{"type":"Feature","geometry":{g if g is not None else "null"},"properties":{p}}}'
                for g, p in zip(geoms, props)
            ]
            f.write(("" if first else ",\n") + ",\n".join(lines))
            first = False
            n += batch.num_rows
            if on_batch:
                on_batch(n)
        f.write("\n]}\n")
    return n


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _add_geometry(batch: pa.RecordBatch, source: str, kind: str) -> tuple[pa.RecordBatch, np.ndarray]:
    import pyarrow as pa
    import shapely

    geoms = batch_geometry(batch, source)
    col: pa.Array[Any]
    if kind == "wkb":
        col = pa.array(shapely.to_wkb(geoms), pa.binary())
    else:
        col = pa.array(shapely.to_wkt(geoms, rounding_precision=8, trim=True), pa.string())
    names = [n for n in batch.schema.names if not (source == "column" and n.lower() == "geometry")]
    arrays = [batch.column(n) for n in names] + [col]
    return pa.RecordBatch.from_arrays(arrays, names=names + ["geometry"]), geoms


def _write_geoparquet(batches: Iterator[pa.RecordBatch], tmp: Path, source: str, on_batch: Callable[[int], None] | None) -> int:
    import numpy as np
    import pyarrow.parquet as pq
    import shapely

    writer: pq.ParquetWriter | None = None
    n = 0
    bbox = [np.inf, np.inf, -np.inf, -np.inf]
    types: set[str] = set()
    try:
        for batch in batches:
            out, geoms = _add_geometry(batch, source, "wkb")
            if writer is None:
                # The schema's `geo` (what pyarrow's read_table shows) knows the types of
                # tile and point layers; the file's (what GDAL and geopandas read) adds the
                # bbox, known only at the end.
                known = {"point": ["Point"], "tile": ["Polygon"]}.get(source, [])
                first = {"version": GEOPARQUET_VERSION, "primary_column": "geometry",
                         "columns": {"geometry": {"encoding": "WKB", "geometry_types": known}}}
                schema = out.schema.with_metadata({"geo": json.dumps(first)})
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            if batch.num_rows:
                writer.write_batch(out.replace_schema_metadata(schema.metadata))
                b = shapely.total_bounds(geoms)
                if np.isfinite(b).all():
                    bbox = [min(bbox[0], b[0]), min(bbox[1], b[1]), max(bbox[2], b[2]), max(bbox[3], b[3])]
                types.update(str(t) for t in np.unique(shapely.get_type_id(geoms[~shapely.is_missing(geoms)])))
                n += batch.num_rows
                if on_batch:
                    on_batch(n)
        if writer is None:
            raise UsageError("the result has no columns to write")  # pragma: no cover
        names = {"0": "Point", "1": "LineString", "3": "Polygon", "4": "MultiPoint", "5": "MultiLineString",
                 "6": "MultiPolygon", "7": "GeometryCollection"}
        column: dict[str, object] = {"encoding": "WKB", "geometry_types": sorted(names[t] for t in types if t in names)}
        if np.isfinite(bbox).all():
            column["bbox"] = [float(v) for v in bbox]
        geo = {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}
        writer.add_key_value_metadata({"geo": json.dumps(geo)})
    finally:
        if writer is not None:
            writer.close()
    return n


def _write_csv(batches: Iterator[pa.RecordBatch], tmp: Path, source: str, on_batch: Callable[[int], None] | None) -> int:
    import pyarrow.csv as pacsv

    writer: pacsv.CSVWriter | None = None
    n = 0
    try:
        for batch in batches:
            out, _ = _add_geometry(batch, source, "wkt")
            if writer is None:
                writer = pacsv.CSVWriter(str(tmp), out.schema)
            writer.write_batch(out)
            n += batch.num_rows
            if on_batch:
                on_batch(n)
    finally:
        if writer is not None:
            writer.close()
    return n
