"""Traced lines of a sweep (``tilesweep lines``): its detections, joined by
:mod:`tilesweep.trace` into polylines, written as GeoJSON or GeoParquet.

A line's properties: ``line`` (its rank, 0 = most confident), ``towers``, ``length_m``
(ground metres), ``mean_score`` and ``confidence`` (0..1, :func:`tilesweep.trace.line_confidence`),
and ``model``. The detections are read whole (three floats each: a country's worth of
tower detections is millions of points, tens of MB); lines are few.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .detections import check_threshold, choose_model, detections
from .geoout import check_writable, output_format, write_batches
from .sql import connect, stream
from .trace import TracedLine, TraceSettings, trace_lines

if TYPE_CHECKING:
    from .sweep import Sweep

LINE_FORMATS = ("geojson", "parquet")


@dataclass(frozen=True)
class LinesReport:
    """What :func:`export_lines` wrote: ``lines``, the ``towers`` they join, the
    ``detections`` read, the model, the threshold (None: the model's own) and seconds."""

    lines: int
    towers: int
    detections: int
    model: str
    threshold: float | None
    seconds: float
    path: Path


def detection_points(sweep: "Sweep | str | os.PathLike[str]", model: str | None = None,
                     threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(lon, lat, score, model name)`` of a model's detections (their points, degrees: a
    model's position in the tile where it gives one, else the tile centre;
    score 0..1), read in batches from the sweep's predictions."""
    from .sql import _open_sweep

    sw = _open_sweep(sweep)
    threshold = check_threshold(threshold)
    m = choose_model(sw.path, model)
    assert m is not None
    con = connect()
    try:
        rel = detections(sw, model=model, threshold=threshold, con=con)
        lon, lat, score = [], [], []
        for batch in stream(rel.select("lon, lat, score")):
            lon.append(batch.column(0).to_numpy(zero_copy_only=False))
            lat.append(batch.column(1).to_numpy(zero_copy_only=False))
            score.append(batch.column(2).to_numpy(zero_copy_only=False))
    finally:
        con.close()
    def cat(a: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(a).astype(np.float64) if a else np.zeros(0)

    return cat(lon), cat(lat), cat(score), str(m["name"])


def sweep_lines(sweep: "Sweep | str | os.PathLike[str]", model: str | None = None, threshold: float | None = None,
                settings: TraceSettings = TraceSettings()) -> tuple[list[TracedLine], int, str]:
    """``(lines, detections read, model name)``: the sweep's detections traced into lines."""
    lon, lat, score, name = detection_points(sweep, model, threshold)
    return trace_lines(lon, lat, score, settings), len(lon), name


def lines_batch(lines: list[TracedLine], model: str) -> Any:
    """The lines as one Arrow batch with a WKT ``geometry`` column."""
    import pyarrow as pa
    import shapely

    return pa.RecordBatch.from_pydict({
        "line": pa.array(range(len(lines)), pa.int32()),
        "towers": pa.array([ln.towers for ln in lines], pa.int32()),
        "length_m": pa.array([round(ln.length_m, 1) for ln in lines], pa.float64()),
        "mean_score": pa.array([round(ln.mean_score, 4) for ln in lines], pa.float64()),
        "confidence": pa.array([round(ln.confidence, 4) for ln in lines], pa.float64()),
        "model": pa.array([model] * len(lines), pa.string()),
        "geometry": pa.array([shapely.to_wkt(ln.geometry, rounding_precision=8, trim=True) for ln in lines], pa.string()),
    })


def export_lines(sweep: "Sweep | str | os.PathLike[str]", output: str | os.PathLike[str], *, model: str | None = None,
                 threshold: float | None = None, settings: TraceSettings = TraceSettings()) -> LinesReport:
    """Trace the sweep's detections and write the lines to ``output``: ``.geojson`` (RFC
    7946 LineStrings) or ``.parquet`` (GeoParquet 1.1), atomically; a bad output, model or
    threshold is a :class:`UsageError` before anything is written."""
    out = Path(output)
    fmt = output_format(out, LINE_FORMATS)
    threshold = check_threshold(threshold)
    check_writable(out)
    started = time.perf_counter()
    lines, n_det, name = sweep_lines(sweep, model, threshold, settings)
    batch = lines_batch(lines, name)
    write_batches(iter([batch]), batch.schema.names, out, "geoparquet" if fmt == "parquet" else fmt, "column")
    return LinesReport(len(lines), sum(ln.towers for ln in lines), n_det, name, threshold,
                       time.perf_counter() - started, out)


def lines_geojson(lines: list[TracedLine], model: str) -> dict[str, Any]:
    """The lines as a GeoJSON FeatureCollection (for the viewer)."""
    from shapely.geometry import mapping

    feats = []
    for i, ln in enumerate(lines):
        feats.append({"type": "Feature", "geometry": mapping(ln.geometry),
                      "properties": {"line": i, "towers": ln.towers, "length_m": round(ln.length_m, 1),
                                     "mean_score": round(ln.mean_score, 4), "confidence": round(ln.confidence, 4),
                                     "model": model}})
    return {"type": "FeatureCollection", "features": feats}


__all__ = ["LinesReport", "detection_points", "export_lines", "lines_batch", "lines_geojson", "sweep_lines"]
