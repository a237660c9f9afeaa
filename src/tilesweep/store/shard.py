"""One shard file: the tiles of one block, append-only, with a fixed-record index.

A shard holds the zoom-``z`` descendants of one block tile (zoom ``bz``). While it is being
written it is two files next to each other::

    {y}.shard.partial   header + tile bytes, appended in arrival order
    {y}.idx.partial     sidecar journal: one 32-byte record per tile, appended after the
                        bytes it points at are fsynced

:meth:`ShardWriter.finish` appends the index (the same records, sorted by tile id) and a
footer to the data file and publishes it as ``{y}.shard`` through the storage seam
(:meth:`tilesweep.storage.LocalStorage.publish`: fsync, rename without replacing, fsync of
the folder). Byte layout and the crash-safety argument: ``docs/store.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import numpy as np

from ..durable import fsync_dir
from ..block import TileStatus
from ..storage import AlreadyPublished, LocalStorage, Storage
from ..tiles import Tile, descendant_id_range, descendant_ranks, from_tile_id, hilbert_frame, tile_id, tile_id_array, zoom_base_id

MAGIC = b"TSSHARD\x00"
"""First 8 bytes of every shard file."""

FOOTER_MAGIC = b"TSSHEND\x00"
"""Last 8 bytes of a finished shard."""

VERSION = 1

HEADER = struct.Struct("<8sHBBIIIII")  # magic, version, zoom, bz, bx, by, record size, reserved, crc
HEADER_SIZE = 32
assert HEADER.size == HEADER_SIZE
"""Header bytes; tile data starts right after it."""

FOOTER = struct.Struct("<QQII8s")  # index offset, record count, index crc, footer crc, magic
FOOTER_SIZE = 32

RECORD = np.dtype(
    {
        "names": ["id", "offset", "length", "crc", "status", "rcrc"],
        "formats": ["<u8", "<u8", "<u4", "<u4", "u1", "<u4"],
        "offsets": [0, 8, 16, 20, 24, 28],
        "itemsize": 32,
    }
)
"""One index record: tile id, byte offset in the file, byte length, crc32 of the bytes,
status, zero padding (bytes 25..27), then crc32 of the record's first 25 bytes."""
RECORD_SIZE = RECORD.itemsize

_GRID_MAX_LEVELS = 8
"""Readers precompute a (dx, dy) -> record table for blocks up to 4**8 tiles."""


Status = TileStatus
"""What happened to one planned tile: the package's one :class:`~tilesweep.block.TileStatus`
(its value is the record's ``status`` byte)."""


class ShardSummary(NamedTuple):
    """Counts of a finished shard; ``bytes`` is the sum of the OK tiles' lengths."""

    ok: int
    empty: int
    failed: int
    bytes: int


class CorruptShardError(Exception):
    """A shard file whose header, footer or index does not check out, or a tile whose bytes
    fail their crc32 when read. ``path`` is the shard's file (set by :class:`ShardReader`),
    ``tile`` the tile whose bytes failed, when that is what failed; ``str()`` is the reason."""

    path: Path | str | None = None  # a str: an object's URL (a store on object storage)
    tile: Tile | None = None

    def describe(self) -> str:
        """One line naming the shard file and the fault."""
        where = f"shard {self.path}" if self.path is not None else "a shard"
        return f"{where} is corrupt: {self}"


class ShardBusyError(RuntimeError):
    """Another writer (in this or another process) holds the block's partial shard."""


def pack_header(zoom: int, block: Tile) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, zoom, block.z, block.x, block.y, RECORD_SIZE, 0, 0)
    crc = zlib.crc32(head[:28])
    return head[:28] + struct.pack("<I", crc)


