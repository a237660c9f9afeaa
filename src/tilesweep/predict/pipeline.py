"""Offline prediction: score the tiles of a sweep's store with a model, block by block.

Stages, joined by bounded queues (so memory stays flat whatever the tile count)::

    read (1 thread)      blocks done in the fetch queue and not yet predicted by this model:
                         the block's shard, memory-mapped, its records in tile-id order
    fetch (1 thread)     with ``stream=``: an asyncio :class:`~tilesweep.worker.Worker` that
                         leases blocks and fetches them straight into the pipeline, no store;
                         a block is acked in the fetch queue once its part is durable. With
                         ``StreamFetch(workers=N > 1)`` the thread receives the blocks of N
                         worker processes instead (:mod:`.procs`)
    decode (N threads)   JPEG/PNG/WebP -> RGB (simplejpeg releases the GIL) -> fit to the
                         model's input (uint8, not yet normalised: 4x smaller in the queue)
    model (1 thread)     batches of ``batch`` inputs across block boundaries, normalise and
                         predict (:func:`~tilesweep.model.predict_pixels`: a GPU model gets
                         the uint8 pixels); a chipped tile gets the max over its chips
    sink (1 thread)      group commit of many blocks per Parquet part (:mod:`.sink`)

Each stage counts tiles and busy seconds (:class:`StageMeter`), so a caller can show tiles/s
per stage, queue fill and model busy %. The fetch stage is "busy" while it is not waiting
for room downstream (:class:`FlowMeter`): a fetch that never waits is the bottleneck.
"""

from __future__ import annotations

import contextlib
import queue as queue_mod
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .. import signals
from ..decode import decode, fit
from ..errors import UsageError
from ..fetch import FetchSettings, TileResult
from ..model.base import Model, check_scores, predict_pixels
from ..block import Block, BlockResult, TileStatus
from ..queue import SqliteQueue, State
from ..sources import Source
from ..store.shard import CorruptShardError, ShardReader
from ..sweep import QUEUE_FILE
from ..runner import Worker, WorkerCounters, WorkerSettings
from .bounds import bound_line, model_wait
from .decoding import ProcessDecode, choose_decode, concat, default_processes, gpu_decode_work, ring_bytes
from .procs import FetchProcesses
from .sink import LEDGER_FILE, BlockRows, PredictionSink

_END = object()


class _Stopped(Exception):
    pass


@dataclass
class StageMeter:
    """One stage's counters: tiles through it, seconds spent working (summed over its
    threads) and its thread count."""

    name: str
    threads: int = 1
    tiles: int = 0
    busy_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    wait_s: float = 0.0  # issue 13: seconds spent waiting for input (the model stage)
    processes: bool = False  # issue 13: ``threads`` counts processes (decode processes)

    def add(self, tiles: int, busy_s: float) -> None:
        with self.lock:
            self.tiles += tiles
            self.busy_s += busy_s

    def waited(self, seconds: float) -> None:
        with self.lock:
            self.wait_s += seconds

    def busy(self, wall_s: float) -> float:
        """Share of the stage's thread time spent working, 0..1."""
        return self.busy_s / (wall_s * self.threads) if wall_s > 0 else 0.0


@dataclass
class FlowMeter(StageMeter):
    """A source stage's counters (fetch): busy while not blocked handing tiles on, so
    ``busy`` near 1 means the stages after it wait for it."""

    blocked_s: float = 0.0

    def blocked(self, seconds: float) -> None:
        with self.lock:
            self.blocked_s += seconds

    def busy(self, wall_s: float) -> float:
        return max(0.0, 1.0 - self.blocked_s / wall_s) if wall_s > 0 and self.tiles else 0.0


