"""`make demo`: a real sweep from a fresh clone, against the built-in imagery simulator.

Run as ``python -m tilesweep.demo [--dir DIR]``. Every step calls the same public API as the
``tilesweep`` command and prints what it did.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rich.console import Console

from .area import parse_bbox
from .plan import PlanSpec
from .sweep import SWEEP_FILE, Sweep

DEMO_BBOX = "7.430,46.940,7.460,46.960"  # ~2.3 x 2.2 km: a few hundred zoom-18 tiles
DEMO_ZOOM = 18


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="demo-sweep", help="sweep folder (re-created on each run)")
    args = ap.parse_args(argv)
    console = Console()
    folder = Path(args.dir)
    if (folder / SWEEP_FILE).exists():
        shutil.rmtree(folder)  # only ever a folder the demo made: it holds a sweep.toml

    console.rule("1. plan")
    console.print(f"$ tilesweep plan {DEMO_BBOX} {folder} --zoom {DEMO_ZOOM}")
    area = parse_bbox(DEMO_BBOX)
    sweep, _ = Sweep.plan(folder, area, PlanSpec(zoom=DEMO_ZOOM))
    s = sweep.summary()
    console.print(f"{s.tiles:,} tiles in {s.blocks:,} blocks, {s.area_km2:.2f} km2")

    console.rule("2. status")
    console.print(f"$ tilesweep status {folder}")
    from .cli import _print_status

    _print_status(sweep, sweep.status())
    sweep.close()


if __name__ == "__main__":
    main()
