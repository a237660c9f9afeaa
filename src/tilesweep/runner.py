"""The Runner: lease a block, fetch its tiles, hand them to its output, ack it.

**This module is the one place where a block is acked** (``Worker._flush_acks`` calls
``queue.ack``): every output (the shard store, the prediction pipeline) only reports that a
block's output is durable; the runner then acks it in a group commit, with its counts.

One runner is one event loop with one :class:`~tilesweep.fetch.Fetcher`; it runs in a
process of its own under ``fetch --workers N`` (:mod:`tilesweep.worker`, over
:mod:`tilesweep.pool`), or in a thread of the prediction process (``run``). It keeps a few
blocks in progress so that the fetcher always has ``concurrency`` requests to make. Its
output is one of three:

- **the shard store** (:class:`ShardStoreOutput`: ``tilesweep fetch``). The runner opens (or resumes) the block's shard and skips tiles already
  durable in it; fetches the rest, appending every ok or empty result, fsynced by time
  (data before the index that points at it); finishes the shard (final index, atomic
  rename), then acks the block in a group commit with its counts. A crash anywhere in
  between leaves either a resumable partial shard or a finished one that the next lease
  acks at once: nothing lost, nothing stored twice.
- **a** :class:`BlockConsumer` (``Worker(consumer=...)``: ``tilesweep run``, the
  prediction pipeline). Nothing is stored: the runner fetches a whole block into memory,
  hands it over and keeps the lease until the consumer reports the block durable
  (:meth:`Worker.committed`); then it acks it.
- **a** :class:`Tee` **of both** (``Worker(consumer=..., keep_tiles=True)``: ``run
  --keep-tiles``). The block's shard is written as above; once it is finished and renamed
  the block (the tiles fetched, in memory; the finished shard's when some came from an
  earlier run's partial shard) goes to the consumer, and the block is acked once the
  consumer reports it durable too. A crash between the two leaves a finished shard whose
  block is not predicted: the next lease hands the shard's tiles over without fetching.

Blocks done already have a runner too: :class:`StoreRunner` (``tilesweep predict``, and
the stored blocks of ``run``) reads them from the store and hands them to the same
prediction consumer; they were acked by the runner that stored them, so it acks nothing.

Whatever the output, if some tile still fails after the fetcher's retries, the block is nacked with
the reason (stored good tiles stay durable); after the queue's max attempts it goes dead,
and ``tilesweep retry --dead`` puts it back.

Leases are extended while a block is in progress. Ctrl-C (SIGINT/SIGTERM) stops leasing,
makes what was fetched durable and releases unfinished leases without counting an attempt.
A runner in a worker process knows its parent's pid from its first instruction (it is
passed in, not read with ``os.getppid()`` after the imports, when an early orphan already
sees 1) and stops the same way when its parent is gone.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, NamedTuple, Protocol

import numpy as np

from . import signals
from .diskspace import disk_full, is_disk_full, keep_reserve, release_leases
from .errors import UsageError
from .block import TileStatus
from .fetch import FetchSettings, SourceError, TileResult
from .limits import AdaptiveLimit
from .queue import Block, BlockResult, Lease, Queue, State
from .sources import Source
from .store import CorruptShardError, ShardBusyError, TileStore
from .store.shard import ShardReader
from .supertile import open_fetcher, tiles_per_request
from .sweep import as_location, open_sweep_queue, tiles_location
from .tiles import tile_id


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker drives the queue.

    lease_ttl_s: seconds a lease lasts without renewal (renewed every third of it).
    flush_every_s: seconds of fetching between fsyncs of a shard in progress (the most a
      crash can lose per block; a finished block is always durable before it is acked).
    flush_every: tiles appended between fsyncs at most, whatever the time.
    ack_every_s: at most this many seconds between group commits of finished blocks.
    max_blocks: blocks in progress at once; 0 = enough to keep ``concurrency`` requests busy.
    """

    lease_ttl_s: float = 60.0
    flush_every_s: float = 0.5
    flush_every: int = 4096
    ack_every_s: float = 1.0
    max_blocks: int = 0
    max_attempts: int = 5
    settle_s: float = 30.0  # on a stop, how long to wait for the consumer's last commit
    # A sweep with no tile image yet: when its first this-many blocks (at most the blocks
    # in progress) get none either (all 404/empty, or all unreachable), stop: the template
    # or host is wrong. 0: never. See Worker._probation.
    probe_blocks: int = 4

    def __post_init__(self) -> None:
        if not self.lease_ttl_s >= 3:
            raise UsageError(f"lease ttl {self.lease_ttl_s:g} must be >= 3 seconds")
        if self.max_attempts < 1:
            raise UsageError(f"max attempts {self.max_attempts} must be >= 1")


