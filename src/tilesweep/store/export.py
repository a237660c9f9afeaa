"""Exports of a TileStore: one PMTiles v3 archive (streamed), MBTiles, or a z/x/y folder.

Every export writes to ``<out>.partial`` (for an ``s3://`` output, on local disk) and
publishes it through the storage seam at the end (:mod:`tilesweep.storage`: locally
fsync, atomic rename over an earlier export, fsync of the folder; on S3 one PUT), so a
failed or interrupted export leaves nothing half-written under the output name.
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..imageformat import image_format
from ..storage import LocalStorage, Storage, is_url, open_storage, split_url
from ..tiles import Tile, bounds, tms_y
from .shard import Status
from .store import TileStore

# --- tile formats ---------------------------------------------------------------------------

TILE_TYPES = {"unknown": 0, "mvt": 1, "png": 2, "jpg": 3, "webp": 4, "avif": 5, "mlt": 6}
"""PMTiles v3 tile type codes by MBTiles-style format name."""
_TYPE_NAMES = {v: k for k, v in TILE_TYPES.items()}


def sniff_format(data: bytes) -> str | None:
    """``"jpg"``, ``"png"``, ``"webp"`` or ``"avif"`` from the leading magic bytes, else None."""
    fmt = image_format(data)
    return {"jpeg": "jpg", "png": "png", "webp": "webp", "avif": "avif"}.get(fmt or "")


def _format_name(tile_type: Any, first: bytes) -> str:
    """Normalise a user-given tile type (name, code, enum) or sniff it from ``first``."""
    if tile_type is None:
        return sniff_format(first) or "unknown"
    if hasattr(tile_type, "value"):
        tile_type = tile_type.value
    if isinstance(tile_type, int):
        if tile_type not in _TYPE_NAMES:
            raise UsageError(f"tile type {tile_type} is not a PMTiles tile type code (0..6)")
        return _TYPE_NAMES[tile_type]
    name = str(tile_type).lower().lstrip(".")
    name = {"jpeg": "jpg", "pbf": "mvt"}.get(name, name)
    if name not in TILE_TYPES:
        raise UsageError(f"tile type {tile_type!r} is not one of {', '.join(TILE_TYPES)}")
    return name


def _first_ok_tile(store: TileStore, blocks: list[Tile] | None = None) -> bytes:
    """Bytes of the first OK tile (crc checked), or ``UsageError`` when the store (or
    ``blocks`` of it) has none."""
    for block in store.blocks() if blocks is None else blocks:
        with store.open_shard(block) as r:
            ok = np.nonzero(r.records["status"] == Status.OK)[0]
            if len(ok):
                return r.data(int(ok[0]))
    raise UsageError(f"tile store {store.location} has no OK tiles to export")


def _lnglat_bounds(z: int, xmin: int, ymin: int, xmax: int, ymax: int) -> tuple[float, float, float, float]:
    w, _, _, n = bounds(Tile(z, xmin, ymin))
    _, s, e, _ = bounds(Tile(z, xmax, ymax))
    return w, s, e, n


def export_target(out: str | os.PathLike[str], staging: str | os.PathLike[str] | None = None) -> tuple[Storage, str]:
    """``(storage, key)`` that an export to ``out`` publishes to: the folder of a path
    (created), or the parent of an object URL ``s3://bucket/prefix/name.pmtiles``
    (:class:`~tilesweep.storage.StorageError` when the bucket cannot be used), whose
    archive is written to the local folder ``staging`` first (default: the temp folder;
    it needs room for the whole archive)."""
    if is_url(str(out)):
        parent, name = split_url(str(out))
        return open_storage(parent, **({"staging": Path(staging)} if staging is not None else {})), name
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    return LocalStorage(p.parent), p.name


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


# --- PMTiles v3 -------------------------------------------------------------------------------

HEADER_LEN = 127
ROOT_MAX = 16384 - HEADER_LEN
"""The header plus the compressed root directory must fit in the first 16,384 bytes."""
DATA_START = 16384

ENTRY = np.dtype([("id", "<u8"), ("offset", "<u8"), ("length", "<u4"), ("run", "<u4")])
"""A directory entry as kept in the temporary entries file (24 bytes)."""

_U7 = np.uint64(7)


def encode_varints(v: np.ndarray) -> np.ndarray:
    """Protobuf (LEB128) varints of non-negative integers, vectorised; uint8 array."""
    v = np.asarray(v, dtype=np.uint64)
    if not len(v):
        return np.zeros(0, np.uint8)
    nb = np.ones(len(v), np.int64)
    t = v >> _U7
    while True:
        m = t > 0
        if not m.any():
            break
        nb += m
        t = t >> _U7
    ends = np.cumsum(nb)
    starts = ends - nb
    out = np.empty(int(ends[-1]), np.uint8)
    for j in range(int(nb.max())):
        m = nb > j
        byte = ((v[m] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= ((nb[m] - 1 > j).astype(np.uint8) << 7)
        out[starts[m] + j] = byte
    return out


def serialize_directory(ids: np.ndarray, runs: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> bytes:
    """A PMTiles v3 directory (spec section 4), gzip-compressed: entry count, id deltas,
    run lengths, lengths, offsets (0 when contiguous with the previous entry, else offset+1)."""
    ids = np.asarray(ids, np.uint64)
    offsets = np.asarray(offsets, np.uint64)
    lengths = np.asarray(lengths, np.uint64)
    n = len(ids)
    deltas = np.empty(n, np.uint64)
    if n:
        deltas[0] = ids[0]
        deltas[1:] = ids[1:] - ids[:-1]
    off_enc = offsets + np.uint64(1)
    if n > 1:
        contiguous = offsets[1:] == offsets[:-1] + lengths[:-1]
        off_enc[1:][contiguous] = 0
    body = b"".join(
        a.tobytes()
        for a in (
            encode_varints(np.array([n], np.uint64)),
            encode_varints(deltas),
            encode_varints(runs),
            encode_varints(lengths),
            encode_varints(off_enc),
        )
    )
    return gzip.compress(body, compresslevel=6, mtime=0)


def _pmtiles_header(**h: int) -> bytes:
    out = struct.pack(
        "<7sB11Q4B2B4iB2i",
        b"PMTiles", 3,
        h["root_offset"], h["root_length"], h["metadata_offset"], h["metadata_length"],
        h["leaf_offset"], h["leaf_length"], h["data_offset"], h["data_length"],
        h["addressed"], h["entries"], h["contents"],
        1, 2, 1, h["tile_type"],  # clustered, internal gzip, tile compression none, type
        h["min_zoom"], h["max_zoom"],
        h["min_lon"], h["min_lat"], h["max_lon"], h["max_lat"],
        h["center_zoom"], h["center_lon"], h["center_lat"],
    )
    assert len(out) == HEADER_LEN
    return out


def _build_directories(entries_f, n: int, out, leaves_start: int, min_leaf_size: int) -> tuple[bytes, int, int]:
    """Write leaf directories at ``leaves_start`` (if needed) and return ``(root, leaves
    length, leaf size)``. Reads the entries file one leaf at a time: memory stays bounded."""

    def read(start: int, count: int) -> np.ndarray:
        entries_f.seek(start * ENTRY.itemsize)
        return np.fromfile(entries_f, ENTRY, count)

    if n <= min_leaf_size:
        e = read(0, n)
        root = serialize_directory(e["id"], e["run"], e["length"], e["offset"])
        if len(root) <= ROOT_MAX:
            return root, 0, 0
    leaf_size = min_leaf_size
    while -(-n // leaf_size) > 2048:  # a root entry takes roughly 5-7 compressed bytes
        leaf_size *= 2
    while True:
        out.seek(leaves_start)
        out.truncate()
        rid, rlen, roff = [], [], []
        pos = 0
        for start in range(0, n, leaf_size):
            e = read(start, min(leaf_size, n - start))
            leaf = serialize_directory(e["id"], e["run"], e["length"], e["offset"])
            rid.append(int(e["id"][0]))
            roff.append(pos)
            rlen.append(len(leaf))
            out.write(leaf)
            pos += len(leaf)
        root = serialize_directory(np.array(rid, np.uint64), np.zeros(len(rid), np.uint64), np.array(rlen, np.uint64), np.array(roff, np.uint64))
        if len(root) <= ROOT_MAX:
            return root, pos, leaf_size
        leaf_size *= 2


def _ok_runs(store: TileStore, blocks: Any) -> Any:
    """``(xs, ys, tile ids, data_of(k))`` of the OK tiles of ``blocks`` (in tile order), in
    global tile-id order: one run per shard, or one per group of nested shards (a densify
    round's blocks nest in the sample's cells, tile-disjoint), whose records are merged by
    id (their readers stay open while the run is read)."""
    import contextlib

    from ..tiles import descendant_id_range

    def runs(group: list[Tile]) -> Any:
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(store.open_shard(b)) for b in group]
            for r in readers:  # on object storage: each shard's tile data in one GET, not one per tile
                stack.enter_context(r.holding_data())
            parts = []
            for ri, r in enumerate(readers):
                sel = np.nonzero(r.records["status"] == Status.OK)[0]
                xs, ys = r.coords()
                parts.append((xs[sel], ys[sel], r.ids[sel], np.full(len(sel), ri), sel))
            xs, ys, ids, ri, ii = (np.concatenate([p[k] for p in parts]) for k in range(5))
            if not len(ids):
                return
            order = np.argsort(ids, kind="stable")
            xs, ys, ids, ri, ii = xs[order], ys[order], ids[order], ri[order].tolist(), ii[order].tolist()
            yield xs, ys, ids.tolist(), lambda k: readers[ri[k]].data(ii[k])

    group: list[Tile] = []
    end = -1
    for block in blocks:
        start, stop = descendant_id_range(Tile(*block), store.zoom)
        if group and start >= end:
            yield from runs(group)
            group, end = [], -1
        group.append(Tile(*block))
        end = max(end, stop)
    if group:
        yield from runs(group)


def export_pmtiles(
    store: TileStore,
    out_path: Path | str,
    metadata: dict | None = None,
    tile_type: Any = None,
    *,
    min_leaf_size: int = 4096,
    run_length: bool = True,
    blocks: list[Tile] | None = None,
    replace: bool = True,
    staging: Path | None = None,
) -> dict:
    """Write the store's OK tiles as one clustered PMTiles v3 archive, streaming.

    Tile bytes are copied once, in global Hilbert order, straight from the shards into the
    archive after a reserved 16 KiB head; directory entries go to a temporary file; leaf
    directories are then built from it one leaf at a time, and the header and root
    directory are written into the head last. Memory does not grow with the tile count.

    ``tile_type``: a name (jpg/png/webp/...), a PMTiles code or None to sniff it from the
    first tile's magic bytes. With ``run_length``, consecutive tile ids with identical bytes
    share one entry (stored once). Returns a summary dict. ``UsageError`` when the store
    holds no OK tile.

    ``blocks``: export only these blocks (any order: they are put in tile order, which
    adaptive blocks of several zooms need; default: every finished shard). Every tile's
    crc32 is checked as it is copied: a corrupt or missing shard raises
    :class:`~tilesweep.store.CorruptShardError` and nothing is left under ``out``.

    ``out_path``: a file path, or an object URL ``s3://bucket/prefix/name.pmtiles`` (staged
    in the local folder ``staging``, default the temp folder, then one streamed multipart
    upload). ``replace``: publish over an existing output (the default); False:
    create-if-absent, :class:`~tilesweep.storage.AlreadyPublished` when it exists (on
    object storage checked just before the upload: the export is its name's one writer)."""
    t0 = time.perf_counter()
    if blocks is not None:
        blocks = store.in_tile_order(blocks)
    first = _first_ok_tile(store, blocks)
    fmt = _format_name(tile_type, first)
    z = store.zoom
    storage, key = export_target(out_path, staging)
    tmp = storage.staging_path(key, unique=False)  # <out>.partial, a stale one removed
    entries_f = tempfile.TemporaryFile(dir=tmp.parent, prefix=".pmtiles-entries-")
    try:
        with open(tmp, "w+b", buffering=1 << 20) as out:
            out.write(b"\0" * DATA_START)
            # 1. tile data, in global Hilbert order
            ids: list[int] = []
            offs: list[int] = []
            lens: list[int] = []
            runs: list[int] = []
            n_entries = addressed = 0
            pos = 0
            xmin = ymin = 1 << 62
            xmax = ymax = -1
            cur_id = -1
            cur_off = cur_len = cur_run = 0
            cur_data = b""

            def spill(keep: int = 0) -> None:
                nonlocal n_entries
                if len(ids) > keep:
                    a = np.zeros(len(ids), ENTRY)
                    a["id"], a["offset"], a["length"], a["run"] = ids, offs, lens, runs
                    a.tofile(entries_f)
                    n_entries += len(ids)
                    ids.clear(), offs.clear(), lens.clear(), runs.clear()

            for xs, ys, tids, data_of in _ok_runs(store, store.blocks() if blocks is None else blocks):
                xmin, xmax = min(xmin, int(xs.min())), max(xmax, int(xs.max()))
                ymin, ymax = min(ymin, int(ys.min())), max(ymax, int(ys.max()))
                addressed += len(tids)
                for k, tid in enumerate(tids):
                    data = data_of(k)
                    if run_length and tid == cur_id + cur_run and data == cur_data:
                        cur_run += 1
                        continue
                    if cur_id >= 0:
                        ids.append(cur_id), offs.append(cur_off), lens.append(cur_len), runs.append(cur_run)
                    out.write(data)
                    cur_id, cur_off, cur_len, cur_run, cur_data = tid, pos, len(data), 1, data
                    pos += len(data)
                if len(ids) >= 65536:
                    spill()
            ids.append(cur_id), offs.append(cur_off), lens.append(cur_len), runs.append(cur_run)
            spill()
            entries_f.flush()
            data_len = pos
            # 2. leaf directories, then metadata, after the data
            leaves_start = DATA_START + data_len
            root, leaves_len, leaf_size = _build_directories(entries_f, n_entries, out, leaves_start, min_leaf_size)
            w, s, e, nn = _lnglat_bounds(z, xmin, ymin, xmax, ymax)
            meta = {
                "name": Path(key).stem,
                "format": fmt,
                "type": "baselayer",
                "minzoom": z,
                "maxzoom": z,
                "bounds": [w, s, e, nn],
                "generator": "tilesweep",
            }
            meta.update(metadata or {})
            meta_bytes = gzip.compress(json.dumps(meta).encode(), mtime=0)
            meta_off = leaves_start + leaves_len
            out.seek(meta_off)
            out.write(meta_bytes)
            # 3. header + root into the reserved head
            e7 = lambda v: int(round(v * 1e7))  # noqa: E731
            header = _pmtiles_header(
                root_offset=HEADER_LEN, root_length=len(root),
                metadata_offset=meta_off, metadata_length=len(meta_bytes),
                leaf_offset=leaves_start, leaf_length=leaves_len,
                data_offset=DATA_START, data_length=data_len,
                addressed=addressed, entries=n_entries, contents=n_entries,
                tile_type=TILE_TYPES[fmt], min_zoom=z, max_zoom=z,
                min_lon=e7(w), min_lat=e7(s), max_lon=e7(e), max_lat=e7(nn),
                center_zoom=z, center_lon=e7((w + e) / 2), center_lat=e7((s + nn) / 2),
            )
            out.seek(0)
            out.write(header)
            out.write(root)
            out.flush()
            size = out.seek(0, os.SEEK_END)
        storage.publish(tmp, key, replace=replace, single_writer=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        entries_f.close()
    return {
        "path": str(out_path),
        "tiles": addressed,
        "entries": n_entries,
        "tile_type": fmt,
        "bytes": size,
        "data_bytes": data_len,
        "root_bytes": len(root),
        "leaf_bytes": leaves_len,
        "leaf_size": leaf_size,
        "bounds": (w, s, e, nn),
        "seconds": time.perf_counter() - t0,
    }


# --- MBTiles ----------------------------------------------------------------------------------


def export_mbtiles(
    store: TileStore, out_path: Path | str, name: str | None = None, batch: int = 2000, blocks: list[Tile] | None = None,
    replace: bool = True, staging: Path | None = None,
) -> dict:
    """Write the store's OK tiles to an MBTiles 1.3 file: ``metadata(name, value)`` with
    name, format (jpg/png/webp), minzoom, maxzoom, bounds, center; ``tiles`` with TMS rows
    (``tile_row = 2**z - 1 - y``) and a unique ``tile_index``. ``UsageError`` when the store
    holds no OK tile. ``blocks``, crc checks, object URLs, ``replace`` and ``staging``: as for
    :func:`export_pmtiles`."""
    t0 = time.perf_counter()
    fmt = _format_name(None, _first_ok_tile(store, blocks))
    z = store.zoom
    storage, key = export_target(out_path, staging)
    tmp = storage.staging_path(key, unique=False)  # <out>.partial, a stale one removed
    n = 0
    xmin = ymin = 1 << 62
    xmax = ymax = -1
    try:
        con = sqlite3.connect(tmp)
        try:
            con.execute("PRAGMA journal_mode=OFF")  # a fresh temp file: the rename is the commit
            con.execute("PRAGMA synchronous=OFF")
            con.execute("CREATE TABLE metadata (name text, value text)")
            con.execute("CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)")
            rows = []
            for tile, data in store.iter_tiles(Status.OK, blocks):
                rows.append((z, tile.x, tms_y(tile), data))
                xmin, xmax = min(xmin, tile.x), max(xmax, tile.x)
                ymin, ymax = min(ymin, tile.y), max(ymax, tile.y)
                if len(rows) >= batch:
                    con.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
                    n += len(rows)
                    rows = []
            con.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
            n += len(rows)
            con.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
            w, s, e, nn = _lnglat_bounds(z, xmin, ymin, xmax, ymax)
            meta = {
                "name": name or Path(key).stem,
                "format": fmt,
                "type": "baselayer",
                "minzoom": str(z),
                "maxzoom": str(z),
                "bounds": f"{w:.7f},{s:.7f},{e:.7f},{nn:.7f}",
                "center": f"{(w + e) / 2:.7f},{(s + nn) / 2:.7f},{z}",
            }
            con.executemany("INSERT INTO metadata VALUES (?, ?)", list(meta.items()))
            con.commit()
        finally:
            con.close()
        size = tmp.stat().st_size
        storage.publish(tmp, key, replace=replace, single_writer=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out_path), "tiles": n, "format": fmt, "bytes": size, "seconds": time.perf_counter() - t0}


# --- z/x/y folder -----------------------------------------------------------------------------


EXPORT_MARKER = ".tilesweep-export.json"
"""The file that marks a folder as a :func:`export_dir` tree (only such a folder is replaced)."""


def export_dir(store: TileStore, out_dir: Path, blocks: list[Tile] | None = None) -> dict:
    """Write every OK tile to ``out_dir/{z}/{x}/{y}.{ext}`` (ext from the bytes: jpg, png,
    webp; ``bin`` when unknown), plus :data:`EXPORT_MARKER`.

    The tree is written under ``out_dir.partial`` and renamed into place at the end; an
    earlier export at ``out_dir`` (a folder holding the marker, or an empty folder) is
    replaced whole, never merged into. Any other existing ``out_dir`` is a
    :class:`UsageError`, and a failure leaves nothing under ``out_dir``."""
    import shutil

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and ((out_dir / EXPORT_MARKER).is_file() or not any(out_dir.iterdir()))):
        raise UsageError(f"{str(out_dir)!r} exists and is not an earlier tilesweep export; export elsewhere")
    _first_ok_tile(store, blocks)
    tmp_dir = _partial(out_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    n = nbytes = 0
    made: set[int] = set()
    try:
        tmp_dir.mkdir(parents=True)
        for tile, data in store.iter_tiles(Status.OK, blocks):
            ext = sniff_format(data) or "bin"
            d = tmp_dir / str(tile.z) / str(tile.x)
            if tile.x not in made:
                d.mkdir(parents=True, exist_ok=True)
                made.add(tile.x)
            (d / f"{tile.y}.{ext}").write_bytes(data)
            n += 1
            nbytes += len(data)
        (tmp_dir / EXPORT_MARKER).write_text(json.dumps({"format": "tilesweep-dir", "tiles": n, "store": str(store.root)}))
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return {"path": str(out_dir), "tiles": n, "bytes": nbytes, "seconds": time.perf_counter() - t0}
