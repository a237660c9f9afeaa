"""Counts per area of a sweep (``tilesweep summarize``): tiles planned, fetched, predicted
and detections, per polygon of the user's file (districts, grid cells) or per parent tile
at a coarser zoom (the density a map overlay needs).

A tile counts in a polygon when its centre lies in it (on the boundary counts too; a tile
in two overlapping polygons counts in both). ``fetched`` is the tiles the store holds as
OK plus, for blocks streamed without being stored, the tiles a model has a row for;
``predicted`` and ``detections`` are those of one model (``--model``; the only one by
default). Everything streams: tiles go past in batches from the queue, the store's index
and the Parquet parts, and only one counter per polygon is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import duckdb
import numpy as np
import pyarrow as pa
import shapely

from .detections import check_threshold, choose_model, score_sql
from .errors import UsageError
from .tiles import centres_array as centres
from .sql import LedgerModel, SweepTables, connect, planned_tiles, quote_literal, run, stream

if TYPE_CHECKING:
    from .sweep import Sweep

COUNTS = ("planned", "fetched", "predicted", "detections")


def load_polygons(path: str | os.PathLike[str]) -> tuple[list[Any], list[dict[str, Any]]]:
    """The polygons of a GeoJSON file (a FeatureCollection, a Feature or a geometry) and
    each one's properties; :class:`UsageError` for a file that is not that."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"areas file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"areas file {str(p)!r} is not GeoJSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"areas file {str(p)!r} is not a GeoJSON object")
    if doc.get("type") == "FeatureCollection":
        features = doc.get("features") or []
    elif doc.get("type") == "Feature":
        features = [doc]
    else:
        features = [{"type": "Feature", "geometry": doc, "properties": {}}]
    geoms, props = [], []
    for i, f in enumerate(features):
        g = (f or {}).get("geometry")
        if not g or g.get("type") not in ("Polygon", "MultiPolygon"):
            raise UsageError(f"areas file {str(p)!r}: feature {i} is not a Polygon or MultiPolygon")
        try:
            geom = shapely.from_geojson(json.dumps(g))
        except shapely.errors.GEOSException as exc:
            raise UsageError(f"areas file {str(p)!r}: feature {i}: {exc}") from None
        geoms.append(shapely.make_valid(geom) if not shapely.is_valid(geom) else geom)
        props.append(dict(f.get("properties") or {}))
    if not geoms:
        raise UsageError(f"areas file {str(p)!r} holds no polygon")
    return geoms, props


