"""`tilesweep view` over real HTTP: what it serves, what it refuses, secrets, read-only,
PMTiles with Range, one-line errors. Real sweeps from the simulator; the server runs as
the `tilesweep` subprocess a user starts. The browser checks are in test_view_browser.py."""

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import tilesweep
from helpers.view import SMALL_BBOX, WORLD_SEED, ZOOM, TokenServer, get, kept_sweep, view_server

from tilesweep.sim import World, run_in_thread
from tilesweep.view.server import STATIC

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-5ecret-DO-NOT-LEAK-7f3a"
TINY_BBOX = "8.5005,47.3005,8.5040,47.3025"  # a dozen zoom-18 tiles


@pytest.fixture(scope="module")
def sim():
    with run_in_thread(World(seed=WORLD_SEED)) as srv:
        yield srv


@pytest.fixture(scope="module")
def sweep(sim, tmp_path_factory):
    return kept_sweep(tmp_path_factory, sim.template())


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of a sweep with its sha256 (SQLite's -wal/-shm aside: a reader may map them)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def raw(url: str, target: str, method: str = "GET", host_header: str | None = None) -> int:
    """Status of a request sent byte for byte (no client-side path normalisation)."""
    host, port = url.split("//")[1].strip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        hdr = host_header or f"{host}:{port}"
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: {hdr}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_serves_the_page_tiles_and_overlay_and_refuses_the_rest_read_only(sweep):
    before = snapshot(sweep)
    with view_server(sweep) as (url, _, lines):
        assert url.startswith("http://127.0.0.1:")
        status, headers, body = get(url)
        assert status == 200 and b"maplibre-gl.js" in body
        for name, path in ((n, p) for n, p in ((p.relative_to(STATIC).as_posix(), p) for p in STATIC.rglob("*")) if p.is_file()):
            status, headers, body = get(url + "static/" + name)
            assert (status, body) == (200, path.read_bytes()), name
        info = json.loads(get(url + "api/info")[2])
        assert info["imagery"]["mode"] == "store" and info["zoom"] == ZOOM
        assert [m["name"] for m in info["models"]] == ["demo"]
        model = info["models"][0]["id"]

        # imagery: a stored tile, an overview mosaicked from stored tiles, caching headers
        det = json.loads(get(url + f"api/detections.geojson?model={model}&t=0.5&bbox={','.join(map(str, info['bbox']))}")[2])
        assert 30 <= len(det["features"]) <= 60 and not det["properties"]["truncated"]
        p = det["features"][0]["properties"]
        status, headers, body = get(url + f"imagery/{ZOOM}/{p['x']}/{p['y']}")
        assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
        assert "max-age" in headers["Cache-Control"]
        status, headers, body = get(url + f"imagery/{ZOOM - 2}/{p['x'] >> 2}/{p['y'] >> 2}")
        assert status == 200 and headers["Content-Type"].startswith("image/")
        # overlay: squares at high zoom, cells below; MVT with caching headers
        for z in (ZOOM - 3, ZOOM - 7, ZOOM - 10):
            status, headers, body = get(url + f"overlay/{model}/{z}/{p['x'] >> (ZOOM - z)}/{p['y'] >> (ZOOM - z)}.mvt?t=0.5")
            assert status == 200 and headers["Content-Type"] == "application/vnd.mapbox-vector-tile", z
            assert "Cache-Control" in headers and len(body) > 20, z
        # a click's answer: the tile's scores, label and block
        tile = json.loads(get(url + f"api/tile?z={ZOOM}&x={p['x']}&y={p['y']}")[2])
        assert tile["predictions"][0]["scores"]["tower"] == pytest.approx(p["tower"], abs=1e-3)
        assert tile["predictions"][0]["label"] is True and tile["block"]["state"] == "done" and tile["block"]["z"] == 14
        # traced lines: a layer computed from the detections (tilesweep.trace)
        status, headers, body = get(url + f"api/lines.geojson?model={model}&t=0.5")
        doc = json.loads(body)
        assert status == 200 and headers["Content-Type"].startswith("application/geo+json") and doc["type"] == "FeatureCollection"
        assert doc["features"] and {f["geometry"]["type"] for f in doc["features"]} == {"LineString"}
        assert all(2 <= f["properties"]["towers"] <= len(det["features"]) for f in doc["features"])  # two-tower lines: trace.py min_pair_m
        assert all(0 < f["properties"]["confidence"] <= 1 for f in doc["features"])
        progress = json.loads(get(url + "api/progress")[2])
        assert progress["blocks"]["done"] == 4 and progress["predicted_blocks"] == {model: 4}

        # refused: traversal, absolute paths, unknown routes, malformed z/x/y, writes
        for target, want in [
            ("/static/../sweep.toml", 404), ("/static/%2e%2e/sweep.toml", 404), ("/static/..%2f..%2fsweep.toml", 404),
            ("/static//etc/passwd", 404), ("//etc/passwd", 404), ("/static/vendor/../../server.py", 404),
            (f"/static/{STATIC}/app.js", 404), ("/sweep.toml", 404), ("/queue.sqlite", 404), ("/predictions/", 404),
            ("/imagery/18/abc/1", 400), ("/imagery/18/-1/0", 400), ("/imagery/18/1.5/0", 400), ("/imagery/30/0/0", 400),
            (f"/imagery/18/{1 << 18}/0", 404), ("/imagery/18/0/0", 404), ("/imagery/5/0/0", 404),
            (f"/overlay/{model}/3/9/0.mvt", 404), (f"/overlay/{model}/x/0/0.mvt", 400), ("/overlay/nosuch/3/0/0.mvt", 404),
            ("/overlay/..%2f..%2f/3/0/0.mvt", 404), (f"/overlay/{model}/3/0/0.mvt?t=2", 400),
            ("/api/tile?z=18&x=a&y=1", 400), ("/api/tile?z=3&x=0&y=0", 400),
            ("/api/detections.geojson?model=nosuch&bbox=0,0,1,1", 404),
            (f"/api/detections.geojson?model={model}&bbox=1,2", 400),
            ("/api/lines.geojson?model=nosuch", 404), (f"/api/lines.geojson?model={model}&t=2", 400),
        ]:
            assert raw(url, target) == want, target
        assert raw(url, "/api/info", "POST") == 405 and raw(url, "/", "DELETE") == 405
        # DNS rebinding: a page of another site re-pointed at 127.0.0.1 sends its own Host.
        assert raw(url, "/api/info", host_header="evil.example:8765") == 403
        assert raw(url, "/api/info", host_header=f"localhost:{url.rsplit(':', 1)[1].strip('/')}") == 200
    assert snapshot(sweep) == before, "the viewer changed the sweep"
    assert not any("Traceback" in line for line in lines), "".join(lines)


def test_pmtiles_is_served_with_range(sweep, tmp_path):
    archive = tmp_path / "tiles.pmtiles"
    tilesweep("export", sweep, archive)
    with view_server(sweep, "--pmtiles", str(archive)) as (url, _, _lines):
        assert json.loads(get(url + "api/info")[2])["imagery"]["mode"] == "pmtiles"
        status, headers, body = get(url + "pmtiles/imagery.pmtiles", {"Range": "bytes=0-126"})
        data = archive.read_bytes()
        assert status == 206 and body == data[:127] and body[:7] == b"PMTiles"
        assert headers["Content-Range"] == f"bytes 0-126/{len(data)}" and "max-age" in headers["Cache-Control"]
        status, _, body = get(url + "pmtiles/imagery.pmtiles", {"Range": f"bytes={len(data) - 10}-"})
        assert status == 206 and body == data[-10:]


def test_a_streamed_sweep_is_proxied_and_its_token_never_leaves_the_server(sim, tmp_path):
    with TokenServer(sim.url, TOKEN) as upstream:
        folder = tmp_path / "streamed"
        env = {"VIEW_TEST_TOKEN": TOKEN}
        tilesweep("plan", TINY_BBOX, folder, "--zoom", ZOOM)
        tilesweep("run", folder, "--source", upstream.template("VIEW_TEST_TOKEN"), "--model", "demo", "--quiet", env=env)
        assert not (folder / "tiles").exists() or not any((folder / "tiles").rglob("*.shard"))
        seen = []
        with view_server(folder, env=env) as (url, _, lines):
            for path in ("", "api/info", "api/progress", "api/area.geojson", "static/app.js"):
                seen.append(get(url + path))
            info = json.loads(seen[1][2])
            assert info["imagery"]["mode"] == "proxy" and info["imagery"]["minzoom"] < ZOOM
            W, S, E, N = info["bbox"]
            from tilesweep.tiles import tile_at

            t = tile_at((W + E) / 2, (S + N) / 2, ZOOM)
            before = upstream.with_token
            for z in (ZOOM, ZOOM - 3):
                r = get(url + f"imagery/{z}/{t.x >> (ZOOM - z)}/{t.y >> (ZOOM - z)}")
                assert r[0] == 200 and r[2][:3] == b"\xff\xd8\xff", r[:2]
                seen.append(r)
            assert upstream.with_token == before + 2  # the server added the token itself
            seen.append(get(url + f"imagery/{ZOOM}/{t.x + 100000}/{t.y}"))  # outside the area: refused, not proxied
            assert seen[-1][0] == 404 and upstream.with_token == before + 2
        for status, headers, body in seen:
            assert TOKEN.encode() not in body and TOKEN not in json.dumps(headers)
        assert TOKEN not in "".join(lines)
        # Without the variable the viewer still serves, says which variable is missing, shows no imagery.
        with view_server(folder) as (url, _, lines):
            info = json.loads(get(url + "api/info")[2])
            assert info["imagery"]["mode"] == "none" and "VIEW_TEST_TOKEN" in info["imagery"]["note"]
            assert get(url + f"imagery/{ZOOM}/{t.x}/{t.y}")[0] == 404


def test_bad_folders_ports_and_the_network_warning(sweep, tmp_path):
    res = tilesweep("view", tmp_path, check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "holds no plan" in res.stderr
    res = tilesweep("view", sweep, "--port", "70000", check=False)
    assert res.returncode == 2 and "port 70000" in res.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        res = tilesweep("view", sweep, "--port", busy, check=False, timeout=60)
    assert res.returncode == 2, res
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and f"port {busy} on 127.0.0.1 is in use" in err[0] and "Traceback" not in res.stderr, res.stderr
    # A sweep without predictions serves its imagery and progress, and says so.
    bare = tmp_path / "planned"
    tilesweep("plan", SMALL_BBOX, bare, "--zoom", ZOOM)
    with view_server(bare) as (url, _, lines):
        assert any("no predictions yet" in line for line in lines)
        info = json.loads(get(url + "api/info")[2])
        assert info["models"] == [] and json.loads(get(url + "api/progress")[2])["blocks"]["pending"] > 0
    with view_server(bare, "--host", "0.0.0.0") as (url, _, lines):
        assert any("WARNING" in line and "network" in line for line in lines)


def test_vendored_files_match_their_hashes():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_web.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    vendor = STATIC / "vendor"
    assert (vendor / "LICENSE.maplibre-gl.txt").is_file() and (vendor / "LICENSE.pmtiles.txt").is_file()
    assert "maplibre-gl 5." in (vendor / "VERSIONS").read_text()
