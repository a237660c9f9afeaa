"""The shared vocabulary of a block's lifecycle: :class:`Block`, :class:`BlockResult` and
:class:`TileStatus`.

These are the types every stage passes along (queue -> runner -> fetch -> consumer ->
store / sink -> ack), so they live here, below all of them: this module imports only
:mod:`tilesweep.tiles` (and the planner's mask decoding, lazily, when a block's tiles are
listed), never a stage.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from .tiles import Tile, block_tile_list, tile_id


class TileStatus(IntEnum):
    """What became of one planned tile: the one encoding used by the fetcher's results,
    the shard records, the worker's counters and the prediction sink.

    The value is the code stored in a shard record (a uint8: compare numpy arrays of
    records with it directly); a member also equals its word, ``"ok"``, ``"empty"`` or
    ``"failed"`` (what ``str()`` gives and what counters and JSON use), and hashes as its
    word, so ``Counter(r.status for r in results) == {"ok": 48}`` holds. Do not mix members
    and bare ints as keys of one dict."""

    OK = 0
    """Fetched: the record points at its bytes."""
    EMPTY = 1
    """The source has no tile here (404, 204 or an empty 200); length 0."""
    FAILED = 2
    """Given up on after retries (or a permanent answer); length 0."""

    @property
    def word(self) -> str:
        """``"ok"``, ``"empty"`` or ``"failed"``."""
        return self.name.lower()

    @property
    def stored(self) -> bool:
        """Whether a tile with this status is kept: ok and empty are outcomes (recorded,
        not fetched again); failed is not (its block is nacked and fetched again)."""
        return self is not TileStatus.FAILED

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name.lower()
        return int.__eq__(self, other)  # type: ignore[operator]

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self.name.lower())

    def __str__(self) -> str:
        return self.name.lower()

    def __format__(self, spec: str) -> str:
        return format(self.name.lower(), spec)


class Block(NamedTuple):
    """A unit of work: the tile ``(z, x, y)`` at block zoom, with ``tiles`` planned
    descendants. ``mask`` is the packed set of those descendants, a bit mask or a tile list
    (see :func:`tilesweep.plan.pack_tiles`), or ``None`` when every descendant is planned.
    Blocks of one sweep may lie at different zooms (adaptive blocks); ``id`` is unique
    across zooms and blocks never overlap."""

    z: int
    x: int
    y: int
    tiles: int
    mask: bytes | None = None

    @property
    def tile(self) -> Tile:
        return Tile(self.z, self.x, self.y)

    @property
    def id(self) -> int:
        """The block's PMTiles Hilbert id: its key in the queue, and the order of the store."""
        return tile_id(self.tile)

    def tile_list(self, zoom: int) -> list[Tile]:
        """The planned tiles of the block at ``zoom``, row by row from the north-west."""
        if self.mask is None:
            return block_tile_list(self.tile, zoom)
        from .plan import mask_cells  # the packed-mask format is the planner's

        levels = zoom - self.z
        rows, cols = mask_cells(self.mask, levels)  # type: ignore[misc]  # not None: a mask
        x0, y0 = self.x << levels, self.y << levels
        return [Tile(zoom, x0 + c, y0 + r) for r, c in zip(rows.tolist(), cols.tolist())]


class BlockResult(NamedTuple):
    """What became of a block's tiles, recorded when it is acked: tiles fetched (``ok``),
    absent at the source (``empty``, 404/204) and given up on (``failed``), bytes fetched,
    and ``retries``: requests repeated after transient faults while fetching them.
    ``stored``: 1 when the block's tiles were kept in a shard, 0 when they were streamed to
    a model and not kept (by design), None when not known (`verify` then expects a shard)."""

    ok: int = 0
    empty: int = 0
    failed: int = 0
    bytes: int = 0
    retries: int = 0
    stored: int | None = None


__all__ = ["Block", "BlockResult", "TileStatus"]
