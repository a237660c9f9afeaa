"""Reading areas: a bbox string, a GeoJSON file or WKT, as one polygonal shapely geometry.

Coordinates are longitude/latitude in degrees (WGS 84, as GeoJSON says). Edges are straight
lines in longitude/latitude, as RFC 7946 specifies. Areas are clipped to the Web-Mercator
world (latitudes beyond +-85.0511 have no tiles). Areas that cross the antimeridian must be
given as a MultiPolygon split at +-180 (RFC 7946 section 3.1.9); a bbox with west >= east is
rejected rather than guessed at.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Polygon, box, shape

from .errors import UsageError
from .tiles import MAX_LAT, LngLatBbox

WORLD = box(-180.0, -MAX_LAT, 180.0, MAX_LAT)
"""The Web-Mercator world in degrees: everything a tile can cover."""

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BBOX_RE = re.compile(rf"^\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*$")


@dataclass(frozen=True)
class Area:
    """A polygonal area in degrees, clipped to the Web-Mercator world."""

    geometry: Polygon | MultiPolygon
    source: str
    """What the user gave: the bbox text or the file path."""

    @property
    def bbox(self) -> LngLatBbox:
        return LngLatBbox(*self.geometry.bounds)

    @property
    def area_km2(self) -> float:
        """Ground area in km2 on the WGS 84 authalic sphere (Lambert equal-area projection)."""
        r_km = 6371.0088
        projected = shapely.transform(
            self.geometry,
            lambda c: _lambert_cylindrical(c, r_km),
        )
        return float(projected.area)

    def to_geojson(self) -> dict[str, Any]:
        """The area as a GeoJSON Feature."""
        return {
            "type": "Feature",
            "properties": {"source": self.source},
            "geometry": shapely.geometry.mapping(self.geometry),
        }


def _lambert_cylindrical(coords: Any, r: float) -> Any:
    import numpy as np

    out = np.empty_like(coords)
    out[:, 0] = r * np.radians(coords[:, 0])
    out[:, 1] = r * np.sin(np.radians(coords[:, 1]))
    return out


def parse_bbox(text: str) -> Area:
    """Parse ``"W,S,E,N"`` (degrees) into an :class:`Area`.

    Raises :class:`UsageError` naming the bad value for anything but four finite numbers
    with -180 <= W < E <= 180 and -90 <= S < N <= 90, or a box outside the Mercator world.
    """
    m = _BBOX_RE.match(text)
    if not m:
        raise UsageError(f"bbox {text!r} is not four numbers W,S,E,N")
    w, s, e, n = (float(v) for v in m.groups())
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise UsageError(f"bbox {text!r} has a value that is not finite")
    for name, v in (("west", w), ("east", e)):
        if not -180.0 <= v <= 180.0:
            raise UsageError(f"bbox {text!r}: {name} {v:g} is outside -180..180")
    for name, v in (("south", s), ("north", n)):
        if not -90.0 <= v <= 90.0:
            raise UsageError(f"bbox {text!r}: {name} latitude {v:g} is outside -90..90")
    if w >= e:
        raise UsageError(
            f"bbox {text!r}: west {w:g} must be less than east {e:g} "
            "(areas crossing the antimeridian: give a MultiPolygon split at 180)"
        )
    if s >= n:
        raise UsageError(f"bbox {text!r}: south {s:g} must be less than north {n:g}")
    return _finish(box(w, s, e, n), text.strip())


def load_area(spec: str | os.PathLike[str]) -> Area:
    """Read an area from a bbox string ``W,S,E,N``, a GeoJSON file (Feature,
    FeatureCollection, Polygon, MultiPolygon; holes honoured) or a WKT file or string."""
    text = os.fspath(spec).lstrip()  # the CLI marks a bbox starting with '-' by a leading space
    if re.match(r"^\s*(MULTI)?POLYGON\s*\(", text, re.IGNORECASE):
        shown = text if len(text) <= 80 else text[:77] + "..."  # errors name the WKT by its text
        return _finish(_parse_wkt(text, shown), shown)
    path = Path(text)
    if not path.is_file() and "," in text:
        return parse_bbox(text)
    if not path.is_file():
        raise UsageError(
            f"area {text!r} is neither a bbox W,S,E,N nor an existing GeoJSON/WKT file"
        )
    try:
        body = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"area file {text!r} cannot be read: {exc}") from None
    stripped = body.lstrip()
    if stripped.startswith("{"):
        return _finish(_parse_geojson(body, text), text)
    return _finish(_parse_wkt(body, text), text)


def _parse_wkt(body: str, where: str) -> Polygon | MultiPolygon:
    try:
        geom = shapely.from_wkt(body.strip())
    except shapely.errors.GEOSException as exc:
        raise UsageError(f"area {where!r} is not valid WKT: {exc}") from None
    return _polygonal(geom, where)


def _parse_geojson(body: str, where: str) -> Polygon | MultiPolygon:
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as exc:
        raise UsageError(f"area file {where!r} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "type" not in doc:
        raise UsageError(f"area file {where!r} is not GeoJSON (no 'type')")
    geometries = []
    kind = doc["type"]
    try:
        if kind == "FeatureCollection":
            for feature in doc.get("features") or []:
                if feature.get("geometry"):
                    geometries.append(shape(feature["geometry"]))
        elif kind == "Feature":
            if doc.get("geometry"):
                geometries.append(shape(doc["geometry"]))
        else:
            geometries.append(shape(doc))
    except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.GEOSException) as exc:
        raise UsageError(f"area file {where!r} has a malformed geometry: {exc}") from None
    if not geometries:
        raise UsageError(f"area file {where!r} holds no geometry")
    parts = [_polygonal(g, where) for g in geometries]
    return _polygonal(shapely.union_all(parts), where) if len(parts) > 1 else parts[0]


def _polygonal(geom: Any, where: str) -> Polygon | MultiPolygon:
    if geom is None or geom.is_empty:
        raise UsageError(f"area {where!r} is empty")
    if isinstance(geom, shapely.GeometryCollection) and not isinstance(geom, MultiPolygon):
        polys = [g for g in geom.geoms if isinstance(g, (Polygon, MultiPolygon))]
        if len(polys) != len(geom.geoms):
            raise UsageError(f"area {where!r} holds non-polygon geometries; give polygons only")
        geom = shapely.union_all(polys)
    if not isinstance(geom, (Polygon, MultiPolygon)):
        raise UsageError(f"area {where!r} is a {geom.geom_type}, not a Polygon or MultiPolygon")
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        raise UsageError(f"area {where!r} is not a valid polygon: {reason}")
    return geom


def _finish(geom: Polygon | MultiPolygon, source: str) -> Area:
    w, s, e, n = geom.bounds
    if w < -180.0 or e > 180.0:
        bad = w if w < -180.0 else e
        raise UsageError(
            f"area {source!r} has longitude {bad:g} outside -180..180 "
            "(areas crossing the antimeridian: split them at 180 into a MultiPolygon)"
        )
    if s < -90.0 or n > 90.0:
        bad = s if s < -90.0 else n
        raise UsageError(f"area {source!r} has latitude {bad:g} outside -90..90")
    clipped = geom.intersection(WORLD) if not WORLD.contains(geom) else geom
    if clipped.is_empty or clipped.area == 0:
        raise UsageError(f"area {source!r} lies outside the Web-Mercator world (|lat| > {MAX_LAT:.4f})")
    if isinstance(clipped, shapely.GeometryCollection) and not isinstance(clipped, MultiPolygon):
        clipped = shapely.union_all([g for g in clipped.geoms if g.area > 0])
    if not isinstance(clipped, (Polygon, MultiPolygon)):  # pragma: no cover - polygons clip to polygons
        raise UsageError(f"area {source!r} clipped to the Web-Mercator world is a {clipped.geom_type}, not polygons")
    shapely.prepare(clipped)
    return Area(clipped, source)
