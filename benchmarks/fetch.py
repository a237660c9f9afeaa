"""Fetch benchmark: `tilesweep fetch` vs curl and aria2c against nginx on loopback.

nginx serves a static simulator tree (`tilesweep sim render`, z/x/y.jpg, zoom 18) on
127.0.0.1. Every tool fetches exactly the same planned tiles (the plan's blocks, expanded
with `Block.tile_list`) at the same concurrency:

- tilesweep: `tilesweep fetch SWEEP --source http://127.0.0.1:PORT/{z}/{x}/{y}.jpg -c C -w W -q`
  into packed shards (one file per block), with 1 and 2 worker processes; then alone at
  5,000 requests in flight (curl caps --parallel-max at 300).
- curl: `curl --parallel --parallel-max C --parallel-immediate -K config`, one file per tile.
- aria2c: `aria2c -i list -j C`, one file per tile (one connection per download).

Table 1 shows tiles/s, MB/s, peak RSS, files created and the speed against curl. Every run
is checked: all planned tiles fetched (tilesweep: `status --json`; others: files and bytes
counted). Table 2 reads the tiles back (up to 50,000): from the shards with
`TileStore.get` (random and sequential order) and `TileStore.iter_tiles`, against
open/read of curl's one-file-per-tile folder. The page cache is warm for both.

    .venv/bin/python benchmarks/fetch.py             # ~20,000 tiles (81 blocks of 256)
    .venv/bin/python benchmarks/fetch.py --quick     # ~3,000 tiles, checks the script works
    .venv/bin/python benchmarks/fetch.py --tiles 5000 --concurrency 128 --repeat 3

`--super` instead compares super-tile requests (one WMS GetMap for n x n tiles, cut into
tiles: tilesweep.supertile) with per-tile requests, n = 2, 4, 8, against the simulator
(`tilesweep sim serve` in its own process, caches warm) and nginx (static files: the
simulator's tiles and its super-tile images, named by bbox): requests, bytes on the wire,
tiles/s and the ratios against per-tile requests, every stored tile checked against the
per-tile run byte for byte; then, for n = 4, how full a super-tile must be to pay (a
sparse plan wants only some of its tiles), with and without 30 ms of server latency:

    .venv/bin/python benchmarks/fetch.py --super             # 1,024 tiles (4 blocks)
    .venv/bin/python benchmarks/fetch.py --super --quick     # 256 tiles

The tree is rendered once (~22 ms/tile/core) and cached under
~/.cache/tilesweep-bench/tree-z18-seed0 (override with --cache); later runs reuse it. Needs
nginx (/usr/sbin/nginx), curl and aria2c on PATH; a missing client is shown as such.

Peak RSS comes from a fresh helper process per run: "largest process" is
getrusage(RUSAGE_CHILDREN).ru_maxrss (the high-water mark of the single biggest process of
the run); "all processes" is the largest sum of RSS over the run's process tree, sampled
from /proc ten times a second (it can miss a short peak). "in flight" is the most active
connections nginx saw (stub_status, sampled ten times a second). Runs are not isolated from
other work on the machine: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tilesweep.store import TileStore
from tilesweep.sweep import Sweep
from tilesweep.tiles import Tile, bounds, tile_at

PY = sys.executable
ZOOM, BLOCK_ZOOM = 18, 14
ORIGIN = (8.5, 47.4)  # north-west corner of the benchmark area (lon, lat)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CURL_PARALLEL_MAX = 300  # curl clamps --parallel-max to this
con = Console(width=200)
err = Console(stderr=True)


# --- area and tree -------------------------------------------------------------------------


def area_for(n: int, seed_origin: tuple[float, float] = ORIGIN) -> tuple[tuple[float, ...], tuple[int, int, int, int]]:
    """A bbox of whole zoom-14 blocks holding about ``n`` zoom-18 tiles, and its tile range
    (x0, y0, x1, y1). The bbox is inset by a quarter tile so that no neighbour touches it."""
    d = ZOOM - BLOCK_ZOOM
    blocks = max(1, round(n / 4**d))
    nbx = math.ceil(math.sqrt(blocks))
    nby = max(1, round(blocks / nbx))
    b0 = tile_at(*seed_origin, BLOCK_ZOOM)
    x0, y0 = b0.x << d, b0.y << d
    x1, y1 = ((b0.x + nbx) << d) - 1, ((b0.y + nby) << d) - 1
    w, _, _, n_ = bounds(Tile(ZOOM, x0, y0))
    _, s, e, _ = bounds(Tile(ZOOM, x1, y1))
    ix, iy = (e - w) / (x1 - x0 + 1) / 4, (n_ - s) / (y1 - y0 + 1) / 4
    bbox = (round(w + ix, 7), round(s + iy, 7), round(e - ix, 7), round(n_ - iy, 7))
    return bbox, (x0, y0, x1, y1)


def ensure_tree(cache: Path, bbox: tuple[float, ...], rng: tuple[int, int, int, int], seed: int) -> Path:
    """The cached static tree, rendered (with every core) unless a rendered range holds ``rng``."""
    tree = cache / f"tree-z{ZOOM}-seed{seed}"
    marker = tree / "rendered.json"
    done = json.loads(marker.read_text()) if marker.exists() else []
    x0, y0, x1, y1 = rng
    if any(a <= x0 and b <= y0 and x1 <= c and y1 <= d for a, b, c, d in done):
        return tree
    n = (x1 - x0 + 1) * (y1 - y0 + 1)
    err.print(f"rendering {n:,} zoom-{ZOOM} tiles into {tree} (once; ~{n * 0.022 / (os.cpu_count() or 1) / 60:.0f}+ min)...")
    tree.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    subprocess.run([PY, "-m", "tilesweep", "sim", "render", ",".join(map(str, bbox)), str(tree),
                    "--zoom", str(ZOOM), "--seed", str(seed), "--processes", "0"], check=True)
    err.print(f"  rendered in {time.perf_counter() - t:.0f} s")
    done.append(list(rng))
    marker.write_text(json.dumps(done))
    return tree


# --- nginx ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx in the foreground with a generated config in ``tmp``, serving ``root``."""

    def __init__(self, root: Path, tmp: Path, workers: int, log: bool = False) -> None:
        self.root, self.tmp, self.workers = root, tmp, workers
        self.log = tmp / "access.log" if log else None  # body bytes of each request, one line each
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Nginx":
        d = self.tmp
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""  # the tree may live under /root
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
        (d / "nginx.conf").write_text(f"""
{user}
worker_processes {self.workers};
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {nofile // 2}; multi_accept on; }}
http {{
    {"log_format bytes '$body_bytes_sent'; access_log " + str(self.log) + " bytes;" if self.log else "access_log off;"}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    open_file_cache max=4096 inactive=120s;  # more would hold descriptors past the limit
    types {{ image/jpeg jpg; }}
    default_type application/octet-stream;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{self.port} backlog=8192;
        root {self.root};
        location = /nginx_status {{ stub_status; access_log off; }}
    }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=open(d / "stderr.log", "wb"))
        for _ in range(100):
            if self.proc.poll() is not None:
                sys.exit(f"nginx exited: {(d / 'stderr.log').read_text()}{(d / 'error.log').read_text() if (d / 'error.log').exists() else ''}")
            try:
                self.active()
                return self
            except OSError:
                time.sleep(0.05)
        sys.exit("nginx did not start listening within 5 s")

    def active(self) -> int:
        """Active client connections now (less the one asking)."""
        with urllib.request.urlopen(f"{self.url}/nginx_status", timeout=2) as r:
            return int(r.read().split(b"\n", 1)[0].split(b":")[1]) - 1

    def served(self) -> tuple[int, int]:
        """(requests, body bytes) logged so far (needs ``log=True``; the status page's own
        requests are left out)."""
        n = size = 0
        if self.log is not None and self.log.exists():
            for line in self.log.read_text().split():
                n += 1
                size += int(line)
        return n, size

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ConnectionSampler:
    """The most active connections nginx reports while the ``with`` block runs."""

    def __init__(self, server: Nginx) -> None:
        self.server, self.peak = server, 0
        self._stop = threading.Event()

    def __enter__(self) -> "ConnectionSampler":
        def loop() -> None:
            while not self._stop.wait(0.1):
                try:
                    self.peak = max(self.peak, self.server.active())
                except OSError:
                    pass

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- one measured run ----------------------------------------------------------------------

HELPER = r"""
import json, os, resource, subprocess, sys, time
cmd, log, timeout = json.loads(sys.argv[1])
page = os.sysconf("SC_PAGE_SIZE")

def tree_rss(root):
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
        todo.extend(kids.get(pid, ()))
    return total

with open(log, "wb") as out:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    peak_sum, rc = 0, None
    while rc is None:
        peak_sum = max(peak_sum, tree_rss(p.pid))
        try:
            rc = p.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            if time.perf_counter() - t > timeout:
                p.kill(); p.wait(); rc = "timeout"
    dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(dict(seconds=dt, rss_mb=rss, sum_mb=peak_sum / 2**20, rc=rc)))
