"""`make demo`: a real sweep from a fresh clone, against the built-in imagery simulator.

Run as ``python -m tilesweep.demo [--dir DIR]``. It starts the simulator on loopback (with
a few injected server faults, as a real provider has), then runs the very ``tilesweep``
commands a user types, printing each one before its output: plan, run (tiles stream from
the simulator into the shipped demo model, which looks for power towers), status. Last it
scores the predictions against the simulator's ground truth. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from .sim import Faults, World, run_in_thread
from .sweep import PREDICTIONS_DIR, SWEEP_FILE
from .tiles import Tile

DEMO_BBOX = "8.490,47.330,8.550,47.370"  # ~4.5 x 4.4 km: 1,936 zoom-18 tiles, 183 with a tower
DEMO_ZOOM = 18
DEMO_SEED = 5  # a world the demo model never saw (it was trained on world seed 0)
DEMO_FAULTS = Faults(http_503=0.03, http_429=0.02, reset=0.02, truncate=0.01, retry_after=0.2, latency_ms=20, jitter_ms=40, seed=1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="demo-sweep", help="sweep folder (re-created on each run)")
    ap.add_argument("--seed", type=int, default=DEMO_SEED, help="world seed of the simulator")
    args = ap.parse_args(argv)
    console = Console()
    folder = Path(args.dir)
    if (folder / SWEEP_FILE).exists():
        shutil.rmtree(folder)  # only ever a folder the demo made: it holds a sweep.toml
    elif folder.exists() and any(folder.iterdir()):
        console.print(f"[red]{folder} exists and is not a demo sweep; pass --dir to choose another folder")
        sys.exit(2)

    started = time.perf_counter()
    with run_in_thread(World(seed=args.seed), DEMO_FAULTS) as sim:
        console.print(
            f"imagery simulator on {sim.url} (world seed {args.seed}); it injects 503, 429, resets and "
            "truncated bodies into ~8% of answers, like a real provider on a bad day"
        )
        steps = [
            ("plan: area + zoom -> blocks of tiles in a durable queue", ["plan", DEMO_BBOX, folder, "--zoom", DEMO_ZOOM]),
            ("run: tiles stream (with retries) through decoding into the demo model, which looks for power towers",
             ["run", folder, "--source", sim.template(), "--model", "demo", "--concurrency", 64]),
            ("status: every planned tile accounted for", ["status", folder]),
        ]
        for title, cmd in steps:
            console.rule(title)
            words = ["tilesweep", *map(str, cmd)]
            console.print(f"[bold]$ {shlex.join(words)}", highlight=False)
            res = subprocess.run([sys.executable, "-m", "tilesweep", *map(str, cmd)])
            if res.returncode != 0:
                console.print(f"[red]step failed with exit status {res.returncode}")
                sys.exit(res.returncode)
        served = dict(sim.stats)
    console.rule("the predictions against the simulator's ground truth")
    _score(console, folder, World(seed=args.seed))
    console.rule("done")
    faults = sum(v for k, v in served.items() if k not in ("requests", "ok", "renders", "cache_hits", "not_found"))
    console.print(
        f"the simulator answered {served.get('requests', 0):,} requests, {faults:,} of them with a fault; "
        f"every tile was scored once and none was stored. Sweep folder: {folder}/ (sweep.toml, queue.sqlite, "
        f"{PREDICTIONS_DIR}/). {time.perf_counter() - started:.0f} s in all.",
        highlight=False,
    )
    console.print(
        "To keep the tiles too: `tilesweep run ... --keep-tiles`, then `tilesweep tiles stats` and "
        "`tilesweep export SWEEP tiles.pmtiles` (README: the 2-minute tour).",
        highlight=False,
    )
    port = sim.url.rsplit(":", 1)[1]
    console.print(
        "To see the sweep on a map (imagery comes from its source, the simulator: start it again on the same port first):\n"
        f"  $ tilesweep sim serve --port {port} --seed {args.seed} &\n"
        f"  $ tilesweep view {shlex.quote(str(folder))} --open",
        highlight=False,
    )


def _score(console: Console, folder: Path, world: World) -> None:
    """Precision and recall of the predictions in ``folder`` against ``world``'s towers:
    a tile holds a tower iff a tower's centre lies in it (the rule the model learnt)."""
    import pyarrow.dataset as ds

    parts = sorted((folder / PREDICTIONS_DIR).glob("*/part-*.parquet"))
    table = ds.dataset(parts, format="parquet").to_table(columns=["z", "x", "y", "label"])
    rows = table.to_pydict()
    tp = fp = fn = 0
    for z, x, y, label in zip(rows["z"], rows["x"], rows["y"], rows["label"]):
        truth = world.tile_has_tower(Tile(z, x, y))
        tp += bool(label) and truth
        fp += bool(label) and not truth
        fn += (not label) and truth
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    console.print(
        f"{table.num_rows:,} tiles scored in {len(parts)} Parquet part(s) under {folder / PREDICTIONS_DIR}/; "
        f"{tp + fp:,} predicted to hold a tower, {tp + fn:,} truly do.\n"
        f"precision {precision:.3f} ({tp} of {tp + fp} right), recall {recall:.3f} ({tp} of {tp + fn} found)",
        highlight=False,
    )


if __name__ == "__main__":
    main()
