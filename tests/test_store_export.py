"""Exports: PMTiles v3 (checked with the official reader), MBTiles, z/x/y folders."""

from __future__ import annotations

import io
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pmtiles.reader import MmapSource, Reader, all_tiles
from pmtiles.tile import deserialize_directory, read_varint

from tilesweep.errors import UsageError
from tilesweep.store import Status, TileStore, export_dir, export_mbtiles, export_pmtiles
from tilesweep.store.export import encode_varints, serialize_directory
from tilesweep.tiles import Tile, bounds, children, tile_id

ZOOM, BZ = 12, 8
BLANK = b"\xff\xd8\xff" + b"\x00" * 30  # an "ocean" tile repeated over a whole block


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> tuple[TileStore, dict[Tile, bytes]]:
    """100 blocks x 256 tiles (25,600), a few empty/failed, one block of identical tiles."""
    root = tmp_path_factory.mktemp("big") / "tiles"
    store = TileStore(root, ZOOM, BZ)
    rng = random.Random(7)
    ok: dict[Tile, bytes] = {}
    blocks = [Tile(BZ, 40 + i, 90 + j) for i in range(10) for j in range(10)]
    for n, b in enumerate(blocks):
        w = store.writer(b)
        for t in children(b, ZOOM):
            r = rng.random()
            if n == 13:
                w.append(t, Status.OK, BLANK)
                ok[t] = BLANK
            elif r < 0.03:
                w.append(t, Status.EMPTY, None)
            elif r < 0.04:
                w.append(t, Status.FAILED, None)
            else:
                data = b"\xff\xd8\xff" + rng.randbytes(rng.randint(5, 60))
                w.append(t, Status.OK, data)
                ok[t] = data
        w.finish()
    return store, ok


def read_pmtiles(path: Path) -> tuple[dict, dict, dict[Tile, bytes]]:
    with open(path, "rb") as f:
        src = MmapSource(f)
        r = Reader(src)
        header, meta = r.header(), r.metadata()
        tiles = {Tile(*zxy): bytes(data) for zxy, data in all_tiles(src)}
    return header, meta, tiles


def test_pmtiles_round_trip_with_leaves(big_store, tmp_path: Path) -> None:
    store, ok = big_store
    out = tmp_path / "out.pmtiles"
    summary = export_pmtiles(store, out, metadata={"attribution": "test"})
    assert not (tmp_path / "out.pmtiles.partial").exists()
    h, meta, tiles = read_pmtiles(out)
    assert tiles == ok
    assert summary["tiles"] == len(ok) and summary["leaf_bytes"] > 0
    assert h["version"] == 3
    assert h["clustered"] is True
    assert h["internal_compression"].value == 2 and h["tile_compression"].value == 1
    assert h["tile_type"].value == 3  # JPEG
    assert h["min_zoom"] == h["max_zoom"] == h["center_zoom"] == ZOOM
    assert h["addressed_tiles_count"] == len(ok)
    assert h["tile_entries_count"] == h["tile_contents_count"] == len(ok) - 255  # one run of 256
    assert h["leaf_directory_length"] > 0 and h["root_offset"] == 127
    assert h["root_offset"] + h["root_length"] <= 16384 and h["tile_data_offset"] == 16384
    xs = [t.x for t in ok]
    ys = [t.y for t in ok]
    w, _, _, n = bounds(Tile(ZOOM, min(xs), min(ys)))
    _, s, e, _ = bounds(Tile(ZOOM, max(xs), max(ys)))
    assert (h["min_lon_e7"], h["min_lat_e7"]) == (round(w * 1e7), round(s * 1e7))
    assert (h["max_lon_e7"], h["max_lat_e7"]) == (round(e * 1e7), round(n * 1e7))
    assert meta["format"] == "jpg" and meta["attribution"] == "test" and meta["minzoom"] == ZOOM
    # point reads through the official reader, including tiles that are not there
    with open(out, "rb") as f:
        r = Reader(MmapSource(f))
        for t in random.Random(1).sample(sorted(ok), 50):
            assert r.get(*t) == ok[t]
        missing = [t for b in store.blocks() for t in children(b, ZOOM) if t not in ok][:20]
        assert missing and all(r.get(*t) is None for t in missing)
        assert r.get(ZOOM, 0, 0) is None


def test_pmtiles_is_clustered(big_store, tmp_path: Path) -> None:
    """Entries in id order, data offsets contiguous from 0, leaves in ascending order."""
    store, ok = big_store
    out = tmp_path / "c.pmtiles"
    export_pmtiles(store, out)
    buf = out.read_bytes()
    h, _, _ = read_pmtiles(out)
    root = deserialize_directory(buf[h["root_offset"] : h["root_offset"] + h["root_length"]])
    assert all(e.run_length == 0 for e in root)  # all leaves
    entries = []
    leaf_end = 0
    for e in root:
        assert e.offset == leaf_end  # leaves are contiguous, ascending
        leaf_end += e.length
        o = h["leaf_directory_offset"] + e.offset
        entries += deserialize_directory(buf[o : o + e.length])
    assert leaf_end == h["leaf_directory_length"]
    assert [e.tile_id for e in entries] == sorted(e.tile_id for e in entries)
    pos = 0
    for e in entries:
        assert e.offset == pos and e.length > 0 and e.run_length >= 1
        pos += e.length
    assert pos == h["tile_data_length"]
    assert sum(e.run_length for e in entries) == len(ok)


