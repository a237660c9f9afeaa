"""`tilesweep plan` estimates first (issue 16): an absurd plan is refused (exit 2, one line
naming the count and the flag), --dry-run prints the estimate and writes nothing, and an
interrupted plan (Ctrl-C) leaves nothing behind."""

import json
import os
import signal
import time

from helpers.cli import popen, tilesweep

from tilesweep.area import load_area
from tilesweep.plan import PlanSpec, estimate_plan, plan_blocks
from tilesweep.sweep import Sweep, plan_fingerprint

WORLD = "-180,-85,180,85"


def test_a_plan_of_the_world_at_zoom_24_is_refused_naming_the_count_and_the_flag(tmp_path):
    sweep = tmp_path / "world"
    res = tilesweep("plan", WORLD, sweep, "--zoom", 24, check=False, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "280,553,280,072,323 tiles" in lines[0]
    assert "--allow-huge" in lines[0]
    assert not sweep.exists() and list(tmp_path.iterdir()) == []


def test_a_huge_sample_is_refused_for_the_tiles_it_must_test(tmp_path):
    res = tilesweep("plan", WORLD, tmp_path / "w", "--zoom", 20, "--fraction", 1e-6, check=False, timeout=60)
    assert res.returncode == 2 and "to test" in res.stderr and "--allow-huge" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_estimate_and_writes_nothing(tmp_path):
    sweep = tmp_path / "s"
    res = tilesweep("plan", WORLD, sweep, "--zoom", 24, "--dry-run", timeout=60)
    assert "dry run, nothing written" in res.stdout and "--allow-huge" in res.stdout
    got = json.loads(tilesweep("plan", "30.0,-3.0,36.0,3.0", sweep, "--zoom", 18, "--fraction", 0.001, "--dry-run", "--json").stdout)
    assert got["dry_run"] and got["refused"] is None
    assert abs(got["tiles"] - 19_108) < 100 and got["tested_tiles"] > 19_000_000
    assert not sweep.exists() and list(tmp_path.iterdir()) == []


def test_the_estimate_is_close_to_the_plan():
    for bbox, zoom, fraction in (("7.0,46.0,8.0,47.0", 15, 1.0), ("7.0,46.0,8.0,47.0", 16, 0.1), ("7.40,46.90,7.45,46.95", 17, 1.0)):
        area = load_area(bbox)
        spec = PlanSpec(zoom=zoom, fraction=fraction)
        est = estimate_plan(area.geometry, spec)
        tiles = sum(int(ch.counts.sum()) for ch in plan_blocks(area.geometry, spec))
        assert abs(est.tiles - tiles) <= 0.02 * tiles + 20, (bbox, est, tiles)


def test_sigint_mid_plan_leaves_no_files(tmp_path):
    sweep = tmp_path / "big"
    # ~70 M tiles to hash for the sample: many seconds of planning on a small machine
    p = popen("plan", "0,40,10,50", sweep, "--zoom", 18, "--fraction", 0.5, "--block-tiles", 16)
    deadline = time.monotonic() + 120
    while not (sweep / "queue.sqlite.partial").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode != 0
    assert not sweep.exists(), sorted(os.listdir(sweep))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_plan_into_an_existing_empty_folder_keeps_the_folder_only(tmp_path, monkeypatch):
    sweep = tmp_path / "s"
    sweep.mkdir()
    import tilesweep.sweep as sweep_mod

    def boom(*a, **k):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "plan_blocks", boom)
    try:
        Sweep.plan(sweep, load_area("7.0,46.0,7.1,46.1"), PlanSpec(zoom=14))
    except KeyboardInterrupt:
        pass
    assert sweep.is_dir() and list(sweep.iterdir()) == []


def test_fixed_block_plans_keep_their_fingerprint():
    # Sweeps planned before adaptive blocks (block_zoom fixed, no block_tiles) still match.
    import hashlib

    import shapely

    area = load_area("7.0,46.0,7.1,46.1")
    spec = PlanSpec(zoom=16, block_zoom=12, fraction=0.5, seed=3)
    h = hashlib.sha256()
    h.update(shapely.to_wkb(shapely.normalize(area.geometry), output_dimension=2))
    h.update(json.dumps({"zoom": 16, "block_zoom": 12, "fraction": 0.5, "seed": 3, "max_tiles": None}, sort_keys=True).encode())
    assert plan_fingerprint(area, spec) == h.hexdigest()[:32]


def test_a_fixed_block_sweep_reads_as_before(tmp_path):
    # What sweeps planned before adaptive blocks hold: one block zoom, no block_tiles.
    area = load_area("7.40,46.90,7.43,46.92")
    spec = PlanSpec(zoom=17, block_zoom=13)
    sweep, created = Sweep.plan(tmp_path / "old", area, spec)
    assert created and "block_tiles" not in sweep.plan_config and "block_zoom_min" not in sweep.plan_config
    assert sweep.store.block_zooms == (13,) and sweep.block_zoom_min == sweep.block_zoom == 13
    assert sweep.summary().describe_blocks() == "blocks at zoom 13"
    assert "block zoom 13" in sweep.describe_plan()
    again, created = Sweep.plan(tmp_path / "old", area, spec)
    assert not created  # the same plan again is a no-op
    sweep.close()
    again.close()
