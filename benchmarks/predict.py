"""Prediction benchmark: fetch-only f, model-only m and end-to-end e, in one run.

nginx serves the cached static simulator tree of `benchmarks/fetch.py` on loopback. On the
same planned tiles (zoom 18, blocks of 256) it times, as the user would run them:

- f: `tilesweep fetch` into a fresh sweep (tiles/s);
- m: `tilesweep predict --model demo` over that stored sweep (read + decode + model);
- e: `tilesweep run --model demo` on another fresh sweep (fetch and predict side by side).

Here the model runs on the same CPU cores as fetching and decoding, so the cores are
shared and the limit for e is 1/(1/f + 1/m); with the model on a GPU it would be min(f, m).
The table prints e beside that limit, the model-busy share of the end-to-end run, and peak
RSS of each command (largest process).

    .venv/bin/python benchmarks/predict.py                 # ~20,000 tiles
    .venv/bin/python benchmarks/predict.py --tiles 5000    # quicker

Needs nginx; the tree is rendered once and cached (see benchmarks/fetch.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch as fb  # noqa: E402  (the nginx, tree and measuring helpers of the fetch benchmark)

from rich.table import Table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=20_000, help="about this many zoom-18 tiles (whole blocks of 256)")
    ap.add_argument("--workers", type=int, default=2, help="fetch worker processes (fetch and run)")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tilesweep-bench")
    ap.add_argument("--timeout", type=float, default=900.0)
    a = ap.parse_args()
    if not Path(fb.NGINX).exists():
        sys.exit("nginx not found: install it to run this benchmark")
    bbox, rng = fb.area_for(a.tiles)
    tree = fb.ensure_tree(a.cache, bbox, rng, 0)
    work = Path(tempfile.mkdtemp(prefix="tilesweep-predict-bench-"))
    py = [fb.PY, "-m", "tilesweep"]
    try:
        template = work / "plan"
        subprocess.run([*py, "plan", ",".join(map(str, bbox)), str(template), "--zoom", str(fb.ZOOM),
                        "--block-zoom", str(fb.BLOCK_ZOOM)], check=True, stdout=subprocess.DEVNULL)
        rows = []
        with fb.Nginx(tree, work / "nginx", 1) as server:
            source = server.url + "/{z}/{x}/{y}.jpg"
            fetch_options = ["--workers", str(a.workers), "--concurrency", str(a.concurrency)]
            f_dir, e_dir = work / "f", work / "e"
            shutil.copytree(template, f_dir)
            shutil.copytree(template, e_dir)
            fb.err.print("f: tilesweep fetch ...")
            f = fb.measure([*py, "fetch", str(f_dir), "--source", source, *fetch_options, "-q"], work / "f.log", a.timeout, server)
            fb.err.print("m: tilesweep predict --model demo ...")
            m = fb.measure([*py, "predict", str(f_dir), "--model", "demo", "-q"], work / "m.log", a.timeout, server)
            fb.err.print("e: tilesweep run --model demo ...")
            e = fb.measure([*py, "run", str(e_dir), "--source", source, "--model", "demo", *fetch_options, "-q"],
                           work / "e.log", a.timeout, server)
        for r, log in ((f, "f.log"), (m, "m.log"), (e, "e.log")):
            if r["rc"] != 0:
                sys.exit(f"a command failed; see {work / log}")
        tiles = int(re.search(r"([\d,]+) tiles scored", (work / "m.log").read_text()).group(1).replace(",", ""))
        busy = re.search(r"model busy (\d+)%", (work / "e.log").read_text())
        fr, mr, er = tiles / f["seconds"], tiles / m["seconds"], tiles / e["seconds"]
        shared, gpu = 1 / (1 / fr + 1 / mr), min(fr, mr)
        rows = [
            ("f: fetch only (`tilesweep fetch`)", f, fr, "", ""),
            ("m: model only (`tilesweep predict`, stored tiles)", m, mr, "", ""),
            ("e: end to end (`tilesweep run`)", e, er, f"{shared:,.0f} (shared cores) / {gpu:,.0f} (GPU)",
             f"{er / shared:.2f} (shared)"),
        ]
        table = Table(title=f"predict: {tiles:,} zoom-18 tiles, demo model on the CPU, {a.workers} fetch workers, "
                            f"{a.concurrency} in flight, nginx on loopback")
        for col in ("what", "seconds", "tiles/s", "limit for e", "e / limit", "peak RSS (largest process)"):
            table.add_column(col, justify="left" if col == "what" else "right")
        for name, r, rate, limit, ratio in rows:
            table.add_row(name, f"{r['seconds']:.2f}", f"{rate:,.0f}", limit, ratio, f"{r['rss_mb']:.0f} MB")
        fb.con.print(table)
        fb.con.print(f"model busy during e: {busy.group(1) if busy else '?'}% (of the wall time). Times include each "
                     "command's start-up (model load included).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
