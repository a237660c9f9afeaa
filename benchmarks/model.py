"""Tiles per second of each step between tile bytes and demo-model scores, at batch 32.

    python benchmarks/model.py [--tiles 256] [--model demo] [--repeat 5]

Steps, each timed alone on simulator JPEG tiles (zoom 18, 256 px):
decode (simplejpeg and Pillow), fit + normalise (resize to the model input, NCHW float32),
model (``predict`` on ready batches) with 1 thread and with onnxruntime's default, and the
three together on one thread. Prints a table; asserts nothing (timings are machine-bound).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

from tilesweep.decode import JPEG_BACKEND, decode
from tilesweep.model import load_model, prepare
from tilesweep.sim import World, tiles_in_bbox


def rate(n: int, fn: Callable[[], object], repeat: int) -> float:
    """Best of ``repeat`` runs, in items per second."""
    best = float("inf")
    fn()  # warm up
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", type=int, default=256)
    p.add_argument("--model", default="demo")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="64 tiles, one repeat: checks the script works (the test suite runs it)")
    args = p.parse_args(argv)
    if args.quick:
        args.tiles, args.repeat = 64, 1
    world = World(1)
    tiles = list(tiles_in_bbox(8.5, 47.3, 8.6, 47.4, 18))[: args.tiles]
    data = [world.render(t) for t in tiles]
    rgb = [decode(d) for d in data]
    one = load_model(args.model, threads=1)
    many = load_model(args.model)
    spec = one.info.input
    b = args.batch
    batches = [prepare(rgb[i : i + b], spec)[0] for i in range(0, len(rgb), b)]
    n = len(tiles)

    def model_all(m):  # type: ignore[no-untyped-def]
        return lambda: [m.predict(x) for x in batches]

    def end_to_end() -> None:
        for i in range(0, n, b):
            one.predict(prepare([decode(d) for d in data[i : i + b]], spec)[0])

    rows = [
        (f"decode JPEG ({JPEG_BACKEND})", rate(n, lambda: [decode(d) for d in data], args.repeat)),
        ("decode JPEG (Pillow)", rate(n, lambda: [decode(d, use_pillow=True) for d in data], args.repeat)),
        (f"fit + normalise to {spec.size} px", rate(n, lambda: [prepare(rgb[i : i + b], spec) for i in range(0, n, b)], args.repeat)),
        (f"model {one.name}, 1 thread", rate(n, model_all(one), args.repeat)),
        (f"model {many.name}, default threads ({os.cpu_count()} cores)", rate(n, model_all(many), args.repeat)),
        ("decode + fit + model, 1 thread", rate(n, end_to_end, args.repeat)),
    ]
    print(f"{n} zoom-18 JPEG tiles (256 px, {sum(map(len, data)) / n / 1e3:.1f} kB each), batch {b}, device {one.device}")
    w = max(len(r[0]) for r in rows)
    for name, r in rows:
        print(f"  {name:<{w}}  {r:8.0f} tiles/s  {1e3 / r:6.2f} ms/tile")


if __name__ == "__main__":
    main()