"""


def measure(cmd: list[str], log: Path, timeout: float, server: Nginx) -> dict:
    """Run ``cmd`` in a fresh helper process: seconds, peak RSS (largest process, and sampled
    sum over the process tree), exit status, most connections in flight at nginx."""
    # RUSAGE_CHILDREN is a high-water mark over all children: a fresh helper per run keeps
    # runs from seeing each other's peaks.
    load = os.getloadavg()[0]
    with ConnectionSampler(server) as conns:
        res = subprocess.run([PY, "-c", HELPER, json.dumps([cmd, str(log), timeout])],
                             capture_output=True, text=True, timeout=timeout + 120)
    if res.returncode != 0:
        sys.exit(f"helper failed: {res.stderr}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["in_flight"] = conns.peak
    r["load"] = (load + os.getloadavg()[0]) / 2
    if r["rc"] != 0:
        tail = log.read_text(errors="replace")[-2000:]
        err.print(f"[red]{cmd[0]} ... exited {r['rc']}[/]; log tail:\n{tail}")
    return r


def count_files(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``."""
    n = size = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            n += 1
            size += os.stat(os.path.join(dirpath, name)).st_size
    return n, size


# --- the tools -----------------------------------------------------------------------------


def run_tilesweep(template: Path, work: Path, server: Nginx, c: int, w: int, timeout: float, planned: int) -> dict:
    sweep = work / f"sweep-c{c}-w{w}"
    shutil.rmtree(sweep, ignore_errors=True)
    shutil.copytree(template, sweep)
    cmd = [PY, "-m", "tilesweep", "fetch", str(sweep), "--source", server.url + "/{z}/{x}/{y}.jpg",
           "--concurrency", str(c), "--workers", str(w), "-q"]
    r = measure(cmd, work / f"tilesweep-c{c}-w{w}.log", timeout, server)
    st = json.loads(subprocess.run([PY, "-m", "tilesweep", "status", str(sweep), "--json"],
                                   capture_output=True, text=True).stdout)
    r["tiles"], r["bytes"] = st["tiles_ok"], st["bytes_fetched"]
    r["files"], _ = count_files(sweep / "tiles")
    r["extra"] = f"retries {st['fetch_retries']}" if st.get("fetch_retries") else ""
    if st["tiles_ok"] != planned or st["mismatch"] or st["blocks_dead"]:
        err.print(f"[red]tilesweep c={c} w={w}: {st['tiles_ok']:,} of {planned:,} tiles ok, "
                  f"dead blocks {st['blocks_dead']}, mismatch {st['mismatch']}[/]")
    r["path"] = sweep
    if not startup:  # fixed cost: the same command on the finished sweep
        again = measure(cmd, work / f"tilesweep-c{c}-w{w}-again.log", timeout, server)
        startup.append(again["seconds"])
    return r


