"""Edges a newcomer met (issue 16): each is one line on stderr, exit 2, no traceback, and
nothing half-written; all run `tilesweep` as a real subprocess against real files."""

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from helpers.cli import tilesweep

from tilesweep.predict import PredictSettings
from tilesweep.sim import World, run_in_thread
from tilesweep.worker import FetchWorkers, WorkerSettings

BBOX = "7.430,46.940,7.435,46.945"  # 12 tiles at zoom 17, one block
SF = "-122.45,37.75,-122.40,37.78"  # San Francisco: the west is negative


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """A small sweep, fetched from the simulator (its tiles are in the store)."""
    root = tmp_path_factory.mktemp("fetched")
    sweep = root / "s"
    tilesweep("plan", BBOX, sweep, "-z", 17)
    with run_in_thread(World(seed=1)) as srv:
        tilesweep("fetch", sweep, "--source", srv.template(), "-q")
    first = tilesweep("tiles", "ls", sweep, "-n", "1").stdout.split()[0]
    return sweep, first


def one_line_exit_2(res, words):
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert words in res.stderr, res.stderr


def test_a_bbox_with_a_negative_west_is_an_area_not_an_option(tmp_path):
    res = tilesweep("plan", SF, tmp_path / "sf", "-z", 14, "--json")
    assert '"tiles"' in res.stdout and (tmp_path / "sf" / "queue.sqlite").is_file()
    # the same after options, in `sim truth`, and a bad one is named as a bbox
    tilesweep("sim", "truth", SF, "-o", tmp_path / "t.geojson")
    assert (tmp_path / "t.geojson").is_file()
    one_line_exit_2(tilesweep("plan", "-122.45,37.75,-122.40", tmp_path / "x", "-z", 14, check=False), "not four numbers")
    assert not (tmp_path / "x").exists()


def test_version():
    from tilesweep import __version__

    res = tilesweep("--version")
    assert res.stdout.strip() == f"tilesweep {__version__}"


def _ro_mount(path: Path):
    """A read-only tmpfs at ``path`` (root only: the check runs as root, where a chmod
    would not stop a write), or skip."""
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root (a chmod does not stop root)")
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    return path


# (args, words): {dir} a fresh path, {sweep} the fetched sweep, {tile} one of its tiles,
# {file} an existing plain file, {mine} a folder of the user's with a file in it.
BAD = [
    (["plan", BBOX, "/proc/tilesweep-x", "-z", "17"], "cannot be created"),
    (["plan", BBOX, "{file}/x", "-z", "17"], "cannot be created: Not a directory"),
    (["plan", "POLYGON((1 2, 3", "{dir}", "-z", "3"], "'POLYGON((1 2, 3' is not valid WKT"),
    (["tiles", "get", "{sweep}", "{tile}", "-o", "/nonexistent-dir/t.jpg"], "folder '/nonexistent-dir' does not exist"),
    (["tiles", "get", "{sweep}", "{tile}", "-o", "{file}/t.jpg"], "is not a folder"),
    (["tiles", "get", "{sweep}", "{tile}", "-o", "{mine}"], "is a folder"),
    (["sim", "truth", BBOX, "-o", "/nonexistent-dir/t.geojson"], "folder '/nonexistent-dir' does not exist"),
    (["sim", "truth", BBOX, "-o", "{file}/t.geojson"], "is not a folder"),
    (["export", "{sweep}", "/nonexistent-dir/a.pmtiles"], "folder '/nonexistent-dir' does not exist"),
    (["export", "{sweep}", "{file}/a.mbtiles"], "is not a folder"),
    (["export", "{sweep}", "{mine}", "--format", "pmtiles", "--force"], "is a folder"),
    (["export", "{sweep}", "{mine}", "--format", "dir", "--force"], "is not a tilesweep export"),
    (["export", "{sweep}", "{sweep}", "--format", "dir", "--force"], "is the sweep folder"),
    (["export", "{sweep}", "{sweep}", "--format", "pmtiles", "--force"], "is the sweep folder"),
    (["export", "{sweep}", "{sweep}/tiles", "--format", "dir", "--force"], "is the sweep folder"),
    (["fetch", "{sweep}", "--timeout", "0"], "--timeout 0 must be"),
    (["run", "{sweep}", "--model", "demo", "--timeout", "-1"], "--timeout -1 must be"),
    (["fetch", "{sweep}", "--workers", "0"], "workers 0 must be in 1..256"),
    (["fetch", "{sweep}", "--lease-ttl", "1"], "lease ttl 1 must be >= 3 seconds"),
    (["predict", "{sweep}", "--model", "demo", "--batch", "0"], "batch 0 must be in 1..65536"),
    (["predict", "{sweep}", "--model", "{mine}"], "is a folder, not a model file"),
    (["predict", "{sweep}", "--model", "{onnx_dir}"], "is a folder, not a model file"),
    (["fetch", "{sweep}", "--source", "http://127.0.0.1:9/{{z}}/{{x}}/{{y}}.jpg", "--super", "4"], "--super 4 needs a bbox template"),
    (["fetch", "{sweep}", "--source", "http://127.0.0.1:9/wms?BBOX={{bbox}}&W={{width}}", "--super", "4"], "and {width} and {height}"),
    (["fetch", "{sweep}", "--super", "4"], "--super needs --source"),
    (["sim", "serve", "--port", "1", "--host", "999.1.1.1"], "cannot listen on 999.1.1.1:1"),
    (["sim", "serve", "--port", "1", "--host", "10.255.255.254"], "cannot listen on 10.255.255.254:1"),
]


