"""Decoding in other processes through a shared-memory ring (tilesweep.predict.shmring):
real processes, real POSIX shared memory, real JPEG tiles of the simulator's world.

The pixels must be exactly those of decoding in this process, whatever dies: a decode
process killed with SIGKILL, or the parent itself; and no segment may be left in /dev/shm."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tilesweep.decode import decode, fit
from tilesweep.predict.shmring import SHM_PREFIX, DecodePool, ShmRing
from tilesweep.sim import World
from tilesweep.tiles import Tile

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this system")


def segments(name_part: str = "") -> list[str]:
    return sorted(p.name for p in SHM.glob(f"{SHM_PREFIX}*") if name_part in p.name)


@pytest.fixture(scope="module")
def tiles():
    world = World(5)
    data = [world.render(Tile(18, 137000 + i % 7, 92000 + i // 7)) for i in range(21)]
    data[4] = b"<html>not a tile</html>"  # does not decode
    data[9] = data[9][: len(data[9]) // 3]  # cut short
    return data


def expected(datas, size):
    out, owner, bad = [], [], np.zeros(len(datas), bool)
    for i, d in enumerate(datas):
        try:
            p = fit(decode(d), size, "resize")
        except ValueError:
            bad[i] = True
            continue
        out.append(p)
        owner += [i] * len(p)
    return np.concatenate(out), np.array(owner), bad


def collect(pool, jobs, kill=None):
    """Submit ``jobs`` from a thread (submit waits for free slots) and gather them here,
    releasing each slot; ``kill``: SIGKILL this pid after the second job is sent."""
    import threading

    def send():
        for i, (k, datas) in enumerate(jobs.items()):
            assert pool.submit(k, datas, timeout=30)
            if i == 1 and kill:
                os.kill(kill, signal.SIGKILL)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    got = {}
    while len(got) < len(jobs):
        d = pool.get(timeout=30)
        assert d is not None, "a job never came back"
        got[d.key] = (d.pixels.copy(), d.owner.copy(), d.bad.copy())
        pool.release(d.slot)
    t.join(5)
    return got


def test_decode_processes_give_the_pixels_of_this_process_and_survive_a_killed_one(tiles):
    jobs = {k: tiles[k * 3 : k * 3 + 3] for k in range(7)}  # 7 jobs of 3 tiles
    with DecodePool(2, 128, capacity=4, slots=3, per_process=1) as pool:
        name = pool.ring.spec.name
        assert segments(name) == [name]
        got = collect(pool, jobs)
        for k, datas in jobs.items():
            px, owner, bad = expected(datas, 128)
            assert np.array_equal(got[k][0], px) and np.array_equal(got[k][1], owner) and np.array_equal(got[k][2], bad)
        assert pool.busy_s > 0 and not pool.deaths
        # SIGKILL one decode process while it holds jobs: they are decoded again, the same
        # (the ring goes on with its 3 slots and one live process: nothing wedges)
        victim = pool.procs[0].process
        again = collect(pool, {("again", k): d for k, d in jobs.items()}, kill=victim.pid)
        for k in jobs:
            assert all(np.array_equal(a, b) for a, b in zip(again[("again", k)], got[k]))
        assert len(pool.deaths) == 1 and f"pid {victim.pid}" in pool.deaths[0] and "signal 9" in pool.deaths[0]
        assert pool.free_slots == 3
    assert segments(name) == [], "close() unlinks the segment"


def test_a_killed_parent_leaves_no_segment(tmp_path, tiles):
    """SIGKILL of the process that made the ring: its decode processes see their pipe
    close and exit, and the resource tracker unlinks the segment."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from tilesweep.predict.shmring import DecodePool
        pool = DecodePool(2, 128, capacity=8, slots=4)
        print(pool.ring.spec.name, *[p.process.pid for p in pool.procs], flush=True)
        time.sleep(120)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        name, *children = p.stdout.readline().split()
        assert segments(name) == [name]
        p.kill()
        p.wait(10)
        deadline = time.monotonic() + 20
        while (segments(name) or any(_alive(int(c)) for c in children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert segments(name) == [], "the resource tracker unlinks the segment of a killed parent"
        assert not any(_alive(int(c)) for c in children), "decode processes of a killed parent exit"
    finally:
        p.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (its parent is gone: reaped by init soon) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_ring_that_does_not_fit_dev_shm_is_refused_in_one_line():
    from tilesweep.errors import UsageError

    with pytest.raises(UsageError, match=r"shared memory .* /dev/shm has .* free: use --decode threads"):
        ShmRing.create(1 << 20, 256, 256)  # 48 TiB