def unpack_header(buf: bytes) -> tuple[int, Tile]:
    """``(zoom, block)`` from the first 32 bytes; ``CorruptShardError`` if they are not a
    version-1 shard header."""
    if len(buf) < HEADER_SIZE:
        raise CorruptShardError(f"header truncated ({len(buf)} of {HEADER_SIZE} bytes)")
    magic, version, zoom, bz, bx, by, rsize, _, crc = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptShardError(f"bad magic {magic!r}")
    if zlib.crc32(bytes(buf[:28])) != crc:
        raise CorruptShardError("header crc mismatch")
    if version != VERSION:
        raise CorruptShardError(f"unsupported shard version {version}")
    if rsize != RECORD_SIZE:
        raise CorruptShardError(f"record size {rsize}, expected {RECORD_SIZE}")
    return zoom, Tile(bz, bx, by)


def record_crcs(recs: np.ndarray) -> np.ndarray:
    """crc32 of each record's first 25 bytes (id..status; the ``rcrc`` field's value)."""
    raw = np.ascontiguousarray(recs).view(np.uint8).reshape(-1, RECORD_SIZE)[:, :25].tobytes()
    return np.fromiter((zlib.crc32(raw[i : i + 25]) for i in range(0, len(raw), 25)), np.uint32, len(recs))


def _clean(recs: np.ndarray) -> np.ndarray:
    """A contiguous copy with the padding bytes 25..27 zeroed (numpy copies of padded
    structured arrays may carry garbage there)."""
    out = np.ascontiguousarray(recs).copy()
    out.view(np.uint8).reshape(-1, RECORD_SIZE)[:, 25:28] = 0
    return out


