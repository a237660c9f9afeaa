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

- m0: the model alone, in this process, on pre-decoded pixels (``predict_pixels`` on a
  random uint8 batch, after a warm-up): the model's own rate, which no pipeline can beat.

m and e run once per decode mode of ``--decode`` and precision of ``--precision`` (comma
lists: ``--decode threads,processes,gpu --precision fp32,bf16``), so the modes are
compared on the same tiles in one run.

    .venv/bin/python benchmarks/predict.py                 # ~20,000 tiles, demo model, CPU
    .venv/bin/python benchmarks/predict.py --tiles 2000    # quicker
    python benchmarks/predict.py --model benchmarks.gpu_models:heavy --device cuda --precision fp32,bf16   # a GPU

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
    ap.add_argument("--decode", default="auto", help="decode modes of m and e, comma-separated: auto, threads, processes, gpu")
    ap.add_argument("--decode-processes", type=int, default=None, help="decode processes with --decode processes")
    ap.add_argument("--precision", default="fp32", help="model precisions, comma-separated: fp32, bf16, fp16 (PyTorch models)")
    ap.add_argument("--channels-last", action="store_true", help="PyTorch models in channels_last memory order")
    ap.add_argument("--alone-s", type=float, default=3.0, help="seconds of m0 (the model alone on pre-decoded pixels) "
                    "per precision; 0: skip it")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tilesweep-bench")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true", help="256 tiles, one fetch worker: checks the script works, and exits 1 "
                    "when a command's counts disagree (the test suite runs it)")
    a = ap.parse_args()
    if a.quick:
        a.tiles, a.workers, a.timeout, a.alone_s = 256, 1, 120.0, min(a.alone_s, 0.3)
    decodes = [d.strip() for d in a.decode.split(",") if d.strip()]
    precisions = [p.strip() for p in a.precision.split(",") if p.strip()]
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
        with fb.Nginx(tree, work / "nginx", 1) as server:
            source = server.url + "/{z}/{x}/{y}.jpg"
            f_dir = work / "f"
            shutil.copytree(template, f_dir)
            fb.err.print("f: tilesweep fetch ...")
            f = fb.measure([*py, "fetch", str(f_dir), "--source", source, "--workers", str(a.workers),
                            "--concurrency", str(a.concurrency), "-q"], work / "f.log", a.timeout, server)
            if f["rc"] != 0:
                sys.exit(f"a command failed; see {work / 'f.log'}")
            runs = []  # (decode, precision, m, e, m log, e log)
            for decode in decodes:
                for precision in precisions:
                    tag = f"{decode}-{precision}"
                    model = ["--model", a.model, "--device", a.device, "--threads", str(a.threads), "--batch", str(a.batch),
                             "--decode", decode, "--precision", precision]
                    if a.decode_processes:
                        model += ["--decode-processes", str(a.decode_processes)]
                    if a.channels_last:
                        model.append("--channels-last")
                    subprocess.run([*py, "predictions", "drop", str(f_dir), "--model", a.model], check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # m again from scratch
                    e_dir = work / f"e-{tag}"
                    shutil.copytree(template, e_dir)
                    fb.err.print(f"m: tilesweep predict --model {a.model} --decode {decode} --precision {precision} ...")
                    m = fb.measure([*py, "predict", str(f_dir), *model, "-q"], work / f"m-{tag}.log", a.timeout, server)
                    fb.err.print(f"e: tilesweep run --model {a.model} --decode {decode} --precision {precision} ...")
                    e = fb.measure([*py, "run", str(e_dir), "--source", source, "--concurrency", str(a.concurrency),
                                    "--workers", str(a.run_workers), *model, "-q"], work / f"e-{tag}.log", a.timeout, server)
                    for r, log in ((m, f"m-{tag}.log"), (e, f"e-{tag}.log")):
                        if r["rc"] != 0:
                            sys.exit(f"a command failed; see {work / log}")
                    runs.append((decode, precision, m, e, (work / f"m-{tag}.log").read_text(), (work / f"e-{tag}.log").read_text()))
                    shutil.rmtree(e_dir, ignore_errors=True)
        alone = {p: model_alone(a.model, a.device, p, a.channels_last, a.batch, a.alone_s) for p in precisions} if a.alone_s > 0 else {}
        on_gpu = a.device == "cuda"
        fi = _rate(r"([\d,]+) tiles/s", (work / "f.log").read_text())

        def limit_of(f_: float, m_: float) -> float:
            return min(f_, m_) if on_gpu else 1 / (1 / f_ + 1 / m_)

        kind = "min(f, m): model on the GPU" if on_gpu else "1/(1/f+1/m): shared cores"
        table = Table(title=f"predict: model {a.model} on the {'GPU' if on_gpu else 'CPU'}, {os.cpu_count()} cores, "
                            f"f with {a.workers} fetch workers, e with {a.run_workers}, {a.concurrency} in flight, "
                            f"batch {a.batch}, nginx on loopback; limit for e = {kind}")
        for col in ("what", "decode", "precision", "seconds", "tiles/s", "tiles/s after start-up", "limit for e", "e / limit",
                    "model busy", "model waits", "bottleneck", "peak RSS (largest process)"):
            table.add_column(col, justify="left" if col in ("what", "decode", "precision", "bottleneck") else "right")
        lines = []
        tiles = 0
        for decode, precision, m, e, m_log, e_log in runs:
            tiles = _count(m_log)
            e_tiles = _count(e_log)
            if not tiles or e_tiles != tiles:
                sys.exit(f"{decode}/{precision}: predict scored {tiles:,} tiles, run {e_tiles:,}")
            fr, mr, er = tiles / f["seconds"], tiles / m["seconds"], tiles / e["seconds"]
            mi, ei = _rate(PREDICT_RATE, m_log), _rate(PREDICT_RATE, e_log)
            if a.quick and any(math.isnan(v) for v in (fi, mi, ei)):
                sys.exit(f"quick run: a rate is missing from the commands' summaries (f {fi}, m {mi}, e {ei}): did a line change?")
            lim, lim_i = limit_of(fr, mr), limit_of(fi, mi)
            if not runs.index((decode, precision, m, e, m_log, e_log)):
                table.add_row("f: fetch only (`tilesweep fetch`)", "", "", f"{f['seconds']:.2f}", f"{fr:,.0f}", f"{fi:,.0f}",
                              "", "", "", "", "", f"{f['rss_mb']:.0f} MB")
            for name, r, rate, inner, lim_text, ratio, log in (
                ("m: model only (`tilesweep predict`, stored tiles)", m, mr, mi, "", "", m_log),
                ("e: end to end (`tilesweep run`, streamed)", e, er, ei, f"{lim:,.0f} / {lim_i:,.0f}",
                 f"{er / lim:.2f} / {ei / lim_i:.2f}", e_log),
            ):
                table.add_row(name, decode, precision, f"{r['seconds']:.2f}", f"{rate:,.0f}", f"{inner:,.0f}", lim_text, ratio,
                              _find(r"model busy (\d+%)", log), _find(r"model waits for input (\d+%)", log),
                              _find(r"bottleneck (\w+)", log), f"{r['rss_mb']:.0f} MB")
            lines.append(f"[{decode}, {precision}] e: " + " ".join(e_log.split()))
        for precision, (rate, n) in alone.items():
            table.add_row(f"m0: the model alone (pre-decoded pixels, batch {a.batch}, {n:,} inputs)", "", precision, "",
                          f"{rate:,.0f}", f"{rate:,.0f}", "", "", "", "", "", "")
        fb.con.print(table)
        fb.con.print(f"{tiles:,} zoom-18 tiles. 'seconds' and 'tiles/s' include each command's start-up (imports, model "
                     "load); 'after start-up' is the rate the command reports itself. Limits and ratios: wall / after "
                     "start-up. 'model waits': the share of e's wall time the model spent waiting for input.")
        if alone:
            best = max(r for r, _ in alone.values())
            target = min(fi, best)
            fb.con.print(f"targets: e >= 0.9 x min(f, m0) = {0.9 * target:,.0f} tiles/s after start-up "
                         f"(f {fi:,.0f}, best m0 {best:,.0f})")
        for line in lines:
            fb.con.print(line, highlight=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


PREDICT_RATE = r"undecodable[^)]*\),.*?parts? written, ([\d,]+) tiles/s"  # the summary line of predict and run


def _count(log: str) -> int:
    found = re.search(r"([\d,]+) tiles scored", log)
    return int(found.group(1).replace(",", "")) if found else 0


def _find(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    return found.group(1) if found else "?"


def model_alone(spec: str, device: str, precision: str, channels_last: bool, batch: int, seconds: float) -> tuple[float, int]:
    """The model's own rate (inputs/s) on random pre-decoded ``uint8`` pixels in this
    process: ``predict_pixels`` after two warm-up batches, for about ``seconds``."""
    import time

    import numpy as np

    from tilesweep.model import load_model, predict_pixels

    model = load_model(spec, device=device, precision=precision, channels_last=channels_last)  # type: ignore[arg-type]
    size = model.info.input.size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(2):
        predict_pixels(model, pixels)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        predict_pixels(model, pixels)  # returns numpy on the CPU: the device has finished
        n += batch
    return n / (time.perf_counter() - t0), n


def _rate(pattern: str, text: str) -> float:
    found = re.search(pattern, text, re.S)
    return float(found.group(1).replace(",", "")) if found else float("nan")


if __name__ == "__main__":
    main()
