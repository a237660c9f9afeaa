"""Fetch processes for streaming prediction (``tilesweep run --workers N``).

One event loop fetches a few thousand tiles a second; on a many-core machine feeding a GPU
that is the limit. With N workers, N processes each run a streaming
:class:`~tilesweep.runner.Runner` whose consumer is a :class:`QueueConsumer`: a fetched
block (its ok tiles' coordinates and bytes, a :class:`Handed`) goes to the prediction
process through a pipe of that worker's own (:class:`~tilesweep.pool.Outbox`: a worker
killed half-way through a block of megabytes must not leave a half message, or a lock,
in something the other workers share), and the block ids that the
prediction process has made durable come back through a queue per worker
(:class:`Committed`), whose runner then acks them. The processes themselves are a
:class:`~tilesweep.pool.ProcessPool`. The lease stays with
the worker process the whole time, so a crash of either side returns the block. With
``keep_tiles`` (``run --keep-tiles --workers N``) each runner tees
(:class:`~tilesweep.runner.Tee`): it stores the block's shard, then hands the block over,
and acks it once its shard and its predictions are durable.

::

    worker 0 ─┐  Handed (a pipe each)           Committed (per worker)
    worker 1 ─┼──────────────► FetchProcesses ──► decode → model → sink ──┐
    worker N ─┘ ◄──────────────────────────────────────────────────────────┘

The pipes are the backpressure: when the model is slower than the fetch, a worker waits
in the middle of handing its block over (a block is bigger than a pipe's buffer), keeps
fewer blocks in progress and sends fewer requests.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np

from ..block import Block, BlockResult, TileStatus
from ..errors import UsageError
from ..fetch import TileResult
from ..pool import Outbox, ProcessPool, WorkerDeaths, child_main, child_pipes
from ..runner import Worker, WorkerArgs, WorkerCounters
from .sink import ledger_block_result

# --- messages between the prediction process and its fetch workers ----------------------


@dataclass(frozen=True)
class Handed:
    """Worker ``index`` hands a fetched block over: its ok tiles' columns, rows and bytes,
    and how many of its tiles were empty."""

    index: int
    block: Block
    x: np.ndarray
    y: np.ndarray
    data: list[bytes]
    empty: int


@dataclass(frozen=True)
class AllHanded:
    """Worker ``index`` will hand over no more blocks."""

    index: int


@dataclass(frozen=True)
class Committed:
    """These blocks' predictions are durable: the worker holding their leases acks them.
    ``winners``: for those another writer recorded first, the ledger's ``(rows, empty,
    failed)``, which the worker acks instead of its own fetch's counts."""

    ids: list[int]
    winners: dict[int, tuple[int, int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class SinkClosed:
    """The sink made its last commit: stop waiting for more."""


ToPredictor = Union[Handed, AllHanded]
ToWorker = Union[Committed, SinkClosed]


class QueueConsumer:
    """The consumer of a streaming worker process: hands blocks to the prediction
    process, asks the ledger whether a block is predicted already, and picks up the ids
    the prediction process reports durable (:meth:`poll_committed`)."""

    def __init__(self, index: int, blocks: Outbox, commits: Any, stop: Any, ledger: Path, model_key: str, parent: int) -> None:
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

    def _put(self, item: ToPredictor) -> bool:
        """Hand ``item`` over whole, waiting while the prediction process is busy (it reads
        on, even to drop what comes, until this process exits); False when it is gone."""
        return self.blocks.put(item) and not self.orphaned()

    def done_result(self, block: Block) -> BlockResult | None:
        return ledger_block_result(self.ledger, self.model_key, block.id)

    def take(self, block: Block, results: list[TileResult]) -> bool:
        if self._crash:
            raise RuntimeError(f"test crash of worker {self.index} (TILESWEEP_TEST_CRASH_WORKER)")
        ok = [r for r in results if r.status is TileStatus.OK]
        x = np.fromiter((r.tile.x for r in ok), np.int64, len(ok))
        y = np.fromiter((r.tile.y for r in ok), np.int64, len(ok))
        return self._put(Handed(self.index, block, x, y, [r.data for r in ok], len(results) - len(ok)))  # type: ignore[misc]

    def end(self) -> None:
        self._put(AllHanded(self.index))

    def poll_committed(self) -> tuple[list[int], dict[int, tuple[int, int, int]]]:
        """The ids reported durable since the last call, and the ledger's counts of those
        another writer recorded first (:class:`Committed`)."""
        ids: list[int] = []
        winners: dict[int, tuple[int, int, int]] = {}
        while True:
            try:
                msg: ToWorker = self.commits.get_nowait()
            except queue_mod.Empty:
                return ids, winners
            if isinstance(msg, SinkClosed):  # the last commit was sent (a stop): stop waiting for more
                self.closed = True
            else:
                ids += msg.ids
                winners.update(msg.winners)


def _worker_main(args: WorkerArgs, blocks: Outbox, commits: Any, refetch: list[Block], ledger: Path, model_key: str,
                 keep_tiles: bool, progress: Any, index: int, stop: Any, parent: int) -> None:
    consumer = QueueConsumer(index, blocks, commits, stop, ledger, model_key, parent)

    def body(on_progress: Callable[[WorkerCounters], None], stop_event: Any, parent_pid: int) -> WorkerCounters:
        worker = Worker(*args, on_progress=on_progress, stop_event=stop_event, consumer=consumer,
                        refetch=refetch, parent_pid=parent_pid, keep_tiles=keep_tiles)  # keep_tiles: a Tee
        counters = worker.run()
        if not consumer.orphaned():
            consumer.end()  # again, if stopped alone (a SIGINT to this process): the others go on
        return counters

    # A full disk here is a crash like any other (the prediction process names it).
    child_main(body, progress, index, stop, parent, queues=(blocks, commits), disk_full_stops=False,
               on_orphan_check=consumer.orphaned)


class FetchProcesses:
    """``workers`` streaming worker processes feeding this process (module doc).

    :meth:`blocks` yields ``(block, x, y, data, empty)`` as they arrive until every worker
    has handed its last block; :meth:`committed` routes durable ids back to the worker that
    holds their lease; :meth:`close` stops (if asked) and joins the workers."""

    def __init__(self, args: tuple, workers: int, refetch: list[Block], ledger: Path, model_key: str,  # type: ignore[type-arg]
                 keep_tiles: bool = False) -> None:
        ctx = mp.get_context("spawn")
        self.blocks_in, blocks_out = child_pipes(ctx, workers)
        self.commits_q: list[Any] = [ctx.Queue() for _ in range(workers)]  # one writer: this process
        self.owner_of: dict[int, set[int]] = {}  # block id -> the workers that handed it
        # Workers that died (a signal, an error): the run goes on without them; their
        # leases end when the run does (a block they handed over may still be committed).
        self.pool = ProcessPool(
            _worker_main,
            lambda i: (args, blocks_out[i], self.commits_q[i], refetch[i::workers], ledger, model_key, keep_tiles),
            workers, args[0],
        )
        try:
            self.pool.start()
        finally:
            for i in range(len(self.pool.procs), workers):
                self.blocks_in.drop(i)  # never started
            for out in blocks_out:  # the workers hold their own ends now
                out.close()

    @property
    def procs(self) -> list[Any]:
        return self.pool.procs

    @property
    def deaths(self) -> WorkerDeaths:
        return self.pool.deaths

    def stop(self) -> None:
        """Ask the workers to stop leasing and handing blocks over (safe from a signal handler)."""
        self.pool.stop()

    def sink_closed(self) -> None:
        """The last commit was routed: tell every worker to wait for no more."""
        for q in self.commits_q:
            q.put(SinkClosed())

    def counters(self) -> WorkerCounters:
        return self.pool.total(WorkerCounters)  # type: ignore[no-any-return]

    def blocks(self, stop: Any) -> Iterator[tuple[Block, np.ndarray, np.ndarray, list[bytes], int]]:
        ended: set[int] = set()
        while len(ended) < len(self.procs) and not stop.is_set():
            self.pool.read()  # a worker's refusal (UsageError) is raised here
            try:
                msg: ToPredictor = self.blocks_in.get(0.2)
            except queue_mod.Empty:
                for i in self.pool.dead_now(ended):  # died without its last word
                    ended.add(i)  # the others go on; the run ends naming it
                    self.deaths.dead(i, self.procs[i], free=False)
                for i, p in enumerate(self.procs):  # its pipe ended, no last word, exit 0: nothing more comes
                    if i not in ended and self.blocks_in.closed(i) and p.exitcode == 0:
                        ended.add(i)
                continue
            if isinstance(msg, AllHanded):
                ended.add(msg.index)
                continue
            self.owner_of.setdefault(msg.block.id, set()).add(msg.index)
            yield msg.block, msg.x, msg.y, msg.data, msg.empty
        self.pool.read()

    def committed(self, ids: list[int], winners: dict[int, tuple[int, int, int]] | None = None) -> None:
        """Route durable ids (and the ledger's counts of those another writer recorded
        first) to every worker that handed the block: one that handed it and then lost
        its lease still holds it, and waits for its commit."""
        by_worker: dict[int, list[int]] = {}
        for i in ids:
            for w in sorted(self.owner_of.pop(i, ())):
                by_worker.setdefault(w, []).append(i)
        for w, some in by_worker.items():
            won = {i: winners[i] for i in some if winners and i in winners}
            self.commits_q[w].put(Committed(some, won))

    def close(self, stop: bool) -> None:
        """Join the workers, reading their queues meanwhile (a process cannot exit while
        what it wrote sits in a full pipe). ``stop``: ask them to stop first (they release
        their leases). A second Ctrl-C kills them."""
        if stop:
            self.pool.stop()
        self.pool.drain_until_exit(also=[self.blocks_in])
        for q in self.commits_q:  # ids nobody will read now must not hold up our exit
            q.cancel_join_thread()
        try:
            self.pool.read()
        except UsageError:
            pass
        self.pool.note_deaths(stop, free=False)
        if self.deaths:
            self.deaths.free()  # the pipeline is done with what they handed over


__all__ = ["AllHanded", "Committed", "FetchProcesses", "Handed", "QueueConsumer", "SinkClosed"]
