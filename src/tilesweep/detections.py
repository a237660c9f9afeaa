"""Detections: the tiles a model scored at or above a threshold, as a map layer
(``tilesweep detections``).

Rows come from the sweep's ``predictions`` (:mod:`tilesweep.sql`) and are streamed to the
output in batches, so a country's detections never sit in memory at once. Each row's
properties: ``z``, ``x``, ``y``, ``lon``, ``lat`` (the detection's point: where in the tile
the model placed its top label, for a model with positions such as the demo model, see
:mod:`tilesweep.model.base`; otherwise the tile centre), ``score`` (the highest
of the model's label scores), ``label`` (the name of that label), one column per label
score, and ``model``. Without a threshold the model's own decision (the part's ``label``
column, made with the threshold it was run with) selects the rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, overload

import duckdb
import numpy as np
import pyarrow as pa
import shapely

from .errors import UsageError
from .threshold import apply_threshold as apply_threshold, check_threshold as check_threshold  # re-exported: their home before
from .geoout import check_writable, output_format, tile_polygons, write_batches
from .sql import LedgerModel, SweepTables, connect, models, quote_ident, quote_literal, run, stream

if TYPE_CHECKING:
    from .sweep import Sweep

GEOMETRIES = ("point", "tile")


@dataclass(frozen=True)
class DetectionsReport:
    rows: int
    model: str
    threshold: float | None
    seconds: float
    path: Path


@overload
def choose_model(sweep_path: "Path | Sweep", model: str | None, required: Literal[True] = True) -> LedgerModel: ...
@overload
def choose_model(sweep_path: "Path | Sweep", model: str | None, required: bool) -> LedgerModel | None: ...
def choose_model(sweep_path: "Path | Sweep", model: str | None, required: bool = True) -> LedgerModel | None:
    """The ledger's model named ``model`` (by name or folder), or the only one; a
    :class:`UsageError` names the choices when it is ambiguous or unknown. A sweep on
    object storage (a :class:`Sweep`) reads its models from the parts in its bucket."""
    found = models(sweep_path)
    sweep_path = getattr(sweep_path, "location", sweep_path)  # what the messages name
    if not found:
        if required:
            raise UsageError(f"sweep {str(sweep_path)!r} has no predictions yet; run `tilesweep run` or `tilesweep predict` with a model first")
        return None
    names = ", ".join(str(m["name"]) for m in found)
    if model is None:
        if len(found) > 1:
            raise UsageError(f"sweep {str(sweep_path)!r} has predictions of several models ({names}); choose one with --model")
        return found[0]
    for m in found:
        if model in (m["name"], m["folder"]):
            return m
    raise UsageError(f"model {model!r} has no predictions in {str(sweep_path)!r} (it has: {names})")


def score_sql(labels: list[str]) -> tuple[str, str]:
    """SQL of (the highest label score, the name of that label) of a model's row."""
    cols = [quote_ident(lb) for lb in labels]
    score = cols[0] if len(cols) == 1 else f"greatest({', '.join(cols)})"
    if len(cols) == 1:
        label = quote_literal(labels[0])
    else:
        label = "CASE " + " ".join(f"WHEN {c} = {score} THEN {quote_literal(lb)}" for c, lb in zip(cols, labels)) + " END"
    return score, label


def point_sql(labels: list[str], score: str, columns: "set[str] | frozenset[str]") -> tuple[str, str]:
    """SQL of a detection's point (lon, lat): the position of its top label where the
    predictions hold one (``LABEL_lon``/``LABEL_lat``), else the tile centre."""
    placed = [lb for lb in labels if f"{lb}_lon" in columns and f"{lb}_lat" in columns]
    if not placed:
        return "lon", "lat"
    out = []
    for c in ("lon", "lat"):
        if len(labels) == 1:
            out.append(f"coalesce({quote_ident(f'{labels[0]}_{c}')}, {c})")
        else:
            cases = " ".join(f"WHEN {quote_ident(lb)} = {score} THEN {quote_ident(f'{lb}_{c}')}" for lb in placed)
            out.append(f"coalesce(CASE {cases} END, {c})")
    return out[0], out[1]