startup: list[float] = []  # seconds of a `tilesweep fetch` with nothing left to do


def run_curl(tiles: list[Tile], work: Path, server: Nginx, c: int, timeout: float) -> dict:
    out = work / f"curl-c{c}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = work / "curl.cfg"
    with open(cfg, "w") as f:
        for z, x, y in tiles:
            f.write(f'url = "{server.url}/{z}/{x}/{y}.jpg"\noutput = "{out}/{z}/{x}/{y}.jpg"\n')
    cmd = ["curl", "--parallel", "--parallel-max", str(c), "--parallel-immediate", "--create-dirs",
           "--fail", "-s", "-S", "-K", str(cfg)]
    r = measure(cmd, work / f"curl-c{c}.log", timeout, server)
    r["files"], r["bytes"] = count_files(out)
    r["tiles"] = r["files"]
    r["path"] = out
    r["extra"] = f"--parallel-max {min(c, CURL_PARALLEL_MAX)}"
    return r


def run_aria2c(tiles: list[Tile], work: Path, server: Nginx, c: int, timeout: float) -> dict:
    out = work / f"aria2c-c{c}"
    shutil.rmtree(out, ignore_errors=True)
    lst = work / "aria2c.txt"
    with open(lst, "w") as f:
        for z, x, y in tiles:
            f.write(f"{server.url}/{z}/{x}/{y}.jpg\n  out={z}/{x}/{y}.jpg\n")
    cmd = ["aria2c", "-i", str(lst), "-d", str(out), "-j", str(c), "-x", "1", "-s", "1",
           "--auto-file-renaming=false", "--allow-overwrite=true", "--file-allocation=none",
           "--deferred-input=true", "--summary-interval=0", "--console-log-level=error", "-q"]
    r = measure(cmd, work / f"aria2c-c{c}.log", timeout, server)
    r["files"], r["bytes"] = count_files(out)
    r["tiles"] = r["files"]
    r["path"] = out
    r["extra"] = f"-j {c} -x 1"
    return r


# --- reading back --------------------------------------------------------------------------