def make_records(rows: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """Records (with ``rcrc`` filled in) from ``(id, offset, length, crc, status)`` rows."""
    recs = np.zeros(len(rows), RECORD)
    if rows:
        ids, offs, lens, crcs, sts = zip(*rows)
        recs["id"] = ids
        recs["offset"] = offs
        recs["length"] = lens
        recs["crc"] = crcs
        recs["status"] = sts
        recs["rcrc"] = record_crcs(recs)
    return recs


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate record arrays keeping the padded 32-byte layout (np.concatenate would
    pack the dtype and drop the padding)."""
    out = np.zeros(sum(len(c) for c in chunks), RECORD)
    i = 0
    for c in chunks:
        out[i : i + len(c)] = c
        i += len(c)
    return out


def summarize(recs: np.ndarray) -> ShardSummary:
    st = recs["status"]
    ok = st == Status.OK
    return ShardSummary(
        int(ok.sum()),
        int((st == Status.EMPTY).sum()),
        int((st == Status.FAILED).sum()),
        int(recs["length"][ok].sum(dtype=np.uint64)),
    )


def partial_paths(path: Path) -> tuple[Path, Path]:
    """``({y}.shard.partial, {y}.idx.partial)`` for the finished shard path ``{y}.shard``."""
    return path.with_name(path.name + ".partial"), path.with_suffix(".idx.partial")


def _check_in_block(tile: Tile, zoom: int, block: Tile) -> None:
    d = zoom - block.z
    if tile.z != zoom or (tile.x >> d) != block.x or (tile.y >> d) != block.y:
        raise ValueError(f"tile {tile.z}/{tile.x}/{tile.y} is not a zoom-{zoom} tile of block {block}")


class ShardWriter:
    """Appends the tiles of one block to its shard, resuming an unfinished one.

    ``append`` buffers; ``flush`` makes everything appended so far durable (data fsync, then
    index-record append + fsync); ``finish`` seals the shard. A tile id appended twice keeps
    its FIRST record: the second ``append`` is ignored and returns False. Not thread-safe;
    one writer per block at a time (enforced with an exclusive ``flock``)."""

    def __init__(self, path: Path, zoom: int, block: Tile, *, storage: Storage | None = None, key: str | None = None) -> None:
        """``path``: the finished shard's file; with ``storage`` (an object store), the
        local staging name the partial files go beside, and ``key`` the object that
        :meth:`finish` publishes."""
        self.path = Path(path)
        self.zoom = int(zoom)
        self.block = Tile(*block)
        if not 0 <= self.block.z <= self.zoom:
            raise ValueError(f"block {self.block} is not above zoom {self.zoom}")
        self.data_path, self.idx_path = partial_paths(self.path)
        if storage is None:  # the partial is the staging file of the key {y}.shard
            self._storage: Storage = LocalStorage(self.path.parent)
            self._key = self.path.name
        else:
            if key is None:
                raise ValueError("a ShardWriter on a storage needs the shard's key")
            self._storage, self._key = storage, key
        self._id_lo, self._id_hi = descendant_id_range(self.block, self.zoom)
        self._id_table: np.ndarray | None = None  # ids of the block's tiles, [y, x] within it
        self._pending: list[tuple[int, int, int, int, int]] = []
        self._pending_ids: set[int] = set()
        self._durable: set[int] = set()
        self._chunks: list[np.ndarray] = []
        self._summary: ShardSummary | None = None
        # finish() found the block published by another writer: its shard stands, not ours
        self.published_by_other = False
        self._f: BinaryIO | None = None  # the data file, open while the writer is
        self._idx_fd = -1
        self._closed = False
        if self._published():
            self._open_finished()
        else:
            self._open_partial()

    # -- opening ---------------------------------------------------------------------------

    def _published(self) -> bool:
        return self._storage.exists(self._key)

    def _open_finished(self) -> None:
        with ShardReader.open(self._storage, self._key) as r:
            if r.zoom != self.zoom or r.block != self.block:
                raise ValueError(f"{r.path} holds block {r.block} at zoom {r.zoom}, not {self.block} at {self.zoom}")
            recs = r.records.copy()
        self._durable = set(recs["id"].tolist())
        self._summary = summarize(recs)
        self.idx_path.unlink(missing_ok=True)  # a crash between rename and unlink leaves it
        _remove_stale_partial(self.data_path)
        self._closed = True

    def _open_partial(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_partial(self.data_path)
        if self._published():  # another writer published the block since our first look
            os.unlink(self.data_path)  # ours under the lock: nobody writes it
            os.close(fd)
            self._open_finished()
            return
        f = os.fdopen(fd, "r+b", buffering=1 << 20)
        self._f = f
        self._idx_fd = os.open(self.idx_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        header_ok = False
        if size >= HEADER_SIZE:
            try:
                zoom, block = unpack_header(os.pread(fd, HEADER_SIZE, 0))
                header_ok = True
            except CorruptShardError:
                pass
            if header_ok and (zoom != self.zoom or block != self.block):
                self.abort()
                raise ValueError(f"{self.data_path} holds block {block} at zoom {zoom}, not {self.block} at {self.zoom}")
        if not header_ok:
            # Fresh shard, or a crash before the header was durable: nothing in it counts.
            os.ftruncate(fd, 0)
            os.ftruncate(self._idx_fd, 0)
            os.pwrite(fd, pack_header(self.zoom, self.block), 0)
            os.fsync(fd)
            os.fsync(self._idx_fd)
            fsync_dir(self.path.parent)
            size = HEADER_SIZE
        recs = self._recover(fd, size)
        end = HEADER_SIZE
        if len(recs):
            end = max(end, int((recs["offset"] + recs["length"]).max()))
        if size != end:
            os.ftruncate(fd, end)
            os.fsync(fd)
        if os.fstat(self._idx_fd).st_size != len(recs) * RECORD_SIZE:
            os.ftruncate(self._idx_fd, len(recs) * RECORD_SIZE)
            os.fsync(self._idx_fd)
        if len(recs):
            self._chunks.append(recs)
        self._durable = set(recs["id"].tolist())
        f.seek(end)
        self._pos = end

    def _recover(self, fd: int, size: int) -> np.ndarray:
        """The valid prefix of the sidecar: records up to the first torn or bad one."""
        raw = b""
        isize = os.fstat(self._idx_fd).st_size
        if isize:
            raw = os.pread(self._idx_fd, isize - isize % RECORD_SIZE, 0)
        recs = np.frombuffer(raw, RECORD).copy()
        if not len(recs):
            return recs
        good = record_crcs(recs) == recs["rcrc"]
        seen: set[int] = set()
        n = 0
        for i, rec in enumerate(recs):
            tid, off, ln, crc, st = int(rec["id"]), int(rec["offset"]), int(rec["length"]), int(rec["crc"]), int(rec["status"])
            if not good[i] or not self._id_lo <= tid < self._id_hi or tid in seen or st > 2:
                break
            if st == Status.OK:
                if ln == 0 or off < HEADER_SIZE or off + ln > size or zlib.crc32(os.pread(fd, ln, off)) != crc:
                    break
            elif ln != 0:
                break
            seen.add(tid)
            n = i + 1
        return recs[:n]

    # -- writing ---------------------------------------------------------------------------

    @property
    def done_ids(self) -> frozenset[int]:
        """Tile ids already durably recorded (after ``flush``, or found on resume)."""
        return frozenset(self._durable)

    @property
    def finished(self) -> bool:
        return self._summary is not None

    def append(self, tile: Tile, status: Status, data: bytes | None, error: str | None = None) -> bool:
        """Buffer one tile's record (and bytes, for ``Status.OK``). Returns False, and
        changes nothing, when the tile id is already recorded (the first record wins).

        ``error`` is accepted for the caller's convenience but not stored (format v1 has no
        room for it; the queue keeps a block's last error)."""
        if self._closed:
            raise RuntimeError(f"shard writer for block {self.block} is {'finished' if self.finished else 'closed'}")
        tile = Tile(*tile)
        _check_in_block(tile, self.zoom, self.block)
        status = Status(status)
        tid = self._tile_id(tile)
        if tid in self._durable or tid in self._pending_ids:
            return False
        if status == Status.OK:
            if not data:
                raise ValueError(f"tile {tile} is OK but has no bytes; record it as Status.EMPTY")
            n = len(data)
            self._file().write(data)
            self._pending.append((tid, self._pos, n, zlib.crc32(data), 0))
            self._pos += n
        else:
            if data:
                raise ValueError(f"tile {tile} is {status.name} but has {len(data)} bytes")
            self._pending.append((tid, self._pos, 0, 0, int(status)))
        self._pending_ids.add(tid)
        return True

    def _tile_id(self, tile: Tile) -> int:
        """``tile_id(tile)`` from a table of the block's ids, built on first use with the
        vectorised Hilbert walk: a table look-up instead of ~17 us of Python per tile."""
        table = self._id_table
        if table is None and self.zoom - self.block.z > _GRID_MAX_LEVELS:
            return tile_id(tile)  # a coarse (adaptive) block holds few of its 4**d tiles
        if table is None:
            d = self.zoom - self.block.z
            n = 1 << d
            ly, lx = np.mgrid[0:n, 0:n]
            table = self._id_table = tile_id_array(self.zoom, (self.block.x << d) + lx, (self.block.y << d) + ly)
        d = self.zoom - self.block.z
        return int(table[tile.y - (self.block.y << d), tile.x - (self.block.x << d)])

    def flush(self) -> None:
        """Make every appended tile durable: fsync the data, then append and fsync the index
        records that point at it."""
        if self._closed:
            if self.finished:
                return
            raise RuntimeError(f"shard writer for block {self.block} is closed")
        if not self._pending:
            return
        self._file().flush()
        os.fsync(self._file().fileno())
        recs = _clean(make_records(self._pending))
        buf = recs.tobytes()
        while buf:
            k = os.write(self._idx_fd, buf)
            buf = buf[k:]
        os.fsync(self._idx_fd)
        self._chunks.append(recs)
        self._durable |= self._pending_ids
        self._pending = []
        self._pending_ids = set()

    def finish(self) -> ShardSummary:
        """Flush, append the sorted index and footer, publish as ``{y}.shard`` (fsync,
        rename unless it exists, fsync the folder), drop the sidecar. Idempotent: a finished
        shard returns its summary; when another writer published the block first, its
        shard stands and its summary is returned (the first shard wins)."""
        if self._summary is not None:
            return self._summary
        self.flush()
        recs = _concat(self._chunks)
        # Stable sort; ids are unique by construction, np.unique guards the invariant.
        order = np.argsort(recs["id"], kind="stable")
        recs = recs[order]
        _, first = np.unique(recs["id"], return_index=True)
        recs = _clean(recs[first])
        index = recs.tobytes()
        footer = FOOTER.pack(self._pos, len(recs), zlib.crc32(index), 0, FOOTER_MAGIC)
        fcrc = zlib.crc32(footer[:20])
        footer = footer[:20] + struct.pack("<I", fcrc) + FOOTER_MAGIC
        self._file().write(index)
        self._file().write(footer)
        self._file().flush()
        try:  # fsync, rename to {y}.shard unless it exists, fsync the folder
            self._storage.publish(self.data_path, self._key)
        except AlreadyPublished:  # another writer published the block first: its shard stands
            # Read and check the published shard before dropping ours (still locked): a
            # shard that cannot be opened raises and our partial stays, resumable.
            self._open_finished()
            self.data_path.unlink(missing_ok=True)
            self._close_files()
            self.published_by_other = True
            assert self._summary is not None
            return self._summary
        self._close_files()
        self.idx_path.unlink(missing_ok=True)
        self._summary = summarize(recs)
        return self._summary

    def abort(self) -> None:
        """Close without finishing: drops what was not flushed, keeps what is durable."""
        self._pending = []
        self._pending_ids = set()
        self._close_files()

    def _close_files(self) -> None:
        self._closed = True
        if self._f is not None:
            try:
                self._f.close()  # also releases the flock
            except OSError:
                pass
            self._f = None
        if self._idx_fd >= 0:
            os.close(self._idx_fd)
            self._idx_fd = -1

    def _file(self) -> BinaryIO:
        if self._f is None:
            raise RuntimeError(f"shard writer for block {self.block} has no open data file")
        return self._f

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving the block aborts an unfinished writer (durable records are kept)."""
        if not self.finished:
            self.abort()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._close_files()
        except Exception:
            pass


def _same_file(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file open as ``fd`` (it was not renamed away,
    published, or deleted and created anew since it was opened)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _lock_partial(data_path: Path) -> int:
    """Open (creating) and exclusively ``flock`` ``{y}.shard.partial``: its fd.

    After the lock the name must still be ours: between our open and our flock another
    writer may have published that very file (renamed it to ``{y}.shard``) or removed it
    as stale; then we open again. A partial with a second name is a published (or
    quarantined ``.corrupt``) shard's link left by a crash between the seam's ``link``
    and ``unlink``: it is unlinked, never truncated in place. ``ShardBusyError`` when
    another writer holds the lock."""
    while True:
        fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShardBusyError(f"another writer holds {data_path}") from None
        if not _same_file(fd, data_path):
            os.close(fd)
            continue
        if os.fstat(fd).st_nlink > 1:
            os.unlink(data_path)
            os.close(fd)
            continue
        return fd


def _remove_stale_partial(data_path: Path) -> None:
    """Delete a ``{y}.shard.partial`` left beside a finished shard (a crash between the
    link and the unlink of the seam's fallback, or a writer that lost the race to publish),
    unless a writer still holds it or it is no longer the file we locked (a new writer's
    partial created since)."""
    try:
        fd = os.open(data_path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        if _same_file(fd, data_path):
            data_path.unlink(missing_ok=True)
    finally:
        os.close(fd)


class RangedShard:
    """A finished shard on object storage, read by byte ranges: its size (HEAD), its head
    and its tail (footer + index, the last 64 KiB) when opened, then each tile with one
    ranged GET, or the whole data region with one while :meth:`holding` it (a walk over
    every tile). Memory: the tail, plus the data region only while held. Sliced like the
    ``mmap`` of a local shard."""

    TAIL = 64 * 1024

    def __init__(self, storage: Storage, key: str) -> None:
        self._storage, self._key = storage, key
        self.size = storage.size(key)  # FileNotFoundError when absent
        start = max(0, self.size - self.TAIL)
        self._segments: list[tuple[int, bytes]] = [(start, storage.read_range(key, start, self.size - start))]
        if start > 0:
            self._segments.append((0, storage.read_range(key, 0, HEADER_SIZE)))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, sl: slice) -> bytes:
        start, stop = sl.indices(self.size)[:2]
        if stop <= start:
            return b""
        for off, buf in self._segments:
            if off <= start and stop <= off + len(buf):
                return buf[start - off : stop - off]
        return self._storage.read_range(self._key, start, stop - start)

    @contextlib.contextmanager
    def holding(self, start: int, stop: int) -> Iterator[None]:
        """Keep bytes ``start..stop`` in memory (one GET) inside the ``with``."""
        seg = (start, self._storage.read_range(self._key, start, stop - start))
        self._segments.insert(0, seg)
        try:
            yield
        finally:
            self._segments.remove(seg)


# The Hilbert walk and the per-depth rank tables are tile math (tilesweep.tiles).
_block_frame = hilbert_frame
_local_ranks = descendant_ranks


class ShardReader:
    """A finished shard, memory-mapped; the index is loaded with ``np.frombuffer``.

    ``get``, ``get_record``, ``data`` and ``iter_records`` check each tile's crc32 before
    handing its bytes out (``check=True``, the default; a mismatch raises
    :class:`CorruptShardError` naming the shard and the tile). That costs about a tenth of
    a read (docs/store.md, Measured); ``check=False`` is for callers that check on their own
    (:meth:`verify`)."""

    @classmethod
    def open(cls, storage: Storage, key: str) -> "ShardReader":
        """The finished shard ``key`` of a storage: memory-mapped from a local folder, else
        read by ranges (:class:`RangedShard`). ``FileNotFoundError`` when absent."""
        local = storage.local_path(key)
        if local is not None:
            return cls(local)
        return cls(f"{storage.url}/{key}", data=RangedShard(storage, key))

    def __init__(self, path: Path | str, data: "bytes | RangedShard | None" = None) -> None:
        """``path``: a shard file (memory-mapped); with ``data`` (a shard's bytes, or a
        :class:`RangedShard` on object storage), the URL that names it in errors."""
        if data is not None:
            self.path: Path | str = str(path)
            size = len(data)
            self._mm: mmap.mmap | bytes | RangedShard = data
            try:
                if size < HEADER_SIZE + FOOTER_SIZE:
                    raise CorruptShardError(f"object truncated ({size} bytes)")
                self._open(size)
            except CorruptShardError as exc:
                exc.path = self.path
                raise
            return
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_SIZE + FOOTER_SIZE:
                err = CorruptShardError(f"file truncated ({size} bytes)")
                err.path = self.path
                raise err
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._open(size)
        except CorruptShardError as exc:
            self._mm.close()
            exc.path = self.path
            raise
        except Exception:
            self._mm.close()
            raise

    def _open(self, size: int) -> None:
        mm = self._mm
        self.zoom, self.block = unpack_header(mm[:HEADER_SIZE])
        if not self.block.z <= self.zoom:
            raise CorruptShardError(f"block zoom {self.block.z} below zoom {self.zoom}")
        ioff, count, icrc, fcrc, fmagic = FOOTER.unpack(mm[size - FOOTER_SIZE : size])
        if fmagic != FOOTER_MAGIC:
            raise CorruptShardError("no footer (truncated or unfinished)")
        if zlib.crc32(mm[size - FOOTER_SIZE : size - FOOTER_SIZE + 20]) != fcrc:
            raise CorruptShardError("footer crc mismatch")
        if ioff < HEADER_SIZE or ioff + count * RECORD_SIZE + FOOTER_SIZE != size:
            raise CorruptShardError(f"index offset {ioff} / count {count} do not fit a {size}-byte file")
        raw = mm[ioff : ioff + count * RECORD_SIZE]
        if zlib.crc32(raw) != icrc:
            raise CorruptShardError("index crc mismatch")
        self.index_offset = ioff
        self.records = np.frombuffer(raw, RECORD)
        self.ids = np.ascontiguousarray(self.records["id"])
        self._offsets = self.records["offset"].tolist()
        self._lengths = self.records["length"].tolist()
        self._status = self.records["status"].tolist()
        self._crcs = self.records["crc"].tolist()
        self._grid: list[int] | None = None
        self._d = self.zoom - self.block.z
        self._id_lo = zoom_base_id(self.zoom) + (_block_frame(self.block)[0] << (2 * self._d))

    # -- lookup ----------------------------------------------------------------------------

    def _grid_table(self) -> list[int]:
        """Record position (or -1) of every descendant, indexed by ``dy * side + dx``."""
        if self._grid is None:
            gids = _local_ranks(self.zoom, self.block) + np.uint64(self._id_lo)
            pos = np.searchsorted(self.ids, gids)
            pos_c = np.minimum(pos, max(len(self.ids) - 1, 0))
            hit = (pos < len(self.ids)) & (self.ids[pos_c] == gids) if len(self.ids) else np.zeros(len(gids), bool)
            self._grid = np.where(hit, pos, -1).tolist()
        return self._grid

    def find(self, tile: Tile) -> int:
        """Record position of ``tile``, or -1 (also for a tile outside the block)."""
        z, x, y = tile
        d = self._d
        if z != self.zoom or (x >> d) != self.block.x or (y >> d) != self.block.y:
            return -1
        if d <= _GRID_MAX_LEVELS:
            return self._grid_table()[((y - (self.block.y << d)) << d) + x - (self.block.x << d)]
        return self.find_id(tile_id(Tile(z, x, y)))

    def find_id(self, tid: int) -> int:
        i = int(np.searchsorted(self.ids, tid))
        return i if i < len(self.ids) and int(self.ids[i]) == tid else -1

    def get_record(self, tile: Tile, check: bool = True) -> tuple[Status, bytes | None] | None:
        """``(status, bytes)`` (bytes None unless OK), or None when the tile is not recorded."""
        i = self.find(tile)
        if i < 0:
            return None
        st = self._status[i]
        if st:
            return Status(st), None
        return Status.OK, self.data(i, check)

    def get(self, tile: Tile, check: bool = True) -> bytes | None:
        """The tile's bytes, or None when it is absent, empty or failed."""
        i = self.find(tile)
        if i < 0 or self._status[i]:
            return None
        return self.data(i, check)

    def data(self, i: int, check: bool = True) -> bytes:
        """Bytes of record ``i`` (b"" for a non-OK record); with ``check``, a tile whose
        bytes fail their crc32 raises :class:`CorruptShardError`."""
        o, n = self._offsets[i], self._lengths[i]
        data = self._mm[o : o + n]
        if len(data) != n:  # a short read (object storage): never an empty tile
            t = from_tile_id(int(self.ids[i]))
            exc = CorruptShardError(f"tile {t.z}/{t.x}/{t.y}: read {len(data)} of {n} bytes")
            exc.path, exc.tile = self.path, t
            raise exc
        if check and n and zlib.crc32(data) != self._crcs[i]:
            self._bad_tile(i)
        return data

    def _bad_tile(self, i: int) -> None:
        t = from_tile_id(int(self.ids[i]))
        exc = CorruptShardError(f"crc mismatch in tile {t.z}/{t.x}/{t.y}")
        exc.path, exc.tile = self.path, t
        raise exc

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` int64 arrays of the records' tiles, in index (tile id) order."""
        n = len(self.ids)
        if self._d <= _GRID_MAX_LEVELS:
            side = 1 << self._d
            grid = np.asarray(self._grid_table(), dtype=np.int64)
            cells = np.nonzero(grid >= 0)[0]
            order = np.empty(n, np.int64)
            order[grid[cells]] = cells
            dy, dx = np.divmod(order, side)
            return (self.block.x << self._d) + dx, (self.block.y << self._d) + dy
        ts = [from_tile_id(int(t)) for t in self.ids]
        return np.array([t.x for t in ts], np.int64).reshape(n), np.array([t.y for t in ts], np.int64).reshape(n)

    def summary(self) -> ShardSummary:
        return summarize(self.records)

    def iter_records(self, status: Status | None = Status.OK, check: bool = True) -> Iterator[tuple[Tile, Status, bytes]]:
        """``(tile, status, bytes)`` in tile id order, only ``status`` ones (None: all);
        ``check``: see :meth:`data`."""
        xs, ys = self.coords()
        z = self.zoom
        with self._whole_data():
            for i, (x, y, st) in enumerate(zip(xs.tolist(), ys.tolist(), self._status)):
                if status is None or st == status:
                    yield Tile(z, x, y), Status(st), self.data(i, check)

    def holding_data(self) -> "contextlib.AbstractContextManager[None]":
        """Inside the ``with``, a shard on object storage keeps its tile data in memory
        (one ranged GET) so that reading many of its tiles costs no request each; a local
        (memory-mapped) shard needs nothing."""
        return self._whole_data()

    def _whole_data(self) -> "contextlib.AbstractContextManager[None]":
        """While open, a shard on object storage holds its tile data (one ranged GET)
        instead of reading tile by tile."""
        if isinstance(self._mm, RangedShard):
            return self._mm.holding(HEADER_SIZE, self.index_offset)
        return contextlib.nullcontext()

    # -- checking --------------------------------------------------------------------------

    def verify(self) -> str | None:
        """None if every record and every tile's crc checks out, else the first problem."""
        recs = self.records
        n = len(recs)
        if n:
            lo, hi = descendant_id_range(self.block, self.zoom)
            ids = self.ids
            if np.any(ids[1:] <= ids[:-1]):
                return "index ids not strictly increasing"
            if int(ids[0]) < lo or int(ids[-1]) >= hi:
                return "index holds a tile outside the block"
            if np.any(record_crcs(recs) != recs["rcrc"]):
                return "index record crc mismatch"
            st = recs["status"]
            if np.any(st > 2):
                return "index record with unknown status"
            ok = st == Status.OK
            if np.any(recs["length"][~ok] != 0):
                return "empty/failed record with bytes"
            if np.any(recs["length"][ok] == 0):
                return "ok record without bytes"
            end = recs["offset"].astype(np.int64) + recs["length"]
            if np.any(recs["offset"][ok] < HEADER_SIZE) or np.any(end[ok] > self.index_offset):
                return "tile bytes outside the data region"
            mm = self._mm
            with self._whole_data():
                for i in np.nonzero(ok)[0].tolist():
                    o = self._offsets[i]
                    if zlib.crc32(mm[o : o + self._lengths[i]]) != int(recs["crc"][i]):
                        t = from_tile_id(int(ids[i]))
                        return f"crc mismatch in tile {t}"
        return None

    def close(self) -> None:
        self.records = None  # type: ignore[assignment]
        if isinstance(self._mm, mmap.mmap):
            try:
                self._mm.close()
            except BufferError:
                pass

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.ids)