@pytest.mark.parametrize("make, kwargs, words", [
    (PredictSettings, dict(threads=0), "threads 0 must be in 1..256"),
    (PredictSettings, dict(part_seconds=0), "part seconds 0 must be > 0"),
    (PredictSettings, dict(model_threads=0), "model threads 0 must be in 1..256"),
    (WorkerSettings, dict(max_attempts=0), "max attempts 0 must be >= 1"),
    (FetchWorkers, dict(workers=4, concurrency=2), "concurrency 2 must be at least the number of workers (4)"),
], ids=lambda v: getattr(v, "__name__", None) if isinstance(v, type) else None)
def test_settings_check_themselves_with_the_clis_words(make, kwargs, words):
    """The settings objects refuse bad values when built (the CLI only passes its options
    on), so the Python API gets the same one-line UsageError as the command."""
    from tilesweep.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(words)):
        make(**kwargs)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, words", BAD, ids=[" ".join(a[:2]) + ": " + w for a, w in BAD])
def test_bad_paths_are_one_line_exit_2_nothing_written(tmp_path, fetched, args, words):
    sweep, tile = fetched
    (tmp_path / "file").write_text("a file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "net.onnx").mkdir()
    before_sweep, before_here = _snapshot(sweep), _snapshot(tmp_path)
    fmt = dict(dir=tmp_path / "new", sweep=sweep, tile=tile, file=tmp_path / "file", mine=tmp_path / "mine",
               onnx_dir=tmp_path / "net.onnx")
    res = tilesweep(*[a.format(**fmt) for a in args], check=False, timeout=60)
    one_line_exit_2(res, words)
    assert _snapshot(sweep) == before_sweep
    assert _snapshot(tmp_path) == before_here


def test_sim_serve_on_a_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = tilesweep("sim", "serve", "--port", port, check=False, timeout=60)
    one_line_exit_2(res, f"cannot listen on 127.0.0.1:{port}")
    assert "address already in use" in res.stderr


def test_plan_into_a_read_only_folder(tmp_path):
    ro = _ro_mount(tmp_path / "ro")
    try:
        one_line_exit_2(tilesweep("plan", BBOX, ro, "-z", 17, check=False), "is not writable")
        one_line_exit_2(tilesweep("plan", BBOX, ro / "x", "-z", 17, check=False), "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("damage", ["garbage", "empty", "page"])
def test_status_on_a_corrupt_queue(tmp_path, fetched, damage):
    sweep, _ = fetched
    copy = tmp_path / "s"
    subprocess.run(["cp", "-r", str(sweep), str(copy)], check=True)
    q = copy / "queue.sqlite"
    for side in ("-wal", "-shm"):
        Path(str(q) + side).unlink(missing_ok=True)
    if damage == "garbage":
        q.write_bytes(os.urandom(5000))
    elif damage == "empty":
        q.write_bytes(b"")
    else:  # one page overwritten in the middle of a valid file
        with open(q, "r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * 4096)
    res = tilesweep("status", copy, check=False)
    one_line_exit_2(res, "queue.sqlite")


def test_export_dir_force_replaces_an_earlier_export_whole(tmp_path, fetched):
    sweep, _ = fetched
    out = tmp_path / "tree"
    tilesweep("export", sweep, out, "--format", "dir")
    files = sorted(p.relative_to(out) for p in out.rglob("*.jpg"))
    assert len(files) == 12
    stray = out / "17" / "stray.jpg"
    stray.write_bytes(b"old")  # a leftover of the earlier export: --force must not merge
    tilesweep("export", sweep, out, "--format", "dir", "--force")
    assert sorted(p.relative_to(out) for p in out.rglob("*.jpg")) == files
    assert not stray.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]  # no .partial left


def test_tile_outside_the_plan_is_named_so(fetched):
    sweep, tile = fetched
    z, x, y = map(int, tile.split("/"))
    res = tilesweep("tiles", "get", sweep, f"{z}/1/1", check=False)
    assert res.returncode == 1 and "not in the sweep's plan" in res.stderr, res.stderr
    # a neighbour of the westmost planned tile, in its block's cell but outside the bbox
    stored = [tuple(map(int, line.split()[0].split("/"))) for line in tilesweep("tiles", "ls", sweep, "--all").stdout.splitlines()]
    _, wx, wy = min(stored, key=lambda t: t[1])
    corner = f"{z}/{wx - 1}/{wy}"
    assert (z, wx - 1, wy) not in stored
    res = tilesweep("tiles", "get", sweep, corner, check=False)
    assert res.returncode == 1 and "not in the sweep's plan" in res.stderr, res.stderr


def test_counts_in_messages_are_plural_only_when_not_one():
    from tilesweep.cli import _FetchMeter, plural, predict_progress
    from tilesweep.predict import PredictReport
    from tilesweep.predict.pipeline import StageMeter
    from tilesweep.worker import WorkerCounters

    assert (plural(1, "part"), plural(2, "part"), plural(0, "cut"), plural(1000, "block")) == ("1 part", "2 parts", "0 cuts", "1,000 blocks")
    line = _FetchMeter(10, quiet=True).line(WorkerCounters(tiles_ok=3, fetch={"limit": 40, "limit_cuts": 1}))
    assert "(1 cut)" in line
    # the live meter before the blocks are known, then with them: never "0 tiles of 0 blocks"
    r = PredictReport()
    assert predict_progress(r) == "looking for blocks to score; 0 tiles scored"
    r.blocks_todo, r.blocks = 7, 1
    r.stages = {"model": StageMeter("model")}
    r.stages["model"].tiles = 1
    assert predict_progress(r) == "1 of 7 blocks committed, 1 tile scored"


def test_a_worker_error_does_not_chain_a_missing_uvloop(tmp_path):
    """An error inside a run was raised "during handling of" the ImportError of uvloop, so
    every traceback ended in a misleading "ModuleNotFoundError: No module named 'uvloop'"."""
    from tilesweep.fetch import FetchSettings
    from tilesweep.sources import parse_source
    from tilesweep.worker import Worker

    (tmp_path / "queue.sqlite").mkdir()  # the queue cannot be opened: the run fails at once
    worker = Worker(tmp_path, 17, 13, parse_source("http://127.0.0.1:9/{z}/{x}/{y}.jpg", []), FetchSettings())
    with pytest.raises(Exception) as info:
        worker.run()
    assert not isinstance(info.value.__context__, ImportError), repr(info.value.__context__)
