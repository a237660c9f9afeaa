"""The power-line commands of ``tilesweep``: ``lines`` (trace detections into polylines)
and ``densify`` (plan the neighbours of detections).

Registered on the main app by :func:`register` (one line in :mod:`tilesweep.cli`). Bad
input raises :class:`tilesweep.errors.UsageError` (one line, exit 2) before any output
file exists or any block is planned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

out = Console()

MODEL_HELP = "The model (its name in `tilesweep status`); default: the only one."
THRESHOLD_HELP = "Score in 0..1 at or above which a tile is a detection; default: the model's own label."


def register(app: typer.Typer) -> None:
    """Add `lines` and `densify` to ``app``."""
    app.command("lines")(lines)
    app.command("densify")(densify)


def lines(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL with predictions."),
    output: Path = typer.Option(..., "--output", "-o", help="A .geojson (RFC 7946) or .parquet (GeoParquet 1.1) file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    threshold: Optional[float] = typer.Option(None, "--threshold", help=THRESHOLD_HELP),
    min_towers: int = typer.Option(3, "--min-towers", help="Towers a line needs (>= 2)."),
) -> None:
    """Join a model's detections into power lines: polylines through towers spaced evenly
    along near-straight paths, with a confidence per line (0..1).

    Properties: line (rank, 0 = most confident), towers, length_m, mean_score, confidence, model."""
    from .trace import TraceSettings
    from .traced import export_lines

    report = export_lines(sweep_dir, output, model=model, threshold=threshold, settings=TraceSettings(min_towers=min_towers))
    rule = "its own label" if report.threshold is None else f"score >= {report.threshold:g}"
    out.print(f"wrote {report.lines:,} lines ({report.towers:,} towers on them) from {report.detections:,} detections of "
              f"{report.model} ({rule}) to {output} in {report.seconds:.2f} s", highlight=False)


def densify(
    sweep_dir: str = typer.Argument(..., help="Sweep folder or URL with predictions."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    threshold: Optional[float] = typer.Option(None, "--threshold", help=THRESHOLD_HELP),
    radius: int = typer.Option(1, "--radius", "-r", help="Add the tiles within this many tiles of each detection (0..16)."),
    along: bool = typer.Option(False, "--along", help="Follow lines: also the tiles within half a tile of the line through two detections one tower spacing apart (200..600 m), drawn one spacing past each, a ring of tiles 300..400 m out around a detection with no such partner, and the part of it within 25 degrees ahead of a line's end."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Plan nothing once the sweep has this many densify rounds."),
) -> None:
    """Plan one densify round: the unplanned tiles around a model's detections become new
    blocks in the queue (`tilesweep run` fetches and predicts them; `status` lists rounds).

    The same sweep and predictions give the same tiles. A round cut short (a kill) is
    completed by the next densify."""
    from .densify import DensifySettings
    from .densify import densify as plan_densify
    from .sweep import Sweep
    from .sweeplock import SweepLock

    settings = DensifySettings(radius=radius, along=along)
    with Sweep.open(sweep_dir) as sweep, SweepLock(sweep.path, "run"):
        report = plan_densify(sweep, model, threshold, settings, rounds)
    if report.completed:
        out.print(f"completed an earlier round cut short: {report.completed:,} blocks queued", highlight=False)
    if report.tiles:
        out.print(f"densify round {report.round}: {report.tiles:,} new tiles in {report.blocks:,} blocks around "
                  f"{report.detections:,} detections; `tilesweep run {sweep_dir}` fetches them", highlight=False)
    else:
        out.print(f"no new tiles to plan ({report.detections:,} detections, {report.round} rounds so far)", highlight=False)


def run_rounds(sweep, model: str, threshold: Optional[float], radius: Optional[int], along: bool, max_rounds: int,  # type: ignore[no-untyped-def]
               run_once) -> None:
    """`run --densify R`: ``run_once()``, then a densify round around the detections, and
    run again, until a round plans no new tile or the sweep has ``max_rounds`` rounds.
    Without ``radius``, just ``run_once()``. Settings are checked before the first run."""
    if radius is None:
        run_once()
        return
    from .densify import DensifySettings, densify

    settings = DensifySettings(radius=radius, along=along)
    if max_rounds < 1:
        from .errors import UsageError

        raise UsageError(f"densify rounds {max_rounds} must be at least 1")
    while True:
        run_once()
        report = densify(sweep, model, threshold, settings, max_rounds)
        if report.completed:
            out.print(f"completed an earlier densify round cut short: {report.completed:,} blocks queued", highlight=False)
        if not report.tiles and not report.completed:
            out.print(f"densify: no new tiles around {report.detections:,} detections after {report.round} rounds", highlight=False)
            return
        if report.tiles:
            out.print(f"densify round {report.round}: {report.tiles:,} new tiles in {report.blocks:,} blocks around "
                      f"{report.detections:,} detections", highlight=False)
