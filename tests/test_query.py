"""Results out of core: `tilesweep query`, `convert`, `detections`, `summarize`, the
thresholds of predict / run, and `status`'s detections.

One real sweep for the module: the simulator over loopback, `tilesweep fetch` into the
store, then two models through `tilesweep predict` (the demo tower model, and a Python
greenness model at --threshold 0.3), so every table (predictions of two models with
different label columns, tiles, blocks, plan) holds real rows. Outputs are read back with
DuckDB, pyarrow and geopandas."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from helpers.cli import ENV, status_json, tilesweep

import tilesweep as ts
import tilesweep.convert as ts_convert
from tilesweep.store import Status, TileStore
from tilesweep.sweep import Sweep
from tilesweep.tiles import Tile, bounds, center

TESTS = Path(__file__).parent
ZOOM = 18
BBOX = "8.505,47.340,8.531,47.354"  # 320 zoom-18 tiles in 4 blocks at zoom 14 (world seed 5: ~47 towers)
WEST = [[8.50, 47.33], [8.518, 47.33], [8.518, 47.36], [8.50, 47.36], [8.50, 47.33]]
EAST = [[8.518, 47.33], [8.54, 47.33], [8.54, 47.36], [8.518, 47.36], [8.518, 47.33]]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, fetched_template):
    root = tmp_path_factory.mktemp("results")
    path = root / "s"
    # planned and fetched from World(seed=5) once per session (tests/conftest.py); ours to predict into
    shutil.copytree(fetched_template(BBOX, ZOOM, 14, 5), path)
    tilesweep("predict", path, "--model", "demo", "--quiet")
    tilesweep("predict", path, "--model", "helpers.models:greenness", "--threshold", "0.3", "--quiet",
              env={"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)})
    return path


@pytest.fixture(scope="module")
def areas(sweep):
    p = sweep.parent / "districts.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": "west", "code": 1}, "geometry": {"type": "Polygon", "coordinates": [WEST]}},
        {"type": "Feature", "properties": {"name": "east", "code": 2}, "geometry": {"type": "Polygon", "coordinates": [EAST]}},
    ]}))
    return p


def q(sweep, sql, *extra, check=True):
    return tilesweep("query", sql, "--sweep", sweep, *extra, check=check)


def one_line_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in res.stderr


def store_tiles(sweep):
    with TileStore(sweep / "tiles", ZOOM, 14) as store:
        return {t for t, _ in store.iter_tiles(Status.OK)}


# --- the four tables ----------------------------------------------------------------------


def test_predictions_view_holds_every_model_with_its_model_column(sweep):
    rel = Sweep.open(sweep).query("SELECT model, count(*) AS n, count(tower) AS t, count(green) AS g, "
                                  "sum(label::INT) AS pos FROM predictions GROUP BY model ORDER BY model")
    rows = rel.fetchall()
    assert [r[0] for r in rows] == ["demo", "helpers.models:greenness"]
    demo, green = rows
    assert demo[1] == green[1] == 320
    assert (demo[2], demo[3]) == (320, 0) and (green[2], green[3]) == (0, 320)  # union by name
    assert 30 <= demo[4] <= 70
    # The greenness labels were cut at --threshold 0.3, as the ledger records.
    (bad,) = Sweep.open(sweep).query(
        "SELECT count(*) FROM predictions WHERE model = 'helpers.models:greenness' AND label != (green >= 0.3)").fetchall()[0]
    assert bad == 0
    keys = Sweep.open(sweep).query("SELECT DISTINCT z, x, y FROM predictions").fetchall()
    assert {Tile(*k) for k in keys} == store_tiles(sweep)


def test_tiles_view_is_the_store_index(sweep):
    rows = q(sweep, "SELECT status, count(*), sum(bytes) FROM tiles GROUP BY status", "-o", sweep.parent / "t.csv")
    assert "wrote 1 rows" in rows.stdout
    with TileStore(sweep / "tiles", ZOOM, 14) as store:
        stats = store.stats()
    got = list(csv.reader(open(sweep.parent / "t.csv")))
    assert got[1] == ["ok", "320", str(stats["bytes"])]
    rel = ts.query("SELECT z, x, y, block FROM tiles", sweep)
    assert {Tile(z, x, y) for z, x, y, _ in rel.fetchall()} == store_tiles(sweep)
    # A tile's block is its zoom-14 parent's Hilbert id (the queue's key).
    (mismatch,) = ts.query("SELECT count(*) FROM tiles t JOIN blocks b ON t.block = b.block "
                           "WHERE t.x >> 4 != b.x OR t.y >> 4 != b.y", sweep).fetchall()[0]
    assert mismatch == 0


def test_blocks_view_is_the_queue(sweep):
    df = ts.query("SELECT * FROM blocks ORDER BY block", sweep).df()
    assert len(df) == 4
    assert set(df["state"]) == {"done"} and (df["attempts"] >= 1).all()
    assert int(df["ok"].sum()) == 320 and int(df["tiles"].sum()) == 320
    assert df["last_error"].isna().all() and df["done_at"].notna().all()
    assert list(df.columns)[:6] == ["block", "z", "x", "y", "tiles", "state"]


def test_plan_view_is_the_planned_tiles(sweep):
    rel = Sweep.open(sweep).query("SELECT z, x, y FROM plan")
    planned = {Tile(*r) for r in rel.fetchall()}
    assert len(planned) == 320 and planned == store_tiles(sweep)
    # A join the views are for: planned tiles that no model predicted (none here).
    (left,) = Sweep.open(sweep).query(
        "SELECT count(*) FROM plan p ANTI JOIN predictions r ON p.x = r.x AND p.y = r.y").fetchall()[0]
    assert left == 0


def test_python_api_returns_lazy_relations(sweep):
    rel = ts.query("SELECT x, y, tower FROM predictions WHERE model = 'demo' ORDER BY tower DESC", sweep)
    assert isinstance(rel, duckdb.DuckDBPyRelation)
    assert len(rel.df()) == 320 and rel.pl().height == 320 and rel.arrow().read_all().num_rows == 320
    assert len(rel.limit(5).fetchall()) == 5
    rel2 = Sweep.open(sweep).query("SELECT count(*) FROM tiles", threads=1, memory_limit="256MB")
    assert rel2.fetchall()[0] == (320,)


# --- files without a sweep ---------------------------------------------------------------


def test_query_files_by_glob_and_formats(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"trips{i}.csv").write_text("zone,fare\n" + "".join(f"{z},{z * i}.5\n" for z in range(10)))
    monkeypatch.chdir(tmp_path)
    res = tilesweep("query", "SELECT zone, count(*) AS n, sum(fare) AS total FROM 'trips*.csv' GROUP BY zone ORDER BY zone")
    assert "10 rows in" in res.stdout and "zone" in res.stdout
    tilesweep("query", "SELECT * FROM 'trips*.csv'", "-o", tmp_path / "all.parquet")
    tilesweep("query", "SELECT * FROM 'all.parquet' WHERE zone < 3", "-o", tmp_path / "few.json")
    rows = json.loads((tmp_path / "few.json").read_text())
    assert isinstance(rows, list) and len(rows) == 9 and set(rows[0]) == {"zone", "fare"}
    assert pq.read_table(tmp_path / "all.parquet").num_rows == 30
    res = tilesweep("query", "SELECT count(*) AS n FROM 'few.json'")
    assert "9" in res.stdout and "1 rows" in res.stdout


def test_printed_table_shows_first_rows_and_the_total(tmp_path):
    res = tilesweep("query", "SELECT range AS i FROM range(100000)", "-n", "3")
    assert "100,000 rows (first 3 shown)" in res.stdout
    assert res.stdout.count("\n") < 15


# --- outputs ------------------------------------------------------------------------------


def assert_rfc7946(doc, geometry_type):
    """The RFC 7946 structure: a FeatureCollection of Features, each with a geometry of
    the type and a properties object; positions [lon, lat] in range; polygons' rings
    closed, exterior counter-clockwise."""
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    assert set(doc) <= {"type", "features", "bbox"}
    for f in doc["features"]:
        assert f["type"] == "Feature" and isinstance(f["properties"], dict)
        g = f["geometry"]
        assert g["type"] == geometry_type
        if geometry_type == "Point":
            lon, lat = g["coordinates"]
            assert -180 <= lon <= 180 and -90 <= lat <= 90
        else:
            (ring,) = g["coordinates"]
            assert ring[0] == ring[-1] and len(ring) == 5
            area2 = sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ring, ring[1:]))
            assert area2 > 0, "exterior ring must be counter-clockwise"


def test_query_writes_geojson_from_lon_lat(sweep):
    out = sweep.parent / "q.geojson"
    q(sweep, "SELECT x, y, lon, lat, tower, label FROM predictions WHERE model = 'demo' AND label", "-o", out)
    doc = json.loads(out.read_text())
    assert_rfc7946(doc, "Point")
    f = doc["features"][0]
    assert f["geometry"]["coordinates"] == pytest.approx(list(center(Tile(ZOOM, f["properties"]["x"], f["properties"]["y"]))))
    assert f["properties"]["label"] is True and f["properties"]["tower"] >= 0.5


def test_query_writes_geojson_tiles_from_z_x_y_and_nan_as_null(sweep):
    out = sweep.parent / "tiles.geojson"
    q(sweep, "SELECT z, x, y, 'nan'::DOUBLE AS v FROM tiles LIMIT 7", "-o", out)
    doc = json.loads(out.read_text())  # NaN is not JSON: it must be null
    assert_rfc7946(doc, "Polygon")
    assert len(doc["features"]) == 7 and doc["features"][0]["properties"]["v"] is None
    p = doc["features"][0]["properties"]
    w, s, e, n = bounds(Tile(p["z"], p["x"], p["y"]))
    ring = doc["features"][0]["geometry"]["coordinates"][0]
    assert min(c[0] for c in ring) == pytest.approx(w) and max(c[1] for c in ring) == pytest.approx(n)


def test_empty_result_writes_an_empty_collection(sweep):
    out = sweep.parent / "none.geojson"
    q(sweep, "SELECT * FROM predictions WHERE false", "-o", out)
    assert json.loads(out.read_text()) == {"type": "FeatureCollection", "features": []}


# --- bad input: one line, exit 2, nothing written ------------------------------------------


@pytest.mark.parametrize("sql, words", [
    ("SELEC * FROM predictions", ["syntax error"]),
    ("SELECT * FROM towers", ["towers", "predictions, tiles, blocks, plan"]),
    ("SELECT nope FROM predictions", ["nope"]),
    ("SELECT * FROM 'missing*.csv'", ["missing"]),
])
def test_bad_sql_is_one_line(sweep, sql, words):
    out = sweep.parent / "bad.csv"
    before = set(os.listdir(sweep.parent))
    one_line_error(q(sweep, sql, "-o", out, check=False), *words)
    assert set(os.listdir(sweep.parent)) == before


def test_memory_limit_too_small_is_one_line_and_leaves_no_file(sweep):
    out = sweep.parent / "big.parquet"
    before = set(os.listdir(sweep.parent))
    res = q(sweep, "SELECT range % 100 AS k, list(range) FROM range(3000000) GROUP BY k", "-o", out,
            "--memory-limit", "1MB", check=False)
    one_line_error(res, "memory limit is too small")
    assert set(os.listdir(sweep.parent)) == before
    one_line_error(tilesweep("query", "SELECT 1", "--memory-limit", "lots", check=False), "lots")
    one_line_error(tilesweep("query", "SELECT 1", "--threads", "0", check=False), "threads")


def test_unwritable_outputs(sweep, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir.csv").mkdir()
    for out, words in [
        (tmp_path / "nofolder" / "o.csv", ["does not exist"]),
        (tmp_path / "afile" / "o.csv", ["does not exist"]),
        (tmp_path / "dir.csv", ["is a folder"]),
        (tmp_path / "o.xlsx", ["format"]),
        (Path("/proc/o.parquet"), ["cannot be written"]),
    ]:
        one_line_error(q(sweep, "SELECT * FROM predictions", "-o", out, check=False), *words)
    assert sorted(os.listdir(tmp_path)) == ["afile", "dir.csv"] and not os.listdir(tmp_path / "dir.csv")


def test_no_extension_is_installed_or_loaded_even_offline(sweep, tmp_path):
    """Auto-install and auto-load are off: an Excel file or a spatial function is an error
    at once, not a download. Run with no network at all where the kernel allows it."""
    con = ts.query("SELECT current_setting('autoinstall_known_extensions'), current_setting('autoload_known_extensions')")
    assert con.fetchall()[0] == (False, False)
    cmd = [sys.executable, "-m", "tilesweep", "query", "SELECT * FROM 'sheet.xlsx'"]
    spatial = [sys.executable, "-m", "tilesweep", "query", "SELECT ST_Point(1, 2)"]
    prefix = ["unshare", "--net"] if shutil.which("unshare") and subprocess.run(
        ["unshare", "--net", "true"], capture_output=True).returncode == 0 else []
    home = tmp_path / "home"  # an empty extension folder: nothing installed earlier can load
    env = {**ENV, "HOME": str(home)}
    for c in (cmd, spatial):
        res = subprocess.run(prefix + c, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        one_line_error(res)
    assert not (home / ".duckdb").exists(), "nothing was installed"
    # Geometry outputs still work offline: shapely, not a DuckDB extension.
    res = subprocess.run(prefix + [sys.executable, "-m", "tilesweep", "query", "SELECT lon, lat FROM predictions LIMIT 3",
                                   "--sweep", str(sweep), "-o", str(tmp_path / "p.geojson")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(json.loads((tmp_path / "p.geojson").read_text())["features"]) == 3


# --- convert ------------------------------------------------------------------------------


def test_convert_infers_types_over_every_row(tmp_path):
    """The classic failure: a column empty for the first 30,000 rows, then a value; a
    column of numbers that turns into text near the end."""
    n = 40_000
    for part in (0, 1):
        with open(tmp_path / f"fhv_{part}.csv", "w") as f:
            f.write("base,zone,sr_flag,code\n")
            for i in range(n):
                flag = "1" if part == 1 and i > 30_000 and i % 7 == 0 else ""
                code = "X12" if part == 1 and i == n - 1 else str(i)
                f.write(f"B{i % 5:05d},{i % 265 + 1},{flag},{code}\n")
    out = tmp_path / "fhv.parquet"
    res = tilesweep("convert", tmp_path / "fhv_*.csv", out, "--memory-limit", "256MB", "--threads", "1")
    assert "80,000 rows from 2 file(s)" in res.stdout, res.stdout
    t = pq.read_table(out)
    types = {f.name: str(f.type) for f in t.schema}
    assert types["zone"] == "int64" and types["code"] == "string" and types["sr_flag"] == "int64", types
    assert types["base"] == "string"
    assert t.num_rows == 2 * n and t.column("sr_flag").null_count == 2 * n - sum(1 for i in range(n) if i > 30_000 and i % 7 == 0)
    assert t.column("code").to_pylist()[-1] in ("X12", "0") or "X12" in t.column("code").to_pylist()
    meta = pq.read_metadata(out)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    # The converted file answers the same query as the CSV.
    a = ts.query(f"SELECT zone, count(*) FROM '{tmp_path}/fhv_*.csv' GROUP BY zone ORDER BY zone").fetchall()
    b = ts.query(f"SELECT zone, count(*) FROM '{out}' GROUP BY zone ORDER BY zone").fetchall()
    assert a == b and len(a) == 265


def test_convert_files_with_different_columns(tmp_path):
    """Files are joined by column name (a column one file lacks is NULL there), with the
    types inferred over all rows given to the write; the default memory limit applies."""
    (tmp_path / "a.csv").write_text("id,name\n1,x\n2,y\n")
    (tmp_path / "b.csv").write_text("id,score\n3,1.5\n4,\n")
    (tmp_path / "c.csv").write_text("id,name\n5,\n")
    seen = []
    real = ts_convert.connect

    def spy(memory_limit=None, threads=None):
        seen.append(memory_limit)
        return real(memory_limit, threads)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ts_convert, "connect", spy)
        report = ts_convert.convert([tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"], tmp_path / "o.parquet")
    assert seen == [ts_convert.DEFAULT_MEMORY_LIMIT] == ["512MB"]
    assert report.rows == 5 and dict(report.columns) == {"id": "BIGINT", "name": "VARCHAR", "score": "DOUBLE"}
    rows = ts.query(f"SELECT id, name, score FROM '{tmp_path / 'o.parquet'}' ORDER BY id").fetchall()
    assert rows == [(1, "x", None), (2, "y", None), (3, None, 1.5), (4, None, None), (5, None, None)]


def test_cli_start_up_imports_only_what_the_command_needs(tmp_path):
    """`tilesweep --help`, `query` and `convert` do not import the sweep's machinery
    (numpy, shapely, the store, the simulator's world, onnxruntime, aiohttp): on a 2-core
    notebook those imports were most of a second before any work."""
    probe = (
        "import sys\n"
        "from tilesweep.cli import main\n"
        "sys.argv = ['tilesweep', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('shapely', 'pandas', 'onnxruntime', 'aiohttp', 'asyncio', 'tilesweep.sweep', 'tilesweep.store',\n"
        "         'tilesweep.plan', 'tilesweep.area', 'tilesweep.sim.world', 'tilesweep.worker', 'tilesweep.fetch',\n"
        "         'tilesweep.predict.pipeline')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))\n"
        "print('ARRAYS', sorted(m for m in ('numpy', 'pyarrow', 'duckdb') if m in sys.modules))\n"
    )
    (tmp_path / "a.csv").write_text("x\n1\n")

    def loaded(*args):
        res = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, env=ENV,
                             timeout=120, cwd=tmp_path)
        lines = dict(ln.split(" ", 1) for ln in res.stdout.splitlines() if ln.startswith(("LOADED", "ARRAYS")))
        assert "LOADED" in lines, res.stdout + res.stderr
        return lines["LOADED"], lines["ARRAYS"]

    assert loaded("--help") == ("[]", "[]")
    assert loaded("query", "--help") == ("[]", "[]")
    assert loaded("query", "select 1")[0] == "[]"
    # DuckDB writes the file: no Arrow, no numpy
    assert loaded("query", "select 1 AS a", "-o", tmp_path / "o.csv") == ("[]", "['duckdb']")
    assert loaded("convert", tmp_path / "a.csv", tmp_path / "a.parquet") == ("[]", "['duckdb']")
    assert (tmp_path / "o.csv").read_text().split() == ["a", "1"] and (tmp_path / "a.parquet").is_file()
    # status reads the queue and the ledger; a bad --threshold is refused before any import
    # of weight: neither needs the predict pipeline or DuckDB (the tests run them hundreds of times)
    sweep = tmp_path / "s"
    tilesweep("plan", "8.500,47.300,8.502,47.301", sweep, "--zoom", 18)
    for args in (("status", sweep, "--json"), ("predict", sweep, "--model", "demo", "--threshold", 2)):
        heavy, arrays = loaded(*args)
        assert "tilesweep.predict.pipeline" not in heavy and "duckdb" not in arrays, (args, heavy, arrays)
        assert args[0] != "status" or "pyarrow" not in arrays, arrays  # the ledger is SQLite (or the queue's server)


def test_convert_bad_input(tmp_path):
    (tmp_path / "a.csv").write_text("x\n1\n")
    one_line_error(tilesweep("convert", tmp_path / "nope*.csv", tmp_path / "o.parquet", check=False), "nope")
    one_line_error(tilesweep("convert", tmp_path / "gone.csv", tmp_path / "o.parquet", check=False), "does not exist")
    one_line_error(tilesweep("convert", tmp_path / "a.csv", tmp_path / "o.csv", check=False), ".parquet")
    one_line_error(tilesweep("convert", tmp_path / "a.csv", check=False), "OUT.parquet")
    one_line_error(tilesweep("convert", tmp_path / "a.csv", tmp_path / "no" / "o.parquet", check=False), "does not exist")
    one_line_error(tilesweep("convert", tmp_path / "a.csv", tmp_path / "o.parquet", "--memory-limit", "x", check=False))
    assert sorted(os.listdir(tmp_path)) == ["a.csv"]


# --- detections ---------------------------------------------------------------------------


def demo_positives(sweep, threshold=None):
    cond = "label" if threshold is None else f"tower >= {threshold}"
    return {(x, y) for x, y in ts.query(f"SELECT x, y FROM predictions WHERE model = 'demo' AND {cond}", sweep).fetchall()}


def test_detections_geojson_points(sweep):
    out = sweep.parent / "det.geojson"
    res = tilesweep("detections", sweep, "-o", out, "--model", "demo")
    doc = json.loads(out.read_text())
    assert_rfc7946(doc, "Point")
    got = {(f["properties"]["x"], f["properties"]["y"]) for f in doc["features"]}
    assert got == demo_positives(sweep) and f"wrote {len(got)} detections of demo" in res.stdout
    p = doc["features"][0]["properties"]
    assert set(p) == {"z", "x", "y", "lon", "lat", "score", "label", "tower", "model"}
    assert p["label"] == "tower" and p["model"] == "demo" and p["score"] == p["tower"] >= 0.5


def test_detections_geoparquet_tiles_read_by_geopandas(sweep):
    gpd = pytest.importorskip("geopandas")
    out = sweep.parent / "det.parquet"
    tilesweep("detections", sweep, "-o", out, "--model", "demo", "--geometry", "tile", "--threshold", "0.9")
    geo = json.loads(pq.read_metadata(out).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"] and len(col["bbox"]) == 4
    assert json.loads(pq.read_schema(out).metadata[b"geo"])["columns"]["geometry"]["encoding"] == "WKB"
    df = gpd.read_parquet(out)
    assert df.crs is not None and df.crs.to_string() in ("OGC:CRS84", "EPSG:4326")
    assert {(int(x), int(y)) for x, y in zip(df.x, df.y)} == demo_positives(sweep, 0.9)
    r = df.iloc[0]
    w, s, e, n = bounds(Tile(int(r.z), int(r.x), int(r.y)))
    assert r.geometry.bounds == pytest.approx((w, s, e, n))
    assert (df.score >= 0.9).all()
    lo, la, hi, na = col["bbox"]
    assert lo <= df.total_bounds[0] and hi >= df.total_bounds[2]


def test_detections_csv_and_area(sweep, areas, tmp_path):
    out = tmp_path / "det.csv"
    area = tmp_path / "west.geojson"
    area.write_text(json.dumps({"type": "Polygon", "coordinates": [WEST]}))
    tilesweep("detections", sweep, "-o", out, "--model", "demo", "--area", area)
    rows = list(csv.DictReader(open(out)))
    # by the detection's point: where in its tile the demo model placed the tower
    placed = ts.query("SELECT x, y, tower_lon, tower_lat FROM predictions WHERE model = 'demo' AND label", sweep).fetchall()
    west = {(x, y) for x, y, lon, _ in placed if lon < 8.518}
    assert {(int(r["x"]), int(r["y"])) for r in rows} == west and west
    by_centre = {(x, y) for x, y in demo_positives(sweep) if center(Tile(ZOOM, x, y))[0] < 8.518}
    assert len(west ^ by_centre) <= 4, "the points and the tile centres differ only along the area's edge"
    assert rows[0]["geometry"].startswith("POINT (")
    lon, lat = (float(v) for v in rows[0]["geometry"][7:-1].split())
    x, y = int(rows[0]["x"]), int(rows[0]["y"])
    w, s, e, n = bounds(Tile(ZOOM, x, y))
    assert w < lon < e and s < lat < n and (lon, lat) != pytest.approx(center(Tile(ZOOM, x, y)), abs=1e-9)
    assert (lon, lat) == pytest.approx(next((p[2], p[3]) for p in placed if (p[0], p[1]) == (x, y)), abs=1e-7)
    # A bbox area works too.
    tilesweep("detections", sweep, "-o", tmp_path / "bb.csv", "--model", "demo", "--area", "8.50,47.33,8.518,47.36")
    assert len(list(csv.DictReader(open(tmp_path / "bb.csv")))) == len(west)


def test_detections_bad_input(sweep, tmp_path):
    out = tmp_path / "d.geojson"
    one_line_error(tilesweep("detections", sweep, "-o", out, check=False), "several models", "--model")
    one_line_error(tilesweep("detections", sweep, "-o", out, "-m", "nope", check=False), "nope", "demo")
    one_line_error(tilesweep("detections", sweep, "-o", out, "-m", "demo", "--threshold", "1.5", check=False), "outside 0..1")
    one_line_error(tilesweep("detections", sweep, "-o", out, "-m", "demo", "--threshold", "-0.1", check=False), "outside 0..1")
    one_line_error(tilesweep("detections", sweep, "-o", out, "-m", "demo", "--geometry", "hex", check=False), "hex")
    one_line_error(tilesweep("detections", sweep, "-o", tmp_path / "d.json", "-m", "demo", check=False), ".geojson")
    one_line_error(tilesweep("detections", tmp_path / "nosweep", "-o", out, check=False), "holds no plan")
    assert os.listdir(tmp_path) == []


# --- summarize ----------------------------------------------------------------------------


def test_summarize_by_districts(sweep, areas):
    out = sweep.parent / "sum.parquet"
    tilesweep("summarize", sweep, "--by", areas, "--model", "demo", "-o", out)
    t = pq.read_table(out).to_pylist()
    assert [r["name"] for r in t] == ["west", "east"] and [r["code"] for r in t] == [1, 2]
    assert sum(r["planned"] for r in t) == 320 and sum(r["fetched"] for r in t) == 320
    assert sum(r["predicted"] for r in t) == 320
    assert sum(r["detections"] for r in t) == len(demo_positives(sweep))
    west = sum(1 for x, y in demo_positives(sweep) if center(Tile(ZOOM, x, y))[0] < 8.518)
    assert t[0]["detections"] == west
    assert json.loads(pq.read_metadata(out).metadata[b"geo"])["columns"]["geometry"]["geometry_types"] == ["Polygon"]
    res = tilesweep("summarize", sweep, "--by", areas, "--model", "helpers.models:greenness", "--threshold", "0.0")
    assert "west" in res.stdout and "2 rows" in res.stdout
    gj = sweep.parent / "sum.geojson"
    tilesweep("summarize", sweep, "--by", areas, "-m", "demo", "-o", gj)
    doc = json.loads(gj.read_text())
    assert_rfc7946(doc, "Polygon")
    assert doc["features"][1]["properties"]["name"] == "east" and "geometry" not in doc["features"][1]["properties"]


def test_summarize_by_zoom(sweep):
    out = sweep.parent / "z.csv"
    tilesweep("summarize", sweep, "--by-zoom", 16, "-m", "demo", "-o", out)
    rows = list(csv.DictReader(open(out)))
    assert sum(int(r["planned"]) for r in rows) == 320 and sum(int(r["detections"]) for r in rows) == len(demo_positives(sweep))
    assert all(r["z"] == "16" for r in rows)
    assert len({(r["x"], r["y"]) for r in rows}) == len(rows)
    gj = sweep.parent / "z.geojson"
    tilesweep("summarize", sweep, "--by-zoom", 15, "-m", "demo", "-o", gj)
    assert_rfc7946(json.loads(gj.read_text()), "Polygon")


def test_summarize_bad_input(sweep, areas, tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "Point", "coordinates": [1, 2]}')
    one_line_error(tilesweep("summarize", sweep, "-m", "demo", check=False), "--by")
    one_line_error(tilesweep("summarize", sweep, "--by", bad, "-m", "demo", check=False), "Polygon")
    one_line_error(tilesweep("summarize", sweep, "--by", tmp_path / "none.geojson", "-m", "demo", check=False), "does not exist")
    one_line_error(tilesweep("summarize", sweep, "--by-zoom", 19, "-m", "demo", check=False), "19")
    one_line_error(tilesweep("summarize", sweep, "--by", areas, "-m", "demo", "--threshold", "7", check=False), "outside 0..1")


# --- thresholds of predict / run, detections in status -----------------------------------------


def test_status_shows_detections_per_model(sweep):
    res = tilesweep("status", sweep)
    assert "detections at score >= 0.5" in res.stdout and "detections at score >= 0.3" in res.stdout
    st = status_json(sweep)
    by = {m["model"]: m for m in st["predictions"]}
    assert by["demo"]["detections"] == len(demo_positives(sweep)) and by["demo"]["threshold"] == 0.5
    green = ts.query("SELECT count(*) FROM predictions WHERE model = 'helpers.models:greenness' AND green >= 0.3", sweep)
    assert by["helpers.models:greenness"]["detections"] == green.fetchall()[0][0]
    assert by["helpers.models:greenness"]["threshold"] == 0.3


def test_predict_and_run_threshold_bad_values(sweep, tmp_path):
    for cmd in (("predict", sweep, "--model", "demo"), ("run", sweep, "--model", "demo", "--source", "http://127.0.0.1:9/{z}/{x}/{y}.png")):
        for bad in ("1.01", "-1", "nan"):
            one_line_error(tilesweep(*cmd, "--threshold", bad, check=False), "outside 0..1")
    # A threshold that differs from the one this model's rows were written with is refused.
    one_line_error(tilesweep("predict", sweep, "--model", "demo", "--threshold", "0.7", check=False),
                   "threshold 0.5", "detections --threshold")
    res = tilesweep("predict", sweep, "--model", "demo", "--threshold", "0.5", "--quiet")
    assert "0 tiles scored" in res.stdout


def test_plan_view_matches_the_queue_for_a_sampled_plan(tmp_path):
    """A 1% sample: blocks hold bit masks or tile lists (and may sit at several zooms)."""
    path = tmp_path / "sparse"
    tilesweep("plan", "8.40,47.30,8.60,47.45", path, "--zoom", ZOOM, "--fraction", "0.01")
    with Sweep.open(path) as sw:
        expected = set()
        for block in sw.queue.blocks():
            expected |= set(block.tile_list(ZOOM))
        got = [Tile(*r) for r in sw.query("SELECT z, x, y FROM plan").fetchall()]
        assert len(got) == len(set(got)) == sw.summary().tiles
        assert set(got) == expected
        (n,) = sw.query("SELECT count(*) FROM plan p JOIN blocks b USING (block)").fetchall()[0]
        assert n == len(got)