class _Counter:
    """Counts points per polygon through an STR tree, batch by batch."""

    def __init__(self, geoms: list[Any], zoom: int) -> None:
        self.tree = shapely.STRtree(geoms)
        self.n = len(geoms)
        self.zoom = zoom

    def count_xy(self, batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        total = np.zeros(self.n, np.int64)
        for x, y in batches:
            if not len(x):
                continue
            lon, lat = centres(self.zoom, x, y)
            _, hit = self.tree.query(shapely.points(lon, lat), predicate="intersects")
            total += np.bincount(hit, minlength=self.n)
        return total


def _xy(rel: duckdb.DuckDBPyRelation) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for b in stream(rel):
        yield (b.column("x").to_numpy(zero_copy_only=False).astype(np.int64),
               b.column("y").to_numpy(zero_copy_only=False).astype(np.int64))


def _sources(model: LedgerModel | None, threshold: float | None) -> dict[str, str | None]:
    """SQL of the tiles (x, y) that count as fetched, predicted and detections."""
    fetched = ("SELECT x, y FROM tiles WHERE status = 'ok' UNION ALL "
               "SELECT DISTINCT x, y FROM predictions WHERE block NOT IN (SELECT DISTINCT block FROM tiles)")
    if model is None:
        return {"fetched": fetched, "predicted": None, "detections": None}
    name = quote_literal(str(model["name"]))
    score, _ = score_sql(list(model["labels"]))
    cond = "label" if threshold is None else f"{score} >= {float(threshold)!r}"
    return {"fetched": fetched, "predicted": f"SELECT x, y FROM predictions WHERE model = {name}",
            "detections": f"SELECT x, y FROM predictions WHERE model = {name} AND {cond}"}


def summarize_areas(
    sweep: "Sweep | str | os.PathLike[str]",
    by: str | os.PathLike[str],
    *,
    model: str | None = None,
    threshold: float | None = None,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> pa.Table:
    """One row per polygon of ``by``: ``area`` (its index in the file), its scalar
    properties, the four counts and ``geometry`` (WKB)."""
    from .sql import _open_sweep

    sw = _open_sweep(sweep)
    threshold = check_threshold(threshold)
    geoms, props = load_polygons(by)
    m = choose_model(sw, model, required=False)
    con = connect(memory_limit, threads)
    try:
        tables = SweepTables(con, sw)
        counter = _Counter(geoms, sw.zoom)
        counts = {"planned": counter.count_xy((x, y) for x, y, _ in planned_tiles(sw))}
        for key, sql in _sources(m, threshold).items():
            counts[key] = np.zeros(len(geoms), np.int64) if sql is None else counter.count_xy(_xy(run(con, sql, tables)))
    finally:
        con.close()
    columns: dict[str, Any] = {"area": pa.array(np.arange(len(geoms), dtype=np.int32))}
    for key in _property_keys(props):
        vals = [_scalar(p.get(key)) for p in props]
        try:
            columns[key] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[key] = pa.array([None if v is None else str(v) for v in vals], pa.string())
    for key in COUNTS:
        columns[key] = pa.array(counts[key])
    columns["geometry"] = pa.array(shapely.to_wkb(np.asarray(geoms, dtype=object)), pa.binary())
    return pa.table(columns)


def _property_keys(props: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for p in props:
        for k in p:
            if k not in keys and k not in COUNTS and k not in ("area", "geometry"):
                keys.append(k)
    return keys


def _scalar(v: Any) -> Any:
    return v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v)


def summarize_zoom(
    sweep: "Sweep | str | os.PathLike[str]",
    zoom: int,
    *,
    model: str | None = None,
    threshold: float | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> duckdb.DuckDBPyRelation:
    """A relation of one row per parent tile at ``zoom`` that holds planned tiles: z, x, y
    and the four counts, in x, y order."""
    from .sql import _open_sweep

    sw = _open_sweep(sweep)
    threshold = check_threshold(threshold)
    if not 0 <= int(zoom) <= sw.zoom:
        raise UsageError(f"summary zoom {zoom} is outside 0..{sw.zoom} (the sweep's zoom)")
    d = sw.zoom - int(zoom)
    m = choose_model(sw, model, required=False)
    con = con if con is not None else connect(memory_limit, threads)
    tables = SweepTables(con, sw)
    parts = [f"planned AS (SELECT x >> {d} AS px, y >> {d} AS py, count(*) AS n FROM plan GROUP BY ALL)"]
    for key, sql in _sources(m, threshold).items():
        body = "SELECT NULL::BIGINT AS px, NULL::BIGINT AS py, 0 AS n WHERE false" if sql is None else (
            f"SELECT x >> {d} AS px, y >> {d} AS py, count(*) AS n FROM ({sql}) GROUP BY ALL")
        parts.append(f"{key} AS ({body})")
    joins = " ".join(f"LEFT JOIN {k} USING (px, py)" for k in COUNTS[1:])
    counts = ", ".join(f"COALESCE({k}.n, 0)::BIGINT AS {k}" for k in COUNTS)
    sql = (f"WITH {', '.join(parts)} SELECT {int(zoom)}::TINYINT AS z, px::INTEGER AS x, py::INTEGER AS y, {counts} "
           f"FROM planned {joins} ORDER BY px, py")
    return run(con, sql, tables)
