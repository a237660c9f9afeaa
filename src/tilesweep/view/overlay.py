"""The prediction overlay: per-tile scores at high zooms, detection counts per parent tile
at low zooms, computed out of core with DuckDB from a model's Parquet parts.

An :class:`OverlayIndex` keeps, in a DuckDB file outside the sweep (the sweep is never
written), two tables per model:

``base``  one row per predicted tile: ``m`` (the tile's Morton code at the sweep zoom ``Z``),
          ``x``, ``y``, ``s`` (its highest label score), inserted sorted by ``m``;
``agg``   the pyramid: ``k`` (zoom base of level ``L`` plus the cell's Morton code at ``L``),
          ``b`` (score bin, ``floor(s * BINS)``), ``n`` (tiles), for levels ``0..Z-3``.

Morton codes nest like quadtree tiles: the descendants of a tile are one contiguous range,
so an overlay tile is one range scan, which DuckDB's zone maps narrow to the row groups
that hold it. Which table answers an overlay tile at zoom ``z``:

- ``z >= Z - 5``: squares, one per predicted tile (at most 32 x 32), from ``base``; the page
  colours them by ``s`` and filters them by the threshold itself;
- ``Z - 8 <= z < Z - 5``: cells at zoom ``z + 6`` with a detection, counted from ``base``
  (<= 65,536 rows; at ``Z - 6`` a cell is one tile);
- ``z < Z - 8``: cells at zoom ``z + 6`` summed from ``agg`` (threshold in steps of
  ``1 / BINS``).

New parts (the ledger's ``parts`` table, read-only) are appended as they are committed, so
a running sweep's overlay grows; a part that disappears from the ledger rebuilds the model.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from ..predict.sink import PREDICTIONS_DIR
from .mvt import EXTENT, encode_squares

BINS = 20
CELL_LEVELS = 6  # an overlay tile shows cells 6 zooms deeper: at most 64 x 64 features
SQUARE_LEVELS = 5  # squares of every scored tile up to 5 zooms above the sweep: at most 32 x 32
DIRECT_LEVELS = 8  # below this many levels above the sweep zoom, aggregate from base rows
LAYER = "overlay"


def zoom_base(level: int) -> int:
    """Cells at all shallower levels: (4**level - 1) / 3 (as PMTiles tile ids)."""
    return ((1 << (2 * level)) - 1) // 3


def morton(x: int, y: int) -> int:
    """Interleave bits: x in the even bits, y in the odd ones."""
    m = 0
    for i in range(max(x.bit_length(), y.bit_length())):
        m |= ((x >> i) & 1) << (2 * i) | ((y >> i) & 1) << (2 * i + 1)
    return m


def _spread_sql(v: str) -> str:
    """SQL of ``v``'s bits spread to the even positions (up to 31 bits)."""
    e = f"CAST({v} AS BIGINT)"
    for shift, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                        (2, 0x3333333333333333), (1, 0x5555555555555555)):
        e = f"(({e} | ({e} << {shift})) & {mask})"
    return e


MORTON_SQL = f"({_spread_sql('x')} | ({_spread_sql('y')} << 1))"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class ModelInfo:
    """A model the ledger knows: its key, name, part folder, score labels and threshold."""

    key: str
    name: str
    digest: str
    folder: str
    labels: tuple[str, ...]
    threshold: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.folder, "name": self.name, "digest": self.digest[:12], "labels": list(self.labels),
                "threshold": self.threshold}


def read_models(sweep_path: Path) -> list[ModelInfo]:
    """Models in the sweep's prediction ledger (read-only; empty when there is none)."""
    from ..predict.ledger import model_rows

    try:
        rows = model_rows(sweep_path)
    except sqlite3.OperationalError:
        return []
    return [ModelInfo(r[0], r[1], r[2], r[3], tuple(x for x in r[4].split(",") if x), float(r[5])) for r in rows]


def ledger_parts(sweep_path: Path, key: str) -> list[str]:
    """Names (relative to predictions/) of a model's committed parts."""
    from ..predict.ledger import open_ledger

    db = open_ledger(sweep_path)
    if db is None:
        return []
    try:
        return [n for n, _ in db.parts(key)]
    finally:
        db.close()


