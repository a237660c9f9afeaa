"""A full disk during `fetch`, `run` or `export` (issue 16): one line naming ENOSPC and the
path, exit 1, no lease left held, nothing half-written; after space is freed the same
command finishes the job. The disk is a real, small tmpfs (mounting one needs root)."""

import os
import subprocess

import pytest
from helpers.cli import status_json, tilesweep

from tilesweep.sim import World, run_in_thread

BBOX = "8.500,47.300,8.516,47.310"  # 156 zoom-18 tiles (~1.5 MB of simulator JPEGs) in 16 blocks


@pytest.fixture
def disk(tmp_path):
    """A 4 MiB tmpfs; ``fill(left)`` leaves ``left`` bytes free on it, ``free()`` undoes it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")

    class Disk:
        path = mnt
        filler = mnt / "filler"

        def fill(self, left: int) -> None:
            st = os.statvfs(mnt)
            with open(self.filler, "ab") as f:
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - left))

        def free(self) -> None:
            self.filler.unlink()

    yield Disk()
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture(scope="module")
def sim():
    # world seed 5, as most tests of this bbox: its pixels are in the session's sim cache
    # (TILESWEEP_SIM_CACHE) once any of them ran, not rendered again for a world of its own
    with run_in_thread(World(seed=5)) as srv:
        yield srv


def assert_disk_full_line(res, path_words):
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "ENOSPC" in res.stderr and path_words in res.stderr, res.stderr


def no_lease_held(sweep):
    st = status_json(sweep)
    assert st["blocks_leased"] == 0, st
    return st


@pytest.mark.parametrize("workers", [1, 2])
def test_fetch_on_a_full_disk(disk, sim, workers):
    sweep = disk.path / "s"
    tilesweep("plan", BBOX, sweep, "--zoom", 18, "--block-zoom", 16)
    disk.fill(600_000)
    res = tilesweep("fetch", sweep, "--source", sim.template(), "-q", "-w", workers, check=False, timeout=120)
    assert_disk_full_line(res, str(sweep))
    assert no_lease_held(sweep)["blocks_done"] < 16
    disk.free()
    tilesweep("fetch", sweep, "-q", "-w", workers, timeout=120)
    st = no_lease_held(sweep)
    assert st["blocks_done"] == 16 and st["tiles_ok"] == 156 and st["mismatch"] is None


def test_run_on_a_full_disk(disk, sim):
    sweep = disk.path / "r"
    tilesweep("plan", BBOX, sweep, "--zoom", 18, "--block-zoom", 16)
    disk.fill(40_000)  # no room for the reserve, nor for the run
    res = tilesweep("run", sweep, "--source", sim.template(), "--model", "demo", "-q", "--part-seconds", 0.5,
                    check=False, timeout=120)
    assert_disk_full_line(res, str(sweep))
    no_lease_held(sweep)
    disk.free()
    res = tilesweep("run", sweep, "--model", "demo", "-q", timeout=120)
    st = no_lease_held(sweep)
    assert st["blocks_done"] == 16 and st["predictions"][0]["rows"] == 156


@pytest.mark.parametrize("name", ["out.pmtiles", "out.mbtiles", "tree"])
def test_export_on_a_full_disk(disk, sim, tmp_path, name):
    sweep = tmp_path / "s"  # the sweep lives on the big disk; the export goes to the full one
    tilesweep("plan", BBOX, sweep, "--zoom", 18, "--block-zoom", 16)
    tilesweep("fetch", sweep, "--source", sim.template(), "-q")
    disk.fill(200_000)
    before = sorted(p.name for p in disk.path.iterdir())
    args = ["export", sweep, disk.path / name] + (["--format", "dir"] if name == "tree" else [])
    res = tilesweep(*args, check=False, timeout=120)
    assert_disk_full_line(res, str(disk.path))
    assert sorted(p.name for p in disk.path.iterdir()) == before  # nothing half-written
    disk.free()
    tilesweep(*args, timeout=120)
    assert (disk.path / name).exists()