@dataclass(frozen=True)
class StreamFetch:
    """Fetch tiles from ``source`` straight into the model (``tilesweep run``): blocks
    pending in the fetch queue are leased, blocks done earlier without kept tiles are
    fetched again; ``fetch`` and ``worker`` are the fetcher's and the leases' settings
    (``fetch.concurrency`` is per worker). ``workers``: 1 fetches in a thread of this
    process; more start that many fetch processes (one event loop fetches a few thousand
    tiles/s: use them when the model, on a GPU, takes more)."""

    source: Source
    fetch: FetchSettings = field(default_factory=FetchSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    workers: int = 1


@dataclass
class PredictSettings:
    """``batch``: model inputs per ``predict`` call; ``threads``: decode threads;
    ``part_rows`` / ``part_seconds``: group commit bounds; ``queue_blocks``: blocks each
    queue between stages may hold. ``decode``: where tiles are decoded, ``auto``,
    ``threads``, ``processes`` or ``gpu`` (:mod:`.decoding`); ``decode_processes``: how
    many with ``processes`` (None: half the cores, 2..8)."""

    batch: int = 64
    threads: int = 2
    part_rows: int = 65536
    part_seconds: float = 60.0
    queue_blocks: int = 4
    decode: str = "auto"  # issue 13
    decode_processes: int | None = None  # issue 13


@dataclass
class PredictReport:
    """What one run did: blocks and tiles scored, positives, parts written, wall time,
    the per-stage meters and recovery actions; ``missing_shards`` counts done blocks whose
    shard is not in the store (skipped: `tilesweep verify` / fetch again); ``corrupt_shards``
    names the shards that failed their checks (a tile's crc, the index...): each was moved
    aside and its block queued to be fetched again, and the rest of the run went on."""

    blocks_todo: int = 0
    blocks: int = 0
    tiles: int = 0
    empty: int = 0
    failed: int = 0
    undecodable: int = 0
    model_nan: int = 0  # rows whose tile decoded but the model returned NaN
    positives: int = 0
    parts: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    missing_shards: int = 0
    corrupt_shards: list[str] = field(default_factory=list)
    adopted_parts: int = 0
    fetch: WorkerCounters | None = None  # with stream=: the fetch's counters
    decode: str = ""  # issue 13: the decode mode used, and why (auto)
    decode_deaths: list[str] = field(default_factory=list)  # issue 13: decode processes that died (their blocks were decoded again)
    stages: dict[str, StageMeter] = field(default_factory=dict)
    queues: dict[str, "queue_mod.Queue[Any]"] = field(default_factory=dict, repr=False)

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def model_busy(self) -> float:
        m = self.stages.get("model")
        return m.busy(self.wall_s) if m else 0.0

    def bottleneck(self) -> str:
        """``"model"`` when the model is busy 3/4 of the time or more (the goal: the
        model is the limit); else the busiest other stage, if busy half the time; else
        ``"input"``: every stage waits for tiles (the fetch, when it runs beside).

        The model comes first because the stages before it run ahead into bounded queues:
        until those fill, a fetch that feeds a busy model still looks busy."""
        if not self.stages or self.wall_s <= 0:
            return "-"
        if self.model_busy >= 0.75:
            return "model"
        others = [m for m in self.stages.values() if m.name != "model"]
        top = max(others, key=lambda s: s.busy(self.wall_s))
        return top.name if top.busy(self.wall_s) >= 0.5 else "input (every stage waits for tiles)"

    def bound_line(self) -> str:
        """Which stage bounds the run and by how much, and the model's wait for input
        (:func:`.bounds.bound_line`)."""
        return bound_line(self)

    @property
    def model_wait(self) -> float:
        """Share of the wall time the model waited for input, 0..1."""
        return model_wait(self)

    def queue_fill(self) -> dict[str, float]:
        return {k: q.qsize() / q.maxsize for k, q in self.queues.items() if q.maxsize}


class _Work:
    """One block on its way through the stages."""

    __slots__ = ("block", "x", "y", "data", "empty", "failed", "inputs", "owner", "bad", "raw", "cursor", "slots")

    def __init__(self, block: Block, x: np.ndarray, y: np.ndarray, data: list[bytes], empty: int, failed: int) -> None:
        self.block = block
        self.x, self.y, self.data = x, y, data
        self.empty, self.failed = empty, failed
        self.inputs: np.ndarray | None = None
        self.owner: np.ndarray | None = None
        self.bad: np.ndarray | None = None
        self.raw: np.ndarray | None = None
        self.cursor = 0
        self.slots: list[int] = []  # issue 13: shared-memory slots holding ``inputs`` (decode processes)


def blocks_to_predict(sweep: Any, predicted: set[int]) -> list[Block]:
    """Blocks done in the sweep's fetch queue that are not in ``predicted``, in id order."""
    return [b for b in sweep.queue.blocks(State.DONE) if b.id not in predicted]


def predict_sweep(
    sweep: Any,
    model: Model,
    settings: PredictSettings | None = None,
    on_progress: Callable[[PredictReport], None] | None = None,
    progress_every_s: float = 0.5,
    follow: Callable[[], bool] | None = None,
    poll_s: float = 0.25,
    stream: StreamFetch | None = None,
) -> PredictReport:
    """Score every fetched tile of ``sweep`` (a :class:`tilesweep.sweep.Sweep`) that this
    model has not scored yet, into ``SWEEP/predictions/``. Resumable and idempotent: a
    second run finds nothing to do. ``on_progress`` is called from this thread every
    ``progress_every_s`` with the live report.

    ``follow``: while it returns True (e.g. "the fetch is still running"), keep looking
    for newly done blocks every ``poll_s`` seconds and score them too, so prediction runs
    beside fetching (``tilesweep run --keep-tiles``); blocks still go out in
    group-committed parts.

    ``stream``: fetch what the store does not hold straight from the source into the model
    (``tilesweep run``): pending blocks are leased and acked in the fetch queue once their
    predictions are durable; done blocks without a shard (streamed for another model) are
    fetched again. Tiles are not stored."""
    if stream is not None and follow is not None:
        raise ValueError("predict_sweep: stream and follow exclude each other")
    s = settings or PredictSettings()
    info = model.info
    spec = info.input
    n_labels = len(info.labels)
    report = PredictReport()
    # issue 13: where decoding happens (threads here, decode processes, the GPU)
    n_procs = s.decode_processes or default_processes()
    decode_mode, why = choose_decode(s.decode, model, ring=ring_bytes(n_procs, spec.size, s.batch, s.queue_blocks))
    report.decode = f"{decode_mode} ({why})"
    n_dec = {"threads": s.threads, "processes": 1, "gpu": 1}[decode_mode]  # consumers of the read queue
    sink = PredictionSink(
        sweep.path, sweep.zoom, model.name, model.digest, info.labels, info.threshold,
        part_rows=s.part_rows, part_seconds=s.part_seconds,
        # `run` fetches what a kill would lose: its first parts come at once, then at 1,
        # 3, 7, ... seconds up to part_seconds (a few more small parts at the start).
        first_part_s=1.0 if stream is not None or follow is not None else None,
        holder="tilesweep run" if stream is not None or follow is not None else "tilesweep predict",
    )
    cleanup = contextlib.ExitStack()
    live_procs: list[FetchProcesses] = []
    try:
        report.adopted_parts = sink.stats.adopted_parts
        predicted = sink.predicted_ids()
        todo = blocks_to_predict(sweep, predicted)
        store = sweep.store
        refetch: list[Block] = []
        if stream is not None:  # what the store lacks comes from the source
            refetch = [b for b in todo if not store.is_complete(b.tile)]
            todo = [b for b in todo if store.is_complete(b.tile)] if refetch else todo
        report.blocks_todo = len(todo) + len(refetch)
        meters: dict[str, StageMeter] = {"read": StageMeter("read")}
        if stream is not None:
            meters["fetch"] = FlowMeter("fetch")
        meters.update({name: StageMeter(name, threads) for name, threads in
                       (("decode", n_dec), ("model", 1), ("sink", 1))})
        report.stages = meters
        q_read: queue_mod.Queue[Any] = queue_mod.Queue(s.queue_blocks)
        q_dec: queue_mod.Queue[Any] = queue_mod.Queue(s.queue_blocks)
        q_sink: queue_mod.Queue[Any] = queue_mod.Queue(s.queue_blocks * 4)
        report.queues = {"read": q_read, "decode": q_dec, "sink": q_sink}
        stop = threading.Event()
        proc_decode: ProcessDecode | None = None  # issue 13
        gpu_decoder: Any = None
        if decode_mode == "processes":
            meters["decode"].threads, meters["decode"].processes = n_procs, True
            proc_decode = ProcessDecode(n_procs, spec.size, spec.fit, batch=s.batch, queue_blocks=s.queue_blocks,
                                        stop=stop, stopped=_Stopped, n_labels=n_labels, meter=meters["decode"])
            cleanup.callback(proc_decode.close)
        elif decode_mode == "gpu":
            from .gpudecode import GpuDecoder

            gpu_decoder = GpuDecoder(spec.size, spec.fit)

        def on_signal() -> None:  # SIGINT/SIGTERM: stop leasing, commit what is whole, release
            stop.set()
            for fp in live_procs:
                fp.stop()

        # From here on a stop signal only sets the events (signals.stop_on_signals): the
        # stages wind down in order, the sink commits the blocks scored whole, the fetch
        # acks them and releases the rest; then KeyboardInterrupt tells the caller (the
        # CLI: exit 130/143). Entered before the fetch processes start, so a stop during
        # their start-up stops them too.
        signalled = cleanup.enter_context(signals.stop_on_signals(on_signal))
        errors: list[BaseException] = []
        fetch_ended = threading.Event()  # the stream worker handed its last block (or stopped)
        worker: Worker | None = None
        procs: FetchProcesses | None = None
        on_committed: Callable[[list[int]], None] | None = None
        on_closed: Callable[[], None] | None = None  # after the sink's last commit
        if stream is not None:
            worker_args = (sweep.path, sweep.zoom, sweep.block_zoom, stream.source, stream.fetch, stream.worker)
            if stream.workers > 1:
                procs = FetchProcesses(worker_args, stream.workers, refetch, sink.root / LEDGER_FILE, sink.key)
                live_procs.append(procs)
                if stop.is_set():  # signalled while they started
                    procs.stop()
                on_committed, on_closed = procs.committed, procs.sink_closed
            else:
                consumer = _StreamConsumer(sink, predicted, meters["fetch"], lambda w: put(q_read, w), fetch_ended)  # type: ignore[arg-type]
                worker = Worker(*worker_args, on_progress=lambda c: None, stop_event=stop, consumer=consumer, refetch=refetch)
                report.fetch = worker.counters
                on_committed, on_closed = worker.committed, worker.consumer_closed

        def put(q: "queue_mod.Queue[Any]", item: Any) -> None:
            while True:
                if stop.is_set():
                    raise _Stopped
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue_mod.Full:
                    pass

        def get(q: "queue_mod.Queue[Any]", timeout: float | None = None) -> Any:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if stop.is_set():
                    raise _Stopped
                try:
                    return q.get(timeout=0.1)
                except queue_mod.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise

        # The main thread waits on this event, never in Thread.join: a Ctrl-C that lands
        # inside join() can leave that thread marked as stopped while it still runs
        # (CPython gh-90882), and then nobody waits for the worker to release its leases.
        all_ended = threading.Event()
        running = [0]
        running_lock = threading.Lock()

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                except _Stopped:
                    pass
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    errors.append(exc)
                    stop.set()
                finally:
                    with running_lock:
                        running[0] -= 1
                        if running[0] == 0:
                            all_ended.set()
            return run

        def read() -> None:
            m = meters["read"]
            try:
                for block in _blocks(todo):
                    t0 = time.perf_counter()
                    path = store.shard_path(block.tile)
                    try:
                        reader = ShardReader(path)
                    except FileNotFoundError:
                        report.missing_shards += 1
                        continue
                    except CorruptShardError as exc:
                        _requeue_corrupt(sweep, store, block, exc, report)
                        continue
                    with reader:
                        st = np.asarray(reader.records["status"])
                        xs, ys = reader.coords()
                        ok = np.nonzero(st == TileStatus.OK)[0]
                        try:  # every tile's crc is checked: no model scores flipped bytes
                            data = [reader.data(int(i)) for i in ok]
                        except CorruptShardError as exc:
                            data = None
                            bad = exc
                        if data is not None:
                            work = _Work(block, xs[ok], ys[ok], data, int(np.sum(st == TileStatus.EMPTY)), int(np.sum(st == TileStatus.FAILED)))
                    if data is None:
                        _requeue_corrupt(sweep, store, block, bad, report)
                        continue
                    m.add(len(ok), time.perf_counter() - t0)
                    put(q_read, work)
                while stream is not None and not fetch_ended.wait(0.1):  # the stream's blocks
                    if stop.is_set():
                        raise _Stopped
            finally:
                for _ in range(n_dec):
                    put(q_read, _END)

        def fetch_loop() -> None:
            try:
                if worker is not None:
                    worker.run()
                    return
                assert procs is not None
                m = meters["fetch"]
                for block, x, y, data, empty in procs.blocks(stop):
                    t0 = time.perf_counter()
                    put(q_read, _Work(block, x, y, data, empty, 0))
                    m.blocked(time.perf_counter() - t0)  # type: ignore[attr-defined]
                    m.add(len(data) + empty, 0.0)
            finally:
                fetch_ended.set()

        def _blocks(first: list[Block]) -> Iterator[Block]:
            """``first``, then (with ``follow``) the blocks done since, until ``follow()``
            turns False and a last look finds nothing new."""
            seen = {b.id for b in first}
            yield from first
            if follow is None:
                return
            q = SqliteQueue(sweep.path / QUEUE_FILE)  # this thread's own connection
            try:
                while True:
                    more = follow()  # asked before looking, so the last look sees everything
                    new = [b for b in q.blocks(State.DONE) if b.id not in seen and b.id not in predicted]
                    for b in new:
                        seen.add(b.id)
                    report.blocks_todo += len(new)
                    yield from new
                    if not more and not new:
                        return
                    if not new:
                        time.sleep(poll_s)
                        if stop.is_set():
                            raise _Stopped
            finally:
                q.close()

        def decode_loop() -> None:
            m = meters["decode"]
            try:
                while True:
                    work = get(q_read)
                    if work is _END:
                        return
                    t0 = time.perf_counter()
                    if gpu_decoder is not None:  # issue 13: the block's JPEGs in one nvJPEG call
                        gpu_decode_work(gpu_decoder, work, n_labels)
                        m.add(len(work.bad), time.perf_counter() - t0)
                        put(q_dec, work)
                        continue
                    parts, owners = [], []
                    bad = np.zeros(len(work.data), bool)
                    for i, data in enumerate(work.data):
                        try:
                            p = fit(decode(data), spec.size, spec.fit)
                        except ValueError:  # DecodeError, or an image that does not fit
                            bad[i] = True
                            continue
                        parts.append(p)
                        owners.append(np.full(len(p), i, np.int64))
                    work.inputs = np.concatenate(parts) if parts else np.zeros((0, spec.size, spec.size, 3), np.uint8)
                    work.owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
                    work.bad = bad
                    work.raw = np.empty((len(work.inputs), n_labels), np.float32)
                    work.data = []
                    m.add(len(bad), time.perf_counter() - t0)
                    put(q_dec, work)
            finally:
                put(q_dec, _END)

        def finish(work: _Work) -> None:
            scores = np.full((len(work.x), n_labels), -np.inf, np.float32)
            if len(work.owner):
                np.maximum.at(scores, work.owner, work.raw)
            scores[work.bad] = np.nan
            if proc_decode is not None:  # issue 13: the model is done with the block's slot
                proc_decode.release(work)
            put(q_sink, BlockRows(work.block.id, work.block.z, work.x, work.y, scores, work.empty, work.failed, time.time(), work.bad))

        def model_loop() -> None:
            m = meters["model"]
            pending: deque[_Work] = deque()
            avail = 0
            ended = 0
            try:
                while True:
                    while avail < s.batch and ended < n_dec:
                        tw = time.perf_counter()
                        work = get(q_dec)
                        m.waited(time.perf_counter() - tw)  # issue 13: the model waits for input
                        if work is _END:
                            ended += 1
                        elif len(work.inputs) == 0:
                            if not pending:
                                finish(work)
                            else:
                                pending.append(work)
                        else:
                            pending.append(work)
                            avail += len(work.inputs)
                    if avail == 0:
                        while pending:
                            finish(pending.popleft())
                        if ended >= n_dec:
                            return
                        continue
                    chunks, refs, need = [], [], s.batch
                    for work in pending:
                        if need == 0:
                            break
                        take = min(need, len(work.inputs) - work.cursor)
                        if take:
                            chunks.append(work.inputs[work.cursor : work.cursor + take])
                            refs.append((work, work.cursor, take))
                            work.cursor += take
                            need -= take
                    t0 = time.perf_counter()
                    batch = concat(chunks)  # issue 13: numpy, or torch tensors decoded on the GPU
                    out = check_scores(_call_model(model, batch), len(batch), info, model.name)
                    t1 = time.perf_counter()
                    k = 0
                    for work, start, take in refs:
                        work.raw[start : start + take] = out[k : k + take]
                        k += take
                    avail -= len(batch)
                    while pending and pending[0].cursor == len(pending[0].inputs):
                        finish(pending.popleft())
                    m.add(len(batch), t1 - t0)  # normalising counts: it is the model stage's work
            finally:
                put(q_sink, _END)

        def sink_loop() -> None:
            m = meters["sink"]

            def add(rows: BlockRows) -> None:
                t0 = time.perf_counter()
                committed = sink.add(rows)
                m.add(len(rows.x), time.perf_counter() - t0)
                if committed and on_committed is not None:
                    on_committed(committed)

            clean = False
            try:
                try:
                    while True:
                        try:
                            rows = get(q_sink, timeout=1.0)
                        except queue_mod.Empty:
                            if sink.due():
                                committed = sink.commit()
                                if committed and on_committed is not None:
                                    on_committed(committed)
                            continue
                        if rows is _END:
                            break
                        add(rows)
                except _Stopped:
                    # A stop (Ctrl-C, SIGTERM, an error elsewhere): the blocks scored whole
                    # are kept, those waiting here and those buffered, in one last part.
                    while True:
                        try:
                            rows = q_sink.get_nowait()
                        except queue_mod.Empty:
                            break
                        if rows is not _END:
                            add(rows)
                clean = True
            finally:
                try:
                    if clean:  # not after the sink's own failure: it would fail again
                        t0 = time.perf_counter()
                        committed = sink.commit()
                        m.add(0, time.perf_counter() - t0)
                        if committed and on_committed is not None:
                            on_committed(committed)
                finally:
                    if on_closed is not None:  # the fetch stops waiting for commits
                        on_closed()

        threads = [threading.Thread(target=guarded(read), name="predict-read", daemon=True)]
        if proc_decode is not None:  # issue 13: one thread sends blocks to the decode processes, one gathers them
            pd = proc_decode

            def gather() -> None:
                try:
                    pd.gather(lambda w: put(q_dec, w))
                finally:
                    put(q_dec, _END)

            threads += [threading.Thread(target=guarded(lambda: pd.dispatch(lambda: get(q_read), _END)), name="predict-decode-send", daemon=True),
                        threading.Thread(target=guarded(gather), name="predict-decode-gather", daemon=True)]
        else:
            threads += [threading.Thread(target=guarded(decode_loop), name=f"predict-decode-{i}", daemon=True) for i in range(n_dec)]
        threads += [threading.Thread(target=guarded(model_loop), name="predict-model", daemon=True),
                    threading.Thread(target=guarded(sink_loop), name="predict-sink", daemon=True)]
        if stream is not None:
            threads.append(threading.Thread(target=guarded(fetch_loop), name="predict-fetch", daemon=True))
        started = time.monotonic()

        def snapshot() -> None:
            if procs is not None:
                report.fetch = procs.counters()
            st = sink.stats
            report.wall_s = time.monotonic() - started
            report.blocks, report.tiles, report.positives = st.blocks, st.rows, st.positives
            report.parts, report.bytes = st.parts, st.bytes
            report.empty, report.failed, report.undecodable = st.empty, st.failed, st.undecodable
            report.model_nan = st.model_nan
            if proc_decode is not None:
                report.decode_deaths = list(proc_decode.deaths)

        running[0] = len(threads)
        for t in threads:
            t.start()
        try:
            while not all_ended.wait(progress_every_s):
                if on_progress is not None:
                    snapshot()
                    on_progress(report)
        except BaseException:  # a second signal, or a failing progress callback
            on_signal()
            # the fetch worker releases its leases before it ends: give it time to
            all_ended.wait(60 if worker is not None else 5)
            if procs is not None:
                procs.close(stop=True)
                procs = None
            raise
        if procs is not None:  # the workers ack what the sink committed last, then end
            procs.close(stop=bool(errors) or signalled())
        snapshot()
        if errors:
            raise errors[0]
        if signalled():
            raise KeyboardInterrupt
        if procs is not None and procs.deaths:  # a worker died; the others went on without it
            raise procs.deaths.error()
        return report
    except BaseException:
        for fp in live_procs:  # failed before its loop (e.g. a second signal): stop them
            if fp.procs and any(p.is_alive() for p in fp.procs):
                fp.close(stop=True)
        raise
    finally:
        cleanup.close()
        sink.close()


class _StreamConsumer:
    """The pipeline as a :class:`~tilesweep.worker.BlockConsumer`: a fetched block becomes a
    ``_Work`` in the decode queue; time spent waiting for room there is the fetch's
    blocked time."""

    def __init__(
        self, sink: PredictionSink, predicted: set[int], meter: FlowMeter, put: Callable[[_Work], None], ended: threading.Event
    ) -> None:
        self.sink = sink
        self.predicted = predicted  # blocks predicted before this run began
        self.meter = meter
        self.put = put
        self.ended = ended

    def done_result(self, block: Block) -> BlockResult | None:
        # a pending block predicted already: a crash came between the part and the ack
        return self.sink.block_result(block.id) if block.id in self.predicted else None

    def take(self, block: Block, results: list[TileResult]) -> bool:
        ok = [r for r in results if r.status is TileStatus.OK]
        x = np.fromiter((r.tile.x for r in ok), np.int64, len(ok))
        y = np.fromiter((r.tile.y for r in ok), np.int64, len(ok))
        work = _Work(block, x, y, [r.data for r in ok], len(results) - len(ok), 0)  # type: ignore[misc]
        t0 = time.perf_counter()
        try:
            self.put(work)
        except _Stopped:
            return False
        self.meter.blocked(time.perf_counter() - t0)
        self.meter.add(len(results), 0.0)
        return True

    def end(self) -> None:
        self.ended.set()


def _requeue_corrupt(sweep: Any, store: Any, block: Block, exc: CorruptShardError, report: PredictReport) -> None:
    """A shard that fails its checks is moved aside (``.shard.corrupt``) and its block is
    queued again in the fetch queue, so that the next fetch (or this `run`) fetches it
    anew; the rest of the prediction goes on."""
    report.corrupt_shards.append(exc.describe())
    store.quarantine(block.tile)
    q = SqliteQueue(sweep.path / QUEUE_FILE)  # this thread's own connection
    try:
        q.requeue([block.id], f"shard corrupt when read for prediction: {exc}")
    finally:
        q.close()


def probe(model: Model) -> None:
    """Run the model once on a zero batch, so a model that returns the wrong shape fails
    (one-line UsageError) before anything is written."""
    spec = model.info.input
    check_scores(_call_model(model, np.zeros((1, spec.size, spec.size, 3), np.uint8)), 1, model.info, model.name)


def _call_model(model: Model, batch: np.ndarray) -> np.ndarray:
    """The model's scores of ``batch``; an exception the model raises is a one-line
    :class:`UsageError` naming the model (the model is the user's code, not tilesweep's).
    Nothing of that batch is written; committed parts stay durable."""
    try:
        return predict_pixels(model, batch)
    except (KeyboardInterrupt, SystemExit, MemoryError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - any error of the user's model
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(f"model {model.name} raised {type(exc).__name__}{': ' + text if text else ''} (on a batch of {len(batch)} tiles)") from None


__all__ = ["FlowMeter", "PredictReport", "PredictSettings", "StageMeter", "StreamFetch", "blocks_to_predict", "predict_sweep", "probe"]
