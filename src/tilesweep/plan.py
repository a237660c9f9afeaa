"""Planning: an area + zoom + sampling -> a stream of blocks of tiles.

Cover rule: a tile is in the cover iff its square (a longitude/latitude rectangle) and the
area share a non-zero area, i.e. their interiors intersect. Tiles that only touch the area
along an edge or at a corner are out.

The cover is computed by quadtree descent from zoom 0: a node whose square lies inside the
area is taken whole, without looking at its tiles; a node outside is dropped; only nodes on
the boundary are split further. Boundary blocks are refined the same way down to the sweep
zoom. Work and memory therefore follow the area's perimeter, not its number of tiles, and
blocks are produced as a stream of numpy chunks.

Sampling is a pure function of (seed, tile): :func:`tile_hash` maps every tile to a uniform
64-bit integer; ``fraction`` keeps the tiles whose hash is below ``fraction * 2**64``, and
``max_tiles`` keeps exactly the N smallest hashes (found in two streaming passes with a
histogram, so memory stays flat). Samples are nested: a larger fraction or N with the same
seed is a superset. Blocks are given a seeded random ``priority``; the queue leases them in
that order, so stopping a sweep early still leaves a uniform random sample of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from .errors import UsageError
from .tiles import MAX_ZOOM, Tile, bounds_array

DEFAULT_BLOCK_LEVELS = 4
"""Default ``zoom - block_zoom``: blocks of up to 16 x 16 = 256 tiles."""

MAX_BLOCK_LEVELS = 10
"""Largest ``zoom - block_zoom`` (blocks of up to 4**10 = 1,048,576 tiles)."""

_CHUNK_TILES = 1 << 20  # tiles per numpy chunk: bounds the planner's working memory
_HIST_BITS = 20  # histogram resolution of the exact max-tiles pass
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_TILE_SALT = 0x243F6A8885A308D3
_BLOCK_SALT = 0x13198A2E03707344


@dataclass(frozen=True)
class PlanSpec:
    """What to plan: sweep zoom, block zoom and sampling.

    zoom: tile zoom 0..24. block_zoom: zoom of the blocks, ``zoom - 10 .. zoom`` (default
    ``zoom - 4``, at least 0). fraction: share of tiles kept, in (0, 1]. seed: any integer
    >= 0. max_tiles: keep exactly this many tiles (or all, if fewer), after ``fraction``.
    """

    zoom: int
    block_zoom: int | None = None
    fraction: float = 1.0
    seed: int = 0
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.zoom, int) or not 0 <= self.zoom <= MAX_ZOOM:
            raise UsageError(f"zoom {self.zoom} is outside 0..{MAX_ZOOM}")
        if self.block_zoom is None:
            object.__setattr__(self, "block_zoom", max(0, self.zoom - DEFAULT_BLOCK_LEVELS))
        bz = self.block_zoom
        if not 0 <= bz <= self.zoom:
            raise UsageError(f"block zoom {bz} is outside 0..{self.zoom} (it may not exceed the zoom)")
        if self.zoom - bz > MAX_BLOCK_LEVELS:
            raise UsageError(
                f"block zoom {bz} is more than {MAX_BLOCK_LEVELS} levels above zoom {self.zoom} "
                f"(blocks of 4**{self.zoom - bz} tiles are too large a unit of work)"
            )
        if not (0.0 < self.fraction <= 1.0):
            raise UsageError(f"fraction {self.fraction:g} is outside (0, 1]")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"seed {self.seed} is outside 0..2**63-1")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise UsageError(f"max tiles {self.max_tiles} must be at least 1")

    @property
    def levels(self) -> int:
        """``zoom - block_zoom``: a block holds up to ``4 ** levels`` tiles."""
        return self.zoom - int(self.block_zoom)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BlockChunk:
    """Some blocks of a plan, as arrays.

    x, y: block columns/rows at ``block_zoom`` (int64, shape ``(n,)``). masks: ``None`` when
    every one of the blocks' ``4**levels`` tiles is planned, else bool ``(n, side, side)``
    indexed ``[block, row, column]`` within the block. counts: planned tiles per block.
    priority: the blocks' seeded shuffle keys (int64 >= 0, lower first).
    """

    x: np.ndarray
    y: np.ndarray
    masks: np.ndarray | None
    counts: np.ndarray
    priority: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


# --- hashing -------------------------------------------------------------------------------


def _mix64(v: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 with good avalanche."""
    v = (v ^ (v >> np.uint64(30))) * _M1
    v = (v ^ (v >> np.uint64(27))) * _M2
    return v ^ (v >> np.uint64(31))