@dataclass
class WorkerCounters:
    """What a worker did; summed over workers for progress."""

    blocks_done: int = 0
    blocks_failed: int = 0
    tiles_ok: int = 0
    tiles_empty: int = 0
    tiles_skipped: int = 0  # already durable from an earlier run
    tiles_failed: int = 0
    bytes: int = 0
    interrupted: bool = False  # stopped by a signal (Ctrl-C, SIGTERM) before the queue drained
    fetch: dict[str, Any] = field(default_factory=dict)

    def add(self, other: "WorkerCounters") -> None:
        for name in ("blocks_done", "blocks_failed", "tiles_ok", "tiles_empty", "tiles_skipped", "tiles_failed", "bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.interrupted |= other.interrupted
        for k, v in other.fetch.items():
            if isinstance(v, (int, float)):
                self.fetch[k] = self.fetch.get(k, 0) + v


class SourceUnusable(SourceError):
    """The first blocks of a sweep got no tile image at all (every tile 404 or empty, or
    the host unreachable): the source is wrong, not the tiles. See Worker._probation."""


async def _cancel_all(tasks: set) -> None:  # type: ignore[type-arg]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def expire_dead_local_owners(queue: Queue) -> int:
    """End the leases of workers on this host whose process is gone (killed, crashed), so
    that a restart picks their blocks up at once instead of after the lease ttl. Returns
    how many blocks were freed. A pid reused by another process only means we wait.

    "This host" is this hostname *and* this kernel boot and pid namespace (the owner's
    :func:`pid_space` mark): containers that share a hostname (``--uts=host``, ``--network
    host``) on a shared PostgreSQL queue see each other's owners, and a pid dead here may
    be alive in the other container. Owners written before the mark (``host:pid:xxxxxx``)
    are matched on the hostname alone, as they were."""
    host = socket.gethostname()
    here = pid_space()
    freed = 0
    for owner in queue.owners():
        o_host, _, rest = owner.partition(":")
        pid_text, _, suffix = rest.partition(":")
        if o_host != host or not pid_text.isdigit():
            continue
        space = suffix.partition("-")[0] if "-" in suffix else None
        if space is not None and space != here:
            continue
        if not _alive(int(pid_text)):
            freed += queue.expire(owner)
    return freed


@functools.lru_cache(maxsize=1)
def pid_space() -> str:
    """Six hex digits naming where this process's pids mean something: the kernel's boot
    id and this process's pid namespace (Linux); the hostname alone elsewhere."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else open(path).read().strip())
        except OSError:
            pass
    return hashlib.blake2s("|".join(parts).encode(), digest_size=3).hexdigest()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie does not: a killed worker whose parent died
    too waits to be reaped by PID 1, which some containers' init does late."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): trust kill(0)
        return True
    return state not in (b"Z", b"X")


def new_owner() -> str:
    """A lease owner name unique to this process: host, pid, and a suffix of its pid space
    (:func:`pid_space`) and random digits, ``host:pid:space-random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{pid_space()}-{uuid.uuid4().hex[:6]}"


class BlockConsumer(Protocol):
    """Where a *streaming* worker hands its fetched blocks instead of the store (the
    prediction pipeline, :func:`tilesweep.predict.predict_sweep`). A handed block keeps its
    lease until the consumer reports it durable through :meth:`Worker.committed`; only
    then is it acked, with its counts."""

    def done_result(self, block: Block) -> BlockResult | None:
        """The counts of a block whose output is durable already (a crash came between the
        commit and the ack): it is acked at once, not fetched again. None: fetch it."""

    def take(self, block: Block, results: list[TileResult]) -> bool:
        """Take a whole block's ok and empty results; blocks while the consumer is full
        (backpressure: fewer blocks in progress, fewer requests). False: stopping."""

    def end(self) -> None:
        """No more blocks will come."""


class ShardStoreOutput:
    """The shard store as a runner's output (``tilesweep fetch``; half of ``run --keep-tiles``'s :class:`Tee`):
    a block's tiles are appended to its shard as they come, fsynced by time (a crash loses
    at most ``flush_every_s`` of one block), and the block's output is durable once its
    shard is finished and renamed; the runner acks it then. Its calls block (the runner
    makes them in its I/O threads)."""

    def __init__(self, sweep_path: Path | str, zoom: int, block_zoom: int) -> None:
        # coarsest=0: adaptive blocks lie at any zoom up to block_zoom (the finest)
        self.store = TileStore(tiles_location(sweep_path), zoom, block_zoom, coarsest=0)

    def done_result(self, block: Block) -> BlockResult | None:
        """The counts of a block whose shard is finished already (a worker died between
        the rename and the ack), its leftovers discarded; None: fetch it."""
        if not self.store.is_complete(block.tile):
            return None
        self.store.discard_leftovers(block.tile)
        s = self.store.reader(block.tile).summary()  # type: ignore[union-attr]
        return BlockResult(s.ok, s.empty, s.failed, s.bytes, 0, stored=1)

    def open(self, block: Block) -> Any:
        """The block's shard writer (resuming a partial shard; ``ShardBusyError`` when
        another writer holds it)."""
        return self.store.writer(block.tile)

    def results(self, block: Block) -> list[TileResult]:
        """The ok and empty tiles of the block's finished shard, as the fetcher gives them
        (every ok tile's crc checked: ``CorruptShardError`` names a bad one)."""
        reader = self.store.reader(block.tile)
        if reader is None:
            raise FileNotFoundError(f"block {block.id}: its shard is not finished")
        return [TileResult(tile, st, data if st is TileStatus.OK else None, 0, None, None)
                for tile, st, data in reader.iter_records(None) if st.stored]

    def close(self) -> None:
        self.store.close()


class Tee:
    """Both outputs of ``run --keep-tiles``: the shard store and a :class:`BlockConsumer`
    (the prediction pipeline). A block's output is durable once its shard is finished
    and renamed *and* the consumer has reported it durable; only then does the runner ack
    it, with the shard's counts. The runner drives the two halves itself
    (:meth:`Worker._do_block`): the shard as tiles come, the consumer with the whole
    block once the shard is finished."""

    def __init__(self, store: ShardStoreOutput, consumer: BlockConsumer) -> None:
        self.store = store
        self.consumer = consumer

    def done(self, block: Block) -> tuple[BlockResult | None, bool]:
        """``(shard, predicted)``: the counts of the block's finished shard (None: not
        finished), and whether the consumer holds the block's output already. Both:
        the block is acked at once; a shard alone: its tiles are handed over, no fetch."""
        shard = self.store.done_result(block)
        return shard, self.consumer.done_result(block) is not None


class StoredBlock(NamedTuple):
    """A block's tiles read from its finished shard, in tile-id order: the ok tiles'
    columns ``x``, rows ``y`` (tile coordinates at the sweep's zoom) and bytes, and how
    many of its tiles were empty and failed."""

    block: Block
    x: np.ndarray
    y: np.ndarray
    data: list[bytes]
    empty: int
    failed: int


class StoredBlockConsumer(Protocol):
    """What a :class:`StoreRunner` hands stored blocks to (the prediction pipeline)."""

    def done_result(self, block: Block) -> BlockResult | None:
        """Not None: the block's output is durable already; it is skipped."""

    def take_stored(self, stored: StoredBlock) -> bool:
        """Take a stored block; blocks while the consumer is full. False: stopping."""

    def end(self) -> None:
        """No more blocks will come."""


class StoreRunner:
    """The runner of ``tilesweep predict``: the block lifecycle with the store as the
    block source. Its blocks are done in the queue already (nothing to lease, fetch or
    ack): each is read from its finished shard (every ok tile's crc checked, so no model
    scores flipped bytes) and handed to the consumer, the same prediction consumer a
    :class:`Runner` hands fetched blocks to. A block whose shard is missing is counted
    (``missing_shards``); one whose shard fails its checks is moved aside and queued to
    be fetched again (``corrupt_shards`` names it), and the run goes on.

    ``on_read(tiles, seconds)``: called after each block read, with its ok tiles and the
    seconds the read took (the read stage's meter)."""

    def __init__(self, sweep_path: Path | str, store: TileStore, consumer: StoredBlockConsumer,
                 on_read: Callable[[int, float], None] | None = None) -> None:
        self.sweep_path = as_location(sweep_path)  # a folder, or a sweep's object-store URL
        self.store = store
        self.consumer = consumer
        self.on_read = on_read
        self.missing_shards = 0
        self.corrupt_shards: list[str] = []

    def run(self, blocks: Iterable[Block]) -> bool:
        """Hand every block of ``blocks`` (an iterable that may wait for more) to the
        consumer, then tell it the end; False when the consumer stopped first."""
        consumer = self.consumer
        for block in blocks:
            if consumer.done_result(block) is not None:
                continue
            t0 = time.perf_counter()
            stored = self.read(block)
            if stored is None:
                continue
            if self.on_read is not None:
                self.on_read(len(stored.data), time.perf_counter() - t0)
            if not consumer.take_stored(stored):
                return False
        consumer.end()
        return True

    def read(self, block: Block) -> StoredBlock | None:
        """A stored block's tiles, or None when its shard is missing (counted) or corrupt
        (moved aside and requeued)."""
        path = self.store.shard_path(block.tile)
        try:  # on object storage: ranged reads (the index, then the data region in one GET)
            storage = self.store.storage
            reader = ShardReader(path) if storage is None else ShardReader.open(storage, self.store.shard_key(block.tile))
        except FileNotFoundError:
            self.missing_shards += 1
            return None
        except CorruptShardError as exc:
            self._requeue_corrupt(block, exc)
            return None
        with reader:
            st = np.asarray(reader.records["status"])
            xs, ys = reader.coords()
            ok = np.nonzero(st == TileStatus.OK)[0]
            try:
                with reader.holding_data():
                    data = [reader.data(int(i)) for i in ok]
            except CorruptShardError as exc:
                bad = exc
            else:
                return StoredBlock(block, xs[ok], ys[ok], data, int(np.sum(st == TileStatus.EMPTY)),
                                   int(np.sum(st == TileStatus.FAILED)))
        self._requeue_corrupt(block, bad)
        return None

    def _requeue_corrupt(self, block: Block, exc: CorruptShardError) -> None:
        """Move the shard aside (``.shard.corrupt``) and queue its block again, so that the
        next fetch (or ``run``) fetches it anew."""
        self.corrupt_shards.append(exc.describe())
        self.store.quarantine(block.tile)
        q = open_sweep_queue(self.sweep_path)  # this thread's own connection
        try:
            q.requeue([block.id], f"shard corrupt when read for prediction: {exc}")
        finally:
            q.close()


WorkerArgs = tuple[Path | str, int, int, Source, FetchSettings, WorkerSettings]
"""A :class:`Worker`'s positional arguments (sweep folder, zoom, block zoom, source, fetch
and worker settings), as a worker process gets them."""


class Worker:
    """One process's worker over a sweep folder (see the module docstring).

    With a ``consumer`` the worker *streams*: tiles are not stored; each fetched block goes
    to the consumer, whose :meth:`committed` acks it. ``keep_tiles`` (with a consumer):
    both, a :class:`Tee`: the block's shard is stored, then the block goes to the
    consumer, and it is acked once both are durable. ``refetch``: blocks done in the queue
    whose tiles were not kept, fetched again for the consumer without a lease (not with
    ``keep_tiles``)."""

    def __init__(
        self,
        sweep_path: Path | str,
        zoom: int,
        block_zoom: int,
        source: Source,
        fetch: FetchSettings,
        settings: WorkerSettings = WorkerSettings(),
        on_progress: Callable[[WorkerCounters], None] | None = None,
        stop_event: Any = None,
        consumer: BlockConsumer | None = None,
        refetch: Iterable[Block] = (),
        parent_pid: int | None = None,
        keep_tiles: bool = False,
    ):
        if keep_tiles and (consumer is None or refetch):
            raise ValueError("keep_tiles tees the store with a consumer: it needs one, and no refetch")
        self.keep_tiles = keep_tiles
        self.sweep_path = as_location(sweep_path)  # a folder, or a sweep's object-store URL
        self.zoom = zoom
        self.block_zoom = block_zoom
        self.source = source
        self.fetch_settings = fetch
        self.settings = settings
        self.on_progress = on_progress
        self.stop_event = stop_event  # an mp.Event the parent sets to ask for a clean stop
        # A worker process: its parent's pid, passed in (None: this process is the parent).
        self.parent_pid = parent_pid
        self._consumer_closed = False  # the consumer will commit nothing more
        self.owner = new_owner()
        self.counters = WorkerCounters()
        self.stopping = False
        self._auth_streak = 0
        self._probe_ok = False  # a tile image came in this run (or the sweep has some)
        self._probe_sweep: bool | None = None  # the sweep had no tile image when we looked
        self._held: list[int] = []  # blocks fetched with no image, waiting on the probe
        # SQLite and fsync calls block; each gets its own thread so the loop keeps fetching.
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="tilesweep-queue")
        self._io_threads = ThreadPoolExecutor(4, thread_name_prefix="tilesweep-store")
        self.consumer = consumer
        self._refetch: deque[Block] = deque(refetch)
        self._unleased: set[int] = set()  # refetched blocks: done already, nothing to ack
        self._handed: dict[int, BlockResult] = {}  # with the consumer, not yet durable
        self._loop: asyncio.AbstractEventLoop | None = None
        # One thread hands blocks over, in turn: a block waits there while the consumer is full.
        self._hand_thread = ThreadPoolExecutor(1, thread_name_prefix="tilesweep-hand") if consumer else None

    # --- running ----------------------------------------------------------------------

    def run(self) -> WorkerCounters:
        """Work until the queue has nothing pending or a stop is asked; returns counters."""
        with signals.kept_handlers():  # the loop resets SIGINT/SIGTERM when it closes
            try:
                import uvloop
            except ImportError:  # run outside this handler: the run's own errors must not
                uvloop = None  # chain a misleading "ModuleNotFoundError: uvloop" (issue 16)
            if uvloop is None:
                return asyncio.run(self.run_async())
            return uvloop.run(self.run_async())  # type: ignore[no-any-return]

    def stop(self) -> None:
        """Ask the worker to stop leasing and wind down (safe from a signal handler)."""
        self.stopping = True

    def _interrupt(self, signum: int | None = None) -> None:
        if signum is not None:
            signals.note(signum)
        self.counters.interrupted = True
        self.stop()

    def orphaned(self) -> bool:
        """A worker process whose parent is gone (killed): nobody will read what it sends."""
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _look_for_stop(self) -> None:
        """Stop when asked: by the parent's event, a signal to this worker process (noted
        by :func:`tilesweep.signals.install_worker_handlers`), or the parent's death."""
        if self.parent_pid is not None and signals.received() is not None and not self.stopping:
            self._interrupt()
        if self.orphaned() or (self.stop_event is not None and self.stop_event.is_set()):
            self.stop()

    async def run_async(self) -> WorkerCounters:
        loop = asyncio.get_running_loop()
        self._loop = loop
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._interrupt, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        self.queue = open_sweep_queue(self.sweep_path, max_attempts=self.settings.max_attempts)
        # coarsest=0: adaptive blocks lie at any zoom up to block_zoom (the finest)
        stores = self.consumer is None or self.keep_tiles
        self.output = ShardStoreOutput(self.sweep_path, self.zoom, self.block_zoom) if stores else None
        self.store = None if self.output is None else self.output.store
        self.tee = Tee(self.output, self.consumer) if self.output is not None and self.consumer is not None else None
        tiles_per_block = 1 << (2 * (self.zoom - self.block_zoom))
        st = self.queue.stats(window=1.0)  # blocks of a sample hold fewer: keep `concurrency` busy
        if sum(st.blocks.values()):
            tiles_per_block = max(1, min(tiles_per_block, sum(st.tiles.values()) // sum(st.blocks.values())))
        # tiles one request brings (super-tiles: up to N x N, 1 where too sparse to group), so
        # blocks enough to keep `concurrency` requests busy; at most 16x a tile source's
        per_request = tiles_per_request(self.source.supertile, tiles_per_block, 1 << (2 * (self.zoom - self.block_zoom)))
        max_blocks = self.settings.max_blocks or max(2, 2 * int(-(-self.fetch_settings.concurrency * per_request // tiles_per_block)))
        self._max_blocks = max_blocks
        self._to_ack: dict[int, BlockResult] = {}
        self._active: dict[int, Lease] = {}
        # Requests in flight over all blocks: `concurrency` at most, cut when the server
        # answers 429/503 and grown back as requests succeed (AIMD, tilesweep.limits).
        self._slots = AdaptiveLimit(self.fetch_settings.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        self._look_for_stop()  # a stop (or an orphaning) during start-up: lease nothing
        await self._db(keep_reserve, self.sweep_path)  # room to release the leases on a full disk
        await self._db(expire_dead_local_owners, self.queue)
        keeper = asyncio.create_task(self._keep_leases())
        last_ack = time.monotonic()
        do_block = self._do_block if self.output is not None else self._stream_block
        clean = False
        try:
            async with open_fetcher(self.source, self.fetch_settings) as fetcher:  # super-tiles for a bbox source
                self.fetcher = fetcher
                fetcher.on_throttle = self._slots.on_throttle
                fetcher.request_slots = self._slots  # a super-tile's fallback singles take these too
                while True:
                    self._poll_commits()
                    self._look_for_stop()
                    if not self.stopping and len(tasks) < max_blocks:
                        for lease in await self._next_blocks(max_blocks - len(tasks)):
                            self._active[lease.block.id] = lease
                            tasks.add(asyncio.create_task(do_block(lease)))
                    if not tasks:
                        # Nothing pending for us. Blocks leased by other workers may still
                        # come back (their worker died and the lease expires): wait for them.
                        # Not when streaming: sibling workers hold their leases until the
                        # model's part is committed, which waits for every worker's last
                        # block; a sibling that dies fails the run, and the next run frees
                        # its leases at once (expire_dead_local_owners).
                        if self.stopping or self.consumer is not None or not await self._db(self.queue.count, State.LEASED):
                            break
                        await asyncio.sleep(0.2)  # a cheap query; keeps the end of a run prompt
                        continue
                    done, pending = await asyncio.wait(tasks, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                    tasks = set(pending)
                    # A failure (a bug, or SourceError) must not pass silently; read every
                    # task's outcome first so that none is left "never retrieved".
                    errors = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
                    if errors:
                        raise errors[0]
                    if self._to_ack and (time.monotonic() - last_ack >= self.settings.ack_every_s or not tasks):
                        await self._flush_acks()
                        last_ack = time.monotonic()
                    self._report()
                    if self.stopping and tasks:
                        await _cancel_all(tasks)
                        tasks = set()
                if self.consumer is not None and not self.stopping:
                    await self._await_consumer()
            clean = True
        finally:
            await _cancel_all(tasks)
            # Stopped by the consumer's side (Ctrl-C/SIGTERM to the run, or an error in the
            # pipeline): it commits the complete blocks it holds; wait for those acks. Not
            # after an error here, nor when this worker alone was stopped (the pipeline
            # goes on without it): then what it handed is released, and a block committed
            # anyway is acked by the next run (BlockConsumer.done_result).
            if clean and self._handed and self.stop_event is not None and self.stop_event.is_set():
                await self._settle()
            keeper.cancel()
            try:
                await self._flush_acks()
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                raise disk_full(getattr(self.queue, "path", self.sweep_path)) from None  # one line, ENOSPC and the path
            finally:  # also on a full disk, where the acks cannot be written: release_leases makes room
                await self._db(release_leases, self.queue, self.owner, self.sweep_path)
            self._report()
            self.queue.close()
            if self.output is not None:
                self.output.close()
            self._db_thread.shutdown()
            self._io_threads.shutdown()
            if self._hand_thread is not None:
                self._hand_thread.shutdown()
            self._loop = None
        return self.counters

    async def _next_blocks(self, n: int) -> list[Lease]:
        """Up to ``n`` blocks to work on: blocks to fetch again first (no lease: they are
        done in the queue), then leases of pending blocks."""
        out: list[Lease] = []
        while self._refetch and len(out) < n:
            block = self._refetch.popleft()
            self._unleased.add(block.id)
            out.append(Lease(block, self.owner, float("inf"), 0))
        if len(out) < n:
            out += await self._db(self.queue.lease, n - len(out), self.settings.lease_ttl_s, self.owner)
        return out

    async def _await_consumer(self) -> None:
        """The last block is handed over: tell the consumer, then wait until it has made
        every handed block durable (acking them as it does), a stop, or the consumer says
        it will commit nothing more (what is still handed is then released, at the end)."""
        assert self.consumer is not None and self._hand_thread is not None
        await asyncio.get_running_loop().run_in_executor(self._hand_thread, self.consumer.end)
        while self._handed and not self.stopping and not self._closed():
            self._look_for_stop()
            if self.stopping:
                break
            await asyncio.sleep(0.05)
            self._poll_commits()
            if len(self._to_ack) >= 1024:
                await self._flush_acks()
            self._report()

    async def _settle(self) -> None:
        """A stop (or an error) with blocks handed to the consumer: wait, a bounded time,
        while the consumer commits the complete blocks it holds, acking them as they come,
        until it says it will commit nothing more. What is left is released after."""
        deadline = time.monotonic() + self.settings.settle_s
        while self._handed and not self._closed() and not self.orphaned() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self._poll_commits()
        self._poll_commits()

    def _closed(self) -> bool:
        return self._consumer_closed or bool(getattr(self.consumer, "closed", False))

    def consumer_closed(self) -> None:
        """The consumer will report no more commits (safe from any thread; call it after
        its last :meth:`committed`, from the same thread, so the order is kept)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(setattr, self, "_consumer_closed", True)
        except RuntimeError:
            pass

    def _poll_commits(self) -> None:
        """A consumer in another process reports durable blocks through a queue."""
        poll = getattr(self.consumer, "poll_committed", None)
        if poll is not None:
            ids, winners = poll()
            if ids:
                self._committed(ids, winners)

    def committed(self, ids: Iterable[int], winners: dict[int, tuple[int, int, int]] | None = None) -> None:
        """The consumer made these handed blocks durable: ack them (safe from any thread;
        ignored once the worker has stopped, and the next run acks them at once through
        :meth:`BlockConsumer.done_result`). ``winners``: for the blocks another writer
        recorded first, the ledger's ``(rows, empty, failed)``: those are acked, not this
        worker's own fetch counts (the ledger keeps the first record)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._committed, list(ids), dict(winners or {}))
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _committed(self, ids: list[int], winners: dict[int, tuple[int, int, int]] | None = None) -> None:
        for i in ids:
            result = self._handed.pop(i, None)
            if result is None:
                continue
            won = winners.get(i) if winners else None
            if won is not None:  # the ledger kept another writer's record: ack its counts
                result = result._replace(ok=won[0], empty=won[1], failed=won[2])
            self._active.pop(i, None)
            self.counters.blocks_done += 1
            if i in self._unleased:
                self._unleased.discard(i)
            else:
                self._to_ack[i] = result

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io_threads, fn, *args)

    async def _locked(self, lock: threading.Lock, fn: Callable[[], Any]) -> Any:
        """Run a shard writer's blocking call in a thread under the writer's lock, so that a
        call left running by a cancelled task and the clean-up after it never overlap."""

        def call() -> Any:
            with lock:
                return fn()

        return await self._io(call)

    async def _flush_acks(self) -> None:
        if not self._to_ack:
            return
        batch, self._to_ack = self._to_ack, {}
        await self._db(self.queue.ack, list(batch), batch)

    async def _keep_leases(self) -> None:
        period = self.settings.lease_ttl_s / 3
        while True:
            await asyncio.sleep(period)
            ids = [i for i in self._active if i not in self._unleased]
            if ids:
                await self._db(self.queue.extend, ids, self.settings.lease_ttl_s, self.owner)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.counters.fetch = self.fetcher.stats.snapshot() if hasattr(self, "fetcher") else {}
            self.counters.fetch["limit"] = int(self._slots.limit)  # concurrency now (AIMD)
            self.counters.fetch["limit_cuts"] = self._slots.cuts
            self.on_progress(self.counters)

    # --- one block --------------------------------------------------------------------

    async def _do_block(self, lease: Lease) -> None:
        """Fetch a block into its shard and ack it once the shard is finished; with a
        :class:`Tee`, then hand it to the consumer too, and ack it once that is durable."""
        block = lease.block
        output, tee = self.output, self.tee
        assert output is not None  # a storing runner
        try:
            if tee is None:
                done, predicted = await self._io(output.done_result, block), True
            else:
                done, predicted = await self._io(tee.done, block)
            if done is not None and predicted:  # finished by a worker that died before its ack: ack now
                self._to_ack[block.id] = done
                self.counters.blocks_done += 1
                return
            if done is not None:  # a tee's shard finished, its block not consumed (a crash between)
                await self._hand_stored(block, done)
                return
            try:
                writer = await self._io(output.open, block)
            except ShardBusyError as exc:  # a stalled worker that lost its lease still writes it
                owner = None if block.id in self._unleased else self.owner  # a repeat cannot take another's lease
                await self._db(self.queue.nack, block.id, f"shard busy: {exc}", owner)
                return
            lock = threading.Lock()
            kept: list[TileResult] = []  # a tee's: the block's results, for the consumer

            def on_result(r: TileResult, st: TileStatus) -> None:
                writer.append(r.tile, st, r.data)
                if not predicted:
                    kept.append(r)

            try:
                durable = set(int(i) for i in writer.done_ids)
                tiles = block.tile_list(self.zoom)
                todo = [t for t in tiles if tile_id(t) not in durable] if durable else tiles
                self.counters.tiles_skipped += block.tiles - len(todo)
                failures, retries = await self._fetch_into(todo, on_result, lambda: self._locked(lock, writer.flush))
                await self._probation(block)
                if failures:
                    await self._locked(lock, lambda: self._abort_quietly(writer))
                    await self._failed(block, failures)
                    return
                summary = await self._locked(lock, writer.finish)
            except BaseException:
                await asyncio.shield(self._locked(lock, lambda: self._abort_quietly(writer)))
                raise
            if predicted:
                self._finished(block.id, summary, retries)
                return
            result = BlockResult(summary.ok, summary.empty, summary.failed, summary.bytes, retries, stored=1)
            # Some tiles came from an earlier run's partial shard, or another writer published
            # the block first (its shard stands, with its counts): hand the stored shard over,
            # so that the predictions describe the bytes in the store.
            if durable or writer.published_by_other:
                await self._hand_stored(block, result)
            else:
                await self._hand(block, kept, result)
        finally:
            if block.id not in self._handed:
                self._active.pop(block.id, None)

    async def _hand_stored(self, block: Block, result: BlockResult) -> None:
        """A tee's block whose shard is finished: hand the shard's tiles to the consumer. A
        shard that fails its checks is moved aside and the block nacked, to be fetched again."""
        assert self.output is not None
        try:
            results = await self._io(self.output.results, block)
        except CorruptShardError as exc:
            await self._io(self.output.store.quarantine, block.tile)
            await self._db(self.queue.nack, block.id, f"shard corrupt when read to hand over: {exc}", self.owner)
            return
        await self._hand(block, results, result)

    async def _hand(self, block: Block, results: list[TileResult], result: BlockResult) -> None:
        """Hand a whole block to the consumer; it stays leased (and ``result`` waits to be
        acked) until the consumer reports it durable (:meth:`committed`)."""
        assert self.consumer is not None and self._hand_thread is not None
        self._handed[block.id] = result
        loop = asyncio.get_running_loop()
        # shielded: a block being handed over when a stop comes still lands whole
        taken = await asyncio.shield(loop.run_in_executor(self._hand_thread, self.consumer.take, block, results))
        if not taken:
            self._handed.pop(block.id, None)

    async def _stream_block(self, lease: Lease) -> None:
        """Fetch a whole block into memory and hand it to the consumer; its lease is kept
        until the consumer reports it durable (:meth:`committed`)."""
        block = lease.block
        assert self.consumer is not None
        try:
            done = self.consumer.done_result(block)
            if done is not None:  # durable before a crash took the ack: ack now
                if block.id not in self._unleased:
                    self._to_ack[block.id] = done
                self._unleased.discard(block.id)
                self.counters.blocks_done += 1
                return
            got: list[TileResult] = []
            failures, retries = await self._fetch_into(block.tile_list(self.zoom), lambda r, st: got.append(r), None)
            await self._probation(block)
            if failures:
                await self._failed(block, failures)
                return
            ok = sum(1 for r in got if r.status is TileStatus.OK)
            await self._hand(block, got, BlockResult(ok, len(got) - ok, 0, sum(len(r.data or b"") for r in got), retries, stored=0))
        finally:
            if block.id not in self._handed:
                self._active.pop(block.id, None)
                self._unleased.discard(block.id)

    async def _failed(self, block: Block, failures: list[TileResult]) -> None:
        """Some tiles of ``block`` failed after the fetcher's retries: nack it with the
        first reason (a block fetched again without a lease is only counted)."""
        self.counters.tiles_failed += len(failures)
        self.counters.blocks_failed += 1
        if block.id in self._unleased:
            return
        first = failures[0]
        await self._db(
            self.queue.nack, block.id,
            f"{len(failures)} of {block.tiles} tiles failed; first: {first.tile.z}/{first.tile.x}/{first.tile.y}: {first.error or 'failed'}",
            self.owner,  # owner-checked: a nack repeated after a lost reply cannot take another's lease
        )

    async def _probation(self, block: Block) -> None:
        """Called when a block is fetched. While this worker has seen no tile image and the
        sweep holds none, a block with none either (every tile 404, empty, or failed: a
        wrong template, host or port) waits here, neither acked nor nacked. The first image
        anywhere in this worker lets the waiting blocks go on. When the first
        ``probe_blocks`` blocks (at most the blocks in progress) all wait, or no other block
        can come, the run stops with :class:`SourceUnusable`: the leases are released
        without counting an attempt, nothing is acked, and the CLI records no source."""
        limit = self.settings.probe_blocks
        if self._probe_ok or not limit:
            return
        if self._probe_sweep is None:
            self._probe_sweep = (await self._db(self.queue.stats, 1.0)).results.ok == 0
        if not self._probe_sweep:
            self._probe_ok = True
            return
        self._held.append(block.id)
        try:
            while not self._probe_ok:
                # only once no block that could still bring an image is being fetched
                if len(self._held) >= len(self._active) and (
                    len(self._held) >= min(limit, self._max_blocks) or not await self._db(self.queue.count, State.PENDING)
                ):
                    if (await self._db(self.queue.stats, 1.0)).results.ok:  # another worker got images
                        self._probe_ok = True
                        break
                    raise SourceUnusable(self._probe_message())
                await asyncio.sleep(0.1)
        finally:
            self._held.remove(block.id)

    def _probe_message(self) -> str:
        st = self.fetcher.stats
        answers = ", ".join(f"{reason} x {n:,}" for reason, n in st.by_reason.most_common(3)) or "nothing"
        return (
            f"source {self.source.redacted()} gave no tile image for the first {len(self._held)} blocks "
            f"({st.results:,} tiles; it answered: {answers}): check the template (z/x/y order, {{-y}} for TMS, "
            "the host and port); nothing was recorded"
        )

    def _check_auth(self, result: TileResult) -> None:
        """Stop the whole run when the source refuses every request (401/403 in a row): a
        wrong token must cost one clear line, not every block's attempts."""
        limit = self.fetch_settings.auth_failures_to_stop
        if result.http_status in (401, 403):
            if not result.attempts:  # a super-tile's other tiles: its one request is counted once
                return
            self._auth_streak += 1
            if limit and self._auth_streak >= limit:
                raise SourceError(
                    f"source {self.source.redacted()} answered HTTP {result.http_status} to {self._auth_streak} requests "
                    "in a row: check the token, headers or URL"
                )
        elif result.status.stored:
            self._auth_streak = 0
        if result.status is TileStatus.OK:
            self._probe_ok = True

    def _finished(self, block_id: int, summary: Any, retries: int = 0) -> None:
        self._to_ack[block_id] = BlockResult(summary.ok, summary.empty, summary.failed, summary.bytes, retries, stored=1)
        self.counters.blocks_done += 1

    @staticmethod
    def _abort_quietly(writer: Any) -> None:
        try:
            writer.flush()
        except OSError:  # a full disk: the tail not written is fetched again on resume
            pass
        finally:
            writer.abort()

    async def _fetch_released(self, tile: Any, held: bool = True) -> TileResult:
        try:
            result = await self.fetcher.fetch(tile)
        finally:
            if held:
                self._slots.release()
        if result.attempts == 1:
            self._slots.on_success()
        return result

    async def _fetch_into(
        self,
        todo: list,  # type: ignore[type-arg]
        on_result: Callable[[TileResult, TileStatus], Any],
        flush: Callable[[], Awaitable[Any]] | None,
    ) -> tuple[list[TileResult], int]:
        """Fetch ``todo``, passing each ok or empty result to ``on_result`` and awaiting
        ``flush`` every ``flush_every_s`` seconds (or ``flush_every`` tiles); returns the
        results that failed after the fetcher's retries, and the number of retries. Flushing by time keeps fsyncs few when tiles come fast
        (a 256-tile block fetched in 50 ms is synced once, when it is finished) and bounds
        what a crash loses when they come slowly.

        At most ``concurrency`` tiles are in the fetcher over all blocks (so no request
        waits long for a pooled connection, which would count against its timeout). A
        feeder takes a slot before it starts each tile: the semaphore's waiters are the
        blocks in progress, not every tile of them (asyncio's Semaphore does work linear
        in its waiters on each acquire)."""
        failures: list[TileResult] = []
        retries = 0
        unflushed = 0
        last_flush = time.monotonic()
        finished: asyncio.Queue[asyncio.Task[TileResult]] = asyncio.Queue()
        tasks: set[asyncio.Task[TileResult]] = set()

        async def feed() -> None:
            for tile in todo:
                held = self.fetcher.holds_slot(tile)  # not a super-tile's tile that shares its request
                if held:
                    await self._slots.acquire()
                try:
                    task = asyncio.ensure_future(self._fetch_released(tile, held))
                except BaseException:
                    if held:
                        self._slots.release()
                    raise
                tasks.add(task)
                task.add_done_callback(finished.put_nowait)

        forget = self.fetcher.expect(todo)  # a super-tile fetcher groups them into requests
        feeder = asyncio.ensure_future(feed())
        try:
            for _ in range(len(todo)):
                task = await finished.get()
                tasks.discard(task)
                result = task.result()
                retries += max(0, result.attempts - 1)
                self._check_auth(result)
                status = result.status
                if not status.stored:
                    failures.append(result)
                    continue
                on_result(result, status)
                if status is TileStatus.OK:
                    self.counters.tiles_ok += 1
                    self.counters.bytes += len(result.data or b"")
                else:
                    self.counters.tiles_empty += 1
                unflushed += 1
                if flush is not None and (
                    unflushed >= self.settings.flush_every or time.monotonic() - last_flush >= self.settings.flush_every_s
                ):
                    await flush()
                    unflushed = 0
                    last_flush = time.monotonic()
        finally:
            # On cancellation or error: stop feeding, stop the requests in flight, and read
            # the outcome of those that ended (a SourceError seen by several tiles is
            # raised once, not logged as "never retrieved").
            feeder.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(feeder, *tasks, return_exceptions=True)
            forget()
        return failures, retries


Runner = Worker
"""The lifecycle's name for :class:`Worker`: lease -> fetch -> output -> ack."""
