"""The process pool's pipes (tilesweep.pool): a child killed with kill -9 half-way through
a message, or while others write, hangs nobody. Real processes, real pipes, real signals.

CI once hung `run --workers 2` this way: the workers shared one multiprocessing.Queue, and
one killed while it wrote a block of megabytes left half a message in the shared pipe (the
reader waited for the rest forever) and the queue's write lock taken (the other worker
waited for it forever)."""

import multiprocessing as mp
import os
import queue
import signal
import time

import pytest

from tilesweep.pool import StopFlag, child_pipes


def _send(out, size, stop):
    out.put(b"x" * size)  # blocks once the pipe is full: nobody reads yet
    while not stop.is_set():
        time.sleep(0.01)


def _wait_blocked(pid, timeout=20.0):
    """Wait until process ``pid`` sleeps in a write (its pipe is full)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(f"/proc/{pid}/wchan") as f:
            if "pipe" in f.read():
                return
        time.sleep(0.02)
    pytest.fail(f"process {pid} never blocked on its pipe")


def test_a_child_killed_mid_message_ends_its_pipe_and_the_others_go_on():
    ctx = mp.get_context("spawn")
    inbox, outs = child_pipes(ctx, 2)
    stop = StopFlag(ctx)
    big = 8 << 20  # far bigger than a pipe's 64 KiB buffer
    procs = [ctx.Process(target=_send, args=(outs[i], big, stop)) for i in range(2)]
    for p in procs:
        p.start()
    for out in outs:
        out.close()
    try:
        for p in procs:
            _wait_blocked(p.pid)
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].join(10)
        got = []
        end = time.monotonic() + 30
        while not got and time.monotonic() < end:
            try:
                got.append(inbox.get(1.0))  # the half message of child 0 must not hang this
            except queue.Empty:
                pass
        assert got == [b"x" * big]  # child 1's message, whole
        assert inbox.closed(0) and not inbox.closed(1)
        stop.set()  # read without a lock by the child, set from here
        procs[1].join(10)
        assert procs[1].exitcode == 0
        with pytest.raises(queue.Empty):
            inbox.get(0.5)
        assert inbox.closed(1)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
