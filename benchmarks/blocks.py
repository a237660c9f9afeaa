"""Blocks under sampling (issue 15): fixed cells against adaptive blocks, planned and fetched.

Part 1 (plan, as benchmarks/plan.py runs it: `tilesweep plan` in a child, queue included):
one concave country-sized polygon (~100 M zoom-18 tiles, benchmarks/plan.py's shape) planned
at fractions 1, 0.1, 0.01 and 0.001, with fixed zoom-14 cells (`--block-zoom 14`, the old
default) and with adaptive blocks (the default, N = 256): tiles, blocks (= queue rows =
shard files once fetched), tiles per block, shard files per 1,000 tiles, seconds, peak RSS.

Part 2 (fetch, as benchmarks/fetch.py runs it: `tilesweep fetch -w W -c C -q` in a child,
nginx on loopback): a 0.001 sample of 30,-3,36,3 (the issue's ~19,100 tiles), adaptive and
fixed, against a dense plan of about the same tile count; same server, same settings.
nginx answers every tile path with one rendered JPEG (`try_files`), so the server costs the
same whatever the tile and the numbers show what blocks cost the fetcher.

    .venv/bin/python benchmarks/blocks.py              # both parts, full size
    .venv/bin/python benchmarks/blocks.py --quick      # a small area, two fractions, a few seconds
    .venv/bin/python benchmarks/blocks.py --part plan  # or fetch

Needs nginx (`apt-get install -y nginx`) for part 2; without it part 2 is skipped, saying so.
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PY = sys.executable
ZOOM = 18
# benchmarks/plan.py's concave shape, ~81.2 M zoom-18 tiles at scale 1
SHAPE = [(0, 42), (14, 42), (14, 46), (8, 47), (13, 52), (0, 52), (3, 47)]
SHAPE_TILES_M = 81.2
SPARSE_BBOX = "30.0,-3.0,36.0,3.0"


def country(millions: float) -> dict:
    k = math.sqrt(millions / SHAPE_TILES_M)
    cx = sum(x for x, _ in SHAPE) / len(SHAPE)
    cy = sum(y for _, y in SHAPE) / len(SHAPE)
    ring = [[cx + (x - cx) * k, cy + (y - cy) * k] for x, y in SHAPE]
    ring.append(ring[0])
    return {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}


def timed(cmd: list[str], timeout: float = 900) -> dict:
    """Run ``cmd`` in a fresh helper: seconds and the child's peak RSS (MB)."""
    code = (
        "import json, resource, subprocess, sys, time\n"
        f"t = time.perf_counter(); rc = subprocess.run({cmd!r}, stdout=subprocess.DEVNULL).returncode\n"
        "print(json.dumps(dict(seconds=time.perf_counter() - t, rc=rc, "
        "rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)))\n"
    )
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=timeout)
    return json.loads(res.stdout.strip().splitlines()[-1])


def plan_cfg(sweep: Path) -> dict:
    import tomllib

    return tomllib.loads((sweep / "sweep.toml").read_text())["plan"]


# --- part 1: plan ----------------------------------------------------------------------------


