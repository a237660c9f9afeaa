"""Prediction benchmark: fetch-only f, model-only m and end-to-end e, in one run.

nginx serves the cached static simulator tree of `benchmarks/fetch.py` on loopback. On the
same planned tiles (zoom 18, blocks of 256) it times, as the user would run them:

- f: `tilesweep fetch` into a fresh sweep (tiles/s);
- m: `tilesweep predict --model M` over that stored sweep (read + decode + model);
- e: `tilesweep run --model M` on another fresh sweep (tiles stream from nginx through
  decoding into the model; nothing is stored).

When the model runs on the same CPU cores as fetching and decoding, the cores are shared
and the limit for e is 1/(1/f + 1/m); with the model on a GPU the limit is min(f, m). The
table prints e beside the limit that applies, the model-busy share of e, and the peak RSS
of each command (largest process).

    .venv/bin/python benchmarks/predict.py                 # ~20,000 tiles, demo model, CPU
    .venv/bin/python benchmarks/predict.py --tiles 2000    # quicker
    python benchmarks/predict.py --model benchmarks.gpu_models:heavy --device cuda   # a GPU

Needs nginx; the tree is rendered once and cached (see benchmarks/fetch.py). The GPU
models are in benchmarks/gpu_models.py (PyTorch; run from the repository root).
"""

from __future__ import annotations

import argparse
import math
import os
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
    ap.add_argument("--workers", type=int, default=2, help="fetch worker processes of f")
    ap.add_argument("--run-workers", type=int, default=1, help="fetch workers of e (1: a thread of the run process)")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--model", default="demo", help="--model of predict and run")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=2, help="decode threads of predict and run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tilesweep-bench")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true", help="256 tiles, one fetch worker: checks the script works, and exits 1 "
                    "when a command's counts disagree (the test suite runs it)")
    a = ap.parse_args()
    if a.quick:
        a.tiles, a.workers, a.timeout = 256, 1, 120.0
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
            model = ["--model", a.model, "--device", a.device, "--threads", str(a.threads), "--batch", str(a.batch)]
            f_dir, e_dir = work / "f", work / "e"
            shutil.copytree(template, f_dir)
            shutil.copytree(template, e_dir)
            fb.err.print("f: tilesweep fetch ...")
            f = fb.measure([*py, "fetch", str(f_dir), "--source", source, "--workers", str(a.workers),
                            "--concurrency", str(a.concurrency), "-q"], work / "f.log", a.timeout, server)
            fb.err.print(f"m: tilesweep predict --model {a.model} ...")
            m = fb.measure([*py, "predict", str(f_dir), *model, "-q"], work / "m.log", a.timeout, server)
            fb.err.print(f"e: tilesweep run --model {a.model} ...")
            e = fb.measure([*py, "run", str(e_dir), "--source", source, "--concurrency", str(a.concurrency),
                            "--workers", str(a.run_workers), *model, "-q"],
                           work / "e.log", a.timeout, server)
        for r, log in ((f, "f.log"), (m, "m.log"), (e, "e.log")):
            if r["rc"] != 0:
                sys.exit(f"a command failed; see {work / log}")
        tiles = int(re.search(r"([\d,]+) tiles scored", (work / "m.log").read_text()).group(1).replace(",", ""))
        e_log = (work / "e.log").read_text()
        e_tiles = re.search(r"([\d,]+) tiles scored", e_log)
        if a.quick and (not tiles or e_tiles is None or int(e_tiles.group(1).replace(",", "")) != tiles):
            sys.exit(f"quick run: predict scored {tiles:,} tiles, run {e_tiles.group(1) if e_tiles else 'none'}")
        busy = re.search(r"model busy (\d+)%", e_log)
        bottleneck = re.search(r"bottleneck (\w+)", e_log)
        on_gpu = a.device == "cuda"
        fr, mr, er = tiles / f["seconds"], tiles / m["seconds"], tiles / e["seconds"]
        # each command's own rate, start-up (imports, model load, CUDA init) left out
        fi = _rate(r"([\d,]+) tiles/s", (work / "f.log").read_text())
        mi = _rate(PREDICT_RATE, (work / "m.log").read_text())
        ei = _rate(PREDICT_RATE, e_log)
        if a.quick and any(math.isnan(v) for v in (fi, mi, ei)):
            sys.exit(f"quick run: a rate is missing from the commands' summaries (f {fi}, m {mi}, e {ei}): did a line change?")

        def limit_of(f_: float, m_: float) -> float:
            return min(f_, m_) if on_gpu else 1 / (1 / f_ + 1 / m_)

        kind = "min(f, m): model on the GPU" if on_gpu else "1/(1/f+1/m): shared cores"
        lim, lim_i = limit_of(fr, mr), limit_of(fi, mi)
        rows = [
            ("f: fetch only (`tilesweep fetch`)", f, fr, fi, "", ""),
            ("m: model only (`tilesweep predict`, stored tiles)", m, mr, mi, "", ""),
            ("e: end to end (`tilesweep run`, streamed)", e, er, ei, f"{lim:,.0f} / {lim_i:,.0f}",
             f"{er / lim:.2f} / {ei / lim_i:.2f}"),
        ]
        where = "GPU" if on_gpu else "CPU"
        table = Table(title=f"predict: {tiles:,} zoom-18 tiles, model {a.model} on the {where}, {os.cpu_count()} cores, "
                            f"f with {a.workers} fetch workers, e with {a.run_workers}, {a.concurrency} in flight, "
                            "nginx on loopback; "
                            f"limit for e = {kind}")
        for col in ("what", "seconds", "tiles/s", "tiles/s after start-up", "limit for e", "e / limit",
                    "peak RSS (largest process)"):
            table.add_column(col, justify="left" if col == "what" else "right")
        for name, r, rate, inner, lim_text, ratio in rows:
            table.add_row(name, f"{r['seconds']:.2f}", f"{rate:,.0f}", f"{inner:,.0f}", lim_text, ratio, f"{r['rss_mb']:.0f} MB")
        fb.con.print(table)
        fb.con.print(f"during e: model busy {busy.group(1) if busy else '?'}% of the wall time, bottleneck "
                     f"{bottleneck.group(1) if bottleneck else '?'}. 'seconds' and 'tiles/s' include each command's "
                     "start-up (imports, model load); 'after start-up' is the rate the command reports itself. "
                     "Limits and ratios: wall / after start-up.")
        fb.con.print(e_log.strip(), highlight=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


PREDICT_RATE = r"undecodable[^)]*\),.*?parts? written, ([\d,]+) tiles/s"  # the summary line of predict and run


def _rate(pattern: str, text: str) -> float:
    found = re.search(pattern, text, re.S)
    return float(found.group(1).replace(",", "")) if found else float("nan")


if __name__ == "__main__":
    main()
