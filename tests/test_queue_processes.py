"""The SQLite queue under real concurrent processes and SIGKILL."""

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tilesweep.queue import Block, SqliteQueue, State

WORKER = Path(__file__).parent / "helpers" / "queue_worker.py"


def fill(path, n):
    with SqliteQueue(path) as q:
        q.put((Block(12, i % 64, i // 64, 256), random.Random(i).randrange(10**9)) for i in range(n))
        return sorted(b.id for b in q.blocks())


def spawn(path, owner, log, *args):
    return subprocess.Popen([sys.executable, str(WORKER), str(path), owner, str(log), *map(str, args)])


def read_ids(logs):
    return [int(line) for log in logs if log.exists() for line in log.read_text().split()]


def test_many_processes_never_hold_the_same_block(tmp_path):
    path = tmp_path / "q.sqlite"
    all_ids = fill(path, 2000)
    logs = [tmp_path / f"w{i}.log" for i in range(8)]
    procs = [spawn(path, f"w{i}", logs[i], "--batch", 3) for i in range(8)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    ids = read_ids(logs)
    counts = Counter(ids)
    assert sorted(counts) == all_ids  # nothing lost
    assert max(counts.values()) == 1  # no block leased twice (ttl never expired)
    assert sum(1 for log in logs if log.read_text()) >= 2  # the work was actually shared
    with SqliteQueue(path) as q:
        st = q.stats()
        assert st.blocks[State.DONE] == 2000 and st.attempts_total == 2000


def test_sigkilled_workers_lose_nothing(tmp_path):
    """Workers are killed with SIGKILL at random instants; their leases expire and other
    workers take the blocks. In the end every block is done and every block's output is
    there; a block is redone only if its worker died between output and ack."""
    path = tmp_path / "q.sqlite"
    all_ids = fill(path, 300)
    rng = random.Random(7)
    logs = []
    killed = 0
    for round_ in range(6):
        log = tmp_path / f"k{round_}.log"
        logs.append(log)
        p = spawn(path, f"k{round_}", log, "--batch", 4, "--ttl", 0.5, "--work", 0.005)
        # the random instant counts from the worker's first lease, not its spawn: Python's
        # start-up and imports take 0.15-0.4 s here and more on a busy CI machine, where a
        # kill counted from the spawn lands before any lease (no lease ever expires)
        deadline = time.monotonic() + 60
        with SqliteQueue(path) as q:
            while p.poll() is None and f"k{round_}" not in q.owners() and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # 300 blocks take a started worker ~1.5 s
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            killed += 1
    assert killed >= 3
    time.sleep(0.6)  # let the last leases expire
    final = tmp_path / "final.log"
    logs.append(final)
    assert spawn(path, "final", final).wait(timeout=120) == 0
    with SqliteQueue(path) as q:
        st = q.stats()
        assert st.blocks[State.DONE] == 300, st
        assert st.blocks[State.LEASED] == st.blocks[State.PENDING] == st.blocks[State.DEAD] == 0
        retried = [b.id for b in q.blocks() if q.get(b.id)["attempts"] > 1]
    ids = read_ids(logs)
    assert sorted(set(ids)) == all_ids  # every block's output exists
    assert retried  # some leases really expired and were taken again
    # An output is duplicated only for blocks that were leased more than once.
    assert {i for i, c in Counter(ids).items() if c > 1} <= set(retried)


def test_a_zombie_worker_counts_as_dead():
    """A killed worker that nobody has reaped yet (its parent died too, and PID 1 reaps
    late) holds no lease: `expire_dead_local_owners` must not wait for it."""
    from tilesweep.worker import _alive

    child = subprocess.Popen(["sleep", "60"])
    try:
        assert _alive(child.pid)
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(child.pid) and time.monotonic() < deadline:  # killed, not reaped: a zombie
            time.sleep(0.01)
        assert not _alive(child.pid)
        assert child.poll() is not None  # it was a zombie until now
    finally:
        child.kill()
        child.wait()


def test_dead_owners_are_expired_only_in_our_own_pid_space(tmp_path):
    """Two containers with one hostname on one shared queue: a pid dead here may be alive
    over there, so only owners of this boot and pid namespace are expired early; owners
    named before the mark existed (host:pid:xxxxxx) are judged by the hostname, as before."""
    import socket

    from tilesweep.runner import expire_dead_local_owners, pid_space

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    other_space = "000000" if pid_space() != "000000" else "ffffff"
    owners = {"ours": f"{host}:{dead.pid}:{pid_space()}-aaaaaa", "theirs": f"{host}:{dead.pid}:{other_space}-bbbbbb",
              "old": f"{host}:{dead.pid}:cccccc"}
    path = tmp_path / "queue.sqlite"
    fill(path, 3)
    with SqliteQueue(path) as q:
        for owner in owners.values():
            assert len(q.lease(1, 600, owner)) == 1
        assert expire_dead_local_owners(q) == 2
        assert set(q.owners()) == {owners["theirs"]}
