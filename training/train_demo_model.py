"""Train the demo model: does a zoom-18 tile hold a high-voltage power tower?

    pip install -e '.[train]'
    nice -n 19 python training/train_demo_model.py            # writes src/tilesweep/model/demo.onnx

Data: the built-in simulator, world seed ``--seed`` (0), in six 0.4 x 0.4 degree areas at
latitudes from 0 to 60 degrees (tiles cover 153 to 77 m on the ground at zoom 18, so the
towers come in several apparent sizes). Zoom-17 tiles are rendered at 512 px, which is the
exact pixel grid of their four zoom-18 children; each gives the four children themselves
(the tiles a sweep sees) and 256 px windows at other offsets, half of them placed so that a
tower sits within 24 px of a window edge, inside or out, to teach the rule at the edge.
Every window goes through JPEG (quality 70..95), :func:`tilesweep.decode.decode` and
:func:`tilesweep.decode.resize` to 128 px, as in a sweep.

Label: positive iff a tower centre lies in the window (west/north edges in, east/south
out), the same rule as :meth:`World.tile_has_tower`.

The network is eight 3x3 conv layers (BatchNorm, ReLU, stride 2 four times: 128 -> 8),
a 1x1 conv to an 8x8 map of "tower centre here" logits, and a global max; the ONNX graph
ends in a sigmoid, so scores are probabilities in 0..1, and also outputs the map as
``heatmap`` (where in the tile the tower is: tilesweep.model.onnxrt). Runs on one CPU thread.

The rendered windows are cached under ``~/.cache/tilesweep-train`` (about 0.5 GB per
10,000), keyed by the data settings, so a second run only trains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from tilesweep.decode import decode, resize
from tilesweep.model.evaluate import evaluate, sample_tiles
from tilesweep.sim import World, encode
from tilesweep.tiles import Tile, lnglat_to_fraction, tile_at

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "tilesweep" / "model" / "demo.onnx"
CACHE = Path(os.environ.get("TILESWEEP_TRAIN_CACHE", Path.home() / ".cache" / "tilesweep-train"))

INPUT = 128
TRAIN_AREAS = (
    (8.1, 46.9, 8.5, 47.3),  # 47 N (beside, not over, the demo area: another seed is held out there)
    (-3.4, 40.0, -3.0, 40.4),  # 40 N
    (24.0, 60.0, 24.4, 60.4),  # 60 N
    (30.0, -0.2, 30.4, 0.2),  # equator
    (-60.4, -25.4, -60.0, -25.0),  # 25 S
    (100.0, 20.0, 100.4, 20.4),  # 20 N
)
HELD_OUT_SEED = 1
HELD_OUT_AREA = (8.5, 47.3, 8.6, 47.4)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data --------------------------------------------------------------------------------


def canvas_towers(world: World, parent: Tile) -> np.ndarray:
    """Tower centres near ``parent`` (zoom 17) in px of its 512 px canvas."""
    n = 1 << parent.z
    pts = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            t = Tile(parent.z, parent.x + dx, parent.y + dy)
            if 0 <= t.x < n and 0 <= t.y < n:
                for tw in world.towers_in_tile(t):
                    fx, fy = lnglat_to_fraction(tw.lon, tw.lat)
                    pts.append(((fx * n - parent.x) * 512, (fy * n - parent.y) * 512))
    return np.array(pts, np.float64).reshape(-1, 2)


def window_label(pts: np.ndarray, ox: int, oy: int) -> bool:
    """A tower centre in the window [ox, ox + 256) x [oy, oy + 256)?"""
    if not len(pts):
        return False
    c, r = pts[:, 0] - ox, pts[:, 1] - oy
    return bool(np.any((c >= 0) & (c < 256) & (r >= 0) & (r < 256)))


def edge_window(pts: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """A window offset that puts a tower within 24 px of one of the window's edges."""
    inside = pts[(pts[:, 0] >= 0) & (pts[:, 0] < 512) & (pts[:, 1] >= 0) & (pts[:, 1] < 512)]
    if not len(inside):
        return None
    c, r = inside[rng.integers(len(inside))]
    d = rng.uniform(-24, 24)  # signed: > 0 inside the window
    along = rng.uniform(0, 256)
    side = rng.integers(4)
    if side == 0:  # west edge
        ox, oy = c - d, r - along
    elif side == 1:  # east edge
        ox, oy = c + d - 256, r - along
    elif side == 2:  # north edge
        ox, oy = c - along, r - d
    else:  # south edge
        ox, oy = c - along, r + d - 256
    ox, oy = int(round(ox)), int(round(oy))
    if not (0 <= ox <= 256 and 0 <= oy <= 256):
        return None
    return ox, oy