def read_back(store_dir: Path, files_dir: Path, tiles: list[Tile], n: int) -> list[tuple[str, int, int, float]]:
    """(method, tiles, bytes, seconds) for reading ``n`` tiles back every way."""
    rnd = random.Random(0)
    sample = rnd.sample(tiles, min(n, len(tiles)))
    seq = sorted(sample, key=lambda t: (t.x >> 4, t.y >> 4, t.y, t.x))  # block by block, rows within
    rows = []

    def timed(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        count, size = fn()
        rows.append((name, count, size, time.perf_counter() - t))

    def via_get(store: TileStore, order: list[Tile]):  # type: ignore[no-untyped-def]
        size = 0
        get = store.get
        for t in order:
            size += len(get(t))
        return len(order), size

    def via_files(order: list[Tile]):  # type: ignore[no-untyped-def]
        size = 0
        root = str(files_dir)
        for z, x, y in order:
            with open(f"{root}/{z}/{x}/{y}.jpg", "rb") as f:
                size += len(f.read())
        return len(order), size

    def iter_all():  # type: ignore[no-untyped-def]
        with TileStore(store_dir, ZOOM, BLOCK_ZOOM) as s:
            count = size = 0
            for _, data in s.iter_tiles():
                count += 1
                size += len(data)
        return count, size

    def walk_all():  # type: ignore[no-untyped-def]
        count = size = 0
        for dirpath, _, names in os.walk(files_dir):
            for name in names:
                with open(os.path.join(dirpath, name), "rb") as f:
                    size += len(f.read())
                count += 1
        return count, size

    # correctness: same bytes both ways
    with TileStore(store_dir, ZOOM, BLOCK_ZOOM) as s:
        for t in sample[:500]:
            if s.get(t) != (files_dir / f"{t.z}/{t.x}/{t.y}.jpg").read_bytes():
                err.print(f"[red]tile {t} differs between the shard and curl's file[/]")
                break
    blocks = len({(t.x >> 4, t.y >> 4) for t in tiles})
    store = TileStore(store_dir, ZOOM, BLOCK_ZOOM)
    timed("shards: TileStore.get, random, 1st pass (opens shards)", lambda: via_get(store, sample))
    timed(f"shards: TileStore.get, random, 2nd pass ({store.max_open} shards kept open)", lambda: via_get(store, sample))
    store.close()
    if blocks > 64:  # what an LRU smaller than the shards read costs (the old default, 64)
        small = TileStore(store_dir, ZOOM, BLOCK_ZOOM, max_open=64)
        via_get(small, sample)
        timed(f"shards: TileStore(max_open=64).get, random over {blocks} shards, 2nd pass", lambda: via_get(small, sample))
        small.close()
    with TileStore(store_dir, ZOOM, BLOCK_ZOOM) as s:
        timed("shards: TileStore.get, sequential (block by block)", lambda: via_get(s, seq))
    timed("shards: TileStore.iter_tiles (all, Hilbert order)", iter_all)
    timed("files: open/read, random", lambda: via_files(sample))
    timed("files: open/read, sequential (folder by folder)", lambda: via_files(sorted(sample, key=lambda t: (t.x, t.y))))
    timed("files: os.walk + open/read (all)", walk_all)
    return rows


# --- super-tiles (issue 12) ---------------------------------------------------------------

SUPER_NS = (2, 4, 8)


class SimProcess:
    """`tilesweep sim serve` in its own process (so it does not share the client's core)."""

    def __init__(self, tmp: Path, latency_ms: float = 0.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--latency-ms", str(latency_ms)] if latency_ms else []
        self.log = tmp / f"sim-{self.port}.log"

    def __enter__(self) -> "SimProcess":
        self.proc = subprocess.Popen([PY, "-m", "tilesweep", "sim", "serve", "--port", str(self.port), "--workers", "2",
                                      "--cache-mb", "1024", *self.args], stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                self.stats()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    sys.exit(f"the simulator exited: {self.log.read_text()}")
                time.sleep(0.1)
        sys.exit("the simulator did not start within 30 s")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as r:
            return json.loads(r.read())

    def served(self) -> tuple[int, int]:
        st = self.stats()
        return st["requests"], st["bytes"]

    def active(self) -> int:  # for ConnectionSampler: not counted here
        return 0

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def wms_template(base: str) -> str:
    return f"{base}/wms?SERVICE=WMS&REQUEST=GetMap&LAYERS=world&SRS=EPSG:3857&BBOX={{bbox}}&WIDTH={{width}}&HEIGHT={{height}}&FORMAT=image/jpeg"


def nginx_tree(sim: SimProcess, tiles: list[Tile], root: Path) -> str:
    """Static files for nginx from the simulator: tiles at z/x/y.jpg, super-tile images at
    bbox/{bbox}/{W}x{H}.jpg (the names the bbox template asks for). Returns the template."""
    from tilesweep.fetch import fetch_tiles
    from tilesweep.sources import parse_source

    for r in fetch_tiles(parse_source(sim.url + "/{z}/{x}/{y}.jpg"), tiles):
        path = root / f"{r.tile.z}/{r.tile.x}/{r.tile.y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(r.data or b"")
    template = "http://nginx/bbox/{bbox}/{width}x{height}.jpg"
    for n in SUPER_NS:
        src, wms = parse_source(template, supertile=n), parse_source(wms_template(sim.url), supertile=n)
        for nw in sorted({Tile(t.z, t.x - t.x % n, t.y - t.y % n) for t in tiles}):
            with urllib.request.urlopen(wms.area_url(nw, n), timeout=60) as resp:
                body = resp.read()
            path = root / src.area_url(nw, n).split("://nginx/", 1)[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
    return template


def super_runs(server, template: dict, plan_dir: Path, work: Path, c: int, name: str, rate: float | None = None) -> list[dict]:
    """`tilesweep fetch` of the plan per tile and with --super n: one row each."""
    rows = []
    for n in (1, *SUPER_NS):
        sweep = work / f"{name}-n{n}"
        shutil.rmtree(sweep, ignore_errors=True)
        shutil.copytree(plan_dir, sweep)
        src = template["tile"] if n == 1 else template["bbox"]
        cmd = [PY, "-m", "tilesweep", "fetch", str(sweep), "--source", src, "-c", str(c), "-q"] + (["--super", str(n)] if n > 1 else [])
        cmd += ["--rate", str(rate)] if rate else []
        req0, bytes0 = server.served()
        r = measure(cmd, work / f"{name}-n{n}.log", 600, server)
        req1, bytes1 = server.served()
        with Sweep.open(sweep) as sw:
            st = sw.status().to_json()
        r.update(n=n, requests=req1 - req0, wire=bytes1 - bytes0, tiles=st["tiles_ok"], stored=st["bytes_fetched"], sweep=sweep)
        r["tps"] = fetcher_speed(template["tile"] if n == 1 else template["bbox"], n, tiles_of(plan_dir), c, rate)
        rows.append(r)
    return rows


def tiles_of(plan_dir: Path) -> list[Tile]:
    with Sweep.open(plan_dir) as sw:
        return [t for b in sw.queue.blocks() for t in b.tile_list(ZOOM)]


def fetcher_speed(template: str, n: int, tiles: list[Tile], c: int, rate: float | None, repeat: int = 3) -> float:
    """Tiles/s of the fetcher alone (in this process, results dropped), best of ``repeat``:
    the command's start-up (a few seconds on a loaded machine) would swamp a small run."""
    import asyncio

    from tilesweep.fetch import FetchSettings
    from tilesweep.sources import parse_source
    from tilesweep.supertile import open_fetcher

    src = parse_source(template, supertile=n if n > 1 else None)

    async def once() -> float:
        async with open_fetcher(src, FetchSettings(concurrency=c, rate=rate)) as f:
            t0 = time.perf_counter()
            ok = sum([r.status == "ok" async for r in f.fetch_many(tiles)])
            dt = time.perf_counter() - t0
        if ok != len(tiles):
            err.print(f"[red]{template} n={n}: {ok} of {len(tiles)} tiles ok[/]")
        return ok / dt

    return max(asyncio.run(once()) for _ in range(repeat))


def same_tiles(a: Path, b: Path) -> tuple[int, int]:
    """(tiles, tiles whose bytes differ) between two fetched sweeps."""
    sa, sb = TileStore(a / "tiles", ZOOM, BLOCK_ZOOM, coarsest=0), TileStore(b / "tiles", ZOOM, BLOCK_ZOOM, coarsest=0)
    n = differ = 0
    for tile, data in sa.iter_tiles():
        n += 1
        differ += sb.get(tile) != data
    sa.close()
    sb.close()
    return n, differ


def fill_rows(sim_url: str, tiles: list[Tile], n: int = 4, rate: float | None = None) -> list[tuple[int, dict, dict]]:
    """For k = 1, 2, 4, 8, 16 wanted tiles of each n x n super-tile (the first k in row
    order): the same tiles fetched in process as super-tiles and one by one."""
    import asyncio

    from tilesweep.sources import parse_source
    from tilesweep.supertile import SuperTileFetcher

    groups: dict[Tile, list[Tile]] = {}
    for t in sorted(tiles, key=lambda t: (t.y, t.x)):
        groups.setdefault(Tile(t.z, t.x - t.x % n, t.y - t.y % n), []).append(t)
    src = parse_source(wms_template(sim_url), supertile=n)

    from tilesweep.fetch import FetchSettings

    async def one(want: list[Tile], min_tiles: int) -> dict:
        async with SuperTileFetcher(src, FetchSettings(rate=rate), min_tiles=min_tiles) as f:
            t0 = time.perf_counter()
            ok = sum([r.status == "ok" async for r in f.fetch_many(want)])
            return dict(seconds=time.perf_counter() - t0, ok=ok, requests=f.stats.requests, wire=f.stats.bytes)

    out = []
    for k in (1, 2, 4, 8, 16):
        want = [t for g in groups.values() for t in g[:k]]
        out.append((k, asyncio.run(one(want, 1)), asyncio.run(one(want, n * n + 1))))
    return out


def super_benchmark(n_tiles: int, c: int, quick: bool, keep: bool) -> None:
    bbox, rng = area_for(n_tiles)
    work = Path(tempfile.mkdtemp(prefix="tilesweep-super-bench-"))
    load0 = os.getloadavg()[0]
    try:
        plan_dir = work / "plan"
        subprocess.run([PY, "-m", "tilesweep", "plan", ",".join(map(str, bbox)), str(plan_dir), "--zoom", str(ZOOM), "--json"],
                       check=True, stdout=subprocess.DEVNULL)
        with Sweep.open(plan_dir) as sw:
            tiles = [t for b in sw.queue.blocks() for t in b.tile_list(ZOOM)]
        from tilesweep.sources import parse_source
        from tilesweep.tilecut import jpeg_cut_mode

        err.print(f"{len(tiles):,} tiles; JPEG cut: {jpeg_cut_mode()}")
        table = Table(title=f"super-tile requests vs per-tile requests: `tilesweep fetch` of {len(tiles):,} zoom-18 JPEG tiles, "
                            f"one worker, loopback, {os.cpu_count()} cores")
        for col in ("server", "in flight", "n x n", "requests", "wire MB", "stored MB", "fetch command s", "fetcher tiles/s",
                    "requests vs per-tile", "wire bytes vs per-tile", "tiles/s vs per-tile", "peak RSS", "same bytes"):
            table.add_column(col.strip(), justify="left" if col == "server" else "right")
        results: dict[str, list[dict]] = {}
        in_flight: dict[str, int] = {}
        rate = 200.0
        with SimProcess(work) as sim:
            err.print("warming the simulator (renders every tile once, encodes every super-tile image once)...")
            urllib.request.urlopen(parse_source(wms_template(sim.url)).url(tiles[0])).read()  # from now on it keeps pixels
            root = work / "tree"
            ngx_template = nginx_tree(sim, tiles, root)  # fetches every tile and super-tile image: the cache is warm
            sim_templates = {"tile": sim.url + "/{z}/{x}/{y}.jpg", "bbox": wms_template(sim.url)}
            with Nginx(root, work / "nginx", 1, log=True) as ngx:
                runs = [("simulator", sim, sim_templates, None),
                        ("nginx", ngx, {"tile": ngx.url + "/{z}/{x}/{y}.jpg", "bbox": ngx_template.replace("http://nginx", ngx.url)}, None),
                        (f"sim, {rate:g} req/s", sim, sim_templates, rate)]
                for name, server, template, r in runs:
                    err.print(f"{name}: per tile, then --super {', '.join(map(str, SUPER_NS))}...")
                    results[name] = super_runs(server, template, plan_dir, work, c, name.split(",")[0] + ("-rate" if r else ""), r)
                    in_flight[name] = c
            err.print("how full must a super-tile be (n = 4, in process)...")
            fills = {"none": fill_rows(sim.url, tiles), f"{rate:g}/s": fill_rows(sim.url, tiles[:256], rate=rate)}
        lat, few = 50, 16
        with SimProcess(work, latency_ms=lat) as slow:
            name = f"sim, {lat} ms latency"
            err.print(f"{name}, {few} in flight: warming, then per tile and --super {', '.join(map(str, SUPER_NS))}...")
            urllib.request.urlopen(parse_source(wms_template(slow.url)).url(tiles[0])).read()
            nginx_tree(slow, tiles, work / "tree-slow")  # fetches every tile and super-tile image once
            results[name] = super_runs(slow, {"tile": slow.url + "/{z}/{x}/{y}.jpg", "bbox": wms_template(slow.url)},
                                       plan_dir, work, few, "slow")
            in_flight[name] = few
        for name, rows in results.items():
            base = rows[0]
            for r in rows:
                tps, btps = r["tps"], base["tps"]
                count, differ = same_tiles(base["sweep"], r["sweep"]) if r is not base else (r["tiles"], 0)
                ok = r["tiles"] == len(tiles) and r["rc"] == 0
                table.add_row(name, str(in_flight[name]), "per tile" if r["n"] == 1 else f"{r['n']}x{r['n']}", f"{r['requests']:,}",
                              f"{r['wire'] / 1e6:.2f}", f"{r['stored'] / 1e6:.2f}", f"{r['seconds']:.2f}",
                              f"{tps:,.0f}" + ("" if ok else f" ({r['tiles']:,} of {len(tiles):,})"),
                              f"{r['requests'] / base['requests']:.3f}", f"{r['wire'] / base['wire']:.3f}", f"{tps / btps:.2f}x",
                              f"{r['rss_mb']:.0f} MB", "-" if r is base else f"{count - differ:,} of {count:,}")
        con.print(table)
        t2 = Table(title="how full a 4x4 super-tile must be to pay: k of its 16 tiles wanted, fetched in one process "
                         "as super-tiles (cut to the k) and one by one, from the simulator; with no rate cap and at 200 requests/s")
        for col in ("rate cap", "k of 16", "tiles", "super: requests", "super: wire MB", "super: tiles/s",
                    "single: requests", "single: wire MB", "single: tiles/s", "super vs single tiles/s"):
            t2.add_column(col, justify="right")
        for lat, rows in fills.items():
            for k, sup, one in rows:
                t2.add_row(lat, str(k), f"{sup['ok']:,}", f"{sup['requests']:,}", f"{sup['wire'] / 1e6:.2f}",
                           f"{sup['ok'] / sup['seconds']:,.0f}", f"{one['requests']:,}", f"{one['wire'] / 1e6:.2f}",
                           f"{one['ok'] / one['seconds']:,.0f}", f"{(sup['ok'] / sup['seconds']) / (one['ok'] / one['seconds']):.2f}x")
        con.print(t2)
        con.print(f"load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after. 'wire' is the bodies the server sent; "
                  "'stored' the tiles' bytes in the shards. 'same bytes': tiles equal to the per-tile run's. "
                  "Requests, bytes and 'same bytes' are of `tilesweep fetch` (queue, shards); 'fetch command s' includes its "
                  "start-up (seconds on a loaded machine); 'fetcher tiles/s' is the fetcher alone in this process, the same "
                  f"tiles, best of 3. 'in flight' counts requests (a super-tile is one).")
        bad = [f"{name} n={r['n']}" for name, rows in results.items() for r in rows if r["tiles"] != len(tiles) or r["rc"] != 0]
        if bad:
            sys.exit(f"runs that did not fetch every tile: {', '.join(bad)}")
    finally:
        if keep:
            err.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=20_000, help="about this many zoom-18 tiles (whole blocks of 256)")
    ap.add_argument("--quick", action="store_true", help="a small run (256 tiles, one repeat, no high-concurrency row) that "
                    "checks the script works and exits 1 when a run did not get every tile (the test suite runs it)")
    ap.add_argument("--concurrency", "-c", type=int, default=256, help="requests in flight for every tool")
    ap.add_argument("--high", type=int, default=5000, help="the extra tilesweep-only concurrency (0: skip)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="tilesweep worker counts (default: 1 and the cores)")
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool; the fastest is shown")
    ap.add_argument("--read-tiles", type=int, default=50_000, help="tiles read back in table 2 (at most all)")
    ap.add_argument("--seed", type=int, default=0, help="world seed of the tree")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tilesweep-bench")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--sparse", action="store_true", help="instead: a 0.001 sample against a dense plan of the same "
                    "tile count, adaptive and fixed blocks (benchmarks/blocks.py, part 2; issue 15)")
    ap.add_argument("--super", action="store_true", help="instead: super-tile requests (n = 2, 4, 8) against per-tile "
                    "requests, against the simulator and nginx (issue 12)")
    a = ap.parse_args()
    if a.super:
        super_benchmark(256 if a.quick else (a.tiles if a.tiles != 20_000 else 1024), a.concurrency, a.quick, a.keep)
        return
    if a.sparse:
        from blocks import SPARSE_BBOX, fetch_table, print_fetch

        w = (a.workers or [2])[-1]
        with tempfile.TemporaryDirectory() as tmp:
            print_fetch(fetch_table(Path(tmp), SPARSE_BBOX, 0.001, w, a.concurrency, a.repeat), w, a.concurrency, a.repeat)
        return
    if a.quick:
        a.tiles, a.high, a.repeat, a.read_tiles = 256, 0, 1, 256
    if not Path(NGINX).exists():
        sys.exit("nginx not found (looked for `nginx` on PATH and /usr/sbin/nginx): install it to run this benchmark")
    cores = os.cpu_count() or 1
    workers = a.workers or sorted({1, cores})
    bbox, rng = area_for(a.tiles)
    tree = ensure_tree(a.cache, bbox, rng, a.seed)
    work = Path(tempfile.mkdtemp(prefix="tilesweep-fetch-bench-"))
    try:
        template = work / "plan"
        subprocess.run([PY, "-m", "tilesweep", "plan", ",".join(map(str, bbox)), str(template),
                        "--zoom", str(ZOOM), "--block-zoom", str(BLOCK_ZOOM), "--json"],
                       check=True, stdout=subprocess.DEVNULL)
        with Sweep.open(template) as sw:
            blocks = list(sw.queue.blocks())
            tiles = [t for b in blocks for t in b.tile_list(ZOOM)]
        x0, y0, x1, y1 = rng
        outside = [t for t in tiles if not (x0 <= t.x <= x1 and y0 <= t.y <= y1)]
        if outside:
            sys.exit(f"the plan holds {len(outside)} tiles outside the rendered tree, e.g. {outside[0]}")
        # the tree into the page cache, so that the first run does not pay for it
        tree_files, tree_bytes = 0, 0
        for t in tiles:
            tree_bytes += len((tree / f"{t.z}/{t.x}/{t.y}.jpg").read_bytes())
            tree_files += 1
        err.print(f"{len(tiles):,} tiles in {len(blocks)} blocks, {tree_bytes / 1e6:.1f} MB "
                  f"({tree_bytes / len(tiles) / 1e3:.1f} KB/tile); bbox {','.join(map(str, bbox))}")

        runs: list[tuple[str, int, dict]] = []
        with Nginx(tree, work / "nginx", a.nginx_workers) as server:
            def best(fn, *args):  # type: ignore[no-untyped-def]
                rs = [fn(*args) for _ in range(a.repeat)]
                return min(rs, key=lambda r: r["seconds"])

            c = a.concurrency
            have = {tool: shutil.which(tool) is not None for tool in ("curl", "aria2c")}
            if have["curl"]:
                err.print(f"curl, {c} in flight...")
                runs.append(("curl", c, best(run_curl, tiles, work, server, c, a.timeout)))
            if have["aria2c"]:
                err.print(f"aria2c, {c} in flight...")
                runs.append(("aria2c", c, best(run_aria2c, tiles, work, server, c, a.timeout)))
            for cc in [c] + ([a.high] if a.high else []):
                for w in workers:
                    err.print(f"tilesweep, {cc} in flight, {w} worker(s)...")
                    runs.append((f"tilesweep -w {w}", cc, best(run_tilesweep, template, work, server, cc, w, a.timeout, len(tiles))))
            nginx_errors = (work / "nginx" / "error.log").read_text(errors="replace").strip()
            if nginx_errors:
                err.print(f"[yellow]nginx error.log:[/]\n{nginx_errors[-2000:]}")

        load = os.getloadavg()
        curl_tps = next((len(tiles) / r["seconds"] for tool, _, r in runs if tool == "curl" and r["tiles"] == len(tiles)), None)
        table = Table(title=f"fetch: {len(tiles):,} zoom-18 JPEG tiles ({tree_bytes / len(tiles) / 1e3:.1f} KB) in {len(blocks)} blocks, "
                            f"nginx ({a.nginx_workers} worker) on loopback, {cores} cores; best of {a.repeat}")
        for col in ("tool", "concurrency", "in flight", "tiles", "seconds", "tiles/s", "MB/s",
                    "peak RSS (largest process)", "peak RSS (all processes)", "files created", "vs curl", "load", "notes"):
            table.add_column(col, justify="left" if col in ("tool", "notes") else "right")
        for tool, cc, r in runs:
            ok = r["tiles"] == len(tiles) and r["rc"] == 0
            tps = r["tiles"] / r["seconds"]
            table.add_row(
                tool, f"{cc:,}", f"{r['in_flight']:,}", f"{r['tiles']:,}" + ("" if ok else f" of {len(tiles):,} (rc {r['rc']})"),
                f"{r['seconds']:.2f}", f"{tps:,.0f}", f"{r['bytes'] / 1e6 / r['seconds']:.1f}",
                f"{r['rss_mb']:.0f} MB", f"{r['sum_mb']:.0f} MB", f"{r['files']:,}",
                f"{tps / curl_tps:.2f}x" if curl_tps else "-", f"{r['load']:.1f}", r.get("extra", ""),
            )
        con.print(table)
        incomplete = [tool for tool, _, r in runs if r["tiles"] != len(tiles) or r["rc"] != 0]
        if a.quick and incomplete:
            sys.exit(f"quick run: {', '.join(incomplete)} did not fetch all {len(tiles):,} tiles")
        con.print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}. 'in flight' = most active connections "
                  f"nginx saw (sampled at 10 Hz). curl clamps --parallel-max to {CURL_PARALLEL_MAX}, so only tilesweep runs "
                  f"at {a.high:,}. 'vs curl' is against curl at {c}. Times include each tool's start-up "
                  f"(tilesweep: `tilesweep fetch` on a finished sweep takes {min(startup) if startup else float('nan'):.2f} s).")

        # --- table 2 ---------------------------------------------------------------------
        store_run = next(r for tool, cc, r in runs if tool.startswith("tilesweep") and cc == c)
        curl_run = next((r for tool, _, r in runs if tool == "curl"), None)
        if curl_run is None:
            err.print("curl missing: no one-file-per-tile folder to read back")
            return
        rows = read_back(store_run["path"] / "tiles", curl_run["path"], tiles, a.read_tiles)
        t2 = Table(title=f"read back {min(a.read_tiles, len(tiles)):,} tiles: {len(blocks)} shards vs "
                         f"{len(tiles):,} files, one process, page cache warm for both")
        for col in ("method", "tiles", "seconds", "tiles/s", "MB/s"):
            t2.add_column(col, justify="left" if col == "method" else "right")
        for name, count, size, secs in rows:
            t2.add_row(name, f"{count:,}", f"{secs:.3f}", f"{count / secs:,.0f}", f"{size / 1e6 / secs:,.0f}")
        con.print(t2)
    finally:
        if a.keep:
            err.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
