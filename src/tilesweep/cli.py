"""The ``tilesweep`` command: a thin layer over the Python API, with the same words.

Bad input raises :class:`tilesweep.errors.UsageError`; :func:`main` prints it as one line
and exits with status 2, before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .area import load_area
from .errors import UsageError
from .plan import PlanSpec
from .sim.cli import app as sim_app
from .sweep import Sweep, SweepStatus

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


@app.command()
def plan(
    area: str = typer.Argument(..., help="W,S,E,N bbox in degrees, or a GeoJSON / WKT file."),
    sweep_dir: Path = typer.Argument(..., help="Sweep folder to create (sweep.toml, queue.sqlite)."),
    zoom: int = typer.Option(..., "--zoom", "-z", help="Tile zoom, 0..24 (18 is about 0.6 m per pixel)."),
    block_zoom: Optional[int] = typer.Option(None, "--block-zoom", help="Zoom of the blocks (units of work); default zoom - 4, i.e. 256 tiles."),
    fraction: float = typer.Option(1.0, "--fraction", help="Keep this share of tiles, in (0, 1], by a per-tile hash."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample and of the block shuffle."),
    max_tiles: Optional[int] = typer.Option(None, "--max-tiles", help="Keep exactly this many tiles (a uniform sample)."),
    rate: float = typer.Option(1000.0, "--rate", help="Tiles/s assumed for the time estimate."),
    tile_kb: float = typer.Option(20.0, "--tile-kb", help="KB per tile assumed for the size estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan summary as one JSON object."),
) -> None:
    """Plan AREA at --zoom into SWEEP_DIR: blocks of tiles, sampled and shuffled, queued."""
    if rate <= 0:
        raise UsageError(f"rate {rate:g} must be > 0 tiles/s")
    if tile_kb <= 0:
        raise UsageError(f"tile size {tile_kb:g} KB must be > 0")
    spec = PlanSpec(zoom=zoom, block_zoom=block_zoom, fraction=fraction, seed=seed, max_tiles=max_tiles)
    the_area = load_area(area)
    with err.status("planning...") as status:
        counted = [0, 0]

        def progress(chunk) -> None:  # type: ignore[no-untyped-def]
            counted[0] += int(chunk.counts.sum())
            counted[1] += len(chunk)
            status.update(f"planning... {counted[0]:,} tiles in {counted[1]:,} blocks")

        sweep, created = Sweep.plan(sweep_dir, the_area, spec, on_chunk=progress)
    summary = sweep.summary()
    size, hours = summary.estimate(tile_kb=tile_kb, rate=rate)
    if as_json:
        out.print_json(json.dumps({**sweep.plan_config, "created": created, "estimate_bytes": size, "estimate_hours": hours}))
        return
    verb = "planned" if created else "already planned (same plan, nothing changed)"
    out.print(f"[bold]{sweep_dir}[/]: {verb}")
    out.print(
        f"  {summary.tiles:,} tiles at zoom {summary.zoom} in {summary.blocks:,} blocks at zoom {summary.block_zoom}, "
        f"area {summary.area_km2:,.1f} km2"
    )
    out.print(f"  estimate: {_human_bytes(size)} at {tile_kb:g} KB/tile, {_human_hours(hours)} at {rate:,.0f} tiles/s")


@app.command()
def status(
    sweep_dir: Path = typer.Argument(..., help="Sweep folder."),
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
def retry(
    sweep_dir: Path = typer.Argument(..., help="Sweep folder."),
    dead: bool = typer.Option(False, "--dead", help="Put dead blocks (too many failed attempts) back in the queue."),
) -> None:
    """Queue failed work again."""
    if not dead:
        raise UsageError("retry needs --dead (the only kind of work that is retried by hand)")
    with Sweep.open(sweep_dir) as sweep:
        n = sweep.queue.retry_dead()
    out.print(f"{n:,} dead blocks queued again")


def _print_status(sweep: Sweep, st: SweepStatus) -> None:
    table = Table(title=f"{sweep.path}  ({sweep.describe_plan()})", title_justify="left")
    table.add_column("state")
    table.add_column("blocks", justify="right")
    table.add_column("tiles", justify="right")
    table.add_column("share", justify="right")
    for state in ("pending", "leased", "done", "dead"):
        share = st.tiles[state] / st.tiles_total if st.tiles_total else 0.0
        table.add_row(state, f"{st.blocks[state]:,}", f"{st.tiles[state]:,}", f"{share:.1%}")
    table.add_row("[bold]total", f"[bold]{st.blocks_total:,}", f"[bold]{st.tiles_total:,}", "")
    out.print(table)
    retries = max(0, st.attempts_total - st.blocks["done"] - st.blocks["leased"] - st.blocks["dead"])
    eta = "-" if st.eta_s is None else _human_hours(st.eta_s / 3600)
    out.print(f"throughput {st.throughput:,.1f} tiles/s over the last {st.window_s:.0f} s, ETA {eta}, retried attempts {retries:,}")


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


def main() -> None:
    """Entry point of the ``tilesweep`` console script."""
    try:
        app()
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
