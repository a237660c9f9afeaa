"""Planning: an area + zoom + sampling -> a stream of blocks of tiles.

Cover rule: a tile is in the cover iff its square (a longitude/latitude rectangle) and the
area share a non-zero area, i.e. their interiors intersect. Tiles that only touch the area
along an edge or at a corner are out.

The cover is computed by quadtree descent from zoom 0: a node whose square lies inside the
area is taken whole, without looking at its tiles; a node outside is dropped; only nodes on
the boundary are split further. Boundary blocks are refined the same way down to the sweep
zoom. Work and memory therefore follow the area's perimeter, not its number of tiles, and
blocks are produced as a stream of numpy chunks.

Blocks. By default a block is **adaptive**: the coarsest quadtree cell that holds at most
``block_tiles`` (N, default 256) planned tiles. The planner computes planned tiles per *base
cell* (the finest block cell, ``4**levels <= N`` tiles), then merges four sibling cells
into their parent whenever all four are mergeable and their planned tiles sum to at most N,
bottom-up. A sparse sample or a thin strip of a polygon therefore gets coarse blocks that
still hold tens to hundreds of tiles, and a dense interior keeps 256-tile cells. The work
runs one *top cell* (``4**11`` tiles) at a time in Hilbert order, with the merge above top
cells carried on a small stack, so memory stays flat and the cost follows the tiles that
are tested (hashed), not the blocks. ``block_zoom`` given fixes every block to that zoom
instead (the pre-adaptive behaviour).

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
from .tiles import MAX_ZOOM, Tile, bounds_array, tile_id_array

DEFAULT_BLOCK_LEVELS = 4
"""Default ``zoom - block_zoom``: blocks of up to 16 x 16 = 256 tiles."""

MAX_BLOCK_LEVELS = 10
"""Largest ``zoom - block_zoom`` of a fixed ``block_zoom`` (blocks of up to 4**10 tiles)."""

DEFAULT_BLOCK_TILES = 256
"""Default ``block_tiles``: an adaptive block holds at most this many planned tiles."""

MAX_BLOCK_TILES = 1 << 16
"""Largest ``block_tiles``."""

_TOP_LEVELS = 11  # a top cell (the planner's unit of work) spans 4**11 (~4.2 M) tiles

_CHUNK_TILES = 1 << 20  # tiles per numpy chunk: bounds the planner's working memory
_HIST_BITS = 20  # histogram resolution of the exact max-tiles pass
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_TILE_SALT = 0x243F6A8885A308D3
_BLOCK_SALT = 0x13198A2E03707344


@dataclass(frozen=True)
class PlanSpec:
    """What to plan: sweep zoom, blocks and sampling.

    zoom: tile zoom 0..24. block_tiles: adaptive blocks (the default, with 256): each block
    is the coarsest quadtree cell holding at most this many planned tiles, 1..65536.
    block_zoom: instead, fixed blocks at this zoom, ``zoom - 10 .. zoom`` (the two exclude
    each other). fraction: share of tiles kept, in (0, 1]. seed: any integer >= 0.
    max_tiles: keep exactly this many tiles (or all, if fewer), after ``fraction``.
    """

    zoom: int
    block_zoom: int | None = None
    fraction: float = 1.0
    seed: int = 0
    max_tiles: int | None = None
    block_tiles: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.zoom, int) or not 0 <= self.zoom <= MAX_ZOOM:
            raise UsageError(f"zoom {self.zoom} is outside 0..{MAX_ZOOM}")
        bz = self.block_zoom
        if bz is not None:
            if self.block_tiles is not None:
                raise UsageError(
                    f"block zoom {bz} and block tiles {self.block_tiles} exclude each other "
                    "(--block-zoom fixes every block's cell; --block-tiles caps adaptive blocks)"
                )
            if not 0 <= bz <= self.zoom:
                raise UsageError(f"block zoom {bz} is outside 0..{self.zoom} (it may not exceed the zoom)")
            if self.zoom - bz > MAX_BLOCK_LEVELS:
                raise UsageError(
                    f"block zoom {bz} is more than {MAX_BLOCK_LEVELS} levels above zoom {self.zoom} "
                    f"(blocks of 4**{self.zoom - bz} tiles are too large a unit of work)"
                )
        else:
            n = DEFAULT_BLOCK_TILES if self.block_tiles is None else self.block_tiles
            if not isinstance(n, int) or not 1 <= n <= MAX_BLOCK_TILES:
                raise UsageError(f"block tiles {n} is outside 1..{MAX_BLOCK_TILES}")
            object.__setattr__(self, "block_tiles", n)
        if not (0.0 < self.fraction <= 1.0):
            raise UsageError(f"fraction {self.fraction:g} is outside (0, 1]")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"seed {self.seed} is outside 0..2**63-1")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise UsageError(f"max tiles {self.max_tiles} must be at least 1")

    @property
    def adaptive(self) -> bool:
        """True when blocks are adaptive (no fixed ``block_zoom``)."""
        return self.block_zoom is None

    @property
    def levels(self) -> int:
        """Levels of the finest block cell: a fixed block, or an adaptive *base cell*,
        holds up to ``4 ** levels`` tiles (adaptive: the largest with ``4**levels <= N``)."""
        if self.block_zoom is not None:
            return self.zoom - int(self.block_zoom)
        return min(self.zoom, (int(self.block_tiles).bit_length() - 1) // 2)  # type: ignore[arg-type]

    @property
    def base_zoom(self) -> int:
        """Zoom of the finest block cells: ``block_zoom``, or ``zoom - levels`` (adaptive)."""
        return self.zoom - self.levels


@dataclass(frozen=True)
class BlockChunk:
    """Some blocks of a plan, as arrays.

    x, y: block columns/rows at ``block_zoom`` (int64, shape ``(n,)``). masks: ``None`` when
    every one of the blocks' ``4**levels`` tiles is planned, else bool ``(n, side, side)``
    indexed ``[block, row, column]`` within the block. counts: planned tiles per block.
    priority: the blocks' seeded shuffle keys (int64 >= 0, lower first).

    Adaptive plans set ``z`` (each block's zoom, int64) and ``packed`` (each block's
    :func:`pack_tiles` bytes, None = every descendant planned) and leave ``masks`` None.
    """

    x: np.ndarray
    y: np.ndarray
    masks: np.ndarray | None
    counts: np.ndarray
    priority: np.ndarray
    z: np.ndarray | None = None
    packed: list[bytes | None] | None = None

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


def tile_key_array(z: int | np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pack (z, x, y) into one uint64: ``z << 58 | x << 29 | y`` (unique for z <= 24);
    ``z`` is one zoom or an array of them."""
    return (
        (np.asarray(z).astype(np.uint64) << np.uint64(58))
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


def block_priority_array(seed: int, z: int | np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
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
    geometry: BaseGeometry, zoom: int, block_zoom: int, root: Tile | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Stream the cover of ``geometry`` at ``zoom`` grouped into blocks at ``block_zoom``.

    Yields ``(x, y, masks)`` chunks of blocks: ``masks`` is ``None`` for blocks inside the
    area (all tiles in), else bool ``(n, side, side)`` marking the tiles in the cover.
    ``root``: only the cover inside this tile (zoom ``<= block_zoom``; default the world)."""
    shapely.prepare(geometry)
    levels = zoom - block_zoom
    side = 1 << levels
    max_blocks = max(1, _CHUNK_TILES // (side * side))
    root = Tile(0, 0, 0) if root is None else root
    x = np.array([root.x], dtype=np.int64)
    y = np.array([root.y], dtype=np.int64)
    for z in range(root.z, block_zoom + 1):
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
    for bx, by, masks in cover_blocks(geometry, spec.zoom, spec.base_zoom):
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
    for bx, by, masks in cover_blocks(geometry, spec.zoom, spec.base_zoom):
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
    if spec.adaptive:
        yield from _plan_adaptive(geometry, spec, cutoff)
        return
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


# --- adaptive blocks --------------------------------------------------------------------------


class _Node:
    """A quadtree cell on the merge stack: ``whole`` when it may still become (part of) a
    block, with its planned tiles (zoom-z ``tx``, ``ty``); a split cell carries none."""

    __slots__ = ("z", "x", "y", "whole", "count", "tx", "ty")

    def __init__(self, z: int, x: int, y: int, whole: bool, count: int, tx: np.ndarray | None, ty: np.ndarray | None):
        self.z, self.x, self.y, self.whole, self.count, self.tx, self.ty = z, x, y, whole, count, tx, ty


class _Emitter:
    """Collects emitted blocks and hands them out as :class:`BlockChunk` s."""

    def __init__(self, spec: PlanSpec):
        self.spec = spec
        self.z: list[np.ndarray] = []
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.packed: list[bytes | None] = []
        self.tiles = 0

    def add(self, z: int, x: np.ndarray, y: np.ndarray, counts: np.ndarray, packed: list[bytes | None]) -> None:
        self.z.append(np.full(len(x), z, dtype=np.int64))
        self.x.append(np.asarray(x, dtype=np.int64))
        self.y.append(np.asarray(y, dtype=np.int64))
        self.counts.append(np.asarray(counts, dtype=np.int64))
        self.packed.extend(packed)
        self.tiles += int(np.sum(counts))

    def node(self, n: _Node) -> None:
        """Emit a whole node as one block."""
        levels = self.spec.zoom - n.z
        assert n.tx is not None and n.ty is not None
        packed = pack_tiles(levels, n.x << levels, n.y << levels, n.tx, n.ty)
        self.add(n.z, np.array([n.x]), np.array([n.y]), np.array([n.count]), [packed])

    def full(self) -> bool:
        return self.tiles >= _CHUNK_TILES or len(self.packed) >= 65536

    def take(self) -> Iterator[BlockChunk]:
        """The collected blocks, in chunks of at most ~a million tiles (or 65,536 blocks)."""
        if not self.packed:
            return
        z, x, y = np.concatenate(self.z), np.concatenate(self.x), np.concatenate(self.y)
        counts = np.concatenate(self.counts)
        packed = self.packed
        self.__init__(self.spec)  # type: ignore[misc]
        ends = np.cumsum(counts)
        start = 0
        while start < len(counts):
            base = int(ends[start - 1]) if start else 0
            stop = int(np.searchsorted(ends, base + _CHUNK_TILES, side="right"))
            stop = min(max(stop, start + 1), start + 65536)
            sl = slice(start, stop)
            yield BlockChunk(x[sl], y[sl], None, counts[sl], block_priority_array(self.spec.seed, z[sl], x[sl], y[sl]),
                             z=z[sl], packed=packed[sl])
            start = stop


class _Merger:
    """Merges whole sibling cells above the top cells, fed in Hilbert order (siblings come
    one after another). Holds at most four cells per zoom, each with <= N tiles."""

    def __init__(self, n: int, emit: _Emitter):
        self.n = n
        self.emit = emit
        self.pending: dict[int, tuple[tuple[int, int], list[_Node]]] = {}

    def push(self, node: _Node) -> None:
        if node.z == 0:
            if node.whole and node.count:
                self.emit.node(node)
            return
        parent = (node.x >> 1, node.y >> 1)
        cur = self.pending.get(node.z)
        if cur is not None and cur[0] != parent:
            self._close(node.z)
        self.pending.setdefault(node.z, (parent, []))[1].append(node)

    def _close(self, z: int) -> None:
        (px, py), nodes = self.pending.pop(z)
        total = sum(n.count for n in nodes)
        if all(n.whole for n in nodes) and total <= self.n:
            full = [n for n in nodes if n.count]
            tx = np.concatenate([n.tx for n in full]) if full else np.zeros(0, np.int64)
            ty = np.concatenate([n.ty for n in full]) if full else np.zeros(0, np.int64)
            self.push(_Node(z - 1, px, py, True, total, tx, ty))
            return
        for n in nodes:
            if n.whole and n.count:
                self.emit.node(n)
        self.push(_Node(z - 1, px, py, False, 0, None, None))

    def finish(self) -> None:
        if not self.pending:
            return
        for z in range(max(self.pending), 0, -1):  # closing zoom z adds to z - 1 only
            if z in self.pending:
                self._close(z)


def _top_cells(geometry: BaseGeometry, top_zoom: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells at ``top_zoom`` whose interiors meet the area, in Hilbert order, with a flag
    for those inside it. There are about tiles / 4**11 of them plus the perimeter's."""
    xs, ys, ins = [], [], []
    for x, y, masks in cover_blocks(geometry, top_zoom, top_zoom):
        xs.append(x)
        ys.append(y)
        ins.append(np.full(len(x), masks is None))
    if not xs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    x, y, inside = np.concatenate(xs), np.concatenate(ys), np.concatenate(ins)
    order = np.argsort(tile_id_array(top_zoom, x, y), kind="stable")
    return x[order], y[order], inside[order]


def _plan_adaptive(geometry: BaseGeometry, spec: PlanSpec, cutoff: int | None) -> Iterator[BlockChunk]:
    """Adaptive blocks: the coarsest cells holding at most ``spec.block_tiles`` tiles."""
    n_max = int(spec.block_tiles)  # type: ignore[arg-type]
    b = spec.levels
    bz0 = spec.base_zoom
    top = max(0, bz0 - max(0, _TOP_LEVELS - b))
    depth = bz0 - top
    sampled = spec.fraction < 1.0 or cutoff is not None
    emit = _Emitter(spec)
    merger = _Merger(n_max, emit)
    tops_x, tops_y, tops_in = _top_cells(geometry, top)
    for tx, ty, inside in zip(tops_x.tolist(), tops_y.tolist(), tops_in.tolist()):
        if inside and not sampled and depth > 0:
            # Every base cell is full (4**b tiles) and four of them exceed N: each is a block.
            side = 1 << depth
            gx, gy = np.meshgrid((tx << depth) + np.arange(side), (ty << depth) + np.arange(side))
            emit.add(bz0, gx.ravel(), gy.ravel(), np.full(side * side, 1 << (2 * b)), [None] * (side * side))
            merger.push(_Node(top, tx, ty, False, 0, None, None))
        else:
            merger.push(_plan_top(geometry, spec, cutoff, Tile(top, tx, ty), emit))
        if emit.full():
            yield from emit.take()
    merger.finish()
    yield from emit.take()


def _plan_top(geometry: BaseGeometry, spec: PlanSpec, cutoff: int | None, top: Tile, emit: _Emitter) -> _Node:
    """Plan one top cell: base-cell counts, the merge inside it (vectorised over the
    complete 4-ary tree of its base cells, indexed by Hilbert rank), blocks emitted; returns
    the top cell as a node for the merge above."""
    n_max = int(spec.block_tiles)  # type: ignore[arg-type]
    b = spec.levels
    bz0 = spec.base_zoom
    depth = bz0 - top.z
    side_b = 1 << b
    from .store.shard import _local_ranks  # the Hilbert ranks of a cell's descendants, cached per depth

    ranks_of = _local_ranks(bz0, top)  # indexed by dy << depth | dx, for the base cells of `top`
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for bx, by, masks in cover_blocks(geometry, spec.zoom, bz0, root=top):
        m = _sampled(spec, bx, by, masks, cutoff)
        if m is None:
            m = np.ones((len(bx), side_b, side_b), dtype=bool)
        counts = m.reshape(len(bx), -1).sum(axis=1)
        keep = counts > 0
        if not keep.any():
            continue
        bx, by, m, counts = bx[keep], by[keep], m[keep], counts[keep]
        ranks = ranks_of[((by - (top.y << depth)) << depth) + (bx - (top.x << depth))].astype(np.int64)
        parts.append((ranks, bx, by, m, counts))
    if not parts:
        return _Node(top.z, top.x, top.y, True, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    ranks = np.concatenate([p[0] for p in parts])
    order = np.argsort(ranks, kind="stable")
    ranks = ranks[order]
    bx = np.concatenate([p[1] for p in parts])[order]
    by = np.concatenate([p[2] for p in parts])[order]
    masks = np.concatenate([p[3] for p in parts])[order]
    counts = np.concatenate([p[4] for p in parts])[order]
    del parts
    cnt = np.zeros(1 << (2 * depth), dtype=np.int64)
    cnt[ranks] = counts
    cnts = [cnt]
    wholes = [np.ones(len(cnt), dtype=bool)]  # a base cell holds <= 4**b <= N tiles
    for _ in range(depth):
        c = cnts[-1].reshape(-1, 4).sum(axis=1)
        wholes.append(wholes[-1].reshape(-1, 4).all(axis=1) & (c <= n_max))
        cnts.append(c)

    def tiles_of(k: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        i0, i1 = np.searchsorted(ranks, [r << (2 * k), (r + 1) << (2 * k)])
        j, rr, cc = np.nonzero(masks[i0:i1])
        return (bx[i0 + j] << b) + cc, (by[i0 + j] << b) + rr

    full = 1 << (2 * b)
    for k in range(depth):
        sel = np.flatnonzero(wholes[k] & ~np.repeat(wholes[k + 1], 4) & (cnts[k] > 0))
        if not len(sel):
            continue
        zk = bz0 - k
        levels = spec.zoom - zk
        if k == 0:
            rows = np.searchsorted(ranks, sel)
            xs, ys = bx[rows], by[rows]
            packed: list[bytes | None] = []
            for i, row in enumerate(rows.tolist()):
                if counts[row] == full:
                    packed.append(None)
                else:
                    rr, cc = np.nonzero(masks[row])
                    packed.append(pack_tiles(levels, int(xs[i]) << levels, int(ys[i]) << levels,
                                             (int(xs[i]) << b) + cc, (int(ys[i]) << b) + rr))
            emit.add(zk, xs, ys, cnts[0][sel], packed)
            continue
        xs_l, ys_l, packed = [], [], []
        for r in sel.tolist():
            txs, tys = tiles_of(k, r)
            x, y = int(txs[0]) >> levels, int(tys[0]) >> levels
            xs_l.append(x)
            ys_l.append(y)
            packed.append(pack_tiles(levels, x << levels, y << levels, txs, tys))
        emit.add(zk, np.array(xs_l), np.array(ys_l), cnts[k][sel], packed)
    if wholes[depth][0]:
        txs, tys = tiles_of(depth, 0)
        return _Node(top.z, top.x, top.y, True, int(cnts[depth][0]), txs, tys)
    return _Node(top.z, top.x, top.y, False, 0, None, None)


def pack_tiles(levels: int, x0: int, y0: int, tx: np.ndarray, ty: np.ndarray) -> bytes | None:
    """The packed tile set of a block of ``4**levels`` descendants whose first (north-west)
    descendant is ``(x0, y0)``, holding the zoom-z tiles ``(tx, ty)``: ``None`` when every
    descendant is there; else whichever is smaller of a bit mask (``ceil(4**levels / 8)``
    bytes, as :func:`pack_mask`) and a sorted list of row-major local indices
    (``dy << levels | dx``) after a tag byte (1: uint32, 2: uint64, little-endian). The
    list is only used when strictly shorter, so the length tells the two apart."""
    n = len(tx)
    total = 1 << (2 * levels)
    if n == total:
        return None
    idx = np.sort(((np.asarray(ty, np.int64) - y0) << levels) + (np.asarray(tx, np.int64) - x0))
    wide = 2 * levels > 32
    list_len = 1 + n * (8 if wide else 4)
    if (total + 7) // 8 <= list_len:
        bits = np.zeros(total, dtype=bool)
        bits[idx] = True
        return np.packbits(bits, bitorder="little").tobytes()
    return bytes([2 if wide else 1]) + idx.astype("<u8" if wide else "<u4").tobytes()


def mask_cells(data: bytes | None, levels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(rows, cols)`` int64 of the planned descendants of a block of ``4**levels`` tiles
    from its packed bytes (:func:`pack_tiles` or :func:`pack_mask`), row-major; None: all."""
    if data is None:
        return None
    total = 1 << (2 * levels)
    if len(data) == (total + 7) // 8:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:total]
        idx = np.flatnonzero(bits)
    else:
        idx = np.frombuffer(data, dtype="<u8" if data[0] == 2 else "<u4", offset=1).astype(np.int64)
    return idx >> levels, idx & ((1 << levels) - 1)


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
    """Inverse of :func:`pack_mask` (and of :func:`pack_tiles`) for blocks of ``4**levels``
    tiles, as a bool ``(side, side)`` array: for small blocks only (see :func:`mask_cells`)."""
    cells = mask_cells(data, levels)
    if cells is None:
        return None
    side = 1 << levels
    out = np.zeros((side, side), dtype=bool)
    out[cells[0], cells[1]] = True
    return out


# --- estimate ---------------------------------------------------------------------------------

MAX_PLAN_TILES = 2_000_000_000
"""Plans estimated above this many planned tiles are refused unless asked for."""

MAX_TESTED_TILES = 20_000_000_000
"""Plans that must hash more than this many tiles (a sample of a huge cover) are refused
unless asked for: at tens of millions of tiles per second, that is many minutes."""


@dataclass(frozen=True)
class PlanEstimate:
    """What a plan would hold, estimated before planning: ``cover`` tiles in the area at
    the zoom, ``tiles`` planned after sampling, ``tested``: tiles whose sampling hash the
    planner computes (every tile of the cover when sampling; with ``max_tiles`` three
    passes), ``blocks`` the blocks expected (adaptive: about tiles / (N/2))."""

    cover: int
    tiles: int
    tested: int
    blocks: int

    def too_big(self) -> str | None:
        """Why this plan is refused without ``allow_huge`` (one phrase), or None."""
        if self.tiles > MAX_PLAN_TILES:
            return f"about {self.tiles:,} tiles, over the limit of {MAX_PLAN_TILES:,}"
        if self.tested > MAX_TESTED_TILES:
            return f"about {self.tested:,} tiles to test for the sample, over the limit of {MAX_TESTED_TILES:,}"
        return None


def estimate_plan(geometry: BaseGeometry, spec: PlanSpec, max_cells: int = 4096) -> PlanEstimate:
    """Estimate a plan in milliseconds: quadtree descent from zoom 0 until the sweep zoom
    or more than ``max_cells`` boundary cells, which then count by the share of their
    square (in degrees) that the area covers. Exact when the descent reaches the zoom."""
    shapely.prepare(geometry)
    x = np.zeros(1, dtype=np.int64)
    y = np.zeros(1, dtype=np.int64)
    cover = 0.0
    for z in range(0, spec.zoom + 1):
        inside, boundary = _classify(geometry, z, x, y)
        cover += float(inside.sum()) * 4.0 ** (spec.zoom - z)
        x, y = x[boundary], y[boundary]
        if z == spec.zoom:
            cover += len(x)
            break
        if len(x) * 4 > max_cells:
            b = bounds_array(z, x, y)
            boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
            share = shapely.area(shapely.intersection(geometry, boxes)) / np.maximum(shapely.area(boxes), 1e-300)
            cover += float(share.sum()) * 4.0 ** (spec.zoom - z)
            break
        x, y = _children(x, y)
    tiles = cover * spec.fraction
    if spec.max_tiles is not None:
        tiles = min(tiles, float(spec.max_tiles))
    sampled = spec.fraction < 1.0 or spec.max_tiles is not None
    tested = cover * (3 if spec.max_tiles is not None else 1) if sampled else 0.0
    per_block = (1 << (2 * spec.levels)) if not spec.adaptive else max(1, int(spec.block_tiles) // 2)  # type: ignore[arg-type]
    blocks = tiles / per_block if spec.adaptive or not sampled else min(cover / (1 << (2 * spec.levels)), tiles)
    return PlanEstimate(int(round(cover)), int(round(tiles)), int(round(tested)), max(1, int(round(blocks))) if tiles else 0)
