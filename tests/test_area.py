"""Reading areas: bbox strings, GeoJSON and WKT, and the errors for bad ones."""

import pytest
from shapely.geometry import MultiPolygon, Polygon

from tilesweep.area import load_area, parse_bbox
from tilesweep.errors import UsageError
from tilesweep.tiles import MAX_LAT

SQUARE = [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]
HOLE = [[0.4, 0.4], [0.6, 0.4], [0.6, 0.6], [0.4, 0.6], [0.4, 0.4]]


def test_bbox_parses_to_a_box():
    a = parse_bbox(" 7.4, 46.9 ,7.5,46.97 ")
    assert a.bbox == pytest.approx((7.4, 46.9, 7.5, 46.97))
    assert a.area_km2 == pytest.approx(7.6 * 7.8, rel=0.05)  # about 7.6 km x 7.8 km near Bern


def test_bbox_is_clipped_to_the_mercator_world():
    a = parse_bbox("-10,80,10,90")
    assert a.bbox.north == pytest.approx(MAX_LAT)


@pytest.mark.parametrize(
    "text, words",
    [
        ("1,2,3", "not four numbers"),
        ("1,2,3,4,5", "not four numbers"),
        ("a,b,c,d", "not four numbers"),
        ("nowhere.geojson", "neither a bbox"),
        ("10,0,5,1", "west 10 must be less than east 5"),
        ("0,1,1,0", "south 1 must be less than north 0"),
        ("0,0,1,95", "north latitude 95"),
        ("-181,0,1,1", "west -181"),
        ("0,89,1,90", "outside the Web-Mercator world"),
        ("nan,0,1,1", "not four numbers"),
    ],
)
def test_bad_bbox_names_the_value(text, words):
    with pytest.raises(UsageError, match=words):
        load_area(text)


def test_geojson_kinds_and_holes(write_geojson):
    poly = {"type": "Polygon", "coordinates": [SQUARE, HOLE]}
    for doc in (
        poly,
        {"type": "Feature", "properties": {}, "geometry": poly},
        {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": poly}]},
    ):
        a = load_area(write_geojson(doc))
        assert isinstance(a.geometry, Polygon)
        assert len(a.geometry.interiors) == 1
        assert a.geometry.area == pytest.approx(1 - 0.04)


def test_geojson_multipolygon_and_collection_union(write_geojson):
    far = [[[5, 5], [6, 5], [6, 6], [5, 6], [5, 5]]]
    mp = {"type": "MultiPolygon", "coordinates": [[SQUARE], far]}
    assert isinstance(load_area(write_geojson(mp)).geometry, MultiPolygon)
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [SQUARE]}},
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": far}},
        ],
    }
    assert load_area(write_geojson(fc)).geometry.area == pytest.approx(2.0)


def test_wkt_file_and_inline(tmp_path):
    p = tmp_path / "a.wkt"
    p.write_text("POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0))")
    assert load_area(p).geometry.area == pytest.approx(1.0)
    assert load_area("POLYGON ((0 0, 2 0, 2 1, 0 0))").geometry.area == pytest.approx(1.0)


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        ('{"features": []}', "not GeoJSON"),
        ('{"type": "FeatureCollection", "features": []}', "holds no geometry"),
        ('{"type": "LineString", "coordinates": [[0,0],[1,1]]}', "LineString, not a Polygon"),
        ('{"type": "Polygon", "coordinates": [[[0,0],[1,1],[1,0],[0,1],[0,0]]]}', "not a valid polygon"),
        ('{"type": "Polygon", "coordinates": [[[170,0],[190,0],[190,1],[170,1],[170,0]]]}', "longitude 190"),
        ('{"type": "Polygon", "coordinates": "x"}', "malformed geometry"),
    ],
)
def test_bad_geojson_names_the_problem(write_geojson, content, words):
    with pytest.raises(UsageError, match=words):
        load_area(write_geojson(content))


def test_missing_file():
    with pytest.raises(UsageError, match="no/such.geojson"):
        load_area("no/such.geojson")
