"""Simulator rendering throughput on one core, and the server's throughput on a cached tile.

    python benchmarks/render.py [--tiles 200]

Prints tiles/s and ms/tile per encoding and tile size for zoom-18 tiles of the demo area
(a mix of tiles with and without towers), then requests/s of the loopback server for one
cached tile. Run by hand; CI never asserts on these numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np

from tilesweep.sim import SimServer, World, tilecache
from tilesweep.tiles import Tile, tile_at

AREA = (8.5, 47.3, 8.6, 47.4)


def sample_tiles(n: int, z: int = 18) -> list[Tile]:
    a, b = tile_at(AREA[0], AREA[3], z), tile_at(AREA[2], AREA[1], z)
    rng = np.random.default_rng(0)
    return [Tile(z, int(rng.integers(a.x, b.x + 1)), int(rng.integers(a.y, b.y + 1))) for _ in range(n)]


def bench_render(n: int) -> None:
    os.environ.pop(tilecache.ENV, None)  # measure rendering, never reads of the tile cache
    tiles = sample_tiles(n)
    print(f"{'encoding':<8} {'size':>5} {'tiles/s':>9} {'ms/tile':>8} {'KB/tile':>8}   ({n} zoom-18 tiles, one core)")
    w = World(0)
    w.render_array(tiles[0])  # warm the line cells of the area
    t0 = time.perf_counter()
    for t in tiles:
        w.render_array(t)
    dt = time.perf_counter() - t0
    print(f"{'(array)':<8} {256:>5} {n / dt:>9.1f} {1000 * dt / n:>8.2f} {'-':>8}")
    for size in (256, 512):
        for fmt in ("jpeg", "png", "webp"):
            t0 = time.perf_counter()
            total = 0
            for t in tiles:
                total += len(w.render(t, size, fmt))
            dt = time.perf_counter() - t0
            print(f"{fmt:<8} {size:>5} {n / dt:>9.1f} {1000 * dt / n:>8.2f} {total / n / 1000:>8.1f}")


async def bench_server(seconds: float = 3.0, concurrency: int = 32) -> None:
    import aiohttp

    async with SimServer(World(0)) as srv:
        url = f"{srv.url}/18/137316/91872.jpg"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
            async with s.get(url) as r:
                await r.read()
            done = 0
            stop = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    async with s.get(url) as r:
                        await r.read()
                    done += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            dt = time.perf_counter() - t0
    print(f"server, one cached tile, {concurrency} connections, client in the same process: {done / dt:,.0f} requests/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiles", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="6 tiles and a 1 s server run: checks the script works (the test suite runs it)")
    args = p.parse_args()
    if args.quick:
        args.tiles = 6
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    bench_render(args.tiles)
    asyncio.run(bench_server(1.0 if args.quick else 3.0))


if __name__ == "__main__":
    main()
