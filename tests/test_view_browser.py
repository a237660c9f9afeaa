"""The viewer in a real browser: headless Chromium (Debian's package) driven by Playwright,
against `tilesweep view` serving real sweeps made with the simulator.

Skipped, with the reason, where Chromium or Playwright is missing (`.ci/run` installs both).
Screenshots go to build/test-screenshots/ (or $TILESWEEP_SCREENSHOTS)."""

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import ENV, tilesweep
from helpers.view import CHROMIUM, SCREENSHOTS, SMALL_BBOX, WORLD_SEED, ZOOM, TokenServer, get, kept_sweep, view_server

from tilesweep.sim import Faults, World, run_in_thread

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install '.[test]')")
if CHROMIUM is None:
    pytest.skip("no system Chromium (apt-get install chromium); Playwright's own browser download cannot work offline",
                allow_module_level=True)

from PIL import Image, ImageChops  # noqa: E402

TOKEN = "tok-browser-5ecret-91c2"


@pytest.fixture(scope="module")
def sim():
    with run_in_thread(World(seed=WORLD_SEED)) as srv:
        yield srv


@pytest.fixture(scope="module")
def sweep(sim, tmp_path_factory):
    return kept_sweep(tmp_path_factory, sim.template())


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(sweep):
    with view_server(sweep) as (url, _, lines):
        yield url
    assert not any("Traceback" in line for line in lines), "".join(lines)


class Page:
    """A page of the viewer with its console messages and network log."""

    def __init__(self, browser, url):
        self.page = browser.new_page(viewport={"width": 1200, "height": 760}, accept_downloads=True)
        self.console, self.responses, self.requests = [], [], []
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("response", lambda r: self.responses.append((r.status, r.url, r.headers)))
        self.page.goto(url)
        self.page.wait_for_function("window.tilesweep && window.tilesweep.ready === true", timeout=90_000)
        self.settle()

    def settle(self):
        self.page.wait_for_function("window.tilesweep.map.loaded() && window.tilesweep.map.areTilesLoaded()", timeout=90_000)
        self.page.evaluate("() => new Promise(r => { const m = window.tilesweep.map; m.once('idle', r); m.triggerRepaint(); })")

    def shot(self, name=None) -> Image.Image:
        png = self.page.locator("#map").screenshot()
        if name:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / f"{name}.png").write_bytes(self.page.screenshot())
        return Image.open(io.BytesIO(png)).convert("RGB")

    def errors(self):
        return [m for m in self.console if m[0] in ("error", "pageerror")]

    def close(self):
        self.page.close()


def differing(a: Image.Image, b: Image.Image, tol: int = 24) -> int:
    diff = ImageChops.difference(a, b).convert("L")
    return sum(diff.point(lambda v: 255 if v > tol else 0).histogram()[255:])


def not_background(img: Image.Image) -> int:
    bg = Image.new("RGB", img.size, (0x15, 0x18, 0x1C))
    return differing(img, bg, tol=30)


@pytest.fixture(scope="module")
def served_page(browser, served):
    """One page of the stored sweep's viewer, loaded once for the tests that read that page
    (each leaves its layers as it found them)."""
    p = Page(browser, served)
    yield p
    p.close()


def test_page_loads_imagery_and_overlay_without_console_errors(served_page, served):
    p = served_page
    layers = ["squares", "squares-line", "cells", "imagery"]
    try:
        assert p.errors() == [], p.errors()
        ok = {(s, u.split("/")[3]) for s, u, _ in p.responses if s == 200}
        assert (200, "imagery") in ok and (200, "overlay") in ok, ok
        mvt = [h for s, u, h in p.responses if "/overlay/" in u]
        assert mvt and all(h["content-type"] == "application/vnd.mapbox-vector-tile" for h in mvt)
        assert all(u.startswith(served) or u.startswith("data:") or u.startswith("blob:") for u in p.requests), \
            [u for u in p.requests if not u.startswith(served)]
        full = p.shot("viewer-stored-sweep")
        assert not_background(full) > full.size[0] * full.size[1] // 3, "imagery did not draw"
        p.page.evaluate("() => ['squares', 'squares-line', 'cells'].forEach(l => window.tilesweep.map.setLayoutProperty(l, 'visibility', 'none'))")
        p.settle()
        bare = p.shot()
        assert differing(full, bare) > 2000, "the overlay drew nothing"
        p.page.evaluate("() => window.tilesweep.map.setLayoutProperty('imagery', 'visibility', 'none')")
        p.settle()
        assert not_background(p.shot()) < not_background(bare) // 2, "the imagery is what fills the map"
    finally:  # the page as loaded, for the next test
        p.page.evaluate(f"() => {json.dumps(layers)}.forEach(l => window.tilesweep.map.setLayoutProperty(l, 'visibility', 'visible'))")
        p.settle()