def plan_table(work: Path, millions: float, fractions: list[float]) -> list[dict]:
    area = work / "country.geojson"
    area.write_text(json.dumps(country(millions)))
    rows = []
    for f in fractions:
        for mode, extra in (("fixed z14", ["--block-zoom", "14"]), ("adaptive N=256", [])):
            sweep = work / f"plan-{f:g}-{mode.split()[0]}"
            r = timed([PY, "-m", "tilesweep", "plan", str(area), str(sweep), "--zoom", str(ZOOM), "--fraction", str(f), *extra])
            if r["rc"] != 0:
                sys.exit(f"plan {mode} fraction {f:g} exited {r['rc']}")
            cfg = plan_cfg(sweep)
            rows.append(dict(fraction=f, mode=mode, tiles=cfg["tiles"], blocks=cfg["blocks"], seconds=r["seconds"],
                             rss_mb=r["rss_mb"], zooms=f"{cfg.get('block_zoom_min', cfg['block_zoom'])}..{cfg['block_zoom']}"))
            shutil.rmtree(sweep)
            print(f"  plan {f:g} {mode}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def print_plan(rows: list[dict], millions: float) -> None:
    print(f"\nPlanning a concave ~{millions:g} M-tile country at zoom {ZOOM} (`tilesweep plan`, queue included), "
          f"{os.cpu_count()} cores\n")
    head = (f"| {'fraction':>8} | {'blocks':<14} | {'tiles':>11} | {'queue rows':>10} | {'tiles/block':>11} | "
            f"{'shards per 1k tiles':>19} | {'block zooms':>11} | {'plan s':>6} | {'RSS MB':>6} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['fraction']:>8g} | {r['mode']:<14} | {r['tiles']:>11,} | {r['blocks']:>10,} | "
              f"{r['tiles'] / r['blocks']:>11.1f} | {1000 * r['blocks'] / r['tiles']:>19.2f} | {r['zooms']:>11} | "
              f"{r['seconds']:>6.1f} | {r['rss_mb']:>6.0f} |")


# --- part 2: fetch ---------------------------------------------------------------------------


class AnyTileNginx:
    """nginx on loopback answering every path with one file (``tile.jpg`` in ``root``)."""

    def __init__(self, root: Path, tmp: Path) -> None:
        from fetch import free_port

        self.root, self.tmp = root, tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "AnyTileNginx":
        from fetch import NGINX

        d = self.tmp
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        (d / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000; keepalive_timeout 120s;
    open_file_cache max=16; types {{ image/jpeg jpg; }} default_type image/jpeg;
    client_body_temp_path {d}/client_body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    server {{ listen 127.0.0.1:{self.port} backlog=8192; root {self.root};
        location / {{ try_files /tile.jpg =404; }} }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import urllib.request

        for _ in range(100):
            try:
                urllib.request.urlopen(self.url + "/18/0/0.jpg", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        sys.exit("nginx did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def fetch_table(work: Path, sparse_bbox: str, fraction: float, workers: int, concurrency: int, repeat: int) -> list[dict]:
    from fetch import area_for

    from tilesweep.sim import World
    from tilesweep.tiles import Tile

    root = work / "www"
    root.mkdir()
    (root / "tile.jpg").write_bytes(World(seed=0).render(Tile(18, 137000, 92000)))
    plans = []
    sparse_a = work / "sparse-adaptive"
    subprocess.run([PY, "-m", "tilesweep", "plan", sparse_bbox, str(sparse_a), "--zoom", str(ZOOM), "--fraction", str(fraction)], check=True, stdout=subprocess.DEVNULL)
    n = plan_cfg(sparse_a)["tiles"]
    dense_bbox, _ = area_for(n)
    dense = work / "dense"
    subprocess.run([PY, "-m", "tilesweep", "plan", ",".join(f"{v:.7f}" for v in dense_bbox), str(dense), "--zoom", str(ZOOM)], check=True, stdout=subprocess.DEVNULL)
    sparse_f = work / "sparse-fixed"
    subprocess.run([PY, "-m", "tilesweep", "plan", sparse_bbox, str(sparse_f), "--zoom", str(ZOOM), "--fraction", str(fraction), "--block-zoom", "14"], check=True, stdout=subprocess.DEVNULL)
    plans = [("dense (whole cells)", dense), (f"{fraction:g} sample, adaptive N=256", sparse_a), (f"{fraction:g} sample, fixed z14 cells", sparse_f)]
    rows = []
    with AnyTileNginx(root, work / "nginx") as server:
        for label, template in plans:
            best = None
            for i in range(repeat):
                sweep = work / f"run-{template.name}-{i}"
                shutil.copytree(template, sweep)
                r = timed([PY, "-m", "tilesweep", "fetch", str(sweep), "--source", server.url + "/{z}/{x}/{y}.jpg",
                           "--workers", str(workers), "--concurrency", str(concurrency), "-q"])
                st = json.loads(subprocess.run([PY, "-m", "tilesweep", "status", str(sweep), "--json"], capture_output=True, text=True).stdout)
                if st["tiles_ok"] != st["tiles_total"] or st["mismatch"]:
                    sys.exit(f"{label}: {st['tiles_ok']} of {st['tiles_total']} tiles ok, mismatch {st['mismatch']}")
                files = sum(1 for _ in (sweep / "tiles").rglob("*.shard"))
                row = dict(plan=label, tiles=st["tiles_total"], blocks=st["blocks_total"], files=files, seconds=r["seconds"], rss_mb=r["rss_mb"])
                shutil.rmtree(sweep)
                if best is None or row["seconds"] < best["seconds"]:
                    best = row
            rows.append(best)
            print(f"  fetch {label}: {json.dumps(best)}", file=sys.stderr, flush=True)
    return rows


def print_fetch(rows: list[dict], workers: int, concurrency: int, repeat: int) -> None:
    print(f"\nFetching from nginx on loopback (one JPEG for every path), `tilesweep fetch -w {workers} -c {concurrency}`, "
          f"start-up included, best of {repeat}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}\n")
    head = (f"| {'plan':<32} | {'tiles':>7} | {'blocks':>6} | {'tiles/block':>11} | {'shard files':>11} | "
            f"{'files / (tiles/256)':>19} | {'seconds':>7} | {'tiles/s':>7} | {'vs dense':>8} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    dense_rate = rows[0]["tiles"] / rows[0]["seconds"]
    for r in rows:
        rate = r["tiles"] / r["seconds"]
        print(f"| {r['plan']:<32} | {r['tiles']:>7,} | {r['blocks']:>6,} | {r['tiles'] / r['blocks']:>11.1f} | {r['files']:>11,} | "
              f"{r['files'] / (r['tiles'] / 256):>19.2f} | {r['seconds']:>7.2f} | {rate:>7,.0f} | {dense_rate / rate:>7.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["plan", "fetch", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="a 0.5 M-tile country at fractions 1 and 0.01 (dense and sampled) and a 1%% "
                    "sample of a small box: checks the script works (exit 1 when the results are wrong)")
    ap.add_argument("--millions", type=float, default=100.0, help="size of the country in millions of zoom-18 tiles")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    ap.add_argument("--workers", "-w", type=int, default=2)
    ap.add_argument("--concurrency", "-c", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    sparse_bbox, fraction = SPARSE_BBOX, 0.001
    if a.quick:
        # one dense and one sampled fraction: the two ways a plan is made (0.1 and 0.001
        # plan the same way as 0.01); a box of ~480 sampled tiles, ~190 fixed cells
        a.millions, a.repeat, a.fractions = 0.5, 1, [1.0, 0.01]
        sparse_bbox, fraction = "30.0,-0.15,30.3,0.15", 0.01
    from fetch import NGINX

    with tempfile.TemporaryDirectory(prefix="tilesweep-blocks-") as tmp:
        work = Path(tmp)
        plan_rows = plan_table(work, a.millions, a.fractions) if a.part in ("plan", "both") else []
        fetch_rows: list[dict] = []
        if a.part in ("fetch", "both"):
            if Path(NGINX).exists():
                fetch_rows = fetch_table(work, sparse_bbox, fraction, a.workers, a.concurrency, a.repeat)
            else:
                print("part 2 skipped: nginx is not installed (apt-get install -y nginx)", file=sys.stderr)
        if plan_rows:
            print_plan(plan_rows, a.millions)
        if fetch_rows:
            print_fetch(fetch_rows, a.workers, a.concurrency, a.repeat)
    wrong = check(plan_rows, fetch_rows)
    if wrong:
        sys.exit(f"wrong results: {wrong}")


def check(plan_rows: list[dict], fetch_rows: list[dict]) -> str | None:
    """Why the results are wrong (the two block layouts must plan the same tiles, adaptive
    blocks never more of them; the sample's two fetches the same tiles), or None."""
    by_fraction: dict[float, dict[str, dict]] = {}
    for r in plan_rows:
        by_fraction.setdefault(r["fraction"], {})[r["mode"].split()[0]] = r
    for f, rows in by_fraction.items():
        fixed, adaptive = rows.get("fixed"), rows.get("adaptive")
        if fixed and adaptive and (fixed["tiles"] != adaptive["tiles"] or adaptive["blocks"] > fixed["blocks"]):
            return f"fraction {f:g}: fixed {fixed}, adaptive {adaptive}"
    if len(fetch_rows) == 3 and fetch_rows[1]["tiles"] != fetch_rows[2]["tiles"]:
        return f"the sample's fetches differ: {fetch_rows[1:]}"
    return None


if __name__ == "__main__":
    main()
