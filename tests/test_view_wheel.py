"""The viewer's page ships in the wheel: build the wheel from a copy of the source, install
it into a fresh virtual environment, and serve the page from there (assets answered, page
renders). A wheel built by a hook that silently skipped its web assets fails here."""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.cli import tilesweep
from helpers.view import CHROMIUM, SMALL_BBOX, ZOOM, get, view_server

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "src" / "tilesweep" / "view" / "static"


def test_the_wheel_serves_the_page_from_a_fresh_venv(tmp_path):
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel offline needs setuptools >= 77 (pip install '.[test]')")
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = wheels.glob("tilesweep-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assets = sorted(p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*") if p.is_file())
    assert {f"tilesweep/view/static/{a}" for a in assets} <= shipped, "page files missing from the wheel"

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    py = venv / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    # The fresh venv sees this one's dependencies (a plain path line: no .pth of ours runs,
    # so the editable install of the checkout stays invisible).
    (site_dir,) = (venv / "lib").glob("python3*/site-packages")
    (site_dir / "deps.pth").write_text("\n".join(p for p in site.getsitepackages() if "site-packages" in p) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([py, "-c", "import tilesweep.view.server as s; print(s.STATIC)"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=120)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr

    sweep = tmp_path / "planned"
    tilesweep("plan", SMALL_BBOX, sweep, "--zoom", ZOOM)
    with view_server(sweep, python=str(py), cwd=tmp_path, env={"PYTHONPATH": ""}) as (url, _, lines):
        status, _, body = get(url)
        assert status == 200 and b"maplibre-gl.js" in body
        for a in assets:
            status, _, body = get(url + "static/" + a)
            assert (status, body) == (200, (STATIC / a).read_bytes()), a
        if CHROMIUM is not None:
            sync_api = pytest.importorskip("playwright.sync_api")
            with sync_api.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page()
                errors = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                page.wait_for_function("window.tilesweep && window.tilesweep.ready === true", timeout=90_000)
                assert page.locator("#progress").get_attribute("data-done") == "0"
                assert errors == [], errors
                browser.close()
    assert not any("Traceback" in line for line in lines), "".join(lines)
