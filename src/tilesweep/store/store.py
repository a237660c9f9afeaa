"""TileStore: a folder of block shards, ``root/{bz}/{x}/{y}.shard``."""

from __future__ import annotations

import os
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from ..errors import UsageError
from ..durable import fsync_dir
from ..storage import AlreadyPublished, ObjectStorage, Storage, is_url, open_storage
from ..tiles import MAX_ZOOM, Tile, tile_id_array, zoom_base_id
from .shard import (
    RECORD_SIZE,
    CorruptShardError,
    ShardReader,
    ShardWriter,
    Status,
    _remove_stale_partial,
    partial_paths,
)


class VerifyReport(NamedTuple):
    """Result of :meth:`TileStore.verify`: shards checked, shards that passed, and the
    corrupt ones as ``(block, reason)``."""

    checked: int
    ok: int
    corrupt: list[tuple[Tile, str]]


def default_max_open() -> int:
    """How many shards a :class:`TileStore` keeps mapped: a quarter of this process's file
    descriptor limit (each mapping holds one), between 64 and 4,096. Random reads over more
    shards than this reopen them (an LRU of 64 over 81 shards read ~34k tiles/s, against
    ~300k with all open)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(64, min(4096, soft // 4))


class TileStore:
    """The shards of one sweep: zoom-``zoom`` tiles packed one shard per block. Blocks lie
    at zooms ``coarsest .. block_zoom`` (adaptive blocks, :mod:`tilesweep.plan`); by default
    only at ``block_zoom`` (fixed blocks). Blocks never overlap, so a tile is in at most
    one shard. The folder is created lazily by the first writer.

    Reads go through an LRU of at most ``max_open`` memory-mapped shards (one fd each;
    default :func:`default_max_open`). Not thread-safe: give each thread its own
    ``TileStore``.

    ``root`` may be an object-store URL (``s3://bucket/prefix``, :mod:`tilesweep.storage`):
    writers keep their unfinished shards on local disk (``staging``, default
    ``$TMPDIR/tilesweep-staging/...``) and publish each finished shard with one
    create-if-absent PUT, so two machines racing on one block never both publish it;
    readers use ranged GETs (:class:`~tilesweep.store.shard.RangedShard`: an LRU of
    ``max_open``, default 64, shard indexes in memory; one GET per tile)."""

    def __init__(
        self, root: Path | str, zoom: int, block_zoom: int, max_open: int | None = None, coarsest: int | None = None,
        staging: Path | None = None,
    ) -> None:
        zoom, block_zoom = int(zoom), int(block_zoom)
        coarsest = block_zoom if coarsest is None else int(coarsest)
        if not 0 <= zoom <= MAX_ZOOM:
            raise UsageError(f"zoom {zoom} is outside 0..{MAX_ZOOM}")
        if not 0 <= block_zoom <= zoom:
            raise UsageError(f"block zoom {block_zoom} is outside 0..{zoom} (the tile zoom)")
        if not 0 <= coarsest <= block_zoom:
            raise UsageError(f"coarsest block zoom {coarsest} is outside 0..{block_zoom}")
        self.storage: Storage | None = None  # set for a store on object storage
        if isinstance(root, str) and "://" in root:
            storage = open_storage(root) if not is_url(root) else open_storage(root, **({} if staging is None else {"staging": staging}))
            if isinstance(storage, ObjectStorage):
                self.storage = storage
                max_open = 64 if max_open is None else max_open
            else:  # file://
                root = storage.url
        max_open = default_max_open() if max_open is None else max_open
        if max_open < 1:
            raise ValueError(f"max_open {max_open} must be at least 1")
        self.root = Path(root) if self.storage is None else self.storage.staging  # local files: shards or partials
        self.zoom = zoom
        self.block_zoom = block_zoom
        self.max_open = max_open
        self._d = zoom - block_zoom
        # finest first: the order in which a tile's possible blocks are probed
        self.block_zooms = tuple(range(block_zoom, coarsest - 1, -1))
        self._readers: OrderedDict[tuple[int, int, int], ShardReader] = OrderedDict()

    def __repr__(self) -> str:
        return f"TileStore({self.location!r}, zoom={self.zoom}, block_zoom={self.block_zoom})"

    @property
    def location(self) -> str:
        """The store's folder, or its URL on object storage."""
        return str(self.root) if self.storage is None else self.storage.url

    # -- paths -----------------------------------------------------------------------------

    def block_of(self, tile: Tile) -> Tile:
        """The block that holds a zoom-``zoom`` tile: with fixed blocks its ancestor at
        ``block_zoom``; with adaptive ones the ancestor whose shard is finished (or a cached
        reader), probed finest first, else the ancestor at ``block_zoom``."""
        z, x, y = tile
        if z != self.zoom:
            raise ValueError(f"tile {z}/{x}/{y} is not at the store's zoom {self.zoom}")
        if len(self.block_zooms) > 1:
            # densify rounds nest blocks (tile-disjoint): a shard that does not hold the tile is passed over
            for bz in self.block_zooms:
                d = z - bz
                r = self._readers.get((bz, x >> d, y >> d))
                if r is not None and r.find(tile) >= 0:
                    return Tile(bz, x >> d, y >> d)
            for bz in self.block_zooms:
                d = z - bz
                b = Tile(bz, x >> d, y >> d)
                if self.is_complete(b):
                    r = self.reader(b)
                    if r is None or r.find(tile) >= 0:
                        return b
        return Tile(self.block_zoom, x >> self._d, y >> self._d)

    def shard_key(self, block: Tile) -> str:
        """``{bz}/{x}/{y}.shard``: the shard's key under the store's root."""
        bz, x, y = block
        return f"{bz}/{x}/{y}.shard"

    def shard_path(self, block: Tile) -> Path:
        """``root/{bz}/{x}/{y}.shard`` (whether or not it exists); on object storage, the
        local staging name its unfinished shard lies beside."""
        bz, x, y = block
        if not self.block_zooms[-1] <= bz <= self.block_zoom:
            raise ValueError(f"block {bz}/{x}/{y} is not at the store's block zooms {self.block_zooms[-1]}..{self.block_zoom}")
        return self.root / str(bz) / str(x) / f"{y}.shard"

    def is_complete(self, block: Tile) -> bool:
        """True when the block's shard is finished (a re-leased block can just be acked)."""
        if self.storage is not None:
            self.shard_path(block)  # checks the block's zoom
            return self.storage.exists(self.shard_key(block))
        return self.shard_path(block).exists()

    def discard_leftovers(self, block: Tile) -> None:
        """Remove what a crash between a shard's publication and its cleanup leaves beside
        a finished shard: the journal (``{y}.idx.partial``) and, after the link fallback,
        ``{y}.shard.partial`` (a second name of the published file; kept while a writer
        holds it)."""
        path = self.shard_path(block)
        if self.is_complete(block):
            data, journal = partial_paths(path)
            journal.unlink(missing_ok=True)
            _remove_stale_partial(data)

    def discard_partials(self) -> int:
        """Delete every unfinished shard and its journal (tiles fetched from a source that
        is being replaced, or that never gave an image); returns how many. Only call it
        while no writer runs (a writer's lock is on the file being deleted)."""
        n = 0
        for block in self.partial_blocks():
            data, journal = partial_paths(self.shard_path(block))
            data.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
            n += 1
        return n

    def writer(self, block: Tile) -> ShardWriter:
        """A writer for the block: new, resumed from an unfinished shard, or (for a finished
        one) already finished, whose ``finish()`` returns the summary."""
        self._evict(block)
        if self.storage is not None:
            return ShardWriter(self.shard_path(block), self.zoom, Tile(*block), storage=self.storage, key=self.shard_key(block))
        return ShardWriter(self.shard_path(block), self.zoom, Tile(*block))

    # -- reading ---------------------------------------------------------------------------

    def reader(self, block: Tile) -> ShardReader | None:
        """The cached reader of a finished shard, or None when it is not finished."""
        key = (block[0], block[1], block[2])
        r = self._readers.get(key)
        if r is not None:
            self._readers.move_to_end(key)
            return r
        try:
            r = self._open_reader(Tile(*block))
        except FileNotFoundError:
            return None
        self._readers[key] = r
        if len(self._readers) > self.max_open:
            _, old = self._readers.popitem(last=False)
            old.close()
        return r

    def get(self, tile: Tile, check: bool = True) -> bytes | None:
        """The tile's bytes, or None when it is absent, empty or failed. With ``check``, a
        tile whose bytes fail their crc32 raises :class:`CorruptShardError`."""
        z, x, y = tile
        d = self._d
        key = (self.block_zoom, x >> d, y >> d)
        r = self._readers.get(key)
        if r is None or (len(self.block_zooms) > 1 and r.find(tile) < 0):
            r = self.reader(self.block_of(tile))
            if r is None:
                return None
        else:
            self._readers.move_to_end(key)
        return r.get(tile, check)

    def get_record(self, tile: Tile, check: bool = True) -> tuple[Status, bytes | None] | None:
        """``(status, bytes or None)``, or None when the tile is not in a finished shard.
        ``check``: as for :meth:`get`."""
        r = self.reader(self.block_of(tile))
        return None if r is None else r.get_record(tile, check)

    def blocks(self) -> Iterator[Tile]:
        """Blocks with a finished shard, in global Hilbert order of their tiles: by the
        first tile id of each block's descendants (blocks of several zooms interleave, and
        each is one contiguous id range at the tile zoom)."""
        if self.storage is not None:
            found = [Tile(bz, x, y) for bz in self.block_zooms for x, y in self._list_remote(bz)]
        else:
            found = [Tile(bz, x, y) for bz in self.block_zooms for x, y in self._scan(".shard", bz)]
        return iter(self.in_tile_order(found))

    def _list_remote(self, block_zoom: int) -> list[tuple[int, int]]:
        assert self.storage is not None
        out = []
        for o in self.storage.list(f"{block_zoom}/"):
            parts = o.key.split("/")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].endswith(".shard") and parts[2][:-6].isdigit():
                out.append((int(parts[1]), int(parts[2][:-6])))
        return out

    def in_tile_order(self, blocks: Iterable[Tile]) -> list[Tile]:
        """``blocks`` sorted by the first tile id of their descendants at the store's zoom:
        global Hilbert order of their tiles, also when blocks lie at several zooms (block
        id order alone interleaves zooms wrongly). Blocks must not overlap."""
        found = [Tile(*b) for b in blocks]
        if not found:
            return []
        zs = np.array([b[0] for b in found], np.int64)
        xs = np.array([b[1] for b in found], np.int64)
        ys = np.array([b[2] for b in found], np.int64)
        start = np.zeros(len(found), np.uint64)
        for bz in np.unique(zs).tolist():
            sel = zs == bz
            start[sel] = (tile_id_array(bz, xs[sel], ys[sel]) - np.uint64(zoom_base_id(bz))) << np.uint64(2 * (self.zoom - bz))
        return [found[i] for i in np.argsort(start, kind="stable").tolist()]

    def partial_blocks(self) -> list[Tile]:
        """Blocks with an unfinished shard (and no finished one)."""
        return [
            Tile(bz, x, y)
            for bz in self.block_zooms
            for x, y in self._scan(".shard.partial", bz)
            if not self.is_complete(Tile(bz, x, y))
        ]

    def _scan(self, suffix: str, block_zoom: int | None = None) -> list[tuple[int, int]]:
        base = self.root / str(self.block_zoom if block_zoom is None else block_zoom)
        out: list[tuple[int, int]] = []
        try:
            xdirs = list(os.scandir(base))
        except FileNotFoundError:
            return out
        for xd in xdirs:
            if not xd.is_dir() or not xd.name.isdigit():
                continue
            for e in os.scandir(xd.path):
                name = e.name
                if name.endswith(suffix):
                    stem = name[: -len(suffix)]
                    if stem.isdigit():
                        out.append((int(xd.name), int(stem)))
        return out

    def iter_tiles(
        self, status: Status | None = Status.OK, blocks: Iterable[Tile] | None = None, check: bool = True
    ) -> Iterator[tuple[Tile, bytes]]:
        """``(tile, bytes)`` of every ``status`` tile (None: all; non-OK ones carry b"") in
        global Hilbert order: blocks in id order, tiles by id within (a block's descendants
        are one contiguous id range). Opens one shard at a time, outside the LRU.

        ``blocks``: only these (in the order given; default :meth:`blocks`), each of which
        must have a finished shard (else :class:`CorruptShardError` naming the missing file).
        ``check``: every tile's crc32 is checked (:class:`CorruptShardError` on a mismatch)."""
        for block in self.blocks() if blocks is None else blocks:
            with self.open_shard(block) as r:
                for tile, _, data in r.iter_records(status, check):
                    yield tile, data

    def open_shard(self, block: Tile) -> ShardReader:
        """A new reader of the block's finished shard (outside the LRU; close it). A missing
        shard raises :class:`CorruptShardError` naming the file, like a corrupt one."""
        try:
            return self._open_reader(Tile(*block))
        except FileNotFoundError:
            exc = CorruptShardError("missing (deleted or moved?)")
            exc.path = self.shard_path(Tile(*block)) if self.storage is None else f"{self.storage.url}/{self.shard_key(block)}"
            raise exc from None

    def _open_reader(self, block: Tile) -> ShardReader:
        """A reader of the block's finished shard; ``FileNotFoundError`` when there is none."""
        if self.storage is not None:
            self.shard_path(block)  # checks the block's zoom
            return ShardReader.open(self.storage, self.shard_key(block))
        return ShardReader(self.shard_path(block))

    def quarantine(self, block: Tile) -> Path | str | None:
        """Move the block's finished shard aside to ``{y}.shard.corrupt`` (``.corrupt.N``
        when taken), so that :meth:`is_complete` is False and the block can be fetched
        again; the folder is fsynced. Returns the new path (on object storage the new
        object's URL), None when there was no shard.

        On object storage there is no rename: the shard's bytes are read with their
        version (size, ETag), published create-if-absent under the ``.corrupt`` key, then
        the shard is deleted only if it is still those bytes (a crash between the two
        leaves both: the next quarantine makes a ``.corrupt.N``). Another machine may have
        published a good shard meanwhile (the failed one deleted by its own quarantine,
        the block fetched again): bytes that verify whole are left alone (None), and a
        shard whose version changed after the read is not deleted."""
        path = self.shard_path(Tile(*block))
        self._evict(block)
        if self.storage is not None:
            key = self.shard_key(block)
            try:
                data, version = self.storage.read_versioned(key)
            except FileNotFoundError:
                return None
            if _whole_shard(f"{self.storage.url}/{key}", data, self.zoom, Tile(*block)):
                return None  # not the failed shard: a good one published since
            n = 0
            while True:
                aside = f"{key}.corrupt" if n == 0 else f"{key}.corrupt.{n}"
                try:
                    self.storage.put(aside, data)
                    break
                except AlreadyPublished:
                    n += 1
            self.storage.delete_if_version(key, version)  # False: a new shard stands there; the copy aside stays
            return f"{self.storage.url}/{aside}"
        if not path.exists():
            return None
        dest = path.with_name(path.name + ".corrupt")
        n = 1
        while dest.exists():
            dest = path.with_name(f"{path.name}.corrupt.{n}")
            n += 1
        os.rename(path, dest)
        fsync_dir(path.parent)
        return dest

    def stats(self) -> dict[str, int]:
        """Counts over finished shards (tiles ok/empty/failed, bytes of OK tiles) plus the
        unfinished shards and the records durable in them."""
        out = {"shards": 0, "partial_shards": 0, "partial_tiles": 0, "ok": 0, "empty": 0, "failed": 0, "bytes": 0, "corrupt_shards": 0}
        for block in self.blocks():
            out["shards"] += 1
            try:
                with self._open_reader(block) as r:
                    s = r.summary()
            except CorruptShardError:
                out["corrupt_shards"] += 1
                continue
            out["ok"] += s.ok
            out["empty"] += s.empty
            out["failed"] += s.failed
            out["bytes"] += s.bytes
        for block in self.partial_blocks():
            out["partial_shards"] += 1
            idx = partial_paths(self.shard_path(block))[1]
            try:
                out["partial_tiles"] += idx.stat().st_size // RECORD_SIZE
            except FileNotFoundError:
                pass
        out["tiles"] = out["ok"] + out["empty"] + out["failed"]
        return out

    def verify(self, repair: bool = False) -> VerifyReport:
        """Check every finished shard: header, footer, index crc, record crcs, ids in the
        block, every tile's crc. With ``repair``, a corrupt shard is renamed
        ``{y}.shard.corrupt`` so that ``is_complete`` is False and its block can be queued
        again (re-queueing is the caller's job)."""
        checked = ok = 0
        corrupt: list[tuple[Tile, str]] = []
        for block in list(self.blocks()):
            checked += 1
            self._evict(block)
            try:
                with self._open_reader(block) as r:
                    reason = r.verify()
                    if reason is None and (r.zoom != self.zoom or r.block != block):
                        reason = f"header says block {r.block} at zoom {r.zoom}"
            except CorruptShardError as e:
                reason = str(e)
            if reason is None:
                ok += 1
                continue
            corrupt.append((block, reason))
            if repair:
                self.quarantine(block)
        return VerifyReport(checked, ok, corrupt)

    # -- housekeeping ----------------------------------------------------------------------

    def _evict(self, block: Tile) -> None:
        r = self._readers.pop((block[0], block[1], block[2]), None)
        if r is not None:
            r.close()

    def close(self) -> None:
        """Close every cached reader."""
        while self._readers:
            _, r = self._readers.popitem()
            r.close()

    def __enter__(self) -> "TileStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _whole_shard(name: str, data: bytes, zoom: int, block: Tile) -> bool:
    """True when ``data`` is a finished shard of ``block`` at ``zoom`` whose every record
    and tile crc checks out (:meth:`ShardReader.verify`)."""
    try:
        with ShardReader(name, data=data) as r:
            return r.verify() is None and r.zoom == zoom and r.block == block
    except Exception:  # CorruptShardError, or bytes too short to parse at all
        return False