def test_pmtiles_small_png_without_leaves(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 10, 7)
    want = {}
    w = store.writer(Tile(7, 20, 30))
    for i, t in enumerate(children(Tile(7, 20, 30), 10)[:40]):
        img = Image.new("RGB", (8, 8), (i * 5, 100, 200))
        b = io.BytesIO()
        img.save(b, format="PNG")
        w.append(t, Status.OK, b.getvalue())
        want[t] = b.getvalue()
    w.finish()
    out = tmp_path / "small.pmtiles"
    s = export_pmtiles(store, out, run_length=False)
    h, meta, tiles = read_pmtiles(out)
    assert tiles == want
    assert h["leaf_directory_length"] == 0 and s["leaf_bytes"] == 0
    assert h["tile_type"].value == 2 and meta["format"] == "png"
    # an explicit tile type wins over sniffing
    export_pmtiles(store, out, tile_type="webp")
    assert read_pmtiles(out)[0]["tile_type"].value == 4
    with pytest.raises(UsageError, match="tiff"):
        export_pmtiles(store, tmp_path / "x.pmtiles", tile_type="tiff")


def test_exports_of_a_store_without_ok_tiles_fail_cleanly(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 10, 7)
    for fn, name in ((export_pmtiles, "a.pmtiles"), (export_mbtiles, "a.mbtiles"), (export_dir, "dir")):
        with pytest.raises(UsageError, match="no OK tiles"):
            fn(store, tmp_path / name)
    w = store.writer(Tile(7, 1, 1))
    for t in children(Tile(7, 1, 1), 10):
        w.append(t, Status.EMPTY, None)
    w.finish()
    with pytest.raises(UsageError, match=str(tmp_path / "tiles")):
        export_pmtiles(store, tmp_path / "a.pmtiles")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]


def test_mbtiles(big_store, tmp_path: Path) -> None:
    store, ok = big_store
    out = tmp_path / "out.mbtiles"
    s = export_mbtiles(store, out)
    assert s["tiles"] == len(ok)
    con = sqlite3.connect(out)
    meta = dict(con.execute("SELECT name, value FROM metadata"))
    assert meta["format"] == "jpg" and meta["name"] == "out"
    assert meta["minzoom"] == meta["maxzoom"] == str(ZOOM)
    w, south, e, n = (float(v) for v in meta["bounds"].split(","))
    assert -180 <= w < e <= 180 and -90 <= south < n <= 90
    rows = con.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles").fetchall()
    got = {Tile(z, x, (1 << z) - 1 - row): bytes(d) for z, x, row, d in rows}
    assert got == ok
    idx = con.execute("SELECT sql FROM sqlite_master WHERE type='index' AND name='tile_index'").fetchone()
    assert idx and "UNIQUE" in idx[0].upper()
    t = next(iter(ok))
    row = con.execute(
        "SELECT tile_data FROM tiles WHERE zoom_level=? AND tile_column=? AND tile_row=?", (t.z, t.x, (1 << t.z) - 1 - t.y)
    ).fetchone()
    assert bytes(row[0]) == ok[t]
    con.close()


def test_export_dir(tmp_path: Path) -> None:
    store = TileStore(tmp_path / "tiles", 10, 8)
    want = {}
    rng = random.Random(2)
    for b in (Tile(8, 3, 4), Tile(8, 4, 4)):
        w = store.writer(b)
        for t in children(b, 10):
            data = b"\xff\xd8\xff" + rng.randbytes(10)
            w.append(t, Status.OK, data)
            want[t] = data
        w.finish()
    out = tmp_path / "xyz"
    s = export_dir(store, out)
    assert s["tiles"] == len(want) == 32
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 32
    for t, data in want.items():
        assert (out / str(t.z) / str(t.x) / f"{t.y}.jpg").read_bytes() == data


def test_varints_and_directory_match_the_reference() -> None:
    rng = np.random.default_rng(0)
    vals = np.concatenate([np.arange(300), rng.integers(0, 2**62, 500, dtype=np.int64), [2**63 + 5]]).astype(np.uint64)
    enc = io.BytesIO(encode_varints(vals).tobytes())
    assert [read_varint(enc) for _ in vals] == [int(v) for v in vals]
    ids = np.cumsum(rng.integers(1, 50, 1000)).astype(np.uint64) + np.uint64(tile_id(Tile(12, 5, 5)))
    lengths = rng.integers(1, 10000, 1000).astype(np.uint64)
    offsets = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.uint64)
    offsets[500] += 7  # a gap: not contiguous
    runs = rng.integers(1, 3, 1000).astype(np.uint64)
    got = deserialize_directory(serialize_directory(ids, runs, lengths, offsets))
    assert [(e.tile_id, e.offset, e.length, e.run_length) for e in got] == list(
        zip(ids.tolist(), offsets.tolist(), lengths.tolist(), runs.tolist())
    )
