"""Fetch processes for streaming prediction (``tilesweep run --workers N``).

One event loop fetches a few thousand tiles a second; on a many-core machine feeding a GPU
that is the limit. With N workers, N processes each run a streaming
:class:`~tilesweep.worker.Worker` whose consumer is a :class:`QueueConsumer`: a fetched
block (its ok tiles' coordinates and bytes) goes to the prediction process through one
bounded ``multiprocessing`` queue, and the block ids that the prediction process has made
durable come back through a queue per worker, which then acks them. The lease stays with
the worker process the whole time, so a crash of either side returns the block.

::

    worker 0 ─┐  blocks (bounded)               commits (per worker)
    worker 1 ─┼──────────────► FetchProcesses ──► decode → model → sink ──┐
    worker N ─┘ ◄──────────────────────────────────────────────────────────┘

The bounded queue is the backpressure: when the model is slower than the fetch, workers
wait to hand blocks over, keep fewer blocks in progress and send fewer requests.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import signals
from ..errors import UsageError
from ..fetch import TileResult
from ..block import Block, BlockResult, TileStatus
from ..worker import Worker, WorkerCounters, WorkerDeaths, progress_reporter, report_crash
from .sink import ledger_block_result

_END = None


class QueueConsumer:
    """The consumer of a streaming worker process: hands blocks to the prediction
    process, asks the ledger whether a block is predicted already, and picks up the ids
    the prediction process reports durable (:meth:`poll_committed`)."""

    def __init__(self, index: int, blocks: Any, commits: Any, stop: Any, ledger: Path, model_key: str, parent: int) -> None:
        self.index = index
        self.blocks, self.commits, self.stop = blocks, commits, stop
        self.ledger, self.model_key = ledger, model_key
        # Passed in by the parent, not read here: a process orphaned while it was still
        # importing would read 1 and never learn that its parent is gone.
        self.parent = parent
        self.closed = False  # the prediction process said it will commit nothing more
        # A test hook (tests/test_worker_death.py): worker N fails on the first block it
        # hands over, as a bug would, to show that the run goes on and names it.
        self._crash = os.environ.get("TILESWEEP_TEST_CRASH_WORKER") == str(index)

    def orphaned(self) -> bool:
        """The prediction process is gone: it will never read again."""
        return os.getppid() != self.parent

    def _give_up(self) -> bool:
        """Stop waiting for room: asked to stop, or orphaned (our leases are released on
        the way out)."""
        return self.stop.is_set() or self.orphaned()

    def _put(self, item: Any) -> bool:
        while True:
            try:
                self.blocks.put(item, timeout=0.2)
                return True
            except queue_mod.Full:
                if self._give_up():
                    return False

    def done_result(self, block: Block) -> BlockResult | None:
        return ledger_block_result(self.ledger, self.model_key, block.id)

    def take(self, block: Block, results: list[TileResult]) -> bool:
        if self._crash:
            raise RuntimeError(f"test crash of worker {self.index} (TILESWEEP_TEST_CRASH_WORKER)")
        ok = [r for r in results if r.status is TileStatus.OK]
        x = np.fromiter((r.tile.x for r in ok), np.int64, len(ok))
        y = np.fromiter((r.tile.y for r in ok), np.int64, len(ok))
        return self._put((self.index, (block, x, y, [r.data for r in ok], len(results) - len(ok))))

    def end(self) -> None:
        self._put((self.index, _END))

    def poll_committed(self) -> list[int]:
        ids: list[int] = []
        while True:
            try:
                some = self.commits.get_nowait()
            except queue_mod.Empty:
                return ids
            if some is _END:  # the last commit was sent (a stop): stop waiting for more
                self.closed = True
            else:
                ids += some


def _worker_main(args: tuple, index: int, blocks: Any, commits: Any, progress: Any, stop: Any,  # type: ignore[type-arg]
                 refetch: list[Block], ledger: Path, model_key: str, parent: int) -> None:
    signals.install_worker_handlers()
    consumer = QueueConsumer(index, blocks, commits, stop, ledger, model_key, parent)
    worker = Worker(*args, on_progress=progress_reporter(progress, index), stop_event=stop, consumer=consumer,
                    refetch=refetch, parent_pid=parent)
    try:
        counters = worker.run()
    except UsageError as exc:  # a SourceError: the parent stops the run with this line
        if consumer.orphaned():
            for q in (blocks, progress, commits):
                q.cancel_join_thread()
            return
        progress.put((index, str(exc)))
        return
    except Exception as exc:  # a bug, a bad file: the parent names it when the run ends
        if consumer.orphaned():
            for q in (blocks, progress, commits):
                q.cancel_join_thread()
        report_crash(progress, index, exc, consumer.orphaned())
    if consumer.orphaned():
        # Nobody reads our queues any more: a block still in a queue's buffer would hold
        # up our exit forever (the queue's feeder thread blocks on the full pipe).
        for q in (blocks, progress, commits):
            q.cancel_join_thread()
        return
    consumer.end()  # again, if stopped alone (a SIGINT to this process): the others go on
    progress.put((index, counters))


class FetchProcesses:
    """``workers`` streaming worker processes feeding this process (module doc).

    :meth:`blocks` yields ``(block, x, y, data, empty)`` as they arrive until every worker
    has handed its last block; :meth:`committed` routes durable ids back to the worker that
    holds their lease; :meth:`close` stops (if asked) and joins the workers."""

    def __init__(self, args: tuple, workers: int, refetch: list[Block], ledger: Path, model_key: str) -> None:  # type: ignore[type-arg]
        ctx = mp.get_context("spawn")
        self.blocks_q: Any = ctx.Queue(maxsize=2 * workers)
        self.commits_q: list[Any] = [ctx.Queue() for _ in range(workers)]
        self.progress_q: Any = ctx.Queue()
        self.stop_ev = ctx.Event()
        self.latest: dict[int, WorkerCounters] = {}
        self.owner_of: dict[int, int] = {}
        # Workers that died (a signal, an error): the run goes on without them; their
        # leases end when the run does (a block they handed over may still be committed).
        self.deaths = WorkerDeaths(args[0])
        self.lock = threading.Lock()
        self.procs = [
            ctx.Process(
                target=_worker_main, daemon=False,
                args=(args, i, self.blocks_q, self.commits_q[i], self.progress_q, self.stop_ev,
                      refetch[i::workers], ledger, model_key, os.getpid()),
            )
            for i in range(workers)
        ]
        for p in self.procs:
            if self.stop_ev.is_set():  # a stop signal during start-up
                break
            p.start()
        self.procs = [p for p in self.procs if p.pid is not None]

    def stop(self) -> None:
        """Ask the workers to stop leasing and handing blocks over (safe from a signal handler)."""
        self.stop_ev.set()

    def sink_closed(self) -> None:
        """The last commit was routed: tell every worker to wait for no more."""
        for q in self.commits_q:
            q.put(_END)

    def counters(self) -> WorkerCounters:
        total = WorkerCounters()
        with self.lock:
            for c in self.latest.values():
                total.add(c)
        return total

    def _progress(self) -> None:
        while True:
            try:
                index, c = self.progress_q.get_nowait()
            except queue_mod.Empty:
                return
            if isinstance(c, str):
                raise UsageError(c)
            if isinstance(c, tuple):  # ("crashed", line): it exits 1 next
                self.deaths.cause(index, c[1])
                continue
            with self.lock:
                self.latest[index] = c

    def blocks(self, stop: threading.Event) -> Iterator[tuple[Block, np.ndarray, np.ndarray, list[bytes], int]]:
        ended: set[int] = set()
        while len(ended) < len(self.procs) and not stop.is_set():
            self._progress()
            try:
                index, payload = self.blocks_q.get(timeout=0.2)
            except queue_mod.Empty:
                for i, p in enumerate(self.procs):
                    if i not in ended and p.exitcode not in (None, 0):  # died without its last word
                        ended.add(i)  # the others go on; the run ends naming it
                        self.deaths.dead(i, p, free=False)
                continue
            if payload is _END:
                ended.add(index)
                continue
            self.owner_of[payload[0].id] = index
            yield payload
        self._progress()

    def committed(self, ids: list[int]) -> None:
        by_worker: dict[int, list[int]] = {}
        for i in ids:
            w = self.owner_of.pop(i, None)
            if w is not None:
                by_worker.setdefault(w, []).append(i)
        for w, some in by_worker.items():
            self.commits_q[w].put(some)

    def close(self, stop: bool) -> None:
        """Join the workers, reading their queues meanwhile (a process cannot exit while
        what it wrote sits in a full pipe). ``stop``: ask them to stop first (they release
        their leases). A second Ctrl-C kills them."""
        if stop:
            self.stop_ev.set()
        while any(p.is_alive() for p in self.procs):
            try:
                for q in (self.blocks_q, self.progress_q):
                    while True:
                        try:
                            item = q.get_nowait()
                        except queue_mod.Empty:
                            break
                        if q is self.progress_q and isinstance(item[1], tuple):
                            self.deaths.cause(item[0], item[1][1])  # ("crashed", line)
                        elif q is self.progress_q and not isinstance(item[1], str):
                            with self.lock:
                                self.latest[item[0]] = item[1]
                time.sleep(0.05)
            except KeyboardInterrupt:
                for p in self.procs:
                    p.kill()
        for p in self.procs:
            p.join()
        for q in self.commits_q:  # ids nobody will read now must not hold up our exit
            q.cancel_join_thread()
        try:
            self._progress()
        except UsageError:
            pass
        for i, p in enumerate(self.procs):
            if p.exitcode != 0 and i not in self.deaths.died and not stop:
                self.deaths.dead(i, p, free=False)
        if self.deaths:
            self.deaths.free()  # the pipeline is done with what they handed over


__all__ = ["FetchProcesses", "QueueConsumer"]
