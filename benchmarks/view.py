"""Viewer benchmark: overlay tiles over a 10-million-row predictions table, p50 / p99.

Plans a zoom-18 sweep of about N million tiles, writes synthetic predictions for every
tile through the real :class:`tilesweep.predict.PredictionSink` (Parquet parts, ledger;
scores: 98% low, 2% high, in clusters), then starts the real viewer server on loopback
and asks for overlay tiles over HTTP, one at a time, at every zoom from the whole area
down to single tiles: random tiles of the area at each zoom. Prints the cache build time
and, per zoom, what each tile holds and p50 / p99 / max milliseconds per tile (cold: the
first request of each tile; the server caches nothing per tile, the browser would).

    .venv/bin/python benchmarks/view.py            # 10M rows
    .venv/bin/python benchmarks/view.py --quick    # 1M rows
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tilesweep.area import parse_bbox
from tilesweep.plan import PlanSpec
from tilesweep.predict import BlockRows, PredictionSink
from tilesweep.sweep import Sweep
from tilesweep.tiles import tile_at
from tilesweep.view.server import Viewer, serve

ZOOM = 18


def bbox_for(millions: float) -> str:
    # ~1.37e-3 deg per zoom-18 tile in lon; ~0.93e-3 in lat near 47N.
    side = (millions * 1e6) ** 0.5
    w, s = 8.0, 46.0
    return f"{w},{s},{w + side * 1.373e-3:.5f},{s + side * 0.94e-3:.5f}"


def build(folder: Path, millions: float) -> tuple[Sweep, float]:
    t0 = time.perf_counter()
    sweep, _ = Sweep.plan(folder, parse_bbox(bbox_for(millions)), PlanSpec(zoom=ZOOM, block_zoom=ZOOM - 4))
    rng = np.random.default_rng(0)
    db = sweep.queue._db
    rows = db.execute("SELECT id, z, x, y FROM blocks").fetchall()
    d = ZOOM - sweep.block_zoom
    n = 1 << d
    gx, gy = np.meshgrid(np.arange(n), np.arange(n))
    gx, gy = gx.ravel(), gy.ravel()
    total = 0
    with PredictionSink(folder, ZOOM, "bench", "0" * 64, ["tower"], 0.5, part_rows=65536, part_seconds=1e9) as sink:
        for bid, bz, bx, by in rows:
            hot = rng.random() < 0.05  # a block with towers: 40% of its tiles score high
            p = 0.4 if hot else 0.001
            s = np.where(rng.random(n * n) < p, rng.uniform(0.5, 1.0, n * n), rng.beta(1, 30, n * n)).astype(np.float32)
            sink.add(BlockRows(bid, bz, (bx << d) + gx, (by << d) + gy, s[:, None], 0, 0, time.time()))
            total += n * n
        sink.commit()
    print(f"wrote {total:,} prediction rows in {sink.stats.parts} parts ({sink.stats.bytes / 1e6:.0f} MB) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return sweep, float(total)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M rows instead of 10M")
    ap.add_argument("--millions", type=float, default=None)
    ap.add_argument("--tiles", type=int, default=60, help="tiles asked per zoom")
    ap.add_argument("--dir", default=None, help="keep the sweep here (default: a temp folder)")
    args = ap.parse_args(argv)
    millions = args.millions or (1.0 if args.quick else 10.0)
    tmp = tempfile.TemporaryDirectory(prefix="tilesweep-bench-view-")
    folder = Path(args.dir) if args.dir else Path(tmp.name) / "sweep"
    if not (folder / "sweep.toml").exists():
        build(folder, millions)
    viewer = Viewer(folder)
    model = viewer.overlay.models[0].folder
    t0 = time.perf_counter()
    viewer.overlay.refresh(model, force=True)
    print(f"overlay cache built in {time.perf_counter() - t0:.1f} s (DuckDB, out of core; first request waits for it)", flush=True)

    ready = threading.Event()
    url: list[str] = []
    stop_holder: list[asyncio.Event] = []
    loop = asyncio.new_event_loop()

    async def run() -> None:
        stop = asyncio.Event()
        stop_holder.append(stop)
        await serve(viewer, "127.0.0.1", 0, lambda u: (url.append(u), ready.set()), stop)

    th = threading.Thread(target=lambda: loop.run_until_complete(run()), daemon=True)
    th.start()
    ready.wait(30)
    host, port = url[0].split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    W, S, E, N = viewer.bbox
    rng = random.Random(1)
    print(f"\n{'zoom':>4} {'kind':>8} {'features':>9} {'KB':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    all_ms: list[float] = []
    for z in range(max(0, ZOOM - 14), ZOOM + 1):
        a, b = tile_at(W, N, z), tile_at(E, S, z)
        tiles = {(rng.randint(a.x, b.x), rng.randint(a.y, b.y)) for _ in range(args.tiles)}
        ms, sizes = [], []
        for x, y in tiles:
            t = time.perf_counter()
            conn.request("GET", f"/overlay/{model}/{z}/{x}/{y}.mvt?t=0.5")
            r = conn.getresponse()
            body = r.read()
            ms.append((time.perf_counter() - t) * 1000)
            assert r.status == 200, (r.status, body[:200])
            sizes.append(len(body))
        all_ms += ms
        kind = "squares" if ZOOM - z <= 5 else ("cells" if ZOOM - z <= 8 else "pyramid")
        feats = _features(body)
        print(f"{z:>4} {kind:>8} {feats:>9,} {np.mean(sizes) / 1000:>6.1f} {np.percentile(ms, 50):>7.1f} "
              f"{np.percentile(ms, 99):>7.1f} {max(ms):>7.1f}", flush=True)
    print(f"\nall {len(all_ms)} tiles: p50 {np.percentile(all_ms, 50):.1f} ms, p99 {np.percentile(all_ms, 99):.1f} ms "
          f"({millions:g}M prediction rows; {sys.platform}, one request at a time)")
    loop.call_soon_threadsafe(stop_holder[0].set)
    th.join(30)


def _features(body: bytes) -> int:
    """Features in the last tile: exact for tilesweep.view.mvt, whose every feature holds
    the geometry type field (0x18 0x03: POLYGON) right before its geometry (0x22)."""
    return body.count(b"\x18\x03\x22")


if __name__ == "__main__":
    main()
