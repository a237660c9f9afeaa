"""Fetch into the store and predict in one go: ``tilesweep run --keep-tiles``, and
``predict_sweep(..., stream=StreamFetch(source, keep_tiles=True))`` from Python.

Fetch worker processes (:func:`tilesweep.worker.run_workers`, always processes) lease
blocks, pack their tiles into the store and ack each block once its shard is durable, as
``tilesweep fetch`` does; meanwhile this process scores every block the moment it is done
in the queue, reading its shard (``predict_sweep(follow=...)``), as ``tilesweep predict``
does. Both halves keep their own crash arguments: a killed run leaves complete shards
acked and predictions committed, and the next run does the rest.

The fetch runs in a thread of this process that only watches the worker processes; the
prediction runs in the calling thread, which must be the main thread for a stop signal to
reach it: a stop there stops the workers too (they release their leases).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..model.base import Model
    from .pipeline import PredictReport, PredictSettings, StreamFetch


def predict_keeping_tiles(
    sweep: Any,
    model: "Model",
    settings: "PredictSettings | None",
    stream: "StreamFetch",
    on_progress: "Callable[[PredictReport], None] | None" = None,
    progress_every_s: float = 0.5,
) -> "PredictReport":
    """Fetch the sweep's pending blocks into its store with ``stream.workers`` worker
    processes while scoring each stored block with ``model``; returns the prediction's
    report, whose ``fetch`` holds the fetch's counters (live, then final).

    Raises KeyboardInterrupt after a stop (Ctrl-C, SIGTERM) once the workers have
    released their leases; the fetch's own errors (a refused source, a dead worker) are
    raised after the prediction has committed what it scored."""
    from ..worker import WorkerCounters, run_workers
    from .pipeline import predict_sweep

    fetched: dict[str, Any] = {}
    latest: list[WorkerCounters] = []
    interrupted = threading.Event()  # a stop reached this process: stop the workers too
    fetched_all = threading.Event()

    def fetch_all() -> None:
        try:
            fetched["counters"] = run_workers(
                sweep.location, sweep.zoom, sweep.block_zoom, stream.source, stream.fetch, stream.worker, stream.workers,
                lambda c: latest.__setitem__(slice(None), [c]), in_process=False, stop_requested=interrupted.is_set,
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            fetched["error"] = exc
        finally:
            fetched_all.set()

    def progress(report: "PredictReport") -> None:
        if latest:
            report.fetch = latest[0]
        if on_progress is not None:
            on_progress(report)

    fetcher = threading.Thread(target=fetch_all, name="tilesweep-fetch", daemon=True)
    fetcher.start()
    try:
        report = predict_sweep(sweep, model, settings, on_progress=progress, progress_every_s=progress_every_s,
                               follow=lambda: not fetched_all.is_set())
        fetched_all.wait()  # not Thread.join: a Ctrl-C inside join() can lose the thread (CPython gh-90882)
    except KeyboardInterrupt:
        interrupted.set()
        fetched_all.wait()  # the workers release their leases and stop
        raise
    error = fetched.get("error")
    if error is not None:
        raise error  # KeyboardInterrupt too: the workers were stopped by a signal
    report.fetch = fetched["counters"]
    return report


__all__ = ["predict_keeping_tiles"]
