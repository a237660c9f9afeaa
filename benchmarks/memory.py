"""Memory of a streamed `run` as tiles go through: resident memory (RSS) against tiles
scored, sampled twice a second, in one process (the prediction pipeline with its fetch
thread). Memory must level off once the bounded queues are full, not grow with the tile
count.

nginx serves the cached static simulator tree of `benchmarks/fetch.py` on loopback.

    .venv/bin/python benchmarks/memory.py                  # ~20,000 tiles, demo model
    .venv/bin/python benchmarks/memory.py --tiles 5000

Needs nginx.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # appended: never shadow a stdlib module
import fetch as fb  # noqa: E402

from rich.table import Table  # noqa: E402

from tilesweep.fetch import FetchSettings  # noqa: E402
from tilesweep.model import load_model  # noqa: E402
from tilesweep.predict import StreamFetch, predict_sweep  # noqa: E402
from tilesweep.sources import parse_source  # noqa: E402
from tilesweep.sweep import Sweep  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=20_000)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tilesweep-bench")
    ap.add_argument("--quick", action="store_true", help="256 tiles: checks the script works, and exits 1 when the run "
                    "did not score every planned tile (the test suite runs it)")
    a = ap.parse_args()
    if a.quick:
        a.tiles = 256
    if not Path(fb.NGINX).exists():
        sys.exit("nginx not found: install it to run this benchmark")
    bbox, rng = fb.area_for(a.tiles)
    tree = fb.ensure_tree(a.cache, bbox, rng, 0)
    work = Path(tempfile.mkdtemp(prefix="tilesweep-memory-bench-"))
    samples: list[tuple[int, float]] = []
    try:
        subprocess.run([fb.PY, "-m", "tilesweep", "plan", ",".join(map(str, bbox)), str(work / "s"), "--zoom",
                        str(fb.ZOOM), "--block-zoom", str(fb.BLOCK_ZOOM)], check=True, stdout=subprocess.DEVNULL)
        model = load_model(a.model)
        with fb.Nginx(tree, work / "nginx", 1) as server, Sweep.open(work / "s") as sweep:
            source = sweep.bind_source(parse_source(server.url + "/{z}/{x}/{y}.jpg", []))
            before = rss_mb()

            def sample(r) -> None:  # type: ignore[no-untyped-def]
                samples.append((r.stages["model"].tiles if r.stages else 0, rss_mb()))

            report = predict_sweep(sweep, model, on_progress=sample, stream=StreamFetch(source, FetchSettings(concurrency=256)))
            planned = sweep.summary().tiles
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"streamed run: RSS against tiles scored ({report.tiles:,} tiles, model {a.model}; "
                        f"{before:.0f} MB before the run, model loaded)")
    table.add_column("tiles scored", justify="right")
    table.add_column("RSS", justify="right")
    step = max(1, len(samples) // 10)
    for tiles, mb in samples[::step] + samples[-1:]:
        table.add_row(f"{tiles:,}", f"{mb:.0f} MB")
    fb.con.print(table)
    half = [mb for t, mb in samples if t >= report.tiles // 2]
    fb.con.print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
                 f"highest in the first half {max((mb for t, mb in samples if t < report.tiles // 2), default=0):.0f} MB, "
                 f"in the second half {max(half, default=0):.0f} MB")
    if a.quick and report.tiles != planned:
        sys.exit(f"quick run: {report.tiles:,} of {planned:,} planned tiles scored")


if __name__ == "__main__":
    main()