def detections_sql(model: LedgerModel, threshold: float | None, bbox: tuple[float, float, float, float] | None = None,
                   columns: "set[str] | frozenset[str]" = frozenset()) -> str:
    """The SELECT of a model's detections over the ``predictions`` view (``columns``: the
    view's, to find the model's position columns). ``bbox`` selects by the detection's point."""
    labels = list(model["labels"])
    score, label = score_sql(labels)
    plon, plat = point_sql(labels, score, columns)
    cond = "label" if threshold is None else f"{score} >= {float(threshold)!r}"
    where = f"model = {quote_literal(str(model['name']))} AND {cond}"
    if bbox is not None:
        w, s, e, n = bbox
        where += f" AND {plon} BETWEEN {w!r} AND {e!r} AND {plat} BETWEEN {s!r} AND {n!r}"
    label_cols = ", ".join(f"{quote_ident(lb)}::DOUBLE AS {quote_ident(lb)}" for lb in labels if lb not in ("score", "label"))
    return (f"SELECT z, x, y, {plon} AS lon, {plat} AS lat, {score}::DOUBLE AS score, {label} AS label, "
            f"{label_cols + ', ' if label_cols else ''}model FROM predictions WHERE {where}")


def detections(
    sweep: "Sweep | str | os.PathLike[str]",
    *,
    model: str | None = None,
    threshold: float | None = None,
    area: Any = None,
    con: duckdb.DuckDBPyConnection | None = None,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> duckdb.DuckDBPyRelation:
    """A model's detections as a lazy DuckDB relation (``area``: a shapely geometry or an
    area spec for :func:`tilesweep.area.load_area`, filtered here by bounding box only;
    :func:`export_detections` also tests the shape)."""
    from .sql import _open_sweep

    sw = _open_sweep(sweep)
    threshold = check_threshold(threshold)
    m = choose_model(sw, model)
    con = con if con is not None else connect(memory_limit, threads)
    geom = _area_geometry(area)
    bbox = None
    if geom is not None:
        w, s, e, n = (float(v) for v in shapely.bounds(geom))
        bbox = (w, s, e, n)
    tables = SweepTables(con, sw)
    columns = set(con.sql("SELECT * FROM predictions LIMIT 0").columns)
    return run(con, detections_sql(m, threshold, bbox, columns), tables)


def _area_geometry(area: Any) -> Any:
    if area is None:
        return None
    if isinstance(area, shapely.Geometry):
        return area
    from .area import load_area

    return load_area(area).geometry


def export_detections(
    sweep: "Sweep | str | os.PathLike[str]",
    output: str | os.PathLike[str],
    *,
    model: str | None = None,
    threshold: float | None = None,
    geometry: str = "point",
    area: Any = None,
    memory_limit: str | None = None,
    threads: int | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> DetectionsReport:
    """Write a model's detections to ``output``: ``.geojson`` (RFC 7946), ``.parquet``
    (GeoParquet 1.1) or ``.csv`` (WKT ``geometry``). ``geometry``: ``point`` (the detection's
    point: its position in the tile for a model with positions, else the tile centre)
    or ``tile`` (its square). With ``area``, only detections whose point lies in it, or
    whose tile touches it, are written."""
    from .sql import _open_sweep

    out = Path(output)
    fmt = output_format(out, ("geojson", "parquet", "csv"))
    if geometry not in GEOMETRIES:
        raise UsageError(f"geometry {geometry!r} is not one of {', '.join(GEOMETRIES)}")
    threshold = check_threshold(threshold)
    check_writable(out)
    sw = _open_sweep(sweep)
    geom = _area_geometry(area)
    started = time.perf_counter()
    con = connect(memory_limit, threads)
    try:
        rel = detections(sw, model=model, threshold=threshold, area=geom, con=con)
        m = choose_model(sw, model)
        batches: Iterator[pa.RecordBatch] = stream(rel)
        if geom is not None:
            batches = _inside(batches, geom, geometry)
        n = write_batches(batches, list(rel.columns), out, "geoparquet" if fmt == "parquet" else fmt,
                          geometry, on_batch=on_rows)
    finally:
        con.close()
    return DetectionsReport(n, m["name"], threshold, time.perf_counter() - started, out)


def _inside(batches: Iterator[pa.RecordBatch], area: Any, geometry: str) -> Iterator[pa.RecordBatch]:
    shapely.prepare(area)
    for batch in batches:
        if geometry == "point":
            lon = batch.column("lon").to_numpy(zero_copy_only=False)
            lat = batch.column("lat").to_numpy(zero_copy_only=False)
            keep = shapely.contains_xy(area, lon, lat) | shapely.touches(area, shapely.points(lon, lat))
        else:
            cols = [batch.column(k).to_numpy(zero_copy_only=False) for k in ("z", "x", "y")]
            keep = shapely.intersects(area, tile_polygons(*cols))
        yield batch.filter(pa.array(np.asarray(keep, bool)))
