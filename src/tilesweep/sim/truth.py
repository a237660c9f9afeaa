"""Ground truth of the simulated world: tower positions, and their GeoJSON / Parquet files.

A GeoJSON truth file is a FeatureCollection of Points with properties ``line_id`` and
``tower_id``; a Parquet truth file has the columns ``lon``, ``lat`` (float64, degrees),
``line_id`` and ``tower_id`` (int64). Both are written through a temporary file and an
atomic rename, streaming, so memory does not grow with the area.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import shapely
from shapely.geometry import box as _box

from ..area import Area, load_area
from ..errors import UsageError
from ..tiles import Tile
from .world import Tower, World

TRUTH_FORMATS = {".geojson": "geojson", ".json": "geojson", ".parquet": "parquet", ".pq": "parquet"}


def as_geometry(area: Any) -> Any:
    """An :class:`Area`, shapely geometry, ``(w, s, e, n)`` tuple or bbox/file string as a
    shapely geometry in degrees."""
    if isinstance(area, Area):
        return area.geometry
    if isinstance(area, (str, os.PathLike)):
        return load_area(area).geometry
    if isinstance(area, shapely.Geometry):
        return area
    try:
        w, s, e, n = (float(v) for v in area)
    except (TypeError, ValueError):
        raise UsageError(f"area {area!r} is not an Area, a geometry, a (w, s, e, n) box or a bbox string") from None
    if not (w < e and s < n):
        raise UsageError(f"box {area!r} is not (west, south, east, north) with west < east and south < north")
    return _box(w, s, e, n)


def truth(area: Any, seed: int = 0, line_density: float = 1.0) -> list[Tower]:
    """The towers of the world ``seed`` inside ``area`` (see :func:`as_geometry`)."""
    return World(seed, line_density).towers(area)


def towers_in_tile(tile: Tile, seed: int = 0, line_density: float = 1.0) -> list[Tower]:
    """Towers whose centre lies in ``tile`` (west/north edges in, east/south edges out)."""
    return World(seed, line_density).towers_in_tile(tile)


def tile_has_tower(tile: Tile, seed: int = 0, line_density: float = 1.0) -> bool:
    """Whether a tower centre lies in ``tile``."""
    return World(seed, line_density).tile_has_tower(tile)


def truth_format(path: str | os.PathLike[str]) -> str:
    """``geojson`` or ``parquet`` from the file suffix; :class:`UsageError` otherwise."""
    suffix = Path(path).suffix.lower()
    fmt = TRUTH_FORMATS.get(suffix)
    if fmt is None:
        raise UsageError(f"truth file {os.fspath(path)!r} must end in .geojson, .json or .parquet")
    return fmt


def _atomic(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_geojson(towers: Iterable[Tower], path: str | os.PathLike[str]) -> int:
    """Write a FeatureCollection of Points; returns the number of towers written."""
    path = Path(path)
    tmp = _atomic(path)
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"type": "FeatureCollection", "features": [\n')
            for t in towers:
                feat = {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [round(t.lon, 9), round(t.lat, 9)]},
                    "properties": {"line_id": t.line_id, "tower_id": t.tower_id},
                }
                f.write(("," if n else "") + json.dumps(feat, separators=(",", ":")) + "\n")
                n += 1
            f.write("]}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def write_parquet(towers: Iterable[Tower], path: str | os.PathLike[str], batch: int = 65536) -> int:
    """Write columns lon, lat, line_id, tower_id; returns the number of towers written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: list[tuple[str, pa.DataType]] = [("lon", pa.float64()), ("lat", pa.float64()), ("line_id", pa.int64()), ("tower_id", pa.int64())]
    schema = pa.schema(cols)
    path = Path(path)
    tmp = _atomic(path)
    n = 0
    try:
        with pq.ParquetWriter(tmp, schema) as w:
            buf: list[Tower] = []

            def flush() -> None:
                cols: list[tuple[Any, ...]] = list(zip(*buf)) if buf else [(), (), (), ()]
                w.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, schema)], schema=schema))
                buf.clear()

            for t in towers:
                buf.append(t)
                n += 1
                if len(buf) >= batch:
                    flush()
            if buf or n == 0:
                flush()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def write_truth(towers: Iterable[Tower], path: str | os.PathLike[str]) -> int:
    """Write towers as GeoJSON or Parquet, chosen by the file suffix."""
    fmt = truth_format(path)
    return write_geojson(towers, path) if fmt == "geojson" else write_parquet(towers, path)


def read_truth(path: str | os.PathLike[str]) -> list[Tower]:
    """Read a truth file written by :func:`write_truth`."""
    if truth_format(path) == "parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(os.fspath(path))
        return [Tower(*row) for row in zip(*(t.column(c).to_pylist() for c in ("lon", "lat", "line_id", "tower_id")))]
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    out = []
    for feat in doc["features"]:
        lon, lat = feat["geometry"]["coordinates"]
        p = feat["properties"]
        out.append(Tower(lon, lat, int(p["line_id"]), int(p["tower_id"])))
    return out


def iter_truth(area: Any, seed: int = 0) -> Iterator[Tower]:
    """Stream the towers inside ``area`` (for very large areas)."""
    return World(seed).iter_towers(area)
