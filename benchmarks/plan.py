"""Planning benchmark: `tilesweep plan` vs supermercado `burn` on the same area.

Both run as subprocesses on the same GeoJSON polygon (a concave, country-sized shape near
latitude 47) at zoom 18; the table shows tiles, seconds, tiles/s and peak RSS of each.
tilesweep's time includes writing the durable queue (queue.sqlite) of blocks; supermercado
prints one line per tile, which we count and discard.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/plan.py               # 1M, 10M and 100M tiles
    .venv/bin/python benchmarks/plan.py --sizes 1 10  # millions of tiles

supermercado is given --timeout seconds (default 600) per run and shown as "timeout" past it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
# Shape at scale 1: a concave polygon of ~81M zoom-18 tiles (about 14 x 10 degrees).
SHAPE = [(0, 42), (14, 42), (14, 46), (8, 47), (13, 52), (0, 52), (3, 47)]
SHAPE_TILES_M = 81.2


def area_for(millions: float) -> dict:
    """The shape scaled about its centroid so that it holds about ``millions`` M tiles."""
    k = math.sqrt(millions / SHAPE_TILES_M)
    cx = sum(x for x, _ in SHAPE) / len(SHAPE)
    cy = sum(y for _, y in SHAPE) / len(SHAPE)
    ring = [[cx + (x - cx) * k, cy + (y - cy) * k] for x, y in SHAPE]
    ring.append(ring[0])
    return {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}


def run(cmd: list[str], timeout: float, stdin: Path | None = None, count_lines: bool = False) -> dict:
    """Run ``cmd`` in a child, return seconds, peak RSS (MB) of that child, and stdout lines."""
    # RUSAGE_CHILDREN is a high-water mark over all children: measure each run in a fresh
    # helper process so that runs do not see each other's peaks.
    code = f"""
import resource, subprocess, sys, threading, time, json
t = time.perf_counter()
lines = 0
with open({str(stdin)!r} if {stdin is not None!r} else "/dev/null", "rb") as fin:
    p = subprocess.Popen({cmd!r}, stdin=fin, stdout=subprocess.PIPE if {count_lines!r} else subprocess.DEVNULL)
    timer = threading.Timer({timeout!r}, p.kill)  # also stops a child still writing lines
    timer.start()
    if {count_lines!r}:
        for chunk in iter(lambda: p.stdout.read(1 << 20), b""):
            lines += chunk.count(b"\\n")
    rc = p.wait()
    rc = rc if timer.is_alive() else "timeout"
    timer.cancel()
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(dict(seconds=dt, rss_mb=rss, lines=lines, rc=rc)))
"""
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=timeout + 60)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100], help="area sizes in millions of tiles")
    ap.add_argument("--zoom", type=int, default=18)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--quick", action="store_true", help="one area of ~500 tiles: checks the script works, and exits 1 "
                    "when the plan failed or planned nothing (the test suite runs it)")
    ap.add_argument("--fractions", type=float, nargs="+", default=None, help="instead: blocks under sampling, fixed "
                    "zoom-14 cells against adaptive blocks at these fractions (benchmarks/blocks.py, part 1; issue 15)")
    args = ap.parse_args()
    if args.fractions:
        from blocks import plan_table, print_plan

        millions = max(args.sizes) if not args.quick else 2.0
        with tempfile.TemporaryDirectory() as tmp:
            print_plan(plan_table(Path(tmp), millions, args.fractions), millions)
        return
    if args.quick:
        args.sizes, args.timeout = [0.0005], 60.0
    burn = shutil.which("supermercado") or str(Path(PY).parent / "supermercado")
    have_burn = Path(burn).exists()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            area = Path(tmp) / f"area{size:g}.geojson"
            area.write_text(json.dumps(area_for(size)))
            sweep = Path(tmp) / f"sweep{size:g}"
            ours = run([PY, "-m", "tilesweep", "plan", str(area), str(sweep), "--zoom", str(args.zoom), "--json"], args.timeout)
            cfg = (sweep / "sweep.toml").read_text()
            tiles = int(next(l for l in cfg.splitlines() if l.startswith("tiles =")).split("=")[1])
            blocks = int(next(l for l in cfg.splitlines() if l.startswith("blocks =")).split("=")[1])
            shutil.rmtree(sweep)
            if args.quick and (ours["rc"] != 0 or not 100 <= tiles <= 2000 or blocks < 1):
                sys.exit(f"quick run: tilesweep plan gave rc {ours['rc']}, {tiles} tiles in {blocks} blocks")
            if have_burn:
                theirs = run([burn, "burn", str(args.zoom)], args.timeout, stdin=area, count_lines=True)
            else:
                theirs = None
            rows.append((size, tiles, blocks, ours, theirs))
            print(f"  done {size:g}M: {json.dumps(dict(tiles=tiles, ours=ours, theirs=theirs))}", file=sys.stderr, flush=True)
    print(f"\nPlanning at zoom {args.zoom}: tilesweep plan (incl. queue.sqlite) vs supermercado burn "
          f"(one line per tile). {os.cpu_count()} cores.\n")
    head = f"{'tiles':>12} {'blocks':>8} | {'tilesweep s':>11} {'tiles/s':>11} {'RSS MB':>7} | {'supermercado s':>14} {'tiles/s':>11} {'RSS MB':>7} | {'speed-up':>8}"
    print(head)
    print("-" * len(head))
    for size, tiles, blocks, ours, theirs in rows:
        line = f"{tiles:>12,} {blocks:>8,} | {ours['seconds']:>11.1f} {tiles / ours['seconds']:>11,.0f} {ours['rss_mb']:>7.0f} | "
        if theirs is None:
            line += f"{'not installed':>14} {'':>11} {'':>7} | {'':>8}"
        elif theirs["rc"] == "timeout":
            line += f"{'timeout':>14} {'':>11} {theirs['rss_mb']:>7.0f} | {'>' + format(args.timeout / ours['seconds'], '.0f') + 'x':>8}"
        else:
            if theirs["lines"] != tiles:
                print(f"note: supermercado gave {theirs['lines']:,} tiles, tilesweep {tiles:,}", file=sys.stderr)
            line += (f"{theirs['seconds']:>14.1f} {theirs['lines'] / theirs['seconds']:>11,.0f} {theirs['rss_mb']:>7.0f} | "
                     f"{theirs['seconds'] / ours['seconds']:>7.1f}x")
        print(line)


if __name__ == "__main__":
    main()
