"""Queue benchmark (named queue_bench.py: a benchmarks/queue.py would shadow the standard
library's `queue` for every script run from this folder): lease + ack throughput of the SQLite block queue with 1, 2 and 8
processes, leasing 1 or 16 blocks at a time, beside the way teams track progress without a
queue: one marker file per finished tile in a folder (then listed to find what is left).

Each worker process loops lease(batch) -> ack(batch) until the queue is empty; no real
work is done, so the numbers are the queue's own ceiling. Blocks hold 256 tiles (zoom 18
tiles in zoom 14 blocks), so tiles/s = 256 x blocks/s.

    .venv/bin/python benchmarks/queue_bench.py               # 20,000 blocks (5.1M tiles)
    .venv/bin/python benchmarks/queue_bench.py --blocks 5000
"""

from __future__ import annotations

import sys
from pathlib import Path

# This script is named like the standard library's `queue`, which multiprocessing imports:
# keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import multiprocessing as mp
import os
import random
import resource
import shutil
import tempfile
import time

from rich.console import Console
from rich.table import Table

from tilesweep.queue import Block, BlockResult, SqliteQueue

TILES_PER_BLOCK = 256


def fill(path: Path, n: int) -> None:
    rng = random.Random(0)
    with SqliteQueue(path) as q:
        q.put((Block(14, i % 4096, i // 4096, TILES_PER_BLOCK), rng.randrange(1 << 40)) for i in range(n))


def worker(path: str, owner: str, batch: int, start: mp.Event, out: mp.Queue) -> None:
    start.wait()
    done = 0
    with SqliteQueue(path) as q:
        while leases := q.lease(batch, ttl=600, owner=owner):
            ids = [lease.block.id for lease in leases]
            q.ack(ids, {i: BlockResult(TILES_PER_BLOCK, 0, 0, 0) for i in ids})
            done += len(ids)
    out.put((done, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run_queue(tmp: Path, blocks: int, procs: int, batch: int) -> dict:
    path = tmp / f"q-{procs}-{batch}.sqlite"
    fill(path, blocks)
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(str(path), f"w{i}", batch, start, out)) for i in range(procs)]
    for p in ps:
        p.start()
    time.sleep(1.0)  # let the interpreters start before the clock does
    t = time.perf_counter()
    start.set()
    results = [out.get() for _ in ps]
    elapsed = time.perf_counter() - t
    for p in ps:
        p.join()
    assert sum(r[0] for r in results) == blocks, "blocks lost or done twice"
    return {"s": elapsed, "blocks": blocks, "rss": max(r[1] for r in results)}


def run_markers(tmp: Path, blocks: int) -> dict:
    """One marker file per done tile, then a listing to find what is left (one process)."""
    folder = tmp / "done"
    folder.mkdir()
    tiles = blocks * TILES_PER_BLOCK
    t = time.perf_counter()
    for i in range(tiles):
        (folder / f"18_{i}.done").touch()
    left = tiles - sum(1 for _ in os.scandir(folder))
    elapsed = time.perf_counter() - t
    assert left == 0
    shutil.rmtree(folder)
    return {"s": elapsed, "tiles": tiles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=20_000)
    ap.add_argument("--marker-blocks", type=int, default=400, help="blocks for the marker-file baseline")
    ap.add_argument("--quick", action="store_true", help="300 blocks, 4 for the baseline, 1 and 2 processes at batch 16: checks the "
                    "script works (the test suite runs it)")
    a = ap.parse_args()
    if a.quick:
        a.blocks, a.marker_blocks = 300, 4
    con = Console()
    with tempfile.TemporaryDirectory(prefix="tilesweep-bench-") as d:
        tmp = Path(d)
        markers = run_markers(tmp, a.marker_blocks)
        marker_tps = markers["tiles"] / markers["s"]
        table = Table(title=f"queue: lease + ack, {a.blocks:,} blocks of {TILES_PER_BLOCK} tiles, {os.cpu_count()} cores")
        for col in ("processes", "batch", "blocks/s", "tiles/s", "peak RSS / process", "vs marker files"):
            table.add_column(col, justify="right")
        for procs in (1, 2) if a.quick else (1, 2, 8):
            for batch in (16,) if a.quick else (1, 16):
                r = run_queue(tmp, a.blocks, procs, batch)
                bps = r["blocks"] / r["s"]
                table.add_row(
                    str(procs), str(batch), f"{bps:,.0f}", f"{bps * TILES_PER_BLOCK:,.0f}",
                    f"{r['rss']:.0f} MB", f"{bps * TILES_PER_BLOCK / marker_tps:,.1f}x",
                )
        table.add_row("1", "-", "-", f"{marker_tps:,.0f}", "-", "1.0x (one marker file per tile)")
        con.print(table)


if __name__ == "__main__":
    main()
