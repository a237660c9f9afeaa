"""Scale-out benchmark, the queue part (issue 11): lease + ack blocks/s with 1, 2, 4 and 8
worker processes on each queue backend, SQLite (one file) and PostgreSQL (a server).

Each process opens the queue with ``open_queue(url)`` and loops lease(batch) -> ack(batch,
results) until the queue is empty; no real work is done, so the numbers are the queue's own
ceiling (a worker needs one lease and one ack per ``batch`` blocks of up to 256 tiles).
Time runs from the moment every process is connected to the last ack. Without ``--pg``, a
throwaway PostgreSQL is started on 127.0.0.1 (Debian's binaries, tests/helpers/pgserver.py).

    .venv/bin/python benchmarks/scale.py                      # 4,000 blocks per run
    .venv/bin/python benchmarks/scale.py --blocks 20000 --pg postgresql://me@db:5432/bench
    .venv/bin/python benchmarks/scale.py --quick              # 300 blocks, 1 and 2 processes

Every run checks that each block was leased and acked exactly once (none lost, none done
twice) and that the queue then counts them all done; the script exits 1 when one did not.

``--fetch N``: the full fetch instead, from nginx on loopback answering every path with one
JPEG (benchmarks/blocks.py's server), of a dense N-tile zoom-18 plan on the SQLite queue:
``tilesweep fetch --workers P`` against ``tilesweep fetch --dask local:P`` (the same loops
as Dask tasks; ``-c`` is the total in flight, split per loop), start-up included, wall
seconds and tiles/s per loop, one run each.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tilesweep.queue import Block, BlockResult, State, open_queue, stage_queue

TILES_PER_BLOCK = 256


def fill(url: str, base: Path, n: int) -> str:
    staged = stage_queue(url, base)
    rng = random.Random(0)
    staged.queue.put((Block(14, i % 4096, i // 4096, TILES_PER_BLOCK), rng.randrange(1 << 40)) for i in range(n))
    staged.publish()
    return staged.url


def worker(url: str, owner: str, batch: int, ready: mp.Barrier, out: mp.Queue) -> None:  # type: ignore[type-arg]
    with open_queue(url) as q:
        q.count(0)  # type: ignore[arg-type]  # connected before the clock starts
        ready.wait()
        done: list[int] = []
        while leases := q.lease(batch, ttl=600, owner=owner):
            ids = [lease.block.id for lease in leases]
            q.ack(ids, {i: BlockResult(TILES_PER_BLOCK, 0, 0, 0, 0, 1) for i in ids})
            done.extend(ids)
    out.put((done, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run(url: str, procs: int, batch: int) -> dict[str, float]:
    """One run: ``procs`` processes drain the queue at ``url``. ``lost`` and ``twice``:
    blocks of the queue never acked, and blocks acked by more than one lease (both must be 0)."""
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(procs + 1)
    out = ctx.Queue()
    ps = [ctx.Process(target=worker, args=(url, f"w{i}", batch, ready, out)) for i in range(procs)]
    for p in ps:
        p.start()
    ready.wait()
    started = time.perf_counter()
    results = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
    wall = max(r[1] for r in results) - started
    acked = [i for r in results for i in r[0]]
    with open_queue(url) as q:
        planned = {b.id for b in q.blocks()}
        done = q.count(State.DONE)
    lost = len(planned - set(acked)) + (len(planned) - done)
    twice = len(acked) - len(set(acked))
    blocks = len(acked)
    return {"blocks": blocks, "wall": wall, "rate": blocks / wall, "rss": max(r[2] for r in results),
            "lost": lost, "twice": twice}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=4000, help="blocks per run (default 4000)")
    ap.add_argument("--batch", type=int, default=4, help="blocks per lease and ack (default 4)")
    ap.add_argument("--procs", default="1,2,4,8", help="process counts (default 1,2,4,8)")
    ap.add_argument("--quick", action="store_true", help="300 blocks, 1 and 2 processes (a few seconds; the test suite runs it)")
    ap.add_argument("--pg", help="a PostgreSQL URL to use (password from PGPASSWORD / ~/.pgpass); default: start one")
    ap.add_argument("--fetch", type=int, default=0, help="tiles of a full fetch from nginx instead (see the doc)")
    ap.add_argument("-c", "--concurrency", type=int, default=256, help="--fetch: requests in flight in all (default 256)")
    a = ap.parse_args()
    if a.quick:
        a.blocks, a.procs = 300, "1,2"
    counts = [int(x) for x in a.procs.split(",")]
    if a.fetch:
        fetch_table(a.fetch, counts, a.concurrency)
        return
    console = Console()
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="tilesweep-scale-"))
    pg = a.pg
    if pg is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers.pgserver import PASSWORD, PgServer, _bin

        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb and pg_ctl:
            server = PgServer(initdb, pg_ctl)
            server.init()
            os.environ["PGPASSWORD"] = PASSWORD
            pg = server.url()
        else:
            console.print("PostgreSQL skipped: no PostgreSQL binaries (apt-get install postgresql) and no --pg: SQLite only")
    table = Table(title=f"lease + ack, {a.blocks:,} blocks of {TILES_PER_BLOCK} tiles, {a.batch} blocks per lease "
                        f"({os.cpu_count()} CPUs)")
    for col in ("backend", "processes", "blocks/s", "tiles/s", "x 1 process", "wall s", "peak RSS MB", "lost", "twice"):
        table.add_column(col, justify="right" if col not in ("backend",) else "left")
    bad = []
    try:
        backends = [("sqlite", "sqlite:///" + str(tmp / "q-{n}.sqlite").lstrip("/"))]
        if pg is not None:
            backends.append(("postgresql", pg))
        for name, template in backends:
            one = None
            for n in counts:
                url = fill(template.format(n=n) if name == "sqlite" else template, tmp, a.blocks)
                r = run(url, n, a.batch)
                if r["lost"] or r["twice"] or r["blocks"] != a.blocks:
                    bad.append(f"{name}, {n} processes: {r['blocks']} of {a.blocks} blocks acked, "
                               f"{r['lost']} lost, {r['twice']} done twice")
                one = one or r["rate"]
                table.add_row(name, str(n), f"{r['rate']:,.0f}", f"{r['rate'] * TILES_PER_BLOCK:,.0f}",
                              f"{r['rate'] / one:.2f}", f"{r['wall']:.2f}", f"{r['rss']:.0f}",
                              str(r["lost"]), str(r["twice"]))
        console.print(table)
        for line in bad:
            print(f"FAILED: {line}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            shutil.rmtree(server.root, ignore_errors=True)
    if bad:
        sys.exit(1)


def fetch_table(n_tiles: int, counts: list[int], concurrency: int) -> None:
    """``fetch --workers P`` vs ``fetch --dask local:P`` from nginx (see the module doc)."""
    import json
    import shutil
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from blocks import AnyTileNginx, timed
    from fetch import area_for

    from tilesweep.sim import World
    from tilesweep.tiles import Tile

    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="tilesweep-scale-fetch-"))
    root = work / "www"
    root.mkdir()
    (root / "tile.jpg").write_bytes(World(seed=0).render(Tile(18, 137000, 92000)))
    bbox, _ = area_for(n_tiles)
    template = work / "plan"
    subprocess.run([py, "-m", "tilesweep", "plan", ",".join(f"{v:.7f}" for v in bbox), str(template), "--zoom", "18"],
                   check=True, stdout=subprocess.DEVNULL)
    console = Console()
    table = Table(title=f"full fetch from nginx on loopback, -c {concurrency} in all ({os.cpu_count()} CPUs), start-up included")
    for col in ("how", "loops", "tiles", "wall s", "tiles/s", "tiles/s per loop", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "how" else "right")
    try:
        with AnyTileNginx(root, work / "nginx") as server:
            for n in counts:
                for how in ("--workers", "--dask"):
                    sweep = work / f"run-{how.strip('-')}-{n}"
                    shutil.copytree(template, sweep)
                    loops = ["--workers", str(n), "-c", str(concurrency)] if how == "--workers" else \
                        ["--dask", f"local:{n}", "-c", str(max(1, concurrency // n))]
                    r = timed([py, "-m", "tilesweep", "fetch", str(sweep), "--source", server.url + "/{z}/{x}/{y}.jpg", *loops, "-q"])
                    st = json.loads(subprocess.run([py, "-m", "tilesweep", "status", str(sweep), "--json"],
                                                   capture_output=True, text=True).stdout)
                    assert st["tiles_ok"] == st["tiles_total"] and st["mismatch"] is None, st
                    rate = st["tiles_total"] / r["seconds"]
                    table.add_row(f"fetch {how} {'local:' if how == '--dask' else ''}{n}", str(n), f"{st['tiles_total']:,}",
                                  f"{r['seconds']:.1f}", f"{rate:,.0f}", f"{rate / n:,.0f}", f"{r['rss_mb']:.0f}")
                    shutil.rmtree(sweep)
        console.print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
