"""``tilesweep sim``: truth and render write what they say; bad input is a UsageError, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tilesweep.errors import UsageError
from tilesweep.sim import World, read_truth
from tilesweep.sim.cli import app

runner = CliRunner()
BBOX = "8.5,47.3,8.52,47.32"


def test_truth_writes_geojson_and_parquet(tmp_path):
    expected = World(0).towers(BBOX)
    for name in ("towers.geojson", "towers.parquet"):
        out = tmp_path / name
        r = runner.invoke(app, ["truth", BBOX, "-o", str(out)])
        assert r.exit_code == 0, r.output
        assert [t.tower_id for t in read_truth(out)] == [t.tower_id for t in expected]


def test_render_writes_a_static_tree(tmp_path):
    r = runner.invoke(app, ["render", BBOX, str(tmp_path / "tree"), "--zoom", "15", "--processes", "1"])
    assert r.exit_code == 0, r.output
    files = sorted((tmp_path / "tree").rglob("*.jpg"))
    assert files and all(f.read_bytes()[:3] == b"\xff\xd8\xff" for f in files)
    z, x, y = files[0].relative_to(tmp_path / "tree").with_suffix("").parts
    from tilesweep.tiles import Tile

    assert files[0].read_bytes() == World(0).render(Tile(int(z), int(x), int(y)))


def test_render_png_512_in_processes(tmp_path):
    r = runner.invoke(app, ["render", BBOX, str(tmp_path / "t"), "-z", "15", "--format", "png", "--size", "512", "--processes", "2"])
    assert r.exit_code == 0, r.output
    files = list((tmp_path / "t").rglob("*.png"))
    assert len(files) >= 2


@pytest.mark.parametrize(
    "args",
    [
        ["truth", "not-an-area", "-o", "{tmp}/t.geojson"],
        ["truth", BBOX, "-o", "{tmp}/t.csv"],
        ["truth", "10,50,5,55", "-o", "{tmp}/t.geojson"],
        ["render", BBOX, "{tmp}/tree", "--zoom", "21"],
        ["render", BBOX, "{tmp}/tree", "--zoom", "-1"],
        ["render", BBOX, "{tmp}/tree", "--zoom", "15", "--format", "gif"],
        ["render", BBOX, "{tmp}/tree", "--zoom", "15", "--size", "300"],
        ["render", "0,40,10,50", "{tmp}/tree", "--zoom", "14"],
        ["serve", "--http-500", "1.5"],
        ["serve", "--reset", "-0.1"],
        ["serve", "--http-503", "0.7", "--http-429", "0.7"],
        ["serve", "--coverage", "nowhere.geojson"],
    ],
)
def test_bad_input_is_a_usage_error_and_writes_nothing(tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = runner.invoke(app, args)
    assert isinstance(r.exception, UsageError), (r.exception, r.output)
    assert list(tmp_path.iterdir()) == []


def test_top_level_command_exits_2_with_one_line(tmp_path):
    try:
        import tilesweep.cli  # noqa: F401  (mounted by the lead as `tilesweep sim`)
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"top-level CLI not importable yet: {exc}")
    p = subprocess.run(
        [sys.executable, "-m", "tilesweep", "sim", "render", BBOX, str(tmp_path / "x"), "--zoom", "22"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2, p.stderr
    assert "zoom 22" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
