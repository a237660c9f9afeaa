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


def lines(
    sweep_dir: Path = typer.Argument(..., help="Sweep folder with predictions."),
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
    out.print(f"wrote {report.lines:,} lines joining {report.towers:,} towers ({report.detections:,} detections of "
              f"{report.model}, {rule}) to {output} in {report.seconds:.2f} s", highlight=False)