class OverlayIndex:
    """Overlay tiles of every model of one sweep (see the module doc). Thread-safe: each
    thread queries on its own DuckDB cursor; appends are serialised per model."""

    def __init__(self, sweep_path: Path, zoom: int, cache_dir: Path | None = None,
                 memory_limit: str = "1GB", threads: int = 2, refresh_s: float = 2.0) -> None:
        self.sweep_path = Path(sweep_path)
        self.zoom = int(zoom)
        self.refresh_s = refresh_s
        self._own_dir = cache_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="tilesweep-view-")) if cache_dir is None else Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._con = duckdb.connect(str(self.dir / "overlay.duckdb"))
        self._con.execute(f"SET memory_limit = '{memory_limit}'")
        self._con.execute(f"SET threads = {int(threads)}")
        self._con.execute(f"SET temp_directory = '{self.dir / 'spill'}'")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._models: dict[str, ModelInfo] = {}
        self._tables: dict[str, int] = {}  # folder -> table number
        self._parts: dict[str, set[str]] = {}
        self._checked: dict[str, float] = {}
        self.generation: dict[str, int] = {}
        self.reload_models()

    # --- models and refresh -----------------------------------------------------------------

    def reload_models(self) -> list[ModelInfo]:
        with self._lock:
            for m in read_models(self.sweep_path):
                if m.folder not in self._models:
                    self._models[m.folder] = m
                    self._tables[m.folder] = len(self._tables)
                    self._model_locks[m.folder] = threading.Lock()
                    self._parts[m.folder] = set()
                    self.generation[m.folder] = 0
            return list(self._models.values())

    @property
    def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    def model(self, folder: str) -> ModelInfo | None:
        if folder not in self._models:
            self.reload_models()
        return self._models.get(folder)

    def _cur(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._local.cur = self._con.cursor()
        return cur

    def refresh(self, folder: str, force: bool = False) -> int:
        """Append the model's parts committed since the last look (at most every
        ``refresh_s`` seconds unless ``force``). Returns the model's generation."""
        m = self._models[folder]
        now = time.monotonic()
        lock = self._model_locks[folder]
        # Recently checked and no append under way: answer from what is there. An append
        # under way is waited for, so no tile is drawn from half of it.
        if not force and not lock.locked() and now - self._checked.get(folder, -1e9) < self.refresh_s:
            return self.generation[folder]
        with lock:
            if not force and time.monotonic() - self._checked.get(folder, -1e9) < self.refresh_s:
                return self.generation[folder]
            names = set(ledger_parts(self.sweep_path, m.key))
            known = self._parts[folder]
            t = self._tables[folder]
            cur = self._cur()
            if known - names:  # a part left the ledger: start over
                cur.execute(f"DROP TABLE IF EXISTS base{t}; DROP TABLE IF EXISTS agg{t}")
                known = self._parts[folder] = set()
            new = sorted(names - known)
            if new or self.generation[folder] == 0:
                self._append(cur, t, m, [str(self.sweep_path / PREDICTIONS_DIR / n) for n in new])  # winning rows only
                known |= set(new)
                self.generation[folder] += 1
            self._checked[folder] = time.monotonic()
            return self.generation[folder]

    def _append(self, cur: duckdb.DuckDBPyConnection, t: int, m: ModelInfo, paths: list[str]) -> None:
        Z = self.zoom
        cur.execute(f"CREATE TABLE IF NOT EXISTS base{t} (m BIGINT, x INTEGER, y INTEGER, s FLOAT)")
        cur.execute(f"CREATE TABLE IF NOT EXISTS agg{t} (k BIGINT, b TINYINT, n BIGINT)")
        if not paths:
            return
        score = f"GREATEST({', '.join(_q(lb) for lb in m.labels)})" if m.labels else "NULL"
        from ..predict.ledger import part_sources, winning_rows_sql

        # a part's lost blocks (another writer's rows won them) are fixed when it is recorded
        wanted = set(paths)
        rows_sql = winning_rows_sql([p for p in part_sources(self.sweep_path, m.key) if str(p.path) in wanted])
        if rows_sql is None:  # the parts left the ledger meanwhile: the next refresh starts over
            return
        cur.execute("BEGIN")
        try:
            cur.execute(
                f"CREATE TEMP TABLE new_rows AS SELECT {MORTON_SQL} AS m, x, y, CAST({score} AS FLOAT) AS s "
                f"FROM ({rows_sql}) WHERE {score} IS NOT NULL",
            )
            cur.execute(f"INSERT INTO base{t} SELECT * FROM new_rows ORDER BY m")
            top = max(Z - 3, 0)
            sh = 2 * (Z - top)
            cur.execute(
                f"CREATE TEMP TABLE lvl AS SELECT {zoom_base(top)} + (m >> {sh}) AS k, "
                f"CAST(LEAST(FLOOR(s * {BINS}), {BINS - 1}) AS TINYINT) AS b, COUNT(*) AS n FROM new_rows GROUP BY 1, 2"
            )
            parts = ["SELECT * FROM lvl"]
            for level in range(top - 1, -1, -1):
                cur.execute(
                    f"CREATE TEMP TABLE lvl{level} AS SELECT {zoom_base(level)} + ((k - {zoom_base(level + 1)}) >> 2) AS k, b, "
                    f"SUM(n) AS n FROM {'lvl' if level == top - 1 else f'lvl{level + 1}'} GROUP BY 1, 2"
                )
                parts.append(f"SELECT * FROM lvl{level}")
            cur.execute(f"INSERT INTO agg{t} SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY k")
            for level in range(top - 1, -1, -1):
                cur.execute(f"DROP TABLE lvl{level}")
            cur.execute("DROP TABLE lvl; DROP TABLE new_rows")
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    # --- tiles ----------------------------------------------------------------------------

    def tile(self, folder: str, z: int, x: int, y: int, threshold: float, fresh: bool = False) -> bytes:
        """The overlay MVT of tile ``z/x/y`` for a model (module doc for what it holds);
        ``fresh``: look for new parts first, however recently they were looked for."""
        self.refresh(folder, force=fresh)
        Z = self.zoom
        t = self._tables[folder]
        cur = self._cur()
        if z > Z:  # deeper than the sweep: the one predicted tile covering it, scaled up
            d = z - Z
            px, py = x >> d, y >> d
            row = cur.execute(f"SELECT s FROM base{t} WHERE m = ?", [morton(px, py)]).fetchall()
            if not row:
                return encode_squares(LAYER, [])
            size = EXTENT << d
            ox, oy = (px << d) - x, (py << d) - y
            sq = (ox * EXTENT, oy * EXTENT, ox * EXTENT + size, oy * EXTENT + size)
            clip = (max(sq[0], -64), max(sq[1], -64), min(sq[2], EXTENT + 64), min(sq[3], EXTENT + 64))
            return encode_squares(LAYER, [clip], ("s", "kind"), [(round(float(row[0][0]), 3), "tile")])
        d = Z - z
        lo = morton(x, y) << (2 * d)
        hi = lo + (1 << (2 * d)) - 1
        if d <= SQUARE_LEVELS:
            rows = cur.execute(f"SELECT x, y, s FROM base{t} WHERE m BETWEEN ? AND ?", [lo, hi]).fetchall()
            cell = EXTENT >> d
            x0, y0 = x << d, y << d
            return encode_squares(
                LAYER,
                [((rx - x0) * cell, (ry - y0) * cell, (rx - x0 + 1) * cell, (ry - y0 + 1) * cell) for rx, ry, _ in rows],
                ("s", "kind"), [(round(float(s), 3), "tile") for _, _, s in rows],
            )
        level = z + CELL_LEVELS
        b = min(max(int(round(threshold * BINS)), 0), BINS)
        if d <= DIRECT_LEVELS:
            sh = 2 * (Z - level)
            rows = cur.execute(
                f"SELECT m >> {sh} AS c, COUNT(*) FILTER (WHERE s >= ?) AS det, COUNT(*) AS n FROM base{t} "
                f"WHERE m BETWEEN ? AND ? GROUP BY c HAVING det > 0",
                [b / BINS, lo, hi],
            ).fetchall()
        else:
            base = zoom_base(level)
            sh = 2 * CELL_LEVELS
            clo = base + (morton(x, y) << sh)
            chi = clo + (1 << sh) - 1
            rows = cur.execute(
                f"SELECT k - {base} AS c, SUM(n) FILTER (WHERE b >= ?) AS det, SUM(n) AS n FROM agg{t} "
                f"WHERE k BETWEEN ? AND ? GROUP BY k HAVING det > 0",
                [b, clo, chi],
            ).fetchall()
        cell = EXTENT >> CELL_LEVELS
        squares, values = [], []
        x0, y0 = x << CELL_LEVELS, y << CELL_LEVELS
        for c, det, n in rows:
            cx, cy = _unmorton(int(c))
            squares.append(((cx - x0) * cell, (cy - y0) * cell, (cx - x0 + 1) * cell, (cy - y0 + 1) * cell))
            values.append((int(det), int(n), "cell"))
        return encode_squares(LAYER, squares, ("det", "n", "kind"), values)

    def close(self) -> None:
        self._con.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _unmorton(m: int) -> tuple[int, int]:
    x = y = 0
    i = 0
    while m:
        x |= (m & 1) << i
        y |= ((m >> 1) & 1) << i
        m >>= 2
        i += 1
    return x, y
