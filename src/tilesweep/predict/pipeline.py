"""Offline prediction: score the tiles of a sweep's store with a model, block by block.

Stages, joined by bounded queues (so memory stays flat whatever the tile count)::

    read (1 thread)      a :class:`~tilesweep.runner.StoreRunner`: blocks done in the fetch
                         queue and not yet predicted by this model, each read from its shard
                         (memory-mapped, records in tile-id order)
    fetch (1 thread)     with ``stream=``: a :class:`~tilesweep.runner.Runner` that leases
                         blocks and fetches them straight into the pipeline, no store; the
                         runner acks a block in the fetch queue once its part is durable. With
                         ``StreamFetch(workers=N > 1)`` the thread receives the blocks of N
                         worker processes instead (:mod:`.procs`). With
                         ``StreamFetch(keep_tiles=True)`` each runner tees: it stores the
                         block's shard, then hands the block over, and acks it once both are
                         durable (:class:`~tilesweep.runner.Tee`)
    decode (N threads)   JPEG/PNG/WebP -> RGB (simplejpeg releases the GIL) -> fit to the
                         model's input (uint8, not yet normalised: 4x smaller in the queue)
    model (1 thread)     batches of ``batch`` inputs across block boundaries, normalise and
                         predict (:func:`~tilesweep.model.predict_pixels`: a GPU model gets
                         the uint8 pixels); a chipped tile gets the max over its chips
    sink (1 thread)      group commit of many blocks per Parquet part (:mod:`.sink`)

One run is a :class:`_Pipeline`, one method per stage. Both runners hand their blocks to
one :class:`PredictionConsumer`.

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
from ..queue import State
from ..sources import Source
from ..runner import StoreRunner, StoredBlock, Worker, WorkerCounters, WorkerSettings
from ..sweep import open_sweep_queue
from .bounds import bound_line, model_wait
from .decoding import DECODE_MODES, ProcessDecode, choose_decode, concat, default_processes, gpu_decode_work, ring_bytes
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
    tiles/s: use them when the model, on a GPU, takes more). ``keep_tiles``: also pack
    the tiles into the store (``run --keep-tiles``): each runner (the thread, or each of
    the ``workers`` processes) writes a block's shard, hands the block to the model and
    acks it once both its shard and its predictions are durable (a
    :class:`~tilesweep.runner.Tee`)."""

    source: Source
    fetch: FetchSettings = field(default_factory=FetchSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    workers: int = 1
    keep_tiles: bool = False


@dataclass(frozen=True)
class PredictSettings:
    """How the prediction pipeline runs; checked when built (one-line UsageError).

    - ``batch``: model inputs per ``predict`` call, 1..65536;
    - ``threads``: decode threads, 1..256;
    - ``part_rows`` (>= 1) / ``part_seconds`` (> 0): group commit bounds, rows and
      seconds per Parquet part;
    - ``queue_blocks``: blocks each queue between stages may hold, >= 1;
    - ``model_threads``: CPU threads of one model batch, 1..256 (None: the runtime's
      choice); used when the model is loaded (:func:`tilesweep.model.load_model`);
    - ``decode``: where tiles are decoded, ``auto``, ``threads``, ``processes`` or ``gpu``
      (:mod:`.decoding`); ``decode_processes``: how many with ``processes``, 1..256 (None:
      half the cores, 2..8)."""

    batch: int = 64
    threads: int = 2
    part_rows: int = 65536
    part_seconds: float = 60.0
    queue_blocks: int = 4
    model_threads: int | None = None
    decode: str = "auto"  # issue 13
    decode_processes: int | None = None  # issue 13

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:  # issue 13
            raise UsageError(f"decode {self.decode!r} is not auto, threads, processes or gpu")
        if self.decode_processes is not None and not 1 <= self.decode_processes <= 256:
            raise UsageError(f"decode processes {self.decode_processes} must be in 1..256")
        if not 1 <= self.batch <= 65536:
            raise UsageError(f"batch {self.batch} must be in 1..65536")
        if not 1 <= self.threads <= 256:
            raise UsageError(f"threads {self.threads} must be in 1..256")
        if self.part_rows < 1:
            raise UsageError(f"part rows {self.part_rows} must be >= 1")
        if not self.part_seconds > 0:
            raise UsageError(f"part seconds {self.part_seconds:g} must be > 0")
        if self.queue_blocks < 1:
            raise UsageError(f"queue blocks {self.queue_blocks} must be >= 1")
        if self.model_threads is not None and not 1 <= self.model_threads <= 256:
            raise UsageError(f"model threads {self.model_threads} must be in 1..256")


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

    def decoded(self) -> np.ndarray:
        """The block's model inputs, which the decode stage sets before the model sees it."""
        if self.inputs is None:
            raise RuntimeError(f"block {self.block.id} reached the model before it was decoded")
        return self.inputs
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
    fetched again. Tiles are not stored, unless ``stream.keep_tiles``: then each runner
    also packs them into the store, and acks a block once its shard and its predictions
    are durable (done blocks without a shard are then counted in ``missing_shards``, not
    fetched again)."""
    if stream is not None and follow is not None:
        raise ValueError("predict_sweep: stream and follow exclude each other")
    return _Pipeline(sweep, model, settings or PredictSettings(), follow, poll_s, stream).run(on_progress, progress_every_s)


class _Pipeline:
    """One run of :func:`predict_sweep`: the stages of the module doc, one method each,
    joined by bounded queues, started in threads by :meth:`run`.

    - :meth:`_read`: the store's runner: its blocks (and, with ``follow``, those done since) -> decode
    - :meth:`_fetch`: with ``stream``, the runner (or its worker processes) -> decode
    - :meth:`_decode`: bytes -> model inputs
    - :meth:`_model`: batches across blocks -> scores
    - :meth:`_sink`: group commit; each commit's ids go back to the runner, which acks them

    A stop (a signal, an error in any stage) sets :attr:`stop`; every stage then winds down
    in order and the sink commits the blocks scored whole."""

    def __init__(self, sweep: Any, model: Model, s: PredictSettings, follow: Callable[[], bool] | None,
                 poll_s: float, stream: StreamFetch | None) -> None:
        self.sweep, self.model, self.s = sweep, model, s
        self.follow, self.poll_s, self.stream = follow, poll_s, stream
        self.info = model.info
        self.spec = self.info.input
        self.width = self.info.width  # scores, then any positions (model.base)
        self.report = PredictReport()
        # issue 13: where decoding happens (threads here, decode processes, the GPU); chosen
        # before the sink, so a mode that cannot run here writes nothing
        self.n_procs = s.decode_processes or default_processes()
        self.decode_mode, why = choose_decode(s.decode, model, ring=ring_bytes(self.n_procs, self.spec.size, s.batch, s.queue_blocks))
        self.report.decode = f"{self.decode_mode} ({why})"
        self.n_dec = s.threads if self.decode_mode == "threads" else 1  # consumers of the read queue
        self.proc_decode: ProcessDecode | None = None
        self.gpu_decoder: Any = None
        live = stream is not None or follow is not None
        self.sink = PredictionSink(
            sweep.path, sweep.zoom, model.name, model.digest, self.info.labels, self.info.threshold,
            part_rows=s.part_rows, part_seconds=s.part_seconds,
            # `run` fetches what a kill would lose: its first parts come at once, then at 1,
            # 3, 7, ... seconds up to part_seconds (a few more small parts at the start).
            first_part_s=1.0 if live else None,
            holder="tilesweep run" if live else "tilesweep predict",
            storage=sweep.predictions_storage if sweep.remote else None,
            positions=self.info.positions,
        )
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.live_procs: list[FetchProcesses] = []
        self.fetch_ended = threading.Event()  # the stream's runner handed its last block (or stopped)
        self.worker: Worker | None = None
        self.procs: FetchProcesses | None = None
        # the ids durable, and the ledger's (rows, empty, failed) of those another writer recorded first
        self.on_committed: Callable[[list[int], dict[int, tuple[int, int, int]]], None] | None = None
        self.on_closed: Callable[[], None] | None = None  # after the sink's last commit
        self.in_flight: set[int] = set()  # blocks handed over (by worker processes or the runner), not yet committed
        # The main thread waits on this event, never in Thread.join: a Ctrl-C that lands
        # inside join() can leave that thread marked as stopped while it still runs
        # (CPython gh-90882), and then nobody waits for the worker to release its leases.
        self.all_ended = threading.Event()
        self.running = 0
        self.running_lock = threading.Lock()

    # --- the run ------------------------------------------------------------------------

    def run(self, on_progress: Callable[[PredictReport], None] | None, progress_every_s: float) -> PredictReport:
        cleanup = contextlib.ExitStack()
        try:
            self._plan()
            # From here on a stop signal only sets the events (signals.stop_on_signals): the
            # stages wind down in order, the sink commits the blocks scored whole, the fetch
            # acks them and releases the rest; then KeyboardInterrupt tells the caller (the
            # CLI: exit 130/143). Entered before the decode and fetch processes start, so a
            # stop during their start-up stops them too (a stop raised in the middle of the
            # decode pool's start left its processes, which ignore SIGTERM, to hang the exit).
            signalled = cleanup.enter_context(signals.stop_on_signals(self._on_signal))
            self._make_queues()
            if self.stream is not None:
                self._make_fetch(self.stream)
            return self._drive(on_progress, progress_every_s, signalled)
        except BaseException:
            for fp in self.live_procs:  # failed before its loop (e.g. a second signal): stop them
                if fp.procs and any(p.is_alive() for p in fp.procs):
                    fp.close(stop=True)
            raise
        finally:
            cleanup.close()
            if self.proc_decode is not None:  # issue 13: decode processes end, the ring is unlinked
                self.proc_decode.close()
            self.sink.close()

    def _plan(self) -> None:
        """What to score: done blocks this model has not scored, from the store; with a
        stream, those the store lacks are fetched again (``refetch``)."""
        self.report.adopted_parts = self.sink.stats.adopted_parts
        self.predicted = self.sink.predicted_ids()
        todo = blocks_to_predict(self.sweep, self.predicted)
        self.store = self.sweep.store
        self.refetch: list[Block] = []
        if self.stream is not None and not self.stream.keep_tiles:  # what the store lacks comes from the source
            self.refetch = [b for b in todo if not self.store.is_complete(b.tile)]
            todo = [b for b in todo if self.store.is_complete(b.tile)] if self.refetch else todo
        self.todo = todo
        self.report.blocks_todo = len(todo) + len(self.refetch)
        reading = PredictionConsumer(self.sink, self.predicted, lambda w: self._put(self.q_read, w))
        self.reader = StoreRunner(self.sweep.location, self.store, reading, on_read=self._on_read)

    def _make_queues(self) -> None:
        s = self.s
        meters: dict[str, StageMeter] = {"read": StageMeter("read")}
        if self.stream is not None:
            meters["fetch"] = FlowMeter("fetch")
        meters.update({name: StageMeter(name, threads) for name, threads in
                       (("decode", self.n_dec), ("model", 1), ("sink", 1))})
        self.meters = self.report.stages = meters
        if self.decode_mode == "processes":  # issue 13
            meters["decode"].threads, meters["decode"].processes = self.n_procs, True
            self.proc_decode = ProcessDecode(self.n_procs, self.spec.size, self.spec.fit, batch=s.batch,
                                             queue_blocks=s.queue_blocks, stop=self.stop, stopped=_Stopped,
                                             width=self.width, meter=meters["decode"])
        elif self.decode_mode == "gpu":
            from .gpudecode import GpuDecoder

            self.gpu_decoder = GpuDecoder(self.spec.size, self.spec.fit)
        self.q_read: queue_mod.Queue[Any] = queue_mod.Queue(s.queue_blocks)
        self.q_dec: queue_mod.Queue[Any] = queue_mod.Queue(s.queue_blocks)
        self.q_sink: queue_mod.Queue[Any] = queue_mod.Queue(s.queue_blocks * 4)
        self.report.queues = {"read": self.q_read, "decode": self.q_dec, "sink": self.q_sink}

    def _make_fetch(self, stream: StreamFetch) -> None:
        """The stream's runner: in a thread of this process, or ``workers`` processes."""
        sweep = self.sweep
        worker_args = (sweep.location, sweep.zoom, sweep.block_zoom, stream.source, stream.fetch, stream.worker)
        if stream.workers > 1:
            procs = FetchProcesses(worker_args, stream.workers, self.refetch, self.sink.root / LEDGER_FILE, self.sink.key,
                                   keep_tiles=stream.keep_tiles)
            self.procs = procs
            self.live_procs.append(procs)
            if self.stop.is_set():  # signalled while they started
                procs.stop()
            self.on_committed, self.on_closed = procs.committed, procs.sink_closed
        else:
            consumer = PredictionConsumer(self.sink, self.predicted, lambda w: self._put(self.q_read, w),
                                          self.meters["fetch"], self.fetch_ended, self.in_flight)  # type: ignore[arg-type]
            worker = Worker(*worker_args, on_progress=lambda c: None, stop_event=self.stop, consumer=consumer,
                            refetch=self.refetch, keep_tiles=stream.keep_tiles)
            self.worker = worker
            self.report.fetch = worker.counters
            self.on_committed, self.on_closed = worker.committed, worker.consumer_closed

    def _on_signal(self) -> None:  # SIGINT/SIGTERM: stop leasing, commit what is whole, release
        self.stop.set()
        for fp in self.live_procs:
            fp.stop()

    def _threads(self) -> list[threading.Thread]:
        def thread(fn: Callable[[], None], name: str) -> threading.Thread:
            return threading.Thread(target=self._guarded(fn), name=name, daemon=True)

        threads = [thread(self._read, "predict-read")]
        if self.proc_decode is not None:  # issue 13: one thread sends blocks to the decode processes, one gathers them
            pd = self.proc_decode

            def gather() -> None:
                try:
                    pd.gather(lambda w: self._put(self.q_dec, w))
                finally:
                    self._put(self.q_dec, _END)

            threads += [thread(lambda: pd.dispatch(lambda: self._get(self.q_read), _END), "predict-decode-send"),
                        thread(gather, "predict-decode-gather")]
        else:
            threads += [thread(self._decode, f"predict-decode-{i}") for i in range(self.n_dec)]
        threads += [thread(self._model, "predict-model"), thread(self._sink, "predict-sink")]
        if self.stream is not None:
            threads.append(thread(self._fetch, "predict-fetch"))
        return threads

    def _drive(self, on_progress: Callable[[PredictReport], None] | None, every_s: float,
               signalled: Callable[[], bool]) -> PredictReport:
        """Start the stages, report progress until they end, then say how it ended."""
        threads = self._threads()
        self.started = time.monotonic()
        self.running = len(threads)
        for t in threads:
            t.start()
        try:
            while not self.all_ended.wait(every_s):
                if on_progress is not None:
                    self._snapshot()
                    on_progress(self.report)
        except BaseException:  # a second signal, or a failing progress callback
            self._on_signal()
            # the fetch worker releases its leases before it ends: give it time to
            self.all_ended.wait(60 if self.worker is not None else 5)
            if self.procs is not None:
                self.procs.close(stop=True)
                self.procs = None
            raise
        if self.procs is not None:  # the workers ack what the sink committed last, then end
            self.procs.close(stop=bool(self.errors) or signalled())
        self._snapshot()
        if self.errors:
            raise self.errors[0]
        if signalled():
            raise KeyboardInterrupt
        if self.procs is not None and self.procs.deaths:  # a worker died; the others went on without it
            raise self.procs.deaths.error()
        return self.report

    def _snapshot(self) -> None:
        report = self.report
        if self.procs is not None:
            report.fetch = self.procs.counters()
        st = self.sink.stats
        report.wall_s = time.monotonic() - self.started
        report.blocks, report.tiles, report.positives = st.blocks, st.rows, st.positives
        report.parts, report.bytes = st.parts, st.bytes
        report.empty, report.failed, report.undecodable = st.empty, st.failed, st.undecodable
        report.model_nan = st.model_nan
        report.missing_shards, report.corrupt_shards = self.reader.missing_shards, list(self.reader.corrupt_shards)
        if self.proc_decode is not None:  # issue 13
            report.decode_deaths = list(self.proc_decode.deaths)

    # --- between the stages -------------------------------------------------------------

    def _put(self, q: "queue_mod.Queue[Any]", item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=0.1)
                return
            except queue_mod.Full:
                pass

    def _get(self, q: "queue_mod.Queue[Any]", timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=0.1)
            except queue_mod.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        """``fn`` as a stage thread: a stop ends it quietly, an error stops every stage
        and is raised by :meth:`_drive`; the last stage to end sets :attr:`all_ended`."""

        def run() -> None:
            try:
                fn()
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.errors.append(exc)
                self.stop.set()
            finally:
                with self.running_lock:
                    self.running -= 1
                    if self.running == 0:
                        self.all_ended.set()

        return run

    # --- the stages ---------------------------------------------------------------------

    def _read(self) -> None:
        """The store's runner -> decode; with a stream, then wait for its last block."""
        try:
            self.reader.run(self._blocks(self.todo))
            while self.stream is not None and not self.fetch_ended.wait(0.1):  # the stream's blocks
                if self.stop.is_set():
                    raise _Stopped
        finally:
            for _ in range(self.n_dec):
                self._put(self.q_read, _END)

    def _on_read(self, tiles: int, seconds: float) -> None:
        self.meters["read"].add(tiles, seconds)

    def _blocks(self, first: list[Block]) -> Iterator[Block]:
        """``first``, then (with ``follow``) the blocks done since, until ``follow()``
        turns False and a last look finds nothing new."""
        seen = {b.id for b in first}
        yield from first
        follow = self.follow
        if follow is None:
            return
        q = open_sweep_queue(self.sweep.location)  # this thread's own connection
        try:
            while True:
                more = follow()  # asked before looking, so the last look sees everything
                new = [b for b in q.blocks(State.DONE) if b.id not in seen and b.id not in self.predicted]
                for b in new:
                    seen.add(b.id)
                self.report.blocks_todo += len(new)
                yield from new
                if not more and not new:
                    return
                if not new:
                    time.sleep(self.poll_s)
                    if self.stop.is_set():
                        raise _Stopped
        finally:
            q.close()

    def _fetch(self) -> None:
        """The stream: the runner in this thread, or the blocks of the worker processes."""
        try:
            if self.worker is not None:
                self.worker.run()
                return
            assert self.procs is not None
            m = self.meters["fetch"]
            for block, x, y, data, empty in self.procs.blocks(self.stop):
                if self._handed_again(block):
                    continue
                t0 = time.perf_counter()
                self._put(self.q_read, _Work(block, x, y, data, empty, 0))
                m.blocked(time.perf_counter() - t0)  # type: ignore[attr-defined]
                m.add(len(data) + empty, 0.0)
        finally:
            self.fetch_ended.set()

    def _handed_again(self, block: Block) -> bool:
        """A worker that crashed released the leases of blocks it had handed over; a
        sibling may lease one and hand it again. Its rows are not written twice: a block
        still on its way through the stages is dropped (its commit goes to the worker
        that holds it now, :meth:`FetchProcesses.committed`), one committed already is
        reported durable again at once, for that worker to ack."""
        if block.id in self.in_flight:
            return True
        done = self.sink.block_result(block.id)
        if done is not None:
            assert self.procs is not None
            self.procs.committed([block.id], {block.id: (done.ok, done.empty, done.failed)})
            return True
        self.in_flight.add(block.id)
        return False

    def _decode(self) -> None:
        m = self.meters["decode"]
        try:
            while True:
                work = self._get(self.q_read)
                if work is _END:
                    return
                t0 = time.perf_counter()
                n = len(work.data)
                self._decode_block(work)
                m.add(n, time.perf_counter() - t0)
                self._put(self.q_dec, work)
        finally:
            self._put(self.q_dec, _END)

    def _decode_block(self, work: _Work) -> None:
        """Decode and fit every tile of ``work`` (a tile that does not decode is marked
        ``bad``); its bytes are dropped."""
        if self.gpu_decoder is not None:  # issue 13: the block's JPEGs in one nvJPEG call
            gpu_decode_work(self.gpu_decoder, work, self.width)
            return
        spec = self.spec
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
        work.raw = np.empty((len(work.decoded()), self.width), np.float32)
        work.data = []

    def _finish(self, work: _Work) -> None:
        """A block scored whole -> the sink (a chipped tile gets the max over its chips)."""
        assert work.owner is not None and work.raw is not None and work.bad is not None
        scores = np.full((len(work.x), self.width), -np.inf, np.float32)
        if len(work.owner):
            np.maximum.at(scores, work.owner, work.raw)
        scores[work.bad] = np.nan
        if self.proc_decode is not None:  # issue 13: the model is done with the block's slot
            self.proc_decode.release(work)
        self._put(self.q_sink, BlockRows(work.block.id, work.block.z, work.x, work.y, scores, work.empty, work.failed, time.time(), work.bad))

    def _model(self) -> None:
        """Batches of ``batch`` inputs across block boundaries; a block goes on to the sink
        once all its inputs are scored."""
        m = self.meters["model"]
        s = self.s
        pending: deque[_Work] = deque()
        avail = 0
        ended = 0
        try:
            while True:
                while avail < s.batch and ended < self.n_dec:
                    tw = time.perf_counter()
                    work = self._get(self.q_dec)
                    m.waited(time.perf_counter() - tw)  # issue 13: the model waits for input
                    if work is _END:
                        ended += 1
                    elif len(work.decoded()) == 0:
                        if not pending:
                            self._finish(work)
                        else:
                            pending.append(work)
                    else:
                        pending.append(work)
                        avail += len(work.decoded())
                if avail == 0:
                    while pending:
                        self._finish(pending.popleft())
                    if ended >= self.n_dec:
                        return
                    continue
                n, busy_s = self._score_batch(pending)
                avail -= n
                while pending and pending[0].cursor == len(pending[0].decoded()):
                    self._finish(pending.popleft())
                m.add(n, busy_s)  # normalising counts: it is the model stage's work
        finally:
            self._put(self.q_sink, _END)

    def _score_batch(self, pending: "deque[_Work]") -> tuple[int, float]:
        """Score the next ``batch`` inputs of the pending blocks; returns how many, and
        the seconds the model took (normalising included)."""
        chunks, refs, need = [], [], self.s.batch
        for work in pending:
            if need == 0:
                break
            take = min(need, len(work.decoded()) - work.cursor)
            if take:
                chunks.append(work.decoded()[work.cursor : work.cursor + take])
                refs.append((work, work.cursor, take))
                work.cursor += take
                need -= take
        t0 = time.perf_counter()
        batch = concat(chunks)  # issue 13: numpy, or torch tensors decoded on the GPU
        out = check_scores(_call_model(self.model, batch), len(batch), self.info, self.model.name)
        busy_s = time.perf_counter() - t0
        k = 0
        for work, start, take in refs:
            work.raw[start : start + take] = out[k : k + take]  # type: ignore[index]
            k += take
        return len(batch), busy_s

    def _committed(self, committed: list[int]) -> None:
        """The sink made these blocks durable: the runner acks them."""
        self.in_flight.difference_update(committed)
        if committed and self.on_committed is not None:
            self.on_committed(list(committed), dict(getattr(committed, "winners", {})))

    def _sink_add(self, rows: BlockRows) -> None:
        m = self.meters["sink"]
        t0 = time.perf_counter()
        committed = self.sink.add(rows)
        m.add(len(rows.x), time.perf_counter() - t0)
        self._committed(committed)

    def _sink(self) -> None:
        """Group commit; a stop keeps the blocks scored whole, in one last part."""
        m = self.meters["sink"]
        clean = False
        try:
            try:
                while True:
                    try:
                        rows = self._get(self.q_sink, timeout=1.0)
                    except queue_mod.Empty:
                        if self.sink.due():
                            self._committed(self.sink.commit())
                        continue
                    if rows is _END:
                        break
                    self._sink_add(rows)
            except _Stopped:
                # A stop (Ctrl-C, SIGTERM, an error elsewhere): the blocks scored whole
                # are kept, those waiting here and those buffered, in one last part.
                while True:
                    try:
                        rows = self.q_sink.get_nowait()
                    except queue_mod.Empty:
                        break
                    if rows is not _END:
                        self._sink_add(rows)
            clean = True
        finally:
            try:
                if clean:  # not after the sink's own failure: it would fail again
                    t0 = time.perf_counter()
                    committed = self.sink.commit()
                    m.add(0, time.perf_counter() - t0)
                    self._committed(committed)
            finally:
                if self.on_closed is not None:  # the fetch stops waiting for commits
                    self.on_closed()


class PredictionConsumer:
    """The prediction pipeline as a block consumer: the one both runners hand their blocks
    to. A :class:`~tilesweep.runner.Runner`'s fetched block (:meth:`take`: ``run``, and the
    tee of ``run --keep-tiles``) or a :class:`~tilesweep.runner.StoreRunner`'s stored one
    (:meth:`take_stored`: ``predict``) becomes a ``_Work`` in the decode queue; the sink's
    commits report it durable (to the runner, which acks it). ``meter``: a fetch's, which
    counts the time spent waiting for room there as blocked; ``ended``: set by :meth:`end`."""

    def __init__(self, sink: PredictionSink, predicted: set[int], put: Callable[[_Work], None],
                 meter: FlowMeter | None = None, ended: threading.Event | None = None,
                 in_flight: set[int] | None = None) -> None:
        self.sink = sink
        # The pipeline's blocks handed over and not yet committed (it removes them as they
        # commit): a block handed again while one copy is in flight (the runner re-leased it
        # after its own lease expired) is dropped, so one part never holds its rows twice.
        self.in_flight = in_flight if in_flight is not None else set()
        self.predicted = predicted  # blocks predicted before this run began
        self.meter = meter
        self.put = put
        self.ended = ended

    def done_result(self, block: Block) -> BlockResult | None:
        # a pending block predicted already: a crash came between the part and the ack
        return self.sink.block_result(block.id) if block.id in self.predicted else None

    def take(self, block: Block, results: list[TileResult]) -> bool:
        if block.id in self.in_flight:  # a copy is on its way: its commit acks this one too
            return True
        ok = [r for r in results if r.status is TileStatus.OK]
        x = np.fromiter((r.tile.x for r in ok), np.int64, len(ok))
        y = np.fromiter((r.tile.y for r in ok), np.int64, len(ok))
        work = _Work(block, x, y, [r.data for r in ok], len(results) - len(ok), 0)  # type: ignore[misc]
        t0 = time.perf_counter()
        self.in_flight.add(block.id)
        if not self._put(work):
            self.in_flight.discard(block.id)
            return False
        if self.meter is not None:
            self.meter.blocked(time.perf_counter() - t0)
            self.meter.add(len(results), 0.0)
        return True

    def take_stored(self, stored: StoredBlock) -> bool:
        return self._put(_Work(stored.block, stored.x, stored.y, stored.data, stored.empty, stored.failed))

    def _put(self, work: _Work) -> bool:
        try:
            self.put(work)
        except _Stopped:
            return False
        return True

    def end(self) -> None:
        if self.ended is not None:
            self.ended.set()


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


__all__ = ["FlowMeter", "PredictReport", "PredictionConsumer", "PredictSettings", "StageMeter", "StreamFetch", "blocks_to_predict", "predict_sweep", "probe"]
