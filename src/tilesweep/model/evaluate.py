"""Score a tower model against the simulator's ground truth.

A tile is *positive* iff the centre of a tower lies in it (west and north edges in, east
and south edges out: :meth:`World.tile_has_tower`). That is the rule the demo model was
trained on and the one its precision and recall are reported by.

A tower standing on a tile edge is drawn in both tiles, so a second, *edge-tolerant*
reading is reported beside it: with a margin of ``m`` px, a predicted positive counts as
right if a tower centre lies within ``m`` px outside the tile, and a tower only has to be
found when its centre lies more than ``m`` px inside. It is never used instead of the
strict numbers, only to show how many of the errors sit on tile edges.

``python -m tilesweep.model.evaluate --seed 1 --area 8.5,47.3,8.6,47.4`` renders every
zoom-18 tile of the area in-process and prints both readings.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from ..decode import decode
from ..tiles import Tile, lnglat_to_fraction, tile_at
from .base import Model, score_tiles

EDGE_MARGIN_PX = 8.0
"""Margin of the edge-tolerant reading, px of a 256 px tile (3 m on the ground at
zoom 18 and latitude 47; a tower's steel base is 8-11 m wide)."""


class TileTruth(NamedTuple):
    """Ground truth of one tile: ``strict`` (a tower centre in the tile), ``inner`` (one
    more than the margin inside), ``outer`` (one within the margin outside, or inside)."""

    strict: bool
    inner: bool
    outer: bool


def tower_pixels(world: Any, tile: Tile, size: int = 256) -> np.ndarray:
    """Centres of the towers in ``tile`` and its eight neighbours, as ``float64[k, 2]``
    (column, row) positions in px of the tile's ``size`` px grid, from its north-west
    corner (values outside ``0..size`` are in a neighbour)."""
    n = 1 << tile.z
    pts = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            x, y = tile.x + dx, tile.y + dy
            if 0 <= y < n:
                for t in world.towers_in_tile(Tile(tile.z, x % n, y)):
                    fx, fy = lnglat_to_fraction(t.lon, t.lat)
                    col = (fx * n - tile.x) * size
                    if dx == 1 and x >= n:  # wrapped across the antimeridian
                        col += n * size
                    elif dx == -1 and x < 0:
                        col -= n * size
                    pts.append((col, (fy * n - tile.y) * size))
    return np.array(pts, np.float64).reshape(-1, 2)


def tile_truth(world: Any, tile: Tile, margin_px: float = EDGE_MARGIN_PX) -> TileTruth:
    """The strict and edge-tolerant truth of one tile (``margin_px`` in 256 px tile px)."""
    p = tower_pixels(world, tile)
    inner = bool(np.any(np.all((p >= margin_px) & (p < 256 - margin_px), axis=1)))
    outer = bool(np.any(np.all((p >= -margin_px) & (p < 256 + margin_px), axis=1)))
    return TileTruth(world.tile_has_tower(tile), inner, outer)


@dataclass(frozen=True)
class PrecisionRecall:
    """``right`` of ``predicted`` positive tiles were right; ``found`` of ``actual``
    positive tiles were predicted."""

    right: int
    predicted: int
    found: int
    actual: int

    @property
    def precision(self) -> float:
        """right / predicted (1.0 when nothing was predicted)."""
        return self.right / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        """found / actual (1.0 when there was nothing to find)."""
        return self.found / self.actual if self.actual else 1.0

    def __str__(self) -> str:
        return (f"precision {self.precision:.3f} ({self.right}/{self.predicted}), "
                f"recall {self.recall:.3f} ({self.found}/{self.actual})")


def precision_recall(predicted: Sequence[bool] | np.ndarray, actual: Sequence[bool] | np.ndarray) -> PrecisionRecall:
    """Precision and recall of boolean predictions against boolean truth, tile by tile."""
    p, a = np.asarray(predicted, bool), np.asarray(actual, bool)
    tp = int(np.sum(p & a))
    return PrecisionRecall(tp, int(p.sum()), tp, int(a.sum()))


def edge_tolerant(predicted: Sequence[bool] | np.ndarray, truths: Sequence[TileTruth]) -> PrecisionRecall:
    """Precision against ``outer`` truth and recall against ``inner`` truth."""
    p = np.asarray(predicted, bool)
    inner = np.array([t.inner for t in truths], bool)
    outer = np.array([t.outer for t in truths], bool)
    return PrecisionRecall(int(np.sum(p & outer)), int(p.sum()), int(np.sum(p & inner)), int(inner.sum()))


def sample_tiles(world: Any, area: Sequence[float], z: int = 18, n_random: int = 100, seed: int = 0, max_tower_tiles: int | None = None) -> list[Tile]:
    """A test set that is not all negatives: the tiles holding the towers of ``area``
    (at most ``max_tower_tiles``, a seeded choice), their eight neighbours (wires and
    towers cut by the edge: the hard negatives) and ``n_random`` random tiles of the area.
    Deterministic for a given ``seed``; sorted."""
    rng = random.Random(seed)
    west, south, east, north = area
    towers = sorted({tile_at(t.lon, t.lat, z) for t in world.towers(tuple(area))})
    if max_tower_tiles is not None and len(towers) > max_tower_tiles:
        towers = rng.sample(towers, max_tower_tiles)
    chosen = set(towers)
    for t in towers:
        chosen.update(Tile(z, t.x + dx, t.y + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1))
    a, b = tile_at(west, north, z), tile_at(east, south, z)
    for _ in range(n_random):
        chosen.add(Tile(z, rng.randint(a.x, b.x), rng.randint(a.y, b.y)))
    return sorted(chosen)


@dataclass(frozen=True)
class Evaluation:
    """The outcome of :func:`evaluate`: both readings, tile count and timings (s)."""

    strict: PrecisionRecall
    tolerant: PrecisionRecall
    tiles: int
    render_s: float
    model_s: float

    def __str__(self) -> str:
        return (f"{self.tiles} tiles: strict {self.strict}; edge-tolerant ({EDGE_MARGIN_PX:g} px) "
                f"{self.tolerant}; render {self.render_s:.1f} s, decode+model {self.model_s:.1f} s")


def evaluate(model: Model, world: Any, tiles: Iterable[Tile], *, fmt: str = "jpeg", label: int = 0, batch_size: int = 32) -> Evaluation:
    """Render ``tiles`` from ``world`` as ``fmt`` bytes, decode and score them with
    ``model``, and compare ``score[:, label] >= threshold`` with the ground truth."""
    tiles = list(tiles)
    pred = np.zeros(len(tiles), bool)
    truths: list[TileTruth] = []
    render_s = model_s = 0.0
    for i in range(0, len(tiles), batch_size):
        part = tiles[i : i + batch_size]
        t0 = time.perf_counter()
        data = [world.render(t, fmt=fmt) for t in part]
        truths += [tile_truth(world, t) for t in part]
        t1 = time.perf_counter()
        scores = score_tiles(model, [decode(d) for d in data], batch_size)
        pred[i : i + len(part)] = scores[:, label] >= model.info.threshold
        model_s += time.perf_counter() - t1
        render_s += t1 - t0
    strict = precision_recall(pred, [t.strict for t in truths])
    return Evaluation(strict, edge_tolerant(pred, truths), len(tiles), render_s, model_s)


def main(argv: list[str] | None = None) -> None:
    from ..sim import World, tiles_in_bbox
    from .load import load_model

    p = argparse.ArgumentParser(prog="python -m tilesweep.model.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--seed", type=int, default=1, help="world seed of the held-out area")
    p.add_argument("--area", default="8.5,47.3,8.6,47.4", help="west,south,east,north in degrees")
    p.add_argument("--zoom", type=int, default=18)
    p.add_argument("--sample", type=int, default=0, help="score sample_tiles(...) with this many random tiles instead of every tile")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    west, south, east, north = (float(v) for v in args.area.split(","))
    area = (west, south, east, north)
    world = World(args.seed)
    model = load_model(args.model, threads=args.threads)
    tiles = sample_tiles(world, area, args.zoom, args.sample) if args.sample else list(tiles_in_bbox(west, south, east, north, args.zoom))
    print(f"model {model.name}, world seed {args.seed}, area {args.area}, zoom {args.zoom}")
    print(evaluate(model, world, tiles))


if __name__ == "__main__":
    main()
