"""Fetch workers: ``fetch --workers N`` (and ``run --keep-tiles``) as N runner processes.

Each worker process runs one :class:`~tilesweep.runner.Runner` over the sweep's store; this
module starts them through :class:`~tilesweep.pool.ProcessPool`, sums their progress, and
turns what they report (a refusal, a full disk, a crash, a death) into the one line the
command ends with. Blocks are leased, written and acked by the runners
(:mod:`tilesweep.runner`), never here.

The runner's names are re-exported here (``Worker``, ``WorkerSettings``,
``WorkerCounters``, ...), where they lived before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import signals
from .errors import UsageError
from .fetch import FetchSettings
from .pool import (  # noqa: F401 - re-exported
    Crashed,
    DiskFull,
    Finished,
    ProcessPool,
    Progress,
    Refused,
    WorkerDeaths,
    child_main,
    crash_line,
    progress_reporter,
    report_crash,
)
from .runner import (  # noqa: F401 - re-exported: their home before the runner had its own module
    BlockConsumer,
    Runner,
    SourceUnusable,
    Worker,
    WorkerArgs,
    WorkerCounters,
    WorkerSettings,
    _alive,
    expire_dead_local_owners,
    new_owner,
)
from .sources import Source


@dataclass(frozen=True)
class FetchWorkers:
    """``workers`` fetch processes (1..256) sharing one budget: ``concurrency`` requests in
    flight over all of them (at least one each), ``rate`` requests/s over all (None: no
    cap). :meth:`fetch_settings` is each one's share, as :class:`FetchSettings`."""

    workers: int = 1
    concurrency: int = 256
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.workers > 256:
            raise UsageError(f"workers {self.workers} must be in 1..256")
        if self.concurrency < self.workers:
            raise UsageError(f"concurrency {self.concurrency} must be at least the number of workers ({self.workers})")

    def fetch_settings(self, **options: Any) -> FetchSettings:
        """One worker's :class:`FetchSettings`: its share of the concurrency, the rate and
        the in-flight byte budget (256 MiB by default, shared), with ``options`` as given."""
        tile_bytes = options.get("max_tile_bytes", FetchSettings.max_tile_bytes)
        return FetchSettings(
            concurrency=-(-self.concurrency // self.workers),
            rate=None if self.rate is None else self.rate / self.workers,
            max_inflight_bytes=max(tile_bytes, FetchSettings.max_inflight_bytes // self.workers),
            **options,
        )


def sweep_folder_of(worker_args: WorkerArgs) -> Path:
    """The sweep folder of a worker's ``args`` (their first item; a sweep on object
    storage: its local state folder)."""
    from .sweep import local_folder

    return local_folder(worker_args[0])


def _worker_main(args: WorkerArgs, progress: Any, index: int, stop_event: Any, parent_pid: int) -> None:
    """A fetch worker process: one runner over the store (:func:`tilesweep.pool.child_main`)."""

    def body(on_progress: Callable[[WorkerCounters], None], stop: Any, parent: int) -> WorkerCounters:
        return Worker(*args, on_progress=on_progress, stop_event=stop, parent_pid=parent).run()

    child_main(body, progress, index, stop_event, parent_pid, sweep_path=sweep_folder_of(args))


def run_workers(
    sweep_path: Path | str,
    zoom: int,
    block_zoom: int,
    source: Source,
    fetch: FetchSettings,
    settings: WorkerSettings,
    workers: int,
    on_progress: Callable[[WorkerCounters], None] | None = None,
    in_process: bool = True,
    stop_requested: Callable[[], bool] | None = None,
) -> WorkerCounters:
    """Run ``workers`` worker processes to the end (or until Ctrl-C); returns summed counters.

    With ``workers == 1`` and ``in_process`` the worker runs in this process (it must then
    be the main thread for Ctrl-C to reach it); otherwise every worker is a process of its
    own, which gets Ctrl-C from the terminal itself. ``stop_requested`` (polled every
    half second) lets a caller running this in a thread stop the workers as Ctrl-C would.
    Raises KeyboardInterrupt when the work was stopped by Ctrl-C, SIGTERM or
    ``stop_requested`` (after leases were released).

    With worker processes, a SIGINT or SIGTERM to this process (alone, or to the group)
    only sets the workers' stop event, from before the first worker starts to the end:
    it never lands as an exception inside a queue's internals, and a stop during start-up
    stops the workers that were started already (they look before they lease)."""
    if workers == 1 and in_process:
        counters = Worker(sweep_path, zoom, block_zoom, source, fetch, settings, on_progress).run()
        if counters.interrupted:
            raise KeyboardInterrupt
        return counters
    args = (sweep_path, zoom, block_zoom, source, fetch, settings)
    # Workers are asked to stop through the pool's event, never with SIGTERM (pool doc).
    pool = ProcessPool(_worker_main, lambda i: (args,), workers, sweep_path)
    with signals.stop_on_signals(pool.stop) as signalled:
        try:
            pool.start()
            return _watch_workers(pool, on_progress, stop_requested, signalled)
        except KeyboardInterrupt:  # a second signal: the workers were killed
            pool.stop()
            pool.drain_until_exit()
            raise


def _watch_workers(pool: ProcessPool, on_progress: Callable[[WorkerCounters], None] | None,
                   stop_requested: Callable[[], bool] | None, signalled: Callable[[], bool]) -> WorkerCounters:
    """run_workers' loop: sum the workers' progress until they exit; a stop (signal,
    ``stop_requested``) sets their event and waits for them to release their leases.
    A worker that dies (a signal, an unexpected error) is no stop: its leases are ended
    at once, the others go on, and the end raises WorkerDied naming it. A refusal
    (UsageError) or a full disk from one worker stops the others, then is raised."""
    procs = pool.procs
    running = set(range(len(procs)))
    stopping = False
    try:
        while running:
            if pool.stopping() or (stop_requested is not None and stop_requested()):
                raise KeyboardInterrupt
            for i, p in enumerate(procs):  # each turn: many workers' reports leave no Empty
                if i in running and not p.is_alive():
                    running.discard(i)
                    if p.exitcode != 0:
                        pool.deaths.dead(i, p)
            if not running:
                break
            msg = pool.next(0.5)
            if msg is None:
                continue
            if isinstance(msg, (Refused, DiskFull)):  # it released its leases
                pool.stop()  # the others stop cleanly and release theirs
                pool.drain_until_exit()
                pool.handle(msg)  # raises UsageError (a DiskFull as ENOSPC and the path)
            pool.handle(msg)
            if isinstance(msg, Finished):
                running.discard(msg.index)
            if isinstance(msg, (Progress, Finished)) and on_progress is not None:
                on_progress(pool.total(WorkerCounters))
    except KeyboardInterrupt:
        stopping = True
        pool.stop()  # a terminal's Ctrl-C reaches the workers too; this covers a signal to us alone
        pool.drain_until_exit()
    for p in procs:
        p.join()
    refused: Refused | DiskFull | None = None
    while (msg := pool.next(0.05)) is not None:  # the last words of workers seen to exit before they were read
        if refused is None and isinstance(msg, (Refused, DiskFull)):
            refused = msg  # raised below, once every last word is read: the others stopped (joined)
        pool.handle(msg, refusals=False)
    pool.note_deaths(stopping, free=True)
    if refused is not None and not (stopping or signalled()):
        pool.handle(refused)  # raises UsageError (a DiskFull as ENOSPC and the path)
    result: WorkerCounters = pool.total(WorkerCounters)
    if stopping or result.interrupted or signalled():
        raise KeyboardInterrupt
    if pool.deaths:
        raise pool.deaths.error()
    return result


__all__ = [
    "BlockConsumer", "FetchWorkers", "Runner", "SourceUnusable", "Worker", "WorkerCounters", "WorkerDeaths", "WorkerSettings",
    "expire_dead_local_owners", "new_owner", "run_workers",
]
