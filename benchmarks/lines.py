"""Power lines from a fraction of the tiles: full sweep vs samples, with and without densify.

Against the simulator's ground truth, on world seed 7 (the demo model was trained on seed
0 and never saw it), at zoom 18, over two areas (``AREAS``):

- ``dense``: the world's default line density, a ~3.8 x 3.9 km square with 21 lines
  (circuits) of 202 towers: 59 km of line on 15 km2, a tower every 8 tiles, the tiles the
  lines cross a third of the area (no sample + densify can fetch much less than that);
- ``realistic``: line density 0.15 (about 0.3 km of line per km2 over the world, as in
  Germany's HV grid), a ~6 x 6 km square with more lines than most: 12 lines of 86 towers,
  25 km of line on 37 km2, a tower every 40 tiles, the tiles the lines cross 7% of it;
- ``large`` (only with ``--area large``: 13,700 tiles to render): the same density, a
  12 x 12 km square around the realistic one, whose lines run longer inside it.

Every configuration is a real sweep, through the real commands:

    tilesweep plan AREA DIR --zoom 18 [--fraction F --seed 1]
    tilesweep run DIR --source SIM --model demo [--densify 2 | --densify 0 --densify-along]

(`run --densify` plans a densify round around the detections and runs it, until a round
finds no new tile). The simulator runs in this process with a cache that holds every tile
of the area, so each tile is rendered once, by the full sweep, and the samples cost
fetches and model time only. Then, per configuration:

- tiles fetched: tiles predicted, as a share of the area's tiles;
- tower recall: share of the tiles holding a true tower that the model labelled;
- line recall: share of the true lines' length within 50 m of a traced line
  (`tilesweep lines`, default settings); the true lines are the spans between
  consecutive towers of a line that both stand in the area;
- line precision: share of the traced lines' length within 50 m of a true line.

    .venv/bin/python benchmarks/lines.py                  # both areas; docs/img/lines-benchmark-AREA.png
    .venv/bin/python benchmarks/lines.py --area realistic # one of them
    .venv/bin/python benchmarks/lines.py --keep DIR       # keep the sweeps in DIR/AREA (a rerun re-traces them)
    .venv/bin/python benchmarks/lines.py --area large --configs 'full sweep,10% sample + along'  # some rows
    .venv/bin/python benchmarks/lines.py --quick          # ~100 tiles, 2 configurations: checks the script works

Results go to benchmarks/results/lines-AREA.json. About 10 minutes on two busy cores,
mostly rendering (TILESWEEP_SIM_CACHE=DIR keeps the rendered tiles for the next run).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from tilesweep.queue import SqliteQueue  # noqa: E402
from tilesweep.sim import World, run_in_thread  # noqa: E402
from tilesweep.tiles import ORIGIN_SHIFT_M, lnglat_to_xy, xy_to_lnglat  # noqa: E402
from tilesweep.traced import detection_points, sweep_lines  # noqa: E402

SEED = 7
BBOX = (8.55, 47.39, 8.60, 47.425)
DENSITY = 1.0
# (seed, line density, bbox, what it is): world seed 7, which the demo model never saw
AREAS = {
    "dense": (7, 1.0, (8.55, 47.39, 8.60, 47.425),
              "the world's default line density, an unusually busy square: 59 km of line on 15 km2, a tower every 8 tiles"),
    "realistic": (7, 0.15, (8.36, 47.255, 8.44, 47.31),
                  "line density 0.15 (about 0.3 km of line per km2 over the world, like Germany's HV grid), "
                  "a 6 x 6 km square with more lines than most: 25 km of line on 37 km2, a tower every 40 tiles"),
    "large": (7, 0.15, (8.28, 47.2, 8.44, 47.31),
              "line density 0.15, a 12 x 12 km square around the realistic one (lines cross more of it, so a sample "
              "touches more of them); not in the default run (13,700 tiles to render)"),
}
ZOOM = 18
NEAR_M = 50.0
DENSIFY = {"": [], "densify 2": ["--densify", 2], "along": ["--densify", 0, "--densify-along"]}
CONFIGS = [("full sweep", 1.0, ""), *[(f"{int(f * 100)}% sample", f, d) for f in (0.05, 0.10, 0.20) for d in DENSIFY]]
# --quick (tests/test_benchmarks_quick.py): a corner of the area, the full sweep and one densified sample
QUICK_BBOX = (8.55, 47.39, 8.5625, 47.3995)
QUICK_CONFIGS = [("full sweep", 1.0, ""), ("20% sample", 0.20, "along")]


def truth_lines(world: World) -> list[tuple[int, shapely.LineString]]:
    """The spans between consecutive standing towers of each line, both in the area, in
    lon/lat: (line_id, span)."""
    w, s, e, n = BBOX
    (x0, y1), (x1, y0) = lnglat_to_xy(w, s), lnglat_to_xy(e, n)
    X0, X1, Y0, Y1 = x0 + ORIGIN_SHIFT_M, x1 + ORIGIN_SHIFT_M, ORIGIN_SHIFT_M - y0, ORIGIN_SHIFT_M - y1
    box = shapely.box(w, s, e, n)
    out = []
    for ax, ay, bx, by, lid in world.lines.spans_in_box(X0, Y0, X1, Y1):
        a = xy_to_lnglat(ax - ORIGIN_SHIFT_M, ORIGIN_SHIFT_M - ay)
        b = xy_to_lnglat(bx - ORIGIN_SHIFT_M, ORIGIN_SHIFT_M - by)
        if box.contains(shapely.Point(a)) and box.contains(shapely.Point(b)):
            out.append((lid, shapely.LineString([a, b])))
    return out


def to_ground(geom: shapely.Geometry) -> shapely.Geometry:
    """lon/lat -> ground metres (Web-Mercator metres times cos of the area's latitude)."""
    k = math.cos(math.radians((BBOX[1] + BBOX[3]) / 2))

    def f(c: np.ndarray) -> np.ndarray:
        lon, lat = c[:, 0], c[:, 1]
        x = np.radians(lon) * 6378137.0
        y = np.log(np.tan(np.pi / 4 + np.radians(lat) / 2)) * 6378137.0
        return np.column_stack([x * k, y * k])

    return shapely.transform(geom, f)


def line_scores(truth: list[tuple[int, shapely.LineString]], traced: list[shapely.LineString]) -> tuple[float, float]:
    """(recall, precision) of traced lines against the true spans, within NEAR_M metres."""
    t = to_ground(shapely.MultiLineString([ln.coords for _, ln in truth]))
    if not traced:
        return 0.0, float("nan")
    g = to_ground(shapely.MultiLineString([ln.coords for ln in traced]))
    recall = shapely.intersection(t, g.buffer(NEAR_M)).length / t.length
    precision = shapely.intersection(g, t.buffer(NEAR_M)).length / g.length
    return float(recall), float(precision)


def tilesweep(*args: object) -> str:
    res = subprocess.run([sys.executable, "-m", "tilesweep", *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"tilesweep {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


def fetched_tiles(sweep: Path) -> list[tuple[int, int]]:
    with SqliteQueue(sweep / "queue.sqlite") as q:
        return [(t.x, t.y) for b in q.blocks() for t in b.tile_list(ZOOM)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, help="keep the sweeps in this folder (one sub-folder per area)")
    ap.add_argument("--area", choices=[*AREAS, "both"], default="both", help="which area (default both: dense and realistic)")
    ap.add_argument("--configs", help="only these configurations, comma-separated (e.g. 'full sweep,10%% sample + along')")
    ap.add_argument("--picture", type=Path, default=ROOT / "docs" / "img", help="folder of lines-benchmark-AREA.png")
    ap.add_argument("--json", type=Path, default=HERE / "results", help="folder of lines-AREA.json")
    ap.add_argument("--quick", action="store_true", help="a corner of the area (~100 tiles), the full sweep and a 20%% "
                    "sample with --densify 0 --densify-along (3 rounds at most); writes no results or picture; exits 1 when the full "
                    "sweep did not predict every tile of the area")
    args = ap.parse_args()
    if args.quick:
        return bench("quick", args, QUICK_BBOX, QUICK_CONFIGS, 3)
    configs = CONFIGS
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(",")}
        configs = [c for c in CONFIGS if c[0] + (f" + {c[2]}" if c[2] else "") in wanted]
        if not configs or configs[0][1] != 1.0:
            sys.exit(f"--configs {args.configs!r}: name 'full sweep' first, then any of the table's configurations")
    for name in ("dense", "realistic") if args.area == "both" else [args.area]:
        bench(name, args, None, configs, 40)


def bench(area_name: str, args: argparse.Namespace, bbox, configs, rounds: int) -> None:  # type: ignore[no-untyped-def]
    global BBOX, SEED, DENSITY
    SEED, DENSITY, BBOX, about = AREAS["dense" if area_name == "quick" else area_name]
    BBOX = bbox or BBOX
    print(f"\n{area_name}: {about}\n", flush=True)
    world = World(seed=SEED, line_density=DENSITY)
    truth = truth_lines(world)
    towers = world.towers(BBOX)
    tower_tiles = {(t.x, t.y) for t in (_tile(tw.lon, tw.lat) for tw in towers)}
    area = ",".join(map(str, BBOX))
    work = args.keep / area_name if args.keep else Path(tempfile.mkdtemp(prefix="lines-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    keep_for_picture = None
    with run_in_thread(world, cache_mb=1024) as sim:
        total = None
        for name, fraction, densify in configs:
            sweep = work / f"{name}{' ' + densify if densify else ''}".replace(" ", "-").replace("%", "pc").replace("+", "and")
            again = (sweep / "sweep.toml").exists()  # --keep: a sweep of an earlier run (another simulator port)
            if not again:
                plan = ["plan", area, sweep, "--zoom", ZOOM] + (["--fraction", fraction, "--seed", 1] if fraction < 1 else [])
                tilesweep(*plan)
            t0 = time.perf_counter()
            run = ["run", sweep, "--source", sim.template(), "--model", "demo", "--concurrency", 32, "--quiet",
                   *(["--replace-source", "--mix-sources"] if again else [])]
            tilesweep(*run, *(DENSIFY[densify] + ["--densify-rounds", rounds] if densify else []))
            seconds = time.perf_counter() - t0
            tiles = fetched_tiles(sweep)
            total = len(tiles) if fraction == 1.0 else total
            lon, lat, score, _ = detection_points(sweep)
            det_tiles = {(t.x, t.y) for t in (_tile(a, b) for a, b in zip(lon, lat))}
            lines, _, _ = sweep_lines(sweep)
            recall, precision = line_scores(truth, [ln.geometry for ln in lines])
            status = json.loads(tilesweep("status", sweep, "--json"))
            rows.append({
                "config": name + (f" + {densify}" if densify else ""), "fraction": fraction, "densify": densify,
                "tiles": len(tiles), "share": len(tiles) / total if total else float("nan"),
                "rounds": len(status["densify"]), "tower_recall": len(det_tiles & tower_tiles) / len(tower_tiles),
                "sampled_corridors": sampled_corridors(towers, fraction),
                "detections": len(det_tiles), "lines": len(lines), "line_recall": recall, "line_precision": precision,
                "seconds": round(seconds, 1),
            })
            print(_row(rows[-1]), flush=True)
            if fraction == 0.10 and densify == "along":
                keep_for_picture = (tiles, lines, det_tiles)
    print()
    print(table(rows, len(truth), len(towers), total or 0))
    if args.quick:
        w, s, e, n = BBOX
        from tilesweep.tiles import tile_at

        lo, hi = tile_at(w, n, ZOOM), tile_at(e, s, ZOOM)
        if not total or total != (hi.x - lo.x + 1) * (hi.y - lo.y + 1):
            sys.exit(f"the full sweep predicted {total} tiles, not the area's")
        return
    args.json.mkdir(parents=True, exist_ok=True)
    (args.json / f"lines-{area_name}.json").write_text(json.dumps({
        "seed": SEED, "line_density": DENSITY, "bbox": BBOX, "zoom": ZOOM, "area_tiles": total, "towers": len(towers),
        "true_spans": len(truth), "rows": rows}, indent=1))
    if keep_for_picture is not None:
        picture(args.picture / f"lines-benchmark-{area_name}.png", truth, *keep_for_picture)


def _tile(lon: float, lat: float):  # type: ignore[no-untyped-def]
    from tilesweep.tiles import tile_at

    return tile_at(lon, lat, ZOOM)


def sampled_corridors(towers, fraction: float) -> float:  # type: ignore[no-untyped-def]
    """Share of the area's towers on a corridor (its 1..3 circuits) with a tower tile in
    the plan's sample (seed 1): the towers a densify that follows lines can reach at all."""
    from tilesweep.plan import tile_hash

    hit = {tw.line_id // 4 for tw in towers
           if fraction >= 1 or tile_hash(1, _tile(tw.lon, tw.lat)) < fraction * 2**64}
    return sum(tw.line_id // 4 in hit for tw in towers) / len(towers)


def _row(r: dict) -> str:  # type: ignore[type-arg]
    return (f"| {r['config']} | {r['tiles']:,} ({r['share']:.0%}) | {r['rounds']} | {r['sampled_corridors']:.2f} | {r['tower_recall']:.2f} | "
            f"{r['lines']} | {r['line_recall']:.2f} | {r['line_precision']:.2f} |")


def table(rows: list[dict], spans: int, towers: int, total: int) -> str:  # type: ignore[type-arg]
    head = (f"World seed {SEED}, line density {DENSITY:g}, area {','.join(map(str, BBOX))} at zoom {ZOOM}: {total:,} tiles, {towers} towers, "
            f"{spans} true spans; lines within {NEAR_M:.0f} m.\n\n"
            "| configuration | tiles fetched | densify rounds | towers on a sampled corridor | tower recall | traced lines | line recall | line precision |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *(_row(r) for r in rows)])


def picture(path: Path, truth, tiles, lines, det_tiles) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    from tilesweep.tiles import Tile, bounds

    fig, ax = plt.subplots(figsize=(8, 8 * (BBOX[3] - BBOX[1]) / (BBOX[2] - BBOX[0]) / math.cos(math.radians(47.4))))
    rects, hits = [], []
    for x, y in tiles:
        w, s, e, n = bounds(Tile(ZOOM, x, y))
        (hits if (x, y) in det_tiles else rects).append(Rectangle((w, s), e - w, n - s))
    ax.add_collection(PatchCollection(rects, facecolor="#c6dbef", edgecolor="none"))
    ax.add_collection(PatchCollection(hits, facecolor="#fd8d3c", edgecolor="none"))
    for i, (_, ln) in enumerate(truth):
        xs, ys = ln.xy
        ax.plot(xs, ys, color="black", lw=1.2, label="true lines" if i == 0 else None)
    for i, ln in enumerate(lines):
        xs, ys = ln.geometry.xy
        ax.plot(xs, ys, color="#e7298a", lw=2.2, alpha=0.8, label="traced lines" if i == 0 else None)
    ax.plot([], [], "s", color="#c6dbef", label=f"tiles fetched ({len(tiles):,})")
    ax.plot([], [], "s", color="#fd8d3c", label="tiles with a detection")
    ax.set_xlim(BBOX[0], BBOX[2])
    ax.set_ylim(BBOX[1], BBOX[3])
    ax.set_aspect(1 / math.cos(math.radians(47.4)))
    ax.set_title(f"10% sample + run --densify 0 --densify-along, world seed {SEED}, line density {DENSITY:g}")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"picture: {path}")


if __name__ == "__main__":
    main()
