"""Write docs/img/power-line-mosaic.png: a few zoom-18 tiles around a power line.

``python -m tilesweep.sim.mosaic [OUT.png] [--seed N]`` renders a 4 x 3 mosaic of zoom-18
tiles (the window of the demo area holding the most towers) and a second copy with the
ground-truth towers circled (``OUT-truth.png``), so anyone can check towers against truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..tiles import Tile, lnglat_to_fraction, tile_at
from .world import AreaLike, World

DEMO_AREA = (8.5, 47.3, 8.6, 47.4)


def mosaic(world: World, origin: Tile, cols: int = 4, rows: int = 3) -> np.ndarray:
    """The tiles ``origin .. origin + (cols, rows)`` side by side, uint8[rows*256, cols*256, 3]."""
    out = np.zeros((rows * 256, cols * 256, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            out[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = world.render_array(Tile(origin.z, origin.x + c, origin.y + r))
    return out


def best_window(world: World, area: AreaLike = DEMO_AREA, z: int = 18, cols: int = 4, rows: int = 3) -> Tile:
    """The top-left tile of the cols x rows window (around some tower) holding most towers."""
    towers = world.towers(area)
    tiles = [tile_at(t.lon, t.lat, z) for t in towers]
    best, score = tiles[0], -1
    for t in tiles:
        o = Tile(z, t.x - cols // 2, t.y - rows // 2)
        n = sum(o.x <= u.x < o.x + cols and o.y <= u.y < o.y + rows for u in tiles)
        if n > score:
            best, score = o, n
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", nargs="?", default="docs/img/power-line-mosaic.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    world = World(args.seed)
    origin = best_window(world)
    img = mosaic(world, origin)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out, optimize=True)
    marked = Image.fromarray(img)
    draw = ImageDraw.Draw(marked)
    n = 1 << origin.z
    towers = []
    for r in range(3):
        for c in range(4):
            towers += world.towers_in_tile(Tile(origin.z, origin.x + c, origin.y + r))
    for t in towers:
        fx, fy = lnglat_to_fraction(t.lon, t.lat)
        px, py = (fx * n - origin.x) * 256, (fy * n - origin.y) * 256
        draw.ellipse([px - 22, py - 22, px + 22, py + 22], outline=(255, 40, 40), width=3)
    for r in range(1, 3):
        draw.line([(0, r * 256), (4 * 256, r * 256)], fill=(255, 255, 255), width=1)
    for c in range(1, 4):
        draw.line([(c * 256, 0), (c * 256, 3 * 256)], fill=(255, 255, 255), width=1)
    truth_path = out.with_name(out.stem + "-truth" + out.suffix)
    marked.save(truth_path, optimize=True)
    print(f"{out} and {truth_path}: tiles {origin} .. +3/+2, {len(towers)} towers")


if __name__ == "__main__":
    main()
