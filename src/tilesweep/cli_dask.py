"""The ``--dask`` paths of ``tilesweep fetch`` and ``tilesweep run``: the command line's
side of :mod:`tilesweep.cluster` (a live line of the cluster's progress, the closing
lines). ``cli.py`` calls these two functions and nothing else of Dask."""

from __future__ import annotations

from typing import Any

from .errors import WorkerDied


class _ClusterLine:
    """The live line of the whole cluster (from the queue's counts), on a terminal."""

    def __init__(self, quiet: bool) -> None:
        from .cli import _LiveLines

        self.lines: Any = _LiveLines(quiet)
        self.latest: Any = None

    def __enter__(self) -> "_ClusterLine":
        self.lines.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lines.__exit__(*exc)

    def update(self, p: Any) -> None:
        self.latest = p
        if self.lines.live is not None:
            self.lines.live.update(p.line())


def _failed(report: Any) -> None:
    if report.failed:
        raise WorkerDied(f"{len(report.failed)} of {report.loops} Dask loops failed (first: {report.failed[0]}); "
                         "the blocks they held go back to the queue; run the same command to finish the sweep")


def fetch(sweep: Any, address: Any, src: Any, settings: Any, worker_settings: Any, quiet: bool) -> Any:
    """``tilesweep fetch --dask``: the loops to the end; returns their summed counters."""
    from .cluster import fetch_on_dask

    line = _ClusterLine(quiet)
    with line:
        report = fetch_on_dask(sweep, address, src, settings, worker_settings, on_progress=line.update)
    _failed(report)
    return report.counters


def run(sweep: Any, sweep_dir: str, the_model: Any, src: Any, settings: Any, fetch_settings: Any, worker_settings: Any,
        address: Any, quiet: bool, keep_tiles: bool = False, loader: Any = None) -> None:
    """``tilesweep run --dask``: each Dask worker runs the streaming run with the model
    loaded there (``loader``); with ``keep_tiles`` each also packs the tiles into the store."""
    from .cli import _STOPPED_RUN, _predict_summary, _stopped, out
    from .cluster import run_on_dask

    try:
        line = _ClusterLine(quiet)
        with line:
            report, cluster = run_on_dask(sweep, the_model, address, src, fetch_settings, worker_settings, settings,
                                          on_progress=line.update, keep_tiles=keep_tiles, loader=loader)
    except KeyboardInterrupt:
        _stopped(sweep, *_STOPPED_RUN)
    c = cluster.counters
    where = "into the store and predicted them" if keep_tiles else "and predicted them"
    out.print(f"cluster: {cluster.loops} loops fetched {c.tiles_ok + c.tiles_empty:,} tiles {where} on the workers "
              f"({c.tiles_ok:,} ok, {c.tiles_empty:,} empty) in {c.blocks_done:,} blocks, {c.tiles_failed:,} failed tiles, "
              f"{cluster.wall_s:,.1f} s", highlight=False)
    _failed(cluster)
    _predict_summary(sweep, sweep_dir, the_model, report, "run the same command again", dead_is_error=True)