def _seed_key(seed: int, salt: int) -> np.uint64:
    return _mix64(np.array([(seed * _GOLDEN + salt) % 2**64], dtype=np.uint64))[0]


def tile_key_array(z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pack (z, x, y) into one uint64: ``z << 58 | x << 29 | y`` (unique for z <= 24)."""
    return (
        (np.uint64(z) << np.uint64(58))
        | (np.asarray(x).astype(np.uint64) << np.uint64(29))
        | np.asarray(y).astype(np.uint64)
    )


def tile_hash_array(seed: int, z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vectorised :func:`tile_hash`: uint64 hashes of tiles (z, x, y) under ``seed``."""
    with np.errstate(over="ignore"):
        return _mix64(tile_key_array(z, x, y) ^ _seed_key(seed, _TILE_SALT))


def tile_hash(seed: int, tile: Tile) -> int:
    """The sampling hash of a tile: a uniform integer in ``[0, 2**64)``.

    ``tile`` is in a ``fraction`` sample with ``seed`` iff ``tile_hash(seed, tile) <
    fraction * 2**64``. Defined as splitmix64's finaliser applied to
    ``(z << 58 | x << 29 | y) XOR mix(seed * 0x9E3779B97F4A7C15 + 0x243F6A8885A308D3)``."""
    return int(tile_hash_array(seed, tile.z, np.array([tile.x]), np.array([tile.y]))[0])


def block_priority_array(seed: int, z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Seeded shuffle keys of blocks: int64 in ``[0, 2**63)``, independent of tile sampling."""
    with np.errstate(over="ignore"):
        h = _mix64(tile_key_array(z, x, y) ^ _seed_key(seed, _BLOCK_SALT))
    return (h >> np.uint64(1)).astype(np.int64)


def fraction_threshold(fraction: float) -> int | None:
    """Hash threshold for ``fraction`` (keep ``h < threshold``); ``None`` keeps everything."""
    if fraction >= 1.0:
        return None
    return int(fraction * 2**64)


# --- cover by quadtree descent ----------------------------------------------------------------


def _classify(geom: BaseGeometry, z: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inside, boundary) boolean arrays for the squares of tiles (z, x, y).

    inside: the square lies in the area (covers); boundary: interiors intersect but the
    square is not inside. The rest only touch the area, or miss it."""
    b = bounds_array(z, x, y)
    boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    inside = shapely.covers(geom, boxes)
    hit = shapely.intersects(geom, boxes) & ~inside
    if hit.any():
        hit[hit] = ~shapely.touches(geom, boxes[hit])
    return inside, hit


def _children(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cx = (x[:, None] * 2 + np.array([0, 1, 0, 1])).ravel()
    cy = (y[:, None] * 2 + np.array([0, 0, 1, 1])).ravel()
    return cx, cy


def _expand(z: int, x: np.ndarray, y: np.ndarray, to_zoom: int, max_n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All descendants at ``to_zoom`` of tiles (z, x, y), in chunks of at most ``max_n``."""
    d = to_zoom - z
    side = 1 << d
    span = np.arange(side, dtype=np.int64)
    rows_per_chunk = max(1, max_n // side)
    for px, py in zip(x.tolist(), y.tolist()):
        xs = (px << d) + span
        for r0 in range(0, side, rows_per_chunk):
            ys = (py << d) + span[r0 : r0 + rows_per_chunk]
            gx, gy = np.meshgrid(xs, ys)
            yield gx.ravel(), gy.ravel()


def cover_blocks(
    geometry: BaseGeometry, zoom: int, block_zoom: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Stream the cover of ``geometry`` at ``zoom`` grouped into blocks at ``block_zoom``.

    Yields ``(x, y, masks)`` chunks of blocks: ``masks`` is ``None`` for blocks inside the
    area (all tiles in), else bool ``(n, side, side)`` marking the tiles in the cover."""
    shapely.prepare(geometry)
    levels = zoom - block_zoom
    side = 1 << levels
    max_blocks = max(1, _CHUNK_TILES // (side * side))
    x = np.zeros(1, dtype=np.int64)
    y = np.zeros(1, dtype=np.int64)
    for z in range(0, block_zoom + 1):
        inside, boundary = _classify(geometry, z, x, y)
        if inside.any():
            for bx, by in _expand(z, x[inside], y[inside], block_zoom, max_blocks):
                yield bx, by, None
        x, y = x[boundary], y[boundary]
        if z < block_zoom:
            x, y = _children(x, y)
    for start in range(0, len(x), max_blocks):
        bx, by = x[start : start + max_blocks], y[start : start + max_blocks]
        yield bx, by, _refine(geometry, block_zoom, bx, by, zoom)


def _refine(geometry: BaseGeometry, block_zoom: int, bx: np.ndarray, by: np.ndarray, zoom: int) -> np.ndarray:
    """Tile masks of boundary blocks, by descent from ``block_zoom`` to ``zoom``."""
    levels = zoom - block_zoom
    side = 1 << levels
    if levels == 0:  # the boundary blocks are themselves tiles in the cover
        return np.ones((len(bx), 1, 1), dtype=bool)
    masks = np.zeros((len(bx), side, side), dtype=bool)
    block_of = np.arange(len(bx))
    x, y = bx.copy(), by.copy()
    for z in range(block_zoom + 1, zoom + 1):
        x, y = _children(x, y)
        block_of = np.repeat(block_of, 4)
        inside, boundary = _classify(geometry, z, x, y)
        d = zoom - z
        if z == zoom:
            keep = inside | boundary
            b = block_of[keep]
            masks[b, y[keep] - (by[b] << levels), x[keep] - (bx[b] << levels)] = True
            break
        for b, tx, ty in zip(block_of[inside].tolist(), x[inside].tolist(), y[inside].tolist()):
            r0 = (ty << d) - (int(by[b]) << levels)
            c0 = (tx << d) - (int(bx[b]) << levels)
            masks[b, r0 : r0 + (1 << d), c0 : c0 + (1 << d)] = True
        x, y, block_of = x[boundary], y[boundary], block_of[boundary]
    return masks


# --- sampling ---------------------------------------------------------------------------------


def _tile_hashes(spec: PlanSpec, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """uint64 hashes of every tile of the blocks, shaped ``(n, side, side)``."""
    levels = spec.levels
    side = 1 << levels
    span = np.arange(side, dtype=np.int64)
    tx = (bx[:, None, None] << levels) + span[None, None, :]
    ty = (by[:, None, None] << levels) + span[None, :, None]
    tx, ty = np.broadcast_arrays(tx, ty)
    return tile_hash_array(spec.seed, spec.zoom, tx, ty)


def _sampled(spec: PlanSpec, bx: np.ndarray, by: np.ndarray, masks: np.ndarray | None, cutoff: int | None) -> np.ndarray | None:
    """Apply the fraction and max-tiles cut-offs to a chunk's masks."""
    threshold = fraction_threshold(spec.fraction)
    if threshold is None and cutoff is None:
        return masks
    h = _tile_hashes(spec, bx, by)
    keep = np.ones(h.shape, dtype=bool) if masks is None else masks.copy()
    if threshold is not None:
        keep &= h < np.uint64(threshold)
    if cutoff is not None:
        keep &= h <= np.uint64(cutoff)
    return keep


def _max_tiles_cutoff(geometry: BaseGeometry, spec: PlanSpec) -> int | None:
    """The largest hash to keep so that exactly ``max_tiles`` tiles remain (or None: all).

    Pass 1 counts the sampled tiles' hashes in a 2**20-bucket histogram; pass 2 gathers
    only the hashes in the bucket where the N-th smallest falls. Memory is the histogram
    plus that one bucket, whatever the tile count."""
    assert spec.max_tiles is not None
    threshold = fraction_threshold(spec.fraction)
    shift = np.uint64(64 - _HIST_BITS)
    hist = np.zeros(1 << _HIST_BITS, dtype=np.int64)
    for bx, by, masks in cover_blocks(geometry, spec.zoom, int(spec.block_zoom)):  # type: ignore[arg-type]
        h = _tile_hashes(spec, bx, by)
        keep = np.ones(h.shape, dtype=bool) if masks is None else masks
        if threshold is not None:
            keep = keep & (h < np.uint64(threshold))
        hist += np.bincount((h[keep] >> shift).astype(np.int64), minlength=1 << _HIST_BITS)
    cumulative = np.cumsum(hist)
    n = spec.max_tiles
    if cumulative[-1] <= n:
        return None
    bucket = int(np.searchsorted(cumulative, n))  # first bucket where cumulative >= n
    before = int(cumulative[bucket - 1]) if bucket else 0
    candidates: list[np.ndarray] = []
    for bx, by, masks in cover_blocks(geometry, spec.zoom, int(spec.block_zoom)):  # type: ignore[arg-type]
        h = _tile_hashes(spec, bx, by)
        keep = (h >> shift) == np.uint64(bucket)
        if masks is not None:
            keep &= masks
        if threshold is not None:
            keep &= h < np.uint64(threshold)
        if keep.any():
            candidates.append(h[keep])
    in_bucket = np.sort(np.concatenate(candidates))
    return int(in_bucket[n - before - 1])


def plan_blocks(geometry: BaseGeometry, spec: PlanSpec) -> Iterator[BlockChunk]:
    """Stream the planned blocks of ``geometry`` under ``spec``; blocks with no planned
    tile are left out. Chunks hold at most about a million tiles' worth of blocks."""
    cutoff = _max_tiles_cutoff(geometry, spec) if spec.max_tiles is not None else None
    full = 1 << (2 * spec.levels)
    for bx, by, masks in cover_blocks(geometry, spec.zoom, int(spec.block_zoom)):  # type: ignore[arg-type]
        masks = _sampled(spec, bx, by, masks, cutoff)
        if masks is None:
            counts = np.full(len(bx), full, dtype=np.int64)
        else:
            counts = masks.reshape(len(bx), -1).sum(axis=1)
            nonempty = counts > 0
            if not nonempty.all():
                bx, by, masks, counts = bx[nonempty], by[nonempty], masks[nonempty], counts[nonempty]
            if len(bx) == 0:
                continue
        priority = block_priority_array(spec.seed, int(spec.block_zoom), bx, by)  # type: ignore[arg-type]
        yield BlockChunk(bx, by, masks, counts, priority)


def block_tiles(block: Tile, zoom: int, mask: np.ndarray | None = None) -> list[Tile]:
    """The planned tiles of a block at ``zoom``, row by row from the north-west.

    ``mask`` is the block's bool ``(side, side)`` mask, or ``None`` for all tiles."""
    levels = zoom - block.z
    side = 1 << levels
    x0, y0 = block.x << levels, block.y << levels
    if mask is None:
        return [Tile(zoom, x0 + c, y0 + r) for r in range(side) for c in range(side)]
    rows, cols = np.nonzero(mask)
    return [Tile(zoom, x0 + int(c), y0 + int(r)) for r, c in zip(rows, cols)]


def pack_mask(mask: np.ndarray | None) -> bytes | None:
    """A block's bool ``(side, side)`` mask as bytes (row-major, little-endian bit order);
    ``None`` stays ``None`` (every tile planned)."""
    if mask is None:
        return None
    return np.packbits(mask.ravel(), bitorder="little").tobytes()


def unpack_mask(data: bytes | None, levels: int) -> np.ndarray | None:
    """Inverse of :func:`pack_mask` for blocks of ``4**levels`` tiles."""
    if data is None:
        return None
    side = 1 << levels
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return bits[: side * side].astype(bool).reshape(side, side)