def test_imagery_from_a_pmtiles_archive_is_read_with_range_requests(browser, sweep, tmp_path):
    archive = tmp_path / "tiles.pmtiles"
    tilesweep("export", sweep, archive)
    with view_server(sweep, "--pmtiles", str(archive)) as (url, _, _lines):
        p = Page(browser, url)
        try:
            b = p.page.evaluate("() => window.tilesweep.info.bbox")
            p.page.evaluate(f"() => window.tilesweep.map.jumpTo({{center: [{(b[0] + b[2]) / 2}, {(b[1] + b[3]) / 2}], zoom: {ZOOM}}})")
            p.settle()
            ranged = [s for s, u, h in p.responses if "/pmtiles/" in u]
            assert ranged and set(ranged) == {206}, ranged
            img = p.shot("viewer-pmtiles")
            assert not_background(img) > img.size[0] * img.size[1] // 2, "no imagery from the archive"
            assert p.errors() == [], p.errors()
        finally:
            p.close()


def test_slider_cells_click_and_download(served_page, served):
    p = served_page
    try:
        page = p.page
        count = "() => window.tilesweep.map.queryRenderedFeatures({layers: ['squares']}).length"
        at_default = page.evaluate(count)
        before = p.shot()
        page.locator("#threshold").fill("0.95")
        p.settle()
        at_high = page.evaluate(count)
        after = p.shot("viewer-threshold-0.95")
        assert 0 <= at_high < at_default, (at_default, at_high)
        assert differing(before, after) > 1000, "moving the slider changed nothing on the map"

        # Further out, cells count the detections at the threshold, from the base rows
        # (zoom 11) and from the score-bin pyramid (zoom 7): they add up to the detections.
        info = json.loads(get(served + "api/info")[2])
        model = info["models"][0]["id"]
        bbox = ",".join(map(str, info["bbox"]))
        W, S, E, N = info["bbox"]
        cells = ("() => window.tilesweep.map.querySourceFeatures('overlay', {sourceLayer: 'overlay', "
                 "filter: ['==', ['get', 'kind'], 'cell']}).reduce((a, f) => a + f.properties.det, 0)")
        for t in ("0.95", "0.5"):
            want = len(json.loads(get(served + f"api/detections.geojson?model={model}&t={t}&bbox={bbox}")[2])["features"])
            page.locator("#threshold").fill(t)
            for z in (11, 7):
                page.evaluate(f"() => window.tilesweep.map.jumpTo({{center: [{(W + E) / 2}, {(S + N) / 2}], zoom: {z}}})")
                # the cells' URL follows the slider after 150 ms: wait until the source has it
                page.wait_for_function(f"() => window.tilesweep.map.getSource('overlay').tiles[0].includes('t={float(t):.2f}&')",
                                       timeout=30_000)
                p.settle()
                assert page.evaluate(cells) == want > 0, (t, z)
        det = json.loads(get(served + f"api/detections.geojson?model={model}&t=0.5&bbox={bbox}")[2])

        # Click the centre of a detection: the panel shows its tile, block and scores.
        f = det["features"][0]["properties"]
        page.evaluate(f"() => window.tilesweep.map.jumpTo({{center: [{f['lon']}, {f['lat']}], zoom: {ZOOM}}})")
        p.settle()
        box = page.locator("#map").bounding_box()
        xy = page.evaluate(f"() => window.tilesweep.map.project([{f['lon']}, {f['lat']}])")
        page.mouse.click(box["x"] + xy["x"], box["y"] + xy["y"])
        page.wait_for_function(f"document.getElementById('info').dataset.tile === '{ZOOM}/{f['x']}/{f['y']}'", timeout=30_000)
        text = page.locator("#info").inner_text()
        assert f"{f['tower']:.4f}" in text and "true" in text and "14/" in text and "done" in text, text
        assert f"{f['lon']:.6f}" in text, text
        p.shot("viewer-click")

        # Download the detections of the view.
        page.evaluate("() => window.tilesweep.map.fitBounds(window.tilesweep.info.bbox, {animate: false})")
        p.settle()
        with page.expect_download(timeout=30_000) as dl:
            page.locator("#download").click()
        doc = json.loads(open(dl.value.path()).read())
        assert doc["type"] == "FeatureCollection" and 30 <= len(doc["features"]) <= len(det["features"])
        assert all(ft["properties"]["tower"] >= 0.5 for ft in doc["features"])
        assert p.errors() == [], p.errors()
    finally:  # the page as loaded, for a test after this one
        page.locator("#threshold").fill("0.5")
        page.evaluate("() => window.tilesweep.map.fitBounds(window.tilesweep.info.bbox, {padding: 20, animate: false})")
        p.settle()


