"""The ``tilesweep`` command: a thin layer over the Python API, with the same words.

Bad input raises :class:`tilesweep.errors.UsageError`; :func:`main` prints it as one line
and exits with status 2, before anything is written.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from ._lazy import LazyName
from .errors import UsageError, WorkerDied
from .sim.cli import app as sim_app

# Imported when a command first uses them (numpy, shapely, the store): `tilesweep --help`,
# `query` and `convert` start without them (tilesweep._lazy).
# mypy sees the real names; `except _CorruptShard.if_imported()` matches only when the store
# was imported (so it could have raised).
if TYPE_CHECKING:
    from .area import load_area
    from .plan import PlanSpec
    from .store.shard import CorruptShardError
    from .sweep import Sweep
    from .tiles import parse_tile, tile_id
else:
    load_area = LazyName("tilesweep.area", "load_area")
    PlanSpec = LazyName("tilesweep.plan", "PlanSpec")
    CorruptShardError = LazyName("tilesweep.store.shard", "CorruptShardError")
    Sweep = LazyName("tilesweep.sweep", "Sweep")
    parse_tile = LazyName("tilesweep.tiles", "parse_tile")
    tile_id = LazyName("tilesweep.tiles", "tile_id")
_CorruptShard = LazyName("tilesweep.store.shard", "CorruptShardError")
if TYPE_CHECKING:
    from .store import TileStore
    from .sweep import SweepStatus
    from .tiles import Tile

app = typer.Typer(
    name="tilesweep",
    help="Run a model over every map tile of an area: plan, queue, fetch, store, predict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(sim_app, name="sim", help="The built-in imagery simulator: serve tiles, ground truth, static trees.")

out = Console()
err = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"tilesweep {__version__}")
        raise typer.Exit()


@app.callback()
def _top(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
) -> None:
    """Run a model over every map tile of an area: plan, queue, fetch, store, predict."""


@app.command()
def plan(
    area: str = typer.Argument(..., help="W,S,E,N bbox in degrees, or a GeoJSON / WKT file."),
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL to create (sweep.toml, queue.sqlite)."),
    zoom: int = typer.Option(..., "--zoom", "-z", help="Tile zoom, 0..24 (18 is about 0.6 m per pixel)."),
    block_zoom: Optional[int] = typer.Option(None, "--block-zoom", help="Fixed blocks: every block is the cell at this zoom (zoom - 4 holds 256 tiles). Default: adaptive blocks (--block-tiles)."),
    block_tiles: Optional[int] = typer.Option(None, "--block-tiles", help="Adaptive blocks (the default): each is the coarsest cell holding at most N planned tiles (default 256), so a sparse sample still fills its blocks."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the estimate (tiles, blocks, tiles to test) and write nothing."),
    allow_huge: bool = typer.Option(False, "--allow-huge", help="Plan even when the estimate is over the limits (2e9 tiles, or 2e10 tiles to test for a sample)."),
    fraction: float = typer.Option(1.0, "--fraction", help="Keep this share of tiles, in (0, 1], by a per-tile hash."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample and of the block shuffle."),
    max_tiles: Optional[int] = typer.Option(None, "--max-tiles", help="Keep exactly this many tiles (a uniform sample)."),
    rate: float = typer.Option(1000.0, "--rate", help="Tiles/s assumed for the time estimate."),
    tile_kb: float = typer.Option(20.0, "--tile-kb", help="KB per tile assumed for the size estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan summary as one JSON object."),
    queue: Optional[str] = typer.Option(None, "--queue", help="Queue URL: postgresql://user@host:port/db (a shared server; password from PGPASSWORD or ~/.pgpass) or sqlite:///path; default SWEEP_DIR/queue.sqlite. Required (PostgreSQL) for a sweep URL (s3://bucket/prefix)."),
) -> None:
    """Plan AREA at --zoom into SWEEP_DIR: blocks of tiles, sampled and shuffled, queued."""
    if rate <= 0:
        raise UsageError(f"rate {rate:g} must be > 0 tiles/s")
    if tile_kb <= 0:
        raise UsageError(f"tile size {tile_kb:g} KB must be > 0")
    if queue is not None:
        from .queue import parse_queue_url

        parse_queue_url(queue)  # a bad URL: one line, before the area is read
    spec = PlanSpec(zoom=zoom, block_zoom=block_zoom, fraction=fraction, seed=seed, max_tiles=max_tiles, block_tiles=block_tiles)
    the_area = load_area(area)
    if dry_run:
        _plan_dry_run(the_area, spec, sweep_dir, tile_kb, rate, as_json)
        return
    with err.status("planning...") as status:
        counted = [0, 0]

        def progress(chunk) -> None:  # type: ignore[no-untyped-def]
            counted[0] += int(chunk.counts.sum())
            counted[1] += len(chunk)
            status.update(f"planning... {counted[0]:,} tiles in {counted[1]:,} blocks")

        sweep, created = Sweep.plan(sweep_dir, the_area, spec, on_chunk=progress, allow_huge=allow_huge, queue=queue)
    summary = sweep.summary()
    size, hours = summary.estimate(tile_kb=tile_kb, rate=rate)
    if as_json:
        out.print_json(json.dumps({**sweep.plan_config, "queue": sweep.queue_url, "created": created, "estimate_bytes": size, "estimate_hours": hours}))
        return
    verb = "planned" if created else "already planned (same plan, nothing changed)"
    out.print(f"[bold]{sweep_dir}[/]: {verb}")
    out.print(
        f"  {summary.tiles:,} tiles at zoom {summary.zoom} in {summary.blocks:,} {summary.describe_blocks()}, "
        f"area {summary.area_km2:,.1f} km2"
    )
    if queue is not None:
        out.print(f"  queue: {sweep.queue_url}", highlight=False)
    out.print(f"  estimate: {_human_bytes(size)} at {tile_kb:g} KB/tile, {_human_hours(hours)} at {rate:,.0f} tiles/s")


def _plan_dry_run(the_area, spec, sweep_dir: str, tile_kb: float, rate: float, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    """``plan --dry-run``: the estimate, and whether the plan would be refused; writes nothing."""
    from .plan import estimate_plan

    est = estimate_plan(the_area.geometry, spec)
    why = est.too_big()
    size, hours = est.tiles * tile_kb * 1000.0, est.tiles / rate / 3600.0
    if as_json:
        print(json.dumps({"dry_run": True, "cover_tiles": est.cover, "tiles": est.tiles, "tested_tiles": est.tested,
                          "blocks": est.blocks, "estimate_bytes": size, "estimate_hours": hours, "refused": why}))
        return
    out.print(f"[bold]{sweep_dir}[/]: dry run, nothing written", highlight=False)
    out.print(
        f"  about {est.tiles:,} tiles at zoom {spec.zoom} (of {est.cover:,} in the area) in about {est.blocks:,} blocks; "
        f"{est.tested:,} tiles to test for the sample",
        highlight=False,
    )
    out.print(f"  estimate: {_human_bytes(size)} at {tile_kb:g} KB/tile, {_human_hours(hours)} at {rate:,.0f} tiles/s", highlight=False)
    if why:
        out.print(f"  would be refused ({why}); pass --allow-huge to plan it anyway", highlight=False)


@app.command()
def status(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    window: float = typer.Option(300.0, "--window", help="Seconds of recent work used for throughput and ETA."),
) -> None:
    """Show pending / leased / done / dead blocks and tiles, throughput and ETA."""
    if window <= 0:
        raise UsageError(f"window {window:g} must be > 0 seconds")
    with Sweep.open(sweep_dir) as sweep:
        st = sweep.status(window_s=window)
        if as_json:
            print(json.dumps(st.to_json()))
        else:
            _print_status(sweep, st)
    if st.mismatch:
        err.print(f"[bold red]accounting mismatch:[/] {st.mismatch}")
        raise typer.Exit(1)


@app.command()
def fetch(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL made by `tilesweep plan`."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="URL template ({z} {x} {y} {-y} {q} {s} ${ENV}) or preset; recorded on first use."),
    header: list[str] = typer.Option([], "--header", "-H", help="Request header 'Name: value' (repeatable; ${ENV} expanded at request time)."),
    workers: int = typer.Option(1, "--workers", "-w", help="Worker processes (one event loop each); use one per core."),
    concurrency: int = typer.Option(256, "--concurrency", "-c", help="Requests in flight, over all workers."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Most requests/s over all workers (retries count); default: no cap."),
    retries: int = typer.Option(6, "--retries", help="Retries of a tile after a transient fault (5xx, 429, reset, timeout, bad body)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds one request may take in all."),
    lease_ttl: float = typer.Option(60.0, "--lease-ttl", help="Seconds a block's lease lasts unless renewed every third of it; a dead worker's blocks return after it (at once on the same host)."),
    max_attempts: int = typer.Option(5, "--max-attempts", help="Failed attempts a block may have before it is declared dead (a lease lost to a killed worker is not one)."),
    max_tile_bytes: str = typer.Option("4MiB", "--max-tile-bytes", help="Largest body a tile may have (e.g. 4MiB, 16MiB, 500000); bigger ones are cut and fail."),
    tile_budget: float = typer.Option(120.0, "--tile-budget", help="Seconds one tile may take over all its retries, per lease (bounds what one bad tile costs its block)."),
    replace_source: bool = typer.Option(False, "--replace-source", help="Record --source in place of the sweep's source (done blocks with no image are fetched again; see docs/sources.md)."),
    mix_sources: bool = typer.Option(False, "--mix-sources", help="With --replace-source: keep done blocks that hold the old source's tiles."),
    dask: Optional[str] = typer.Option(None, "--dask", help="Run the worker loops on Dask: local:N (N worker processes here) or tcp://scheduler:8786 (one loop per worker thread); --concurrency and --rate are then per loop (docs/scale-out.md)."),
    supertile: Optional[int] = typer.Option(None, "--super", help="With a bbox --source ({bbox} {width} {height}: WMS, static images): ask for N x N tiles per request (2, 4, 8, 16) and cut them."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress line."),
) -> None:
    """Fetch the planned tiles of SWEEP_DIR into its store (tiles/), resumably.

    Workers lease blocks from the queue, fetch their tiles with retries, append them to one
    shard per block and ack the block once it is durable. Run it again after a crash or
    Ctrl-C: it resumes where it stopped."""
    from .worker import run_workers

    settings, worker_settings = _fetch_settings(workers, concurrency, rate, retries, timeout, lease_ttl, max_attempts,
                                                max_tile_bytes=max_tile_bytes, tile_budget=tile_budget)
    dask_address = None if dask is None else _dask_address(dask, workers)
    from .sweeplock import SweepLock

    with Sweep.open(sweep_dir) as sweep, SweepLock(sweep.path, "fetch"):
        new_source = sweep.source is None
        src = _bind_source(sweep, source, header, replace_source, mix_sources, supertile)
        before = sweep.status()
        meter = _FetchMeter(before.tiles["pending"] + before.tiles["leased"], quiet)
        try:
            with meter:
                if dask_address is not None:
                    from . import cli_dask

                    counters = cli_dask.fetch(sweep, dask_address, src, settings, worker_settings, quiet)
                else:
                    counters = run_workers(
                        sweep.location, sweep.zoom, sweep.block_zoom, src, settings, worker_settings, workers, meter.update
                    )
        except KeyboardInterrupt:
            _stopped(sweep, "fetched tiles are durable", "run the same command to resume")
        except UsageError:  # e.g. the source gave no image at all: record nothing of it
            _forget_source(sweep, new_source)
            raise
        meter.update(counters, final=True)
        st = sweep.status()
    out.print(meter.line(counters, final=True))
    r = st.results
    out.print(
        f"{sweep_dir}: {st.blocks['done']:,} of {st.blocks_total:,} blocks done, {st.tiles['done']:,} of {st.tiles_total:,} tiles "
        f"({r['ok']:,} ok, {r['empty']:,} empty); {r['retries']:,} requests retried in all; details: tilesweep status {sweep_dir}",
        highlight=False,
    )
    if st.blocks["dead"]:
        err.print(f"[bold red]{st.blocks['dead']:,} blocks are dead[/] (see `tilesweep status`); `tilesweep retry {sweep_dir} --dead` queues them again")
        raise typer.Exit(1)
    if st.mismatch:
        err.print(f"[bold red]accounting mismatch:[/] {st.mismatch}")
        raise typer.Exit(1)


def _fetch_settings(workers: int, concurrency: int, rate: float | None, retries: int, timeout: float, lease_ttl: float, max_attempts: int,  # type: ignore[no-untyped-def]
                    max_tile_bytes: str = "4MiB", tile_budget: float = 120.0):
    """(FetchSettings per worker, WorkerSettings) from the options of `fetch` and `run`."""
    from .worker import FetchWorkers, WorkerSettings

    # The settings objects check their values (one-line UsageError); the CLI only words
    # what names its own flags.
    share = FetchWorkers(workers, concurrency, rate)
    worker_settings = WorkerSettings(lease_ttl_s=lease_ttl, max_attempts=max_attempts)
    if not 0 < timeout < float("inf"):
        raise UsageError(f"--timeout {timeout:g} must be a number of seconds > 0")
    settings = share.fetch_settings(
        retries=retries,
        total_timeout_s=timeout,
        max_tile_bytes=_parse_bytes(max_tile_bytes, "--max-tile-bytes"),
        tile_budget_s=_positive_seconds(tile_budget, "--tile-budget"),
    )
    return settings, worker_settings


def _dask_address(text: str, workers: int = 1):  # type: ignore[no-untyped-def]
    """A checked ``--dask`` value (before anything is opened or written); ``--workers``
    beside it is refused: Dask runs the loops (``local:N`` says how many)."""
    from .cluster import parse_dask_address

    if workers != 1:
        raise UsageError(f"--workers {workers} with --dask {text!r}: the Dask workers run the loops (local:N sets how many, a cluster has its own); leave --workers out")
    return parse_dask_address(text)


def _parse_bytes(text: str, option: str) -> int:
    """Bytes from ``500000``, ``512KiB``, ``4MiB``, ``4M``, ``1GiB`` (K, M, G are powers of 1,024)."""
    import re as _re

    m = _re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", str(text), _re.IGNORECASE)
    if m is None:
        raise UsageError(f"{option} {text!r} is not a size in bytes (e.g. 4MiB, 500000)")
    return int(float(m.group(1)) * 1024 ** " kmg".index((m.group(2) or " ").lower()))


def _positive_seconds(value: float, option: str) -> float:
    if not 0 < value < float("inf"):
        raise UsageError(f"{option} {value:g} must be a number of seconds > 0")
    return value


def _bind_source(sweep: Sweep, source: str | None, header: list[str], replace: bool = False, mix: bool = False,  # type: ignore[no-untyped-def]
                 supertile: int | None = None):
    """The sweep's source: ``--source`` (recorded on first use) or the recorded one;
    ``replace``: record ``--source`` in place of the recorded one (Sweep.replace_source);
    ``supertile``: ``--super N`` (tiles on a side of one bbox request)."""
    from .sources import parse_source
    from .supertile import check_blocks

    if supertile is not None and source is None:
        raise UsageError("--super needs --source (a bbox template: the super-tile size belongs to the source)")
    given = None if source is None else parse_source(source, header, supertile=supertile)
    if given is not None:
        check_blocks(given, sweep.zoom, sweep.block_zoom)
    if given is None and header:
        raise UsageError("--header needs --source (the headers belong to a source)")
    if (replace or mix) and given is None:
        raise UsageError("--replace-source and --mix-sources need --source NEW")
    if mix and not replace:
        raise UsageError("--mix-sources goes with --replace-source")
    if replace:
        assert given is not None  # --replace-source without --source is refused above
        old = sweep.source
        src, requeued = sweep.replace_source(given, mix=mix)
        if old is not None and old.to_config() != src.to_config():
            err.print(f"source replaced: {old.redacted()} -> {src.redacted()}; {requeued:,} done blocks with no image queued again",
                      highlight=False)
    else:
        src = sweep.bind_source(given)
    src.check_env()
    return src


def _forget_source(sweep: Sweep, new_source: bool) -> None:
    """The run stopped on a source error (it gave no image, or refused every request).
    When the sweep holds no tile image at all, nothing of that source is kept: the
    unfinished shards (only its 404s) are deleted, and the source is no longer recorded
    if this run recorded it, so a corrected --source is not refused as a second source."""
    if sweep.queue.stats(window=1.0).results.ok:
        return
    sweep.store.discard_partials()
    if new_source:
        sweep.unbind_source()


class _LiveLines:
    """Progress lines redrawn in place on stderr (rich Live), only on a terminal and unless
    quiet; ``with meter:`` shows them, leaving clears them."""

    def __init__(self, quiet: bool):
        from rich.live import Live

        self.live = Live(console=err, refresh_per_second=4, transient=True) if not quiet and err.is_terminal else None

    def __enter__(self):  # type: ignore[no-untyped-def]
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)


class _FetchMeter(_LiveLines):
    """The live progress line of `tilesweep fetch`: tiles/s, MB/s, retries, errors, ETA."""

    def __init__(self, remaining: int, quiet: bool):
        super().__init__(quiet)
        self.remaining = remaining
        self.started = time.monotonic()
        self.last_t = self.started
        self.last_n = 0
        self.rate = 0.0

    def update(self, c, final: bool = False) -> None:  # type: ignore[no-untyped-def]
        now = time.monotonic()
        n = c.tiles_ok + c.tiles_empty
        if now - self.last_t >= 1.0:
            inst = (n - self.last_n) / (now - self.last_t)
            self.rate = inst if self.rate == 0 else 0.7 * self.rate + 0.3 * inst
            self.last_t, self.last_n = now, n
        if self.live is not None and not final:
            self.live.update(self.line(c))

    def line(self, c, final: bool = False) -> str:  # type: ignore[no-untyped-def]
        """The progress line; ``final``: the rate over the whole run, not the recent one."""
        elapsed = max(1e-9, time.monotonic() - self.started)
        n = c.tiles_ok + c.tiles_empty
        left = max(0, self.remaining - n - c.tiles_skipped)
        rate = n / elapsed if final or not self.rate else self.rate
        eta = _human_hours(left / rate / 3600) if rate > 0 else "-"
        f = c.fetch
        return (
            f"{n:,} tiles ({c.tiles_ok:,} ok, {c.tiles_empty:,} empty) in {c.blocks_done:,} blocks, "
            f"{rate:,.0f} tiles/s, {c.bytes / 1e6 / elapsed:,.1f} MB/s, "
            f"retries {f.get('retries', 0):,}, failed tiles {c.tiles_failed:,}, "
            + (f"concurrency cut to {f['limit']:,} after 429/503 ({plural(f['limit_cuts'], 'cut')}), " if f.get("limit_cuts") else "")
            + f"{elapsed:,.0f} s, ETA {eta}"
        )


@app.command()
def predict(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL with fetched tiles (`tilesweep fetch`)."),
    model: str = typer.Option(..., "--model", "-m", help="demo, a .onnx / .pt / .pt2 file, or module:function."),
    batch: int = typer.Option(64, "--batch", "-b", help="Model inputs per predict call."),
    threads: int = typer.Option(2, "--threads", "-t", help="Decode threads (JPEG decoding releases the GIL)."),
    part_rows: int = typer.Option(65536, "--part-rows", help="Rows per Parquet part: blocks are group-committed once this many rows are buffered."),
    part_seconds: float = typer.Option(60.0, "--part-seconds", help="Commit a part at least this often (seconds)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    model_threads: Optional[int] = typer.Option(None, "--model-threads", help="CPU threads of one model batch (default: the runtime's choice)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Score in 0..1 at or above which a tile is labelled (default: the model's own)."),
    # issue 13: where tiles are decoded, and the PyTorch model's precision and memory order
    decode: str = typer.Option("auto", "--decode", help="Where tiles are decoded: auto (gpu for a PyTorch model on CUDA with torchvision, processes on more than 4 cores, else threads), threads, processes (shared memory) or gpu (nvJPEG)."),
    decode_processes: Optional[int] = typer.Option(None, "--decode-processes", help="Decode processes with --decode processes (default: half the cores, 2..8)."),
    precision: str = typer.Option("fp32", "--precision", help="PyTorch models: fp32, or bf16 / fp16 mixed precision (autocast)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="PyTorch models: weights and inputs in channels_last memory order."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress line."),
) -> None:
    """Score the fetched tiles of SWEEP_DIR with a model into Parquet parts (predictions/).

    Only blocks that are fetched (done) and not yet predicted by this model are read, so
    running it again, or after a crash, does only what is left."""
    from .threshold import apply_threshold, check_threshold

    check_threshold(threshold)
    from .predict import predict_sweep

    settings = _predict_settings(batch, threads, part_rows, part_seconds, model_threads, decode, decode_processes)
    with Sweep.open(sweep_dir) as sweep:
        sweep.queue  # noqa: B018 - a sweep without its queue is a one-line error before anything loads
        the_model = apply_threshold(_load_model(model, device, model_threads, precision, channels_last), threshold, sweep)
        meter = _PredictMeter(quiet)
        try:
            with meter:
                report = predict_sweep(sweep, the_model, settings, on_progress=meter.update)
        except KeyboardInterrupt:
            from .signals import exit_status, mark_reported

            mark_reported()
            err.print("stopped: committed parts are durable, with every block scored before the stop; run the same command to go on")
            raise typer.Exit(exit_status())
        _predict_summary(sweep, sweep_dir, the_model, report, "run `tilesweep fetch`, then predict again")


def _predict_settings(batch: int, threads: int, part_rows: int, part_seconds: float, model_threads: int | None,  # type: ignore[no-untyped-def]
                      decode: str = "auto", decode_processes: int | None = None):
    from .predict import PredictSettings  # checks its values (one-line UsageError)

    return PredictSettings(batch=batch, threads=threads, part_rows=part_rows, part_seconds=part_seconds, model_threads=model_threads,
                           decode=decode, decode_processes=decode_processes)  # issue 13: decode


def _load_model(spec: str, device: str, model_threads: int | None, precision: str = "fp32", channels_last: bool = False):  # type: ignore[no-untyped-def]
    """Load and probe the model: a model that does not load or answers in the wrong shape
    is a one-line error before anything is written."""
    from .model import load_model
    from .predict import probe

    the_model = load_model(spec, device=device, threads=model_threads, precision=precision, channels_last=channels_last)  # type: ignore[arg-type]
    probe(the_model)
    return the_model


def _predict_summary(sweep: Sweep, sweep_dir: str, the_model, report, not_fetched_hint: str, dead_is_error: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Print what predict did and where the rows are; exit 1 when a done block has no
    shard or the ledger disagrees with the fetch queue (or, with ``dead_is_error``, when
    blocks are dead)."""
    from .predict.sink import model_folder, reconcile

    rec = reconcile(sweep.path, sweep.queue, the_model.name, the_model.digest)
    st = sweep.status()
    name = model_folder(the_model.name, the_model.digest)
    folder = f"{sweep.storage.url}/predictions/{name}" if sweep.remote else sweep.predictions_path / name
    out.print(_predict_line(report), highlight=False)
    out.print(
        f"{sweep_dir}: {rec.blocks:,} of {rec.done_blocks:,} fetched blocks predicted by {the_model.name} "
        f"({rec.rows:,} rows, one per fetched tile); predictions in {folder}/",
        highlight=False,
    )
    if st.blocks["pending"] or st.blocks["leased"]:
        out.print(f"  {st.blocks['pending'] + st.blocks['leased']:,} blocks are not fetched yet: {not_fetched_hint}", highlight=False)
    nulls = report.undecodable + report.model_nan
    if report.tiles and 2 * nulls > report.tiles:
        err.print(
            f"[bold red]{nulls:,} of {report.tiles:,} rows have no scores[/]: the model returned NaN for {report.model_nan:,}, "
            f"{report.undecodable:,} tiles did not decode. Fix the model (or the source), then "
            f"`tilesweep predictions drop {sweep_dir} --model {the_model.name}` and predict again",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(1)
    if report.corrupt_shards:
        err.print(
            f"[bold red]{len(report.corrupt_shards):,} shards failed their checks[/] and were not scored; they were moved "
            f"aside and their blocks queued to be fetched again (first: {report.corrupt_shards[0]}): {not_fetched_hint}",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(1)
    if report.missing_shards:
        err.print(
            f"[bold red]{report.missing_shards:,} fetched blocks have no tiles in the store[/] (streamed by `tilesweep run` "
            f"without --keep-tiles, or lost): `tilesweep run {sweep_dir} --model {the_model.name}` fetches them again"
        )
        raise typer.Exit(1)
    if rec.message:
        err.print(f"[bold red]accounting mismatch:[/] {rec.message}")
        raise typer.Exit(1)
    if dead_is_error and st.blocks["dead"]:
        err.print(f"[bold red]{st.blocks['dead']:,} blocks are dead[/] (see `tilesweep status`); `tilesweep retry {sweep_dir} --dead` queues them again")
        raise typer.Exit(1)


@app.command()
def run(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL made by `tilesweep plan`."),
    model: str = typer.Option(..., "--model", "-m", help="demo, a .onnx / .pt / .pt2 file, or module:function."),
    source: Optional[str] = typer.Option(None, "--source", "-s", help="URL template ({z} {x} {y} {-y} {q} {s} ${ENV}) or preset; recorded on first use."),
    header: list[str] = typer.Option([], "--header", "-H", help="Request header 'Name: value' (repeatable; ${ENV} expanded at request time)."),
    keep_tiles: bool = typer.Option(False, "--keep-tiles", help="Also pack the fetched tiles into the store (tiles/), for another model, export or `tilesweep tiles`."),
    workers: int = typer.Option(1, "--workers", "-w", help="Fetch worker processes (one event loop each; 1: a thread of this process). One loop fetches a few thousand tiles/s: use more when a GPU model takes more."),
    concurrency: int = typer.Option(256, "--concurrency", "-c", help="Requests in flight, over all workers."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Most requests/s over all workers (retries count); default: no cap."),
    retries: int = typer.Option(6, "--retries", help="Retries of a tile after a transient fault."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds one request may take in all."),
    lease_ttl: float = typer.Option(60.0, "--lease-ttl", help="Seconds a block's lease lasts unless renewed."),
    max_attempts: int = typer.Option(5, "--max-attempts", help="Failed attempts a block may have before it is declared dead (a lease lost to a killed worker is not one)."),
    max_tile_bytes: str = typer.Option("4MiB", "--max-tile-bytes", help="Largest body a tile may have (e.g. 4MiB, 16MiB); bigger ones are cut and fail."),
    tile_budget: float = typer.Option(120.0, "--tile-budget", help="Seconds one tile may take over all its retries, per lease."),
    replace_source: bool = typer.Option(False, "--replace-source", help="Record --source in place of the sweep's source (see docs/sources.md)."),
    mix_sources: bool = typer.Option(False, "--mix-sources", help="With --replace-source: keep done blocks that hold the old source's tiles."),
    supertile: Optional[int] = typer.Option(None, "--super", help="With a bbox --source: ask for N x N tiles per request (2, 4, 8, 16) and cut them (docs/sources.md)."),
    batch: int = typer.Option(64, "--batch", "-b", help="Model inputs per predict call."),
    threads: int = typer.Option(2, "--threads", "-t", help="Decode threads."),
    part_rows: int = typer.Option(65536, "--part-rows", help="Rows per Parquet part (group commit)."),
    part_seconds: float = typer.Option(60.0, "--part-seconds", help="Commit a part at least this often (seconds)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda."),
    model_threads: Optional[int] = typer.Option(None, "--model-threads", help="CPU threads of one model batch."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Score in 0..1 at or above which a tile is labelled (default: the model's own)."),
    dask: Optional[str] = typer.Option(None, "--dask", help="Fetch and predict on Dask, the model loaded in each worker (with --keep-tiles: the tiles stored too): local:N (N worker processes here) or tcp://scheduler:8786 (one loop per worker thread); --concurrency and --rate are then per loop (docs/scale-out.md)."),
    # issue 13: where tiles are decoded, and the PyTorch model's precision and memory order
    decode: str = typer.Option("auto", "--decode", help="Where tiles are decoded: auto (gpu for a PyTorch model on CUDA with torchvision, processes on more than 4 cores, else threads), threads, processes (shared memory) or gpu (nvJPEG)."),
    decode_processes: Optional[int] = typer.Option(None, "--decode-processes", help="Decode processes with --decode processes (default: half the cores, 2..8)."),
    precision: str = typer.Option("fp32", "--precision", help="PyTorch models: fp32, or bf16 / fp16 mixed precision (autocast)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="PyTorch models: weights and inputs in channels_last memory order."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress line."),
    densify: Optional[int] = typer.Option(None, "--densify", help="Then plan the unplanned tiles within R tiles of each detection and run them, round after round, until a round finds no new tile (`tilesweep densify`)."),
    densify_along: bool = typer.Option(False, "--densify-along", help="With --densify: also the tiles along the line through two nearby detections."),
    densify_rounds: int = typer.Option(20, "--densify-rounds", help="With --densify: most densify rounds in the sweep."),
) -> None:
    """Fetch and predict in one go, the usual command.

    Tiles stream from the source through decoding into the model, and are not stored: a
    block is acked in the fetch queue once its predictions are durable. Blocks already in
    the store are read from it; blocks streamed earlier for another model are fetched
    again. With --keep-tiles, the tiles are also packed into the store (as `tilesweep
    fetch`): a block is acked once its shard and its predictions are durable. Ctrl-C or a
    crash: run the same command again."""
    fetch_settings, worker_settings = _fetch_settings(workers, concurrency, rate, retries, timeout, lease_ttl, max_attempts,
                                                      max_tile_bytes=max_tile_bytes, tile_budget=tile_budget)
    from .threshold import apply_threshold, check_threshold

    check_threshold(threshold)
    settings = _predict_settings(batch, threads, part_rows, part_seconds, model_threads, decode, decode_processes)
    dask_address = None if dask is None else _dask_address(dask, workers)
    from .sweeplock import SweepLock

    with Sweep.open(sweep_dir) as sweep, SweepLock(sweep.path, "run"):  # not beside a fetch (runs may share a sweep)
        the_model = apply_threshold(_load_model(model, device, model_threads, precision, channels_last), threshold, sweep)  # before the source is recorded
        new_source = sweep.source is None
        src = _bind_source(sweep, source, header, replace_source, mix_sources, supertile)

        def run_once() -> None:
            try:
                if dask_address is not None:
                    from . import cli_dask

                    from .cluster import ModelLoader

                    loader = ModelLoader.of(model, device=device, threads=model_threads, precision=precision,
                                            channels_last=channels_last, threshold=threshold)
                    cli_dask.run(sweep, sweep_dir, the_model, src, settings, fetch_settings, worker_settings, dask_address, quiet,
                                 keep_tiles=keep_tiles, loader=loader)
                else:
                    _run(sweep, sweep_dir, the_model, src, settings, fetch_settings, worker_settings, workers, keep_tiles, quiet)
            except UsageError:  # e.g. the source gave no image at all: record nothing of it
                _forget_source(sweep, new_source)
                raise

        from .cli_lines import run_rounds  # --densify: run, densify, run again (tilesweep.densify)

        run_rounds(sweep, the_model.name, threshold, densify, densify_along, densify_rounds, run_once)


_STOPPED_RUN = ("committed predictions are durable", "run the same command to go on")


def _stopped(sweep: Sweep, kept: str, hint: str) -> None:
    """After a stop (Ctrl-C, SIGTERM): say what is kept and, truthfully, whether blocks are
    still leased (by other processes: ours were released), then exit 130 or 143."""
    from .queue import State
    from .signals import exit_status, mark_reported

    mark_reported()
    try:
        with sweep.open_queue() as q:
            leased = q.count(State.LEASED)
    except Exception:  # noqa: BLE001 - the message must not fail
        leased = 0
    released = "this run's unfinished leases were released"
    if leased:
        released += f"; still leased by other processes: {plural(leased, 'block')} (`tilesweep status`)"
    err.print(f"stopped: {kept} and {released}; {hint}", highlight=False)
    raise typer.Exit(exit_status())


def _run(sweep, sweep_dir, the_model, src, settings, fetch_settings, worker_settings, workers, keep_tiles, quiet) -> None:  # type: ignore[no-untyped-def]
    """`tilesweep run`: fetch -> decode -> model -> sink, streamed (an asyncio thread, or
    worker processes); with --keep-tiles each runner also stores the block (tilesweep.runner.Tee)."""
    from .predict import StreamFetch, predict_sweep

    before = sweep.status()
    fetch_meter = _FetchMeter(before.tiles["pending"] + before.tiles["leased"], quiet=True)
    fetch_lines: list[str] = []

    def on_progress(r) -> None:  # type: ignore[no-untyped-def]
        if r.fetch is not None:
            fetch_meter.update(r.fetch)
            fetch_lines[:] = [fetch_meter.line(r.fetch)]
        meter.update(r)

    meter = _PredictMeter(quiet, lambda: fetch_lines[0] if fetch_lines else ("starting workers" if keep_tiles else "starting"))
    try:
        with meter:
            report = predict_sweep(sweep, the_model, settings, on_progress=on_progress,
                                   stream=StreamFetch(src, fetch_settings, worker_settings, workers, keep_tiles=keep_tiles))
    except KeyboardInterrupt:
        _stopped(sweep, *_STOPPED_RUN)
    if report.fetch is not None:
        out.print(fetch_meter.line(report.fetch, final=True), highlight=False)
    _predict_summary(sweep, sweep_dir, the_model, report, "run the same command again", dead_is_error=True)


def _predict_line(r) -> str:  # type: ignore[no-untyped-def]
    shown = [m for m in r.stages.values() if m.tiles or m.name not in ("read", "fetch")]  # the sources that gave tiles
    stages = ", ".join(f"{m.name} {m.tiles / r.wall_s if r.wall_s else 0:,.0f}/s ({m.busy(r.wall_s):.0%} busy)" for m in shown)
    return (
        f"{r.tiles:,} tiles scored in {r.blocks:,} blocks ({r.positives:,} positive, {r.empty:,} empty, "
        f"{r.failed:,} failed, {r.undecodable:,} undecodable"
        + (f", {r.model_nan:,} NaN from the model" if r.model_nan else "")
        + f"), {plural(r.parts, 'part')} written, "
        f"{r.tiles_per_s:,.0f} tiles/s, " + (f"model busy {r.model_busy:.0%}, " if r.stages else "") + f"{r.wall_s:,.1f} s"
        + (f"\n  stages: {stages}; bottleneck {r.bottleneck()}" if r.tiles and r.stages else "")  # none: run --dask's sum
        # issue 13: which stage bounds the run, by how much, the model's wait; decode deaths
        + (f"\n  {r.bound_line()}; decode {r.decode}" if r.tiles and r.stages and hasattr(r, "bound_line") else "")
        + "".join(f"\n  warning: {d}" for d in getattr(r, "decode_deaths", []))
    )


class _PredictMeter(_LiveLines):
    """The live progress line of `tilesweep predict`: tiles/s per stage, queue fill, model busy %."""

    def __init__(self, quiet: bool, first_line: Callable[[], str] | None = None):
        super().__init__(quiet)
        self.first_line = first_line  # `tilesweep run`: the fetch line above the predict lines

    def update(self, r) -> None:  # type: ignore[no-untyped-def]
        if self.live is None:
            return
        fill = " ".join(f"{k} {v:.0%}" for k, v in r.queue_fill().items())
        head = f"fetch: {self.first_line()}\npredict: " if self.first_line is not None else ""
        self.live.update(f"{head}{_predict_line(r)}\n  {predict_progress(r)}; queues {fill}")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, in the plural unless ``n`` is 1: "1 part", "2 parts", "1,000 blocks"."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def predict_progress(r) -> str:  # type: ignore[no-untyped-def]
    """The live meter's progress: blocks committed of the blocks to do, and the tiles the
    model has scored (counted by the model stage, before they are committed)."""
    scored = r.stages["model"].tiles if r.stages else 0
    if not r.blocks_todo:
        return f"looking for blocks to score; {plural(scored, 'tile')} scored"
    return f"{r.blocks:,} of {plural(r.blocks_todo, 'block')} committed, {plural(scored, 'tile')} scored"


predictions_app = typer.Typer(help="Manage a sweep's predictions: drop a model's, to predict them again.", no_args_is_help=True)
app.add_typer(predictions_app, name="predictions")


@predictions_app.command("drop")
def predictions_drop(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    model: str = typer.Option(..., "--model", "-m", help="The model's name as `tilesweep status` shows it (demo, net.onnx, module:function), or its folder under predictions/."),
) -> None:
    """Drop every prediction of one model (its parts and ledger entries), durably, so that
    the next `tilesweep predict` or `run` with it does all its blocks again (after a model
    was fixed). Blocks that `run` streamed without keeping tiles are fetched again."""
    from .predict.sink import drop_predictions

    with Sweep.open(sweep_dir) as sweep:
        if sweep.remote:  # its parts are in the bucket; the ledger here would adopt them again
            raise UsageError(f"sweep {sweep.location!r} is on object storage: `predictions drop` is not done there yet")
        dropped = drop_predictions(sweep.path, model)
    names = ", ".join(f"{name} (predictions/{folder}/)" for name, folder in dropped.models)
    out.print(f"dropped the predictions of {names}: {plural(dropped.blocks, 'block')}, {plural(dropped.parts, 'part')}; "
              "predict again to redo them", highlight=False)


tiles_app = typer.Typer(help="Read the tile store of a sweep: get one tile, list, count.", no_args_is_help=True)
app.add_typer(tiles_app, name="tiles")


@tiles_app.command("get")
def tiles_get(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    tile: str = typer.Argument(..., help="The tile as Z/X/Y."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Write one stored tile's bytes to stdout (or -o FILE). Exit 1 when it is not stored."""
    from .errors import check_output_file

    t = parse_tile(tile)
    if output is not None:
        check_output_file(output, "output")
    with Sweep.open(sweep_dir) as sweep:
        _check_zoom(sweep, t.z)
        with sweep.store as store:
            record = store.get_record(t)
        planned = record is not None or _in_plan(sweep, t)
        if record is None and planned:
            _raise_if_shard_lost(sweep, t)
    if record is None or record[1] is None:
        if not planned:
            state = "not in the sweep's plan (not fetched, and never will be)"
        else:
            state = "not fetched yet" if record is None else f"recorded as {record[0].name.lower()} (no bytes)"
        err.print(f"tile {tile} is {state}", highlight=False)
        raise typer.Exit(1)
    if output is not None:
        try:
            output.write_bytes(record[1])
        except OSError as exc:
            raise UsageError(f"output {str(output)!r} cannot be written: {exc.strerror}") from None
    else:
        sys.stdout.buffer.write(record[1])
        sys.stdout.buffer.flush()


def _raise_if_shard_lost(sweep: Sweep, t) -> None:  # type: ignore[no-untyped-def]
    """A planned tile with no record: when its block is done and its tiles were kept, the
    shard is gone (deleted or moved), which is not "not fetched yet": CorruptShardError."""
    from .queue import State
    from .tiles import Tile, parent

    for z in range(min(sweep.block_zoom, t.z), -1, -1):
        row = sweep.queue.get(tile_id(parent(t, z)))
        if row is not None:
            store, block = sweep.store, Tile(row["z"], row["x"], row["y"])
            try:
                path = store.shard_path(block)
            except ValueError:  # a block zoom this store does not keep: nothing to say
                return
            if row["state"] is State.DONE and row.get("stored") != 0 and not store.is_complete(block):
                exc = CorruptShardError("missing (deleted or moved?) though its block is done")
                exc.path = path if store.storage is None else f"{store.storage.url}/{store.shard_key(block)}"
                raise exc
            return


def _in_plan(sweep: Sweep, t) -> bool:  # type: ignore[no-untyped-def]
    """Whether tile ``t`` (at the sweep's zoom) is one of the sweep's planned tiles."""
    from .queue import Block
    from .tiles import parent

    for z in range(min(sweep.block_zoom, t.z), -1, -1):  # adaptive blocks lie at any zoom up to block_zoom
        row = sweep.queue.get(tile_id(parent(t, z)))
        if row is not None:  # blocks never overlap: the first ancestor found is t's block
            block = Block(row["z"], row["x"], row["y"], row["tiles"], row["mask"])
            return t in block.tile_list(sweep.zoom)
    return False


@tiles_app.command("ls")
def tiles_ls(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    all_records: bool = typer.Option(False, "--all", help="Also list empty (404/204) tiles."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Stop after this many lines."),
) -> None:
    """List stored tiles in Hilbert order: Z/X/Y, status, bytes (tab-separated)."""
    from .store import Status

    if limit is not None and limit < 0:
        raise UsageError(f"limit {limit} must be >= 0")
    n = 0
    with Sweep.open(sweep_dir) as sweep:
        store = sweep.store
        for block in store.blocks():
            if limit is not None and n >= limit:
                break
            reader = store.reader(block)
            if reader is None:  # its shard went (deleted or moved) since the listing
                continue
            for t, status, data in reader.iter_records(None if all_records else Status.OK):
                if limit is not None and n >= limit:
                    break
                sys.stdout.write(f"{t.z}/{t.x}/{t.y}\t{Status(status).name.lower()}\t{len(data)}\n")
                n += 1
        store.close()


@tiles_app.command("stats")
def tiles_stats(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Count shards, tiles (ok / empty / failed) and bytes in the store."""
    with Sweep.open(sweep_dir) as sweep:
        stats = sweep.store.stats()
    if as_json:
        print(json.dumps(stats))
        return
    out.print(
        f"{stats['shards']:,} shards hold {stats['tiles']:,} tiles: {stats['ok']:,} ok ({_human_bytes(stats['bytes'])}), "
        f"{stats['empty']:,} empty, {stats['failed']:,} failed; "
        f"{stats['partial_shards']:,} unfinished shards hold {stats['partial_tiles']:,} more"
    )
    if stats.get("corrupt_shards"):
        err.print(f"[bold red]{stats['corrupt_shards']:,} shards are corrupt[/]: run `tilesweep verify {sweep_dir} --repair`")


@app.command()
def export(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    output_arg: str = typer.Argument(..., metavar="OUTPUT", help="Output: a .pmtiles or .mbtiles file (or s3://bucket/prefix/name), or a folder for --format dir."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="pmtiles, mbtiles or dir; default from OUTPUT's suffix."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    staging: Optional[Path] = typer.Option(None, "--staging", help="For an s3:// OUTPUT: the local folder the archive is written to before its upload (room for all of it); default SWEEP/.staging."),
) -> None:
    """Export the fetched tiles to one PMTiles archive, an MBTiles file or a z/x/y tree.

    The PMTiles v3 archive is clustered (Hilbert order). Export streams: memory does not
    grow with the number of tiles."""
    from .storage import is_url
    from .store import export_dir, export_mbtiles, export_pmtiles

    if is_url(output_arg):
        _export_to_url(sweep_dir, output_arg, fmt, force, staging)
        return
    output = Path(output_arg)
    kind = fmt or {".pmtiles": "pmtiles", ".mbtiles": "mbtiles"}.get(output.suffix.lower())
    if kind is None:
        raise UsageError(f"cannot tell the format of {str(output)!r}: use a .pmtiles or .mbtiles name, or --format dir")
    if kind not in ("pmtiles", "mbtiles", "dir"):
        raise UsageError(f"format {kind!r} is not one of pmtiles, mbtiles, dir")
    from .errors import check_output_file
    from .store.export import EXPORT_MARKER

    if output.exists() and not force:
        raise UsageError(f"{str(output)!r} exists; pass --force to replace it")
    with Sweep.open(sweep_dir) as sweep:
        here, there = output.resolve(), sweep.path.resolve()
        if here == there or here in there.parents or (there in here.parents and here.relative_to(there).parts[0] in
                                                        ("tiles", "predictions", "queue.sqlite", "sweep.toml", "area.geojson")):
            raise UsageError(f"output {str(output)!r} is the sweep folder {str(sweep_dir)!r}, holds it, or is part of it; export elsewhere")
        if kind == "dir":
            if output.exists() and not output.is_dir():
                raise UsageError(f"output {str(output)!r} exists and is not a folder")
            if output.is_dir() and any(output.iterdir()) and not (output / EXPORT_MARKER).is_file():
                raise UsageError(f"folder {str(output)!r} is not empty and is not a tilesweep export; --force replaces only an earlier export")
            check_output_file(output.parent / (output.name + ".partial"), "output")
        else:
            check_output_file(output, "output")
        store = sweep.store
        blocks = _export_blocks(sweep, sweep_dir, store)
        started = time.perf_counter()
        if kind == "pmtiles":
            meta = {"name": sweep.path.name, "description": f"tilesweep export: {sweep.describe_plan()}"}
            summary = export_pmtiles(store, output, metadata=meta, blocks=blocks)
        elif kind == "mbtiles":
            summary = export_mbtiles(store, output, blocks=blocks)
        else:
            summary = export_dir(store, output, blocks=blocks)
        store.close()
    tiles = summary.get("tiles", summary.get("addressed_tiles", 0))
    out.print(f"wrote {str(output)} ({kind}): {tiles:,} tiles in {time.perf_counter() - started:.1f} s", highlight=False)


def _export_to_url(sweep_dir: str, url: str, fmt: Optional[str], force: bool, staging: Optional[Path] = None) -> None:
    """`export SWEEP s3://bucket/prefix/name.pmtiles`: staged on local disk (``staging``,
    default SWEEP/.staging: beside the sweep, not in a small /tmp), published through the
    storage seam (replacing an earlier object only with --force)."""
    from pathlib import PurePosixPath

    from .store import export_mbtiles, export_pmtiles
    from .store.export import export_target

    kind = fmt or {".pmtiles": "pmtiles", ".mbtiles": "mbtiles"}.get(PurePosixPath(url).suffix.lower())
    if kind not in ("pmtiles", "mbtiles"):
        raise UsageError(f"cannot export {url!r} as {kind or 'an unknown format'}: to object storage, a .pmtiles or .mbtiles name")
    with Sweep.open(sweep_dir) as sweep:
        staging = staging if staging is not None else sweep.path / ".staging"
        storage, key = export_target(url, staging)  # StorageError (exit 2): bucket, credentials, endpoint
        if storage.exists(key) and not force:
            raise UsageError(f"{url!r} exists; pass --force to replace it")
        store = sweep.store
        blocks = _export_blocks(sweep, sweep_dir, store)
        started = time.perf_counter()
        if kind == "pmtiles":
            meta = {"name": sweep.path.name, "description": f"tilesweep export: {sweep.describe_plan()}"}
            summary = export_pmtiles(store, url, metadata=meta, blocks=blocks, replace=force, staging=staging)
        else:
            summary = export_mbtiles(store, url, blocks=blocks, replace=force, staging=staging)
        store.close()
    out.print(f"wrote {url} ({kind}): {summary['tiles']:,} tiles in {time.perf_counter() - started:.1f} s", highlight=False)


def _export_blocks(sweep: Sweep, sweep_dir: str, store: TileStore) -> list[Tile]:
    """The blocks an export holds: the done blocks whose tiles were kept (not a dead or
    pending block's shard, nor a stray one). A done block whose shard is missing stops the
    export before anything is written; blocks streamed without keeping tiles are named."""
    from .queue import State

    blocks = [b.tile for b in sweep.queue.blocks(State.DONE, kept=True)]
    missing = [b for b in blocks if not store.is_complete(b)]
    if missing:
        b = missing[0]
        err.print(
            f"[bold red]error:[/] {len(missing):,} done blocks have no shard (first: {store.shard_path(b)}); "
            f"nothing exported: run `tilesweep verify {sweep_dir} --repair` to queue them again, then fetch",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(1)
    streamed = sum(1 for _ in sweep.queue.blocks(State.DONE, kept=False))
    if streamed:
        err.print(f"note: {streamed:,} done blocks were streamed to a model without keeping their tiles "
                  "(`run` without --keep-tiles) and are not in the export", highlight=False)
    return blocks


@app.command()
def verify(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    repair: bool = typer.Option(False, "--repair", help="Move corrupt shards aside and queue their blocks again."),
) -> None:
    """Check every shard's checksums and that every done block has its shard.

    Exit 1 when something is wrong and --repair was not given; --repair moves corrupt shards
    aside and queues their blocks again."""
    from .queue import State

    with Sweep.open(sweep_dir) as sweep:
        store = sweep.store
        report = store.verify(repair=repair)
        corrupt = {tile_id(b): reason for b, reason in report.corrupt}
        # blocks streamed to a model without keeping their tiles have no shard by design
        missing = [b.id for b in sweep.queue.blocks(State.DONE, kept=True) if not store.is_complete(b.tile) and b.id not in corrupt]
        for block, reason in report.corrupt:
            err.print(f"corrupt shard {block.z}/{block.x}/{block.y}: {reason}", highlight=False)
        if missing:
            err.print(f"{len(missing):,} done blocks have no shard (deleted or moved?)")
        if repair and (corrupt or missing):
            n = sweep.queue.requeue(list(corrupt) + missing, "shard corrupt or missing (verify --repair)")
            out.print(f"{n:,} blocks queued again; run `tilesweep fetch {sweep_dir}` to fetch them")
        store.close()
    out.print(f"checked {report.checked:,} shards: {report.ok:,} ok, {len(report.corrupt):,} corrupt, {len(missing):,} missing")
    if (report.corrupt or missing) and not repair:
        raise typer.Exit(1)


def _check_zoom(sweep: Sweep, z: int) -> None:
    if z != sweep.zoom:
        raise UsageError(f"tile zoom {z} is not the sweep's zoom {sweep.zoom}")


@app.command()
def retry(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL."),
    dead: bool = typer.Option(False, "--dead", help="Put dead blocks (too many failed attempts) back in the queue."),
) -> None:
    """Queue failed work again."""
    if not dead:
        raise UsageError("retry needs --dead (the only kind of work that is retried by hand)")
    with Sweep.open(sweep_dir) as sweep:
        n = sweep.queue.retry_dead()
    out.print(f"{n:,} dead blocks queued again")


def _print_status(sweep: Sweep, st: SweepStatus) -> None:
    out.print(f"[bold]{sweep.location}[/]: {sweep.describe_plan()}", highlight=False)
    table = Table()
    table.add_column("state")
    table.add_column("blocks", justify="right")
    table.add_column("tiles", justify="right")
    table.add_column("share", justify="right")
    for state in ("pending", "leased", "done", "dead"):
        share = st.tiles[state] / st.tiles_total if st.tiles_total else 0.0
        table.add_row(state, f"{st.blocks[state]:,}", f"{st.tiles[state]:,}", f"{share:.1%}")
    table.add_row("[bold]total", f"[bold]{st.blocks_total:,}", f"[bold]{st.tiles_total:,}", "")
    out.print(table)
    eta = "-" if st.eta_s is None else _human_hours(st.eta_s / 3600)
    r = st.results
    if r.get("ok", 0) or r.get("empty", 0):
        out.print(
            f"done blocks: {r['ok']:,} tiles fetched ({_human_bytes(r['bytes'])}), {r['empty']:,} empty (404/204), "
            f"{r['failed']:,} failed; {r['retries']:,} requests retried after transient faults"
        )
    out.print(f"throughput {st.throughput:,.1f} tiles/s over the last {st.window_s:.0f} s, ETA {eta}, {st.attempts_total:,} leases taken")
    for m in st.machines:  # each machine's worker loops (lease owners) and rate
        out.print(f"  machine {m['host']}: {plural(len(m['owners']), 'loop')}, {plural(m['blocks_leased'], 'block')} leased, "
                  f"{m['tiles_done']:,} tiles done in the window ({m['tiles_per_s']:,.1f} tiles/s)", highlight=False)
    for r in st.densify:
        out.print(f"densify round {r['round']}: {r['tiles']:,} tiles in {r['blocks']:,} blocks around {r['detections']:,} detections "
                  f"of {r['model']} (radius {r['radius']}{', along lines' if r['along'] else ''})", highlight=False)
    if st.dead:
        more = st.blocks["dead"] - len(st.dead)
        err.print(f"[bold red]{st.blocks['dead']:,} dead blocks[/], last errors" + (f" (first {len(st.dead)}):" if more else ":"))
        for d in st.dead:
            err.print(f"  {d['block']} after {d['attempts']} attempts: {d['error'] or '?'}", highlight=False, soft_wrap=True)
    for m in st.predictions:
        out.print(
            f"predictions of {m['model']}: {m['blocks']:,} of {st.blocks_total:,} blocks, {m['rows']:,} rows "
            f"({m['positives']:,} detections"
            + (f" at score >= {m['threshold']:g}" if m.get("threshold") is not None else "")
            + f") in {m['parts']:,} parts under predictions/{m['folder']}/",
            highlight=False,
        )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _human_hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


# Command groups that live in modules of their own register here, one line each:
#   from .cli_results import register as _register_results; _register_results(app)
# (results: query/convert/detections/summarize; view: the web viewer).
from .cli_view import register as _register_view; _register_view(app)  # noqa: E402
from .cli_results import register as _register_results; _register_results(app)  # noqa: E402
from .cli_lines import register as _register_lines; _register_lines(app)  # noqa: E402


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NEGATIVE_BBOX = re.compile(rf"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:\s*,\s*{_NUM})+$")


def protect_negative_bboxes(args: list[str]) -> list[str]:
    """``args`` with every bbox whose west is negative (all of the Americas) marked as a
    value: click reads a token that starts with ``-`` as an option ("No such option: -1").
    Such a token gets a leading space, which click leaves positional and
    :func:`tilesweep.area.load_area` strips. Tokens after ``--`` are left alone."""
    fixed: list[str] = []
    for i, a in enumerate(args):
        if a == "--":
            return fixed + args[i:]
        fixed.append(" " + a if _NEGATIVE_BBOX.match(a) else a)
    return fixed


def _path_args() -> list[str]:
    """The command line's arguments that name an existing file or folder, output first
    (the last one): where a write that names no path was going."""
    return [a for a in reversed(sys.argv[2:])
            if not a.startswith("-") and (os.path.exists(a) or (os.sep in a and os.path.isdir(os.path.dirname(a))))]


def _os_error_line(exc: OSError) -> str:
    """One line for an OS error: the path(s), what happened, and the errno's name."""
    name = errno.errorcode.get(exc.errno or 0, "")
    what = exc.strerror or str(exc)
    paths = [repr(os.fspath(f)) for f in (exc.filename, exc.filename2) if f is not None]
    if not paths and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a write to an open file names no path
        paths = [f"writing under {a!r}" for a in _path_args()][:1]
    return f"{' -> '.join(paths) + ': ' if paths else ''}{what}{f' ({name})' if name else ''}"


def main() -> None:
    """Entry point of the ``tilesweep`` console script.

    Bad input (:class:`UsageError`) is one line and exit 2. An OS error that reaches here
    (an unwritable path, a full disk) is one line naming the path and the errno, exit 2,
    or 1 for a full disk (the input was fine; the machine was not)."""
    from .signals import exit_status, install_cli_handlers, received, reported

    install_cli_handlers()  # SIGTERM stops gracefully, as Ctrl-C does (exit 143, not killed at once)
    try:
        _main()
    except SystemExit as exc:
        # A stop signal before any work began: typer turned its KeyboardInterrupt into a
        # silent exit 130. Nothing was leased yet; say so, with 128 + the signal.
        if exc.code == 130 and received() is not None and not reported():
            err.print("stopped before the work began: nothing was leased or written; run the same command to start")
            sys.exit(exit_status())
        raise


def _main() -> None:
    """The app, with its errors as one line (see :func:`main`)."""
    try:
        app(args=protect_negative_bboxes(sys.argv[1:]), prog_name="tilesweep")
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except WorkerDied as exc:  # the others went on; the same command finishes the sweep
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:
        err.print(f"[bold red]error:[/] {_os_error_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(1 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 2)
    except sqlite3.OperationalError as exc:  # SQLite's own "database or disk is full"
        from .diskspace import is_disk_full

        if not is_disk_full(exc):
            raise
        where = next(iter(_path_args()), None)
        err.print(f"[bold red]error:[/] {os.strerror(errno.ENOSPC)} (ENOSPC) writing a database{f' under {where!r}' if where else ''}: {exc}",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
    except _CorruptShard.if_imported() as exc:  # `tiles get`, `export`: the data is bad, not the input
        err.print(f"[bold red]error:[/] {_corrupt_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(1)


def _corrupt_line(exc: CorruptShardError) -> str:
    """One line naming the corrupt (or missing) shard and the way out."""
    sweep_dir = "SWEEP"
    if exc.path is not None and len(Path(exc.path).parents) >= 4 and Path(exc.path).parents[3].joinpath("sweep.toml").is_file():
        sweep_dir = str(Path(exc.path).parents[3])  # SWEEP/tiles/{bz}/{x}/{y}.shard
    return (f"{exc.describe()}; run `tilesweep verify {sweep_dir} --repair` to move it aside "
            "and queue its block again, then fetch it")


if __name__ == "__main__":
    main()