def through_jpeg(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a sweep sees: JPEG at a random quality, decoded, resized to the input size."""
    q = int(rng.integers(70, 96))
    return resize(decode(encode(np.ascontiguousarray(rgb), "jpeg", q)), INPUT)


def build(seed: int, n_tower_parents: int, n_background: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the training set: ``uint8[M, 128, 128, 3]`` images, ``bool[M]`` labels and
    ``bool[M]`` "aligned" flags (a real zoom-18 tile rather than an offset window)."""
    world = World(seed)
    rng = np.random.default_rng(seed)
    tower_parents: set[Tile] = set()
    background: list[Tile] = []
    for area in TRAIN_AREAS:
        for t in world.towers(area):
            tower_parents.add(tile_at(t.lon, t.lat, 17))
        a, b = tile_at(area[0], area[3], 17), tile_at(area[2], area[1], 17)
        background += [Tile(17, int(rng.integers(a.x, b.x + 1)), int(rng.integers(a.y, b.y + 1))) for _ in range(n_background // len(TRAIN_AREAS))]
    tp = sorted(tower_parents)
    chosen = [tp[i] for i in rng.choice(len(tp), size=min(n_tower_parents, len(tp)), replace=False)]
    log(f"{len(tp)} zoom-17 tiles with towers in the training areas; rendering {len(chosen)} of them and {len(background)} random ones")
    imgs, labels, aligned = [], [], []
    t0 = time.time()
    jobs = [(p, True) for p in chosen] + [(p, False) for p in background]
    for k, (parent, has_towers) in enumerate(jobs):
        canvas = world.render_array(parent, 512)
        pts = canvas_towers(world, parent)
        windows = [(0, 0, True), (256, 0, True), (0, 256, True), (256, 256, True)]
        extra = 4 if has_towers else 1
        for j in range(extra):
            w = edge_window(pts, rng) if (has_towers and j % 2 == 0) else None
            if w is None:
                w = (int(rng.integers(0, 257)), int(rng.integers(0, 257)))
            windows.append((w[0], w[1], False))
        for ox, oy, al in windows:
            imgs.append(through_jpeg(canvas[oy : oy + 256, ox : ox + 256], rng))
            labels.append(window_label(pts, ox, oy))
            aligned.append(al)
        if (k + 1) % 250 == 0:
            log(f"rendered {k + 1}/{len(jobs)} zoom-17 tiles, {len(imgs)} windows, {time.time() - t0:.0f} s")
    return np.stack(imgs), np.array(labels), np.array(aligned)


def dataset(seed: int, n_tower_parents: int, n_background: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    key = json.dumps([seed, n_tower_parents, n_background, INPUT, TRAIN_AREAS, 3], sort_keys=True)
    path = CACHE / f"demo-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.exists():
        log(f"training windows from the cache {path}")
        with np.load(path) as f:
            return f["x"], f["y"], f["aligned"]
    x, y, al = build(seed, n_tower_parents, n_background)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, aligned=al)
    os.replace(tmp, path)
    return x, y, al


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of ``uint8[..., 3]`` images, 0..1 units."""
    total, sq, n = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(x), 512):
        part = x[i : i + 512].reshape(-1, 3).astype(np.float64) / 255.0
        total += part.sum(0)
        sq += (part * part).sum(0)
        n += len(part)
    mean = total / n
    return mean, np.sqrt(sq / n - mean * mean)


# --- model -------------------------------------------------------------------------------


def build_net():  # type: ignore[no-untyped-def]
    import torch.nn as nn

    def block(cin: int, cout: int, stride: int) -> list:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 16, 2), *block(16, 32, 2), *block(32, 32, 1), *block(32, 48, 2),
        *block(48, 48, 1), *block(48, 64, 2), *block(64, 64, 1), nn.Conv2d(64, 1, 1),
    )


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, mean: np.ndarray, std: np.ndarray):  # type: ignore[no-untyped-def]
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    net = build_net()
    n = len(x)
    rng = np.random.default_rng(seed + 1)
    batch = 64
    steps = epochs * (n // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    yt = torch.from_numpy(y.astype(np.float32))
    step = 0
    for ep in range(epochs):
        net.train()
        order = rng.permutation(n)
        t0, tot, correct = time.time(), 0.0, 0
        for i in range(0, n - batch + 1, batch):
            idx = order[i : i + batch]
            xb = torch.from_numpy(x[idx]).permute(0, 3, 1, 2).float().div_(255.0)
            # brightness and contrast jitter (+-8 %): haze and season vary between areas
            g = 1.0 + 0.08 * (2 * torch.rand(len(idx), 1, 1, 1) - 1)
            o = 0.03 * (2 * torch.rand(len(idx), 1, 1, 1) - 1)
            xb = ((xb * g + o).clamp_(0, 1) - m) / s
            logit = net(xb).amax(dim=(1, 2, 3))
            loss = F.binary_cross_entropy_with_logits(logit, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += float(loss) * len(idx)
            correct += int(((logit > 0) == (yt[idx] > 0.5)).sum())
        seen = (n // batch) * batch
        log(f"epoch {ep + 1}/{epochs}: loss {tot / seen:.4f}, train accuracy {correct / seen:.4f}, {time.time() - t0:.0f} s")
    net.eval()
    return net


def export(net, path: Path, meta: dict[str, str], mean: np.ndarray, std: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    import onnx
    import torch

    class Scored(torch.nn.Module):
        def __init__(self, body):  # type: ignore[no-untyped-def]
            super().__init__()
            self.body = body

        def forward(self, x):  # type: ignore[no-untyped-def]
            heat = self.body(x)  # [N, 1, 8, 8] "tower centre here" logits: tilesweep's positions
            return torch.sigmoid(heat.amax(dim=(2, 3))), heat  # [N, 1] probability, the map

    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        Scored(net), (torch.zeros(1, 3, INPUT, INPUT),), str(tmp), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["tower", "heatmap"],
        dynamic_axes={"image": {0: "n"}, "tower": {0: "n"}, "heatmap": {0: "n"}},
    )
    model = onnx.load(str(tmp))
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.doc_string = meta["description"]
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="world seed of the training data (and of torch)")
    p.add_argument("--tower-parents", type=int, default=2600, help="zoom-17 tiles with towers to render")
    p.add_argument("--background", type=int, default=1200, help="random zoom-17 tiles to render")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out check")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.seed == HELD_OUT_SEED:
        sys.exit(f"seed {args.seed} is the held-out world; train on another")
    t_start = time.time()
    cpu0 = time.process_time()
    x, y, aligned = dataset(args.seed, args.tower_parents, args.background)
    t_data = time.time() - t_start
    log(f"{len(x)} windows ({int(y.sum())} positive, {int(aligned.sum())} aligned tiles), {x.nbytes / 1e6:.0f} MB")
    mean, std = channel_stats(x)
    t1 = time.time()
    net = train(x, y, args.epochs, args.seed, mean, std)
    t_train = time.time() - t1
    meta = {
        "description": "Does a zoom-18 tile (256 px, resized to 128) hold a high-voltage power tower? tilesweep demo model.",
        "input_size": str(INPUT),
        "channel_order": "RGB",
        "mean": ",".join(f"{v:.4f}" for v in mean),
        "std": ",".join(f"{v:.4f}" for v in std),
        "fit": "resize",
        "labels": "tower",
        "threshold": "0.5",
        "label_rule": "positive iff a tower centre lies in the tile (west/north edges in, east/south out)",
        "zoom": "18",
        "tile_size": "256",
        "train_world_seed": str(args.seed),
        "train_windows": str(len(x)),
        "train_positive": str(int(y.sum())),
        "train_epochs": str(args.epochs),
        "train_areas": json.dumps(TRAIN_AREAS),
        "trained_with": f"training/train_demo_model.py, torch {torch.__version__}",
    }
    export(net, args.out, meta, mean, std)
    cpu = time.process_time() - cpu0
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB); data {t_data:.0f} s, training {t_train:.0f} s, CPU {cpu:.0f} s")
    if not args.no_eval:
        from tilesweep.model import load_model

        world = World(HELD_OUT_SEED)
        tiles = sample_tiles(world, HELD_OUT_AREA, 18, n_random=300)
        log(f"held-out world seed {HELD_OUT_SEED}, area {HELD_OUT_AREA}: {evaluate(load_model(args.out, threads=1), world, tiles)}")


if __name__ == "__main__":
    main()