def test_model_picker_switches_the_overlay(browser, sweep, tmp_path):
    two = tmp_path / "two-models"
    shutil.copytree(sweep, two)
    subprocess.run([sys.executable, "-m", "tilesweep", "predict", str(two), "--model", "helpers.models:greenness", "--quiet"],
                   cwd=Path(__file__).parent, env=ENV, check=True, capture_output=True, timeout=300)
    with view_server(two) as (url, _, _lines):
        p = Page(browser, url)
        try:
            page = p.page
            options = page.locator("#model option").all_inner_texts()
            assert len(options) == 2 and any("green" in o for o in options) and any("tower" in o for o in options), options
            demo = page.evaluate("() => window.tilesweep.model")
            before = p.shot()
            green = next(v for v in page.locator("#model option").evaluate_all("os => os.map(o => o.value)") if v != demo)
            page.locator("#model").select_option(green)
            p.settle()
            assert page.evaluate("() => window.tilesweep.model") == green
            assert differing(before, p.shot("viewer-second-model")) > 1000, "switching the model changed nothing"
            assert any(f"/overlay/{green}/" in u for u in p.requests)
            assert p.errors() == [], p.errors()
        finally:
            p.close()


def test_progress_updates_while_a_streamed_sweep_runs_beside_it(browser, tmp_path):
    # A slow simulator behind a server that wants a token: the run takes seconds, and the
    # page must show it move without ever seeing the token.
    with run_in_thread(World(seed=WORLD_SEED), Faults(latency_ms=120)) as slow, TokenServer(slow.url, TOKEN) as upstream:
        folder = tmp_path / "running"
        env = {"VIEW_TEST_TOKEN": TOKEN}
        template = upstream.template("VIEW_TEST_TOKEN")
        tilesweep("plan", SMALL_BBOX, folder, "--zoom", ZOOM, "--block-zoom", 16)
        with view_server(folder, env=env) as (url, _, lines):
            p = Page(browser, url)
            try:
                page = p.page
                assert page.locator("#progress").get_attribute("data-done") == "0"
                assert page.locator("#model").is_disabled()  # no predictions yet
                run = subprocess.Popen([sys.executable, "-m", "tilesweep", "run", str(folder), "--source", template,
                                        "--model", "demo", "--concurrency", "2", "--part-seconds", "1", "--quiet"],
                                       env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                seen = set()
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    seen.add(int(page.locator("#progress").get_attribute("data-done")))
                    if 16 in seen:
                        break
                    page.wait_for_timeout(500)
                out = run.communicate(timeout=240)[0]
                assert run.returncode == 0, out
                assert 16 in seen and len(seen - {0}) >= 2, f"the page saw done = {sorted(seen)}"
                page.wait_for_function("!document.getElementById('model').disabled", timeout=30_000)
                p.settle()
                page.wait_for_function("window.tilesweep.map.getSource('imagery') !== undefined", timeout=30_000)
                p.settle()
                # The overlay followed the ledger: every detection of the finished run is drawn.
                info = json.loads(get(url + "api/info")[2])
                bbox = ",".join(map(str, info["bbox"]))
                want = len(json.loads(get(url + f"api/detections.geojson?model={info['models'][0]['id']}&t=0.5&bbox={bbox}")[2])["features"])
                drawn = page.evaluate("() => window.tilesweep.map.querySourceFeatures('overlay', {sourceLayer: 'overlay', "
                                      "filter: ['all', ['==', ['get', 'kind'], 'tile'], ['>=', ['get', 's'], 0.5]]}).length")
                assert drawn == want > 0, (drawn, want)
                p.shot("viewer-after-run")
                # Imagery now comes through the server's proxy, which adds the token itself.
                assert any(s == 200 and "/imagery/" in u for s, u, _ in p.responses)
                assert upstream.with_token > 156 and upstream.without_token == 0
                assert p.errors() == [], p.errors()
                # The page, its requests and responses never carry the token.
                assert not any(TOKEN in u for u in p.requests)
                assert not any(TOKEN in json.dumps(h) for _, _, h in p.responses)
                assert TOKEN not in page.content()
            finally:
                p.close()
        assert TOKEN not in "".join(lines)
