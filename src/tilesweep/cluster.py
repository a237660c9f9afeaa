"""Worker loops on a Dask cluster: ``tilesweep fetch|run SWEEP --dask local:N|tcp://host:8786``.

Each Dask task runs one worker loop (:func:`worker_loop`: lease -> fetch -> store -> ack)
against the sweep's own queue, opened from its URL (``sweep.toml``'s ``[queue] url``): the
queue hands each block to one loop, whichever machine it runs on. Dask only places the
loops; it carries no tiles and no results, so:

- a lost Dask worker loses nothing: its leases expire after ``lease_ttl_s`` (at once when
  the next loop starts on the same host and sees the dead pid) and another loop takes the
  blocks up; Dask runs the lost task again on another worker (up to its
  ``distributed.scheduler.allowed-failures``, 3 by default); a block's partial shard is
  resumed, a finished one acked;
- a stop (Ctrl-C or SIGTERM on the command line that started it, or ``stop_requested``)
  sets a Dask :class:`distributed.Event` that every loop polls (cancelling a Dask task
  does not stop a running one, dask/distributed#3681): the loops make what they fetched
  durable, release their unfinished leases and return;
- progress is the queue's counts, polled by the process that started the loops, so it is
  the whole cluster's, whatever each loop reports.

``run --dask`` runs the whole streaming run in each task (:func:`predict_loop`: lease ->
fetch -> decode -> model -> Parquet part -> ack, the model loaded in the worker by a
:class:`ModelLoader`): each task is one writer of the sweep's prediction ledger, which
takes many (:mod:`tilesweep.predict.ledger`). ``run --dask --keep-tiles``: each task's
runner tees, packing the tiles into the store too (as ``run --keep-tiles``).

``local:N`` starts a :class:`distributed.LocalCluster` of N worker processes on 127.0.0.1
(one thread each) for the length of the call; ``tcp://host:port`` (or ``tls://``)
connects to a running scheduler, and one loop is started per worker thread it has. The
loops must see the sweep's folder (the same path) and its queue: on one machine any queue
works; on many, a PostgreSQL queue and a shared folder (docs/scale-out.md).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .errors import UsageError
from .fetch import FetchSettings
from .sources import Source
from .worker import Worker, WorkerCounters, WorkerSettings

__all__ = [
    "ClusterPredictProgress", "ClusterProgress", "ClusterReport", "DaskAddress", "ModelLoader", "fetch_on_dask",
    "parse_dask_address", "predict_loop", "run_on_dask", "worker_loop",
]

LOCAL_MAX = 256


def _distributed() -> Any:
    """The ``distributed`` module (the dask extra), untyped; :class:`UsageError` without it."""
    import importlib

    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise UsageError("--dask needs the dask extra: pip install 'tilesweep[dask]'") from None


@dataclass(frozen=True)
class DaskAddress:
    """Where the loops run: ``local`` workers of a LocalCluster started here (1..256), or
    the ``scheduler`` address of a running cluster. ``connect_timeout_s``: how long to
    wait for the scheduler (> 0); None: Dask's ``distributed.comm.timeouts.connect``
    (30 s unless configured, e.g. ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s``)."""

    text: str
    local: int | None = None
    scheduler: str | None = None
    connect_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if (self.local is None) == (self.scheduler is None):
            raise UsageError(f"--dask {self.text!r}: give local:N or a scheduler address")
        if self.local is not None and not 1 <= self.local <= LOCAL_MAX:
            raise UsageError(f"--dask {self.text!r}: local workers must be in 1..{LOCAL_MAX}")
        if self.connect_timeout_s is not None and not self.connect_timeout_s > 0:
            raise UsageError(f"--dask connect timeout {self.connect_timeout_s:g} must be > 0 seconds")


def parse_dask_address(text: str, connect_timeout_s: float | None = None) -> DaskAddress:
    """``local:N`` or ``tcp://host:port`` / ``tls://host:port``; :class:`UsageError`
    naming ``text`` for anything else."""
    t = str(text).strip()
    usage = f"--dask {text!r} is not local:N (N worker processes here) nor tcp://scheduler:8786"
    if t.startswith("local:"):
        n = t[len("local:"):]
        if not n.isdigit():
            raise UsageError(usage)
        return DaskAddress(t, local=int(n), connect_timeout_s=connect_timeout_s)
    scheme, sep, rest = t.partition("://")
    if not sep or scheme not in ("tcp", "tls") or not rest:
        raise UsageError(usage)
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--dask {text!r}: a scheduler address is {scheme}://host:port (e.g. {scheme}://scheduler:8786)")
    return DaskAddress(t, scheduler=t, connect_timeout_s=connect_timeout_s)


@dataclass(frozen=True)
class LoopSpec:
    """What one loop needs (pickled to the Dask workers): the sweep folder and its plan's
    zooms, the source and the settings."""

    sweep_path: str
    zoom: int
    block_zoom: int
    source: Source
    fetch: FetchSettings
    worker: WorkerSettings


class _StopFlag:
    """The loop's stop event: ``is_set`` reads a local flag that a thread refreshes from
    the Dask Event (the loop looks often; the scheduler is asked twice a second)."""

    def __init__(self, name: str) -> None:
        d = _distributed()
        self._flag = threading.Event()
        # the client named here: found from the task's thread only, not from the watcher's
        self._event = d.Event(name, client=d.get_client())
        self._thread = threading.Thread(target=self._watch, name="tilesweep-dask-stop", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._flag.is_set():
            try:
                if self._event.wait(timeout=0.5):
                    self._flag.set()
            except Exception:  # noqa: BLE001 - the scheduler is gone: stop
                self._flag.set()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def close(self) -> None:
        self._flag.set()


def worker_loop(spec: LoopSpec, stop: Any) -> WorkerCounters:
    """One worker's loop over the sweep until its queue has nothing pending or ``stop``
    is set (anything with ``is_set()``). The one place a Dask task meets the worker."""
    return Worker(spec.sweep_path, spec.zoom, spec.block_zoom, spec.source, spec.fetch, spec.worker,
                  on_progress=lambda c: None, stop_event=stop).run()  # on_progress: the counters carry the fetch stats


def _dask_task(spec: LoopSpec, stop_name: str) -> WorkerCounters:
    stop = _StopFlag(stop_name)
    try:
        return worker_loop(spec, stop)
    finally:
        stop.close()


class ClusterProgress(NamedTuple):
    """The whole cluster's progress, from the queue's counts: blocks and tiles done of
    the sweep's, leased (in progress), dead, the tiles/s of the last ``window_s`` and the
    loops still running."""

    loops: int
    blocks_done: int
    blocks_total: int
    tiles_done: int
    tiles_total: int
    blocks_leased: int
    blocks_dead: int
    tiles_per_s: float
    elapsed_s: float

    def line(self) -> str:
        return (f"cluster: {self.loops} loops, {self.blocks_done:,} of {self.blocks_total:,} blocks done "
                f"({self.tiles_done:,} of {self.tiles_total:,} tiles), {self.blocks_leased:,} in progress, "
                f"{self.blocks_dead:,} dead, {self.tiles_per_s:,.0f} tiles/s, {self.elapsed_s:,.0f} s")


@dataclass
class ClusterReport:
    """What the loops did: their summed counters, how many loops ran, and the Dask
    tasks that ended in an error other than a stop (a task lost more often than Dask
    allows, a bug), as one line each."""

    counters: WorkerCounters = field(default_factory=WorkerCounters)
    loops: int = 0
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    results: list[Any] = field(default_factory=list)  # run --dask: each loop's PredictReport


class _Cluster:
    """A Dask client, and the LocalCluster it owns for ``local:N``."""

    def __init__(self, address: DaskAddress) -> None:
        distributed = _distributed()
        self.cluster: Any = None
        if address.local is not None:
            import signal

            # The workers ignore SIGINT (inherited): a Ctrl-C at the terminal reaches the
            # whole process group, and the loops must stop through the event, not die.
            old = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
            try:
                self.cluster = distributed.LocalCluster(
                    n_workers=address.local, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=None, worker_dashboard_address=None, silence_logs=50,
                )
            finally:
                if old is not None:
                    signal.signal(signal.SIGINT, old)
            self.client: Any = distributed.Client(self.cluster, set_as_default=False)
        else:
            try:
                timeout = {} if address.connect_timeout_s is None else {"timeout": address.connect_timeout_s}
                self.client = distributed.Client(address.scheduler, set_as_default=False, **timeout)
            except (OSError, TimeoutError) as exc:
                raise UsageError(f"--dask {address.text!r}: the scheduler cannot be reached ({_first_line(exc)})") from None

    def threads(self) -> int:
        return max(1, sum(int(n) for n in self.client.nthreads().values()))

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def fetch_on_dask(
    sweep: Any,
    address: DaskAddress | str,
    source: Source,
    fetch: FetchSettings | None = None,
    worker: WorkerSettings | None = None,
    on_progress: Callable[[ClusterProgress], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
) -> ClusterReport:
    """Run worker loops for ``sweep`` (a :class:`tilesweep.sweep.Sweep`) on Dask until
    its queue has nothing pending; ``fetch.concurrency`` and ``fetch.rate`` are per loop.
    ``on_progress`` gets the cluster's :class:`ClusterProgress` every ``poll_s``
    seconds. Raises KeyboardInterrupt after a stop (Ctrl-C/SIGTERM in the main thread, or
    ``stop_requested``) once every loop has released its leases; :class:`UsageError`
    for a bad address, an unreachable scheduler, or a loop that stopped on bad input
    (a source that gives no image)."""
    from . import signals

    addr = parse_dask_address(address) if isinstance(address, str) else address
    stop_local = threading.Event()
    with signals.stop_on_signals(stop_local.set) as signalled:
        cluster = _Cluster(addr)
        try:
            return _run_loops(sweep, cluster, addr, source, fetch, worker, on_progress,
                              lambda: stop_local.is_set() or signalled() or (stop_requested is not None and stop_requested()),
                              poll_s)
        finally:
            cluster.close()


def _run_loops(sweep: Any, cluster: _Cluster, addr: DaskAddress, source: Source, fetch: FetchSettings | None,
               worker: WorkerSettings | None, on_progress: Callable[[ClusterProgress], None] | None,
               stop_requested: Callable[[], bool], poll_s: float, task: tuple[Any, ...] | None = None) -> ClusterReport:
    """The loops as Dask tasks: :func:`_dask_task` (fetch into the store), or ``task``
    ``(function, *args)``, called as ``function(spec, i, n, *args, stop_name)`` for loop
    ``i`` of ``n`` (``run --dask``'s :func:`_predict_task`), whose results are kept in
    :attr:`ClusterReport.results`."""
    spec = LoopSpec(str(sweep.location if sweep.remote else Path(sweep.path).resolve()), sweep.zoom, sweep.block_zoom, source,
                    fetch or FetchSettings(), worker or WorkerSettings())
    started = time.monotonic()
    report = ClusterReport()
    stop_name = f"tilesweep-stop-{secrets.token_hex(8)}"
    stop_event: Any = _distributed().Event(stop_name, client=cluster.client)
    n = addr.local or cluster.threads()
    fn, *args = task if task is not None else (_dask_task,)
    share = (lambda i: (i, n)) if task is not None else (lambda i: ())  # a task's share of the done blocks
    futures: list[Any] = [cluster.client.submit(fn, spec, *share(i), *args, stop_name, pure=False,
                                                key=f"tilesweep-loop-{i}-{stop_name}")
                          for i in range(n)]
    report.loops = n
    stopped = False
    with sweep.open_queue() as q:
        while True:
            if not stopped and stop_requested():
                stop_event.set()
                stopped = True
            if any(f.status == "error" and isinstance(f.exception(), UsageError) for f in futures):
                stop_event.set()  # bad input (a source with no image): the other loops stop too
            running = sum(1 for f in futures if not f.done())
            if on_progress is not None:
                on_progress(_progress(q, running, started))
            if not running:
                break
            time.sleep(poll_s)
    for f in futures:
        if f.status == "error":
            exc = f.exception()
            if isinstance(exc, UsageError) and not stopped:
                stop_event.set()
                while not all(g.done() for g in futures):
                    time.sleep(0.1)
                raise UsageError(str(exc))
            report.failed.append(f"{type(exc).__name__}: {_first_line(exc)}")
        elif f.status == "finished":
            r = f.result()
            if task is None:
                report.counters.add(r)
            elif r is not None:
                report.results.append(r)
                if getattr(r, "fetch", None) is not None:
                    report.counters.add(r.fetch)
    report.wall_s = time.monotonic() - started
    if stopped or stop_requested():
        raise KeyboardInterrupt
    return report


def _progress(q: Any, loops: int, started: float) -> ClusterProgress:
    from .queue import State

    st = q.stats(window=30.0)
    _, tiles, window = st.done_last_window
    return ClusterProgress(
        loops, st.blocks[State.DONE], sum(st.blocks.values()), st.tiles[State.DONE], sum(st.tiles.values()),
        st.blocks[State.LEASED], st.blocks[State.DEAD], tiles / window if window > 0 else 0.0, time.monotonic() - started,
    )


@dataclass(frozen=True)
class ModelLoader:
    """How a Dask task loads the model in its own worker process (``run --dask``): the
    ``--model`` spec (a built-in name, a file path, made absolute by :meth:`of`, or
    ``module:function``, importable on the workers) and its load options, and
    ``threshold`` as ``--threshold``. Loaded and probed once per task, so a GPU worker
    holds its own copy of the weights (one Dask worker per GPU: docs/scale-out.md)."""

    spec: str
    device: str = "auto"
    threads: int | None = None
    precision: str = "fp32"
    channels_last: bool = False
    threshold: float | None = None

    @classmethod
    def of(cls, spec: str, **kw: Any) -> "ModelLoader":
        """A loader of ``spec`` with a file path made absolute (the workers' working
        folder is not the command line's)."""
        p = Path(spec)
        return cls(str(p.resolve()) if p.exists() else spec, **kw)

    def load(self, sweep_path: Path) -> Any:
        """The model, probed, with ``threshold`` applied for ``sweep_path``."""
        from .detections import apply_threshold
        from .model import load_model
        from .predict import probe

        m = load_model(self.spec, device=self.device, threads=self.threads, precision=self.precision,  # type: ignore[arg-type]
                       channels_last=self.channels_last)
        probe(m)
        return apply_threshold(m, self.threshold, sweep_path)


class _TaskStopped(Exception):
    """Raised from the pipeline's progress callback when the stop event is set: the
    pipeline then winds down as after a signal (commits what it scored whole, the runner
    acks it and releases the rest)."""


class _ShareOfQueue:
    """The sweep's queue as one loop of ``n`` sees it for planning: the done blocks it
    lists are those with ``id % n == i``; everything else is the queue's."""

    def __init__(self, q: Any, i: int, n: int) -> None:
        self._q, self._i, self._n = q, i, n

    def blocks(self, state: Any = None, kept: bool | None = None) -> Any:
        from .queue import State

        if state != State.DONE:
            return self._q.blocks(state, kept) if kept is not None else self._q.blocks(state)
        found = self._q.blocks(state, kept) if kept is not None else self._q.blocks(state)
        return (b for b in found if b.id % self._n == self._i)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._q, name)


class _ShareOfSweep:
    """The sweep, but its ``queue`` is :class:`_ShareOfQueue`: the done blocks a model has
    not predicted (stored ones, or streamed for another model) are split among the loops
    instead of every loop doing all of them; pending blocks are leased as ever."""

    def __init__(self, sweep: Any, i: int, n: int) -> None:
        self._sweep = sweep
        self.queue = _ShareOfQueue(sweep.queue, i, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sweep, name)


def predict_loop(spec: LoopSpec, model: Any, settings: Any, stop: Any, share: tuple[int, int] = (0, 1),
                 keep_tiles: bool = False) -> Any:
    """One Dask task of ``run --dask``: the streaming run (:func:`tilesweep.predict.predict_sweep`
    with its fetch in a thread) in this worker process, leasing from the
    sweep's queue until it has nothing pending or ``stop`` is set. ``model``: a
    :class:`ModelLoader` (loaded here) or a model object. ``share``: ``(i, n)``, this loop
    of ``n``: of the done blocks this model has not predicted (stored, or streamed for
    another model) it does those with ``id % n == i`` (a loop that Dask runs again gets
    the same share). ``keep_tiles``: the runner tees (the block's shard, then its
    predictions; acked once both are durable), as ``run --keep-tiles``. Returns the run's
    :class:`tilesweep.predict.PredictReport` without its live meters (picklable)."""
    import dataclasses
    import multiprocessing

    from .predict import PredictSettings, StreamFetch, predict_sweep
    from .sweep import Sweep

    s = settings or PredictSettings()
    if multiprocessing.current_process().daemon and s.decode in ("auto", "processes"):
        # a daemonic Dask worker (the default) may not start decode processes
        if s.decode == "processes":
            raise UsageError("--decode processes cannot run in a daemonic Dask worker; use --decode threads, "
                             "or workers started with distributed.worker.daemon: false")
        s = dataclasses.replace(s, decode="threads")
    last: list[Any] = []

    def on_progress(r: Any) -> None:
        last[:] = [r]
        if stop.is_set():
            raise _TaskStopped

    with Sweep.open(spec.sweep_path) as whole:
        m = model.load(whole.path) if isinstance(model, ModelLoader) else model
        sweep = _ShareOfSweep(whole, *share) if share[1] > 1 else whole
        try:
            report = predict_sweep(sweep, m, s, on_progress=on_progress, progress_every_s=0.25,
                                   stream=StreamFetch(spec.source, spec.fetch, spec.worker, workers=1, keep_tiles=keep_tiles))
        except _TaskStopped:
            if not last:
                return None
            report = last[0]
    return dataclasses.replace(report, stages={}, queues={})


def _predict_task(spec: LoopSpec, i: int, n: int, model: Any, settings: Any, keep_tiles: bool, stop_name: str) -> Any:
    stop = _StopFlag(stop_name)
    try:
        return predict_loop(spec, model, settings, stop, share=(i, n), keep_tiles=keep_tiles)
    finally:
        stop.close()


class ClusterPredictProgress(NamedTuple):
    """``run --dask``'s whole-cluster line: the queue's counts (:class:`ClusterProgress`)
    and the blocks and rows the ledger holds for the model."""

    cluster: ClusterProgress
    blocks_predicted: int
    rows: int

    def line(self) -> str:
        c = self.cluster
        return (f"cluster: {c.loops} loops, {self.blocks_predicted:,} of {c.blocks_total:,} blocks predicted "
                f"({self.rows:,} rows), {c.blocks_leased:,} in progress, {c.blocks_dead:,} dead, "
                f"{c.tiles_per_s:,.0f} tiles/s, {c.elapsed_s:,.0f} s")


def _merge_reports(reports: list[Any], wall_s: float) -> Any:
    """The loops' reports as one (sums; the wall time is the cluster's)."""
    from .predict import PredictReport
    from .runner import WorkerCounters

    out = PredictReport()
    fetch = WorkerCounters()
    for r in reports:
        for f in ("blocks_todo", "blocks", "tiles", "empty", "failed", "undecodable", "model_nan", "positives", "parts",
                  "bytes", "missing_shards", "adopted_parts"):
            setattr(out, f, getattr(out, f) + getattr(r, f))
        out.corrupt_shards += r.corrupt_shards
        out.decode_deaths += r.decode_deaths
        out.decode = out.decode or r.decode
        if r.fetch is not None:
            fetch.add(r.fetch)
    out.fetch = fetch
    out.wall_s = wall_s
    return out


def run_on_dask(
    sweep: Any,
    model: Any,
    address: DaskAddress | str,
    source: Source,
    fetch: FetchSettings | None = None,
    worker: WorkerSettings | None = None,
    settings: Any = None,
    on_progress: Callable[[Any], None] | None = None,
    on_predict: Callable[[Any], None] | None = None,
    keep_tiles: bool = False,
    loader: ModelLoader | None = None,
) -> tuple[Any, ClusterReport]:
    """``tilesweep run --dask``: each Dask task runs the streaming run in its worker
    process (:func:`predict_loop`: lease -> fetch -> decode -> model -> parts -> ack, the
    model loaded there by ``loader``, or ``model`` itself pickled to the workers when
    ``loader`` is None), so the cluster's workers predict, many writers on one ledger
    (:mod:`tilesweep.predict.ledger`). ``on_progress`` gets the whole cluster's
    :class:`ClusterPredictProgress` every half second.

    ``keep_tiles``: each task's runner also packs the tiles into the store (a tee, as
    ``run --keep-tiles``: a block is acked once its shard and its predictions are durable).
    ``on_predict`` is not called (the live meters stay on the workers).

    ``model`` (a :class:`tilesweep.model.Model`, loaded here too: its name and digest key
    the ledger); ``settings``: :class:`tilesweep.predict.PredictSettings`. Returns
    ``(PredictReport, ClusterReport)``. A stop (Ctrl-C/SIGTERM) makes every loop commit
    what it scored whole and release its leases, then raises KeyboardInterrupt; the same
    call goes on."""
    addr = parse_dask_address(address) if isinstance(address, str) else address
    from . import signals
    from .predict.sink import ledger_totals

    def progress(p: ClusterProgress) -> None:
        if on_progress is not None:
            t = ledger_totals(sweep.path, model.name, model.digest)
            on_progress(ClusterPredictProgress(p, t.blocks if t else 0, t.rows if t else 0))

    stop_local = threading.Event()
    with signals.stop_on_signals(stop_local.set) as signalled:
        cluster = _Cluster(addr)  # here, before anything is written: a bad address writes nothing
        try:
            report = _run_loops(sweep, cluster, addr, source, fetch, worker, progress,
                                lambda: stop_local.is_set() or signalled(), 0.5,
                                task=(_predict_task, loader if loader is not None else model, settings, keep_tiles))
        finally:
            cluster.close()
    return _merge_reports(report.results, report.wall_s), report
