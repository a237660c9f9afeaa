"""The viewer's HTTP server: one page, the sweep's imagery, overlays and progress.

Routes (all GET; anything else is 404, or 405 for another method)::

    /                               the page (static/index.html)
    /static/{file}                  the page's own files, from a fixed list made at start
    /api/info                       plan, models, imagery mode (never the source URL)
    /api/area.geojson               the planned area
    /api/progress                   blocks pending / leased / done / dead, predicted blocks
    /api/tile?z&x&y[&model]         one tile: lon/lat, block and its state, scores, label
    /api/detections.geojson?model&t&bbox   the detections in a box, as a download
    /api/lines.geojson?model&t      the detections traced into power lines (tilesweep.trace)
    /imagery/{z}/{x}/{y}            a tile from the store, or proxied from the sweep's source
    /overlay/{model}/{z}/{x}/{y}.mvt?t    prediction overlay (tilesweep.view.overlay)
    /blocks/{z}/{x}/{y}.mvt         blocks done / leased / dead, for the progress layer
    /pmtiles/imagery.pmtiles        a PMTiles archive given with --pmtiles (HTTP Range)

**Read-only.** The queue and the ledger are opened with SQLite's ``mode=ro``; the overlay
cache lives in a temporary folder outside the sweep; no route writes.

**Secrets.** A streamed sweep's imagery is proxied: the server builds each URL with
:meth:`Source.url` (``${NAME}`` tokens expanded from its own environment) and returns only
the body. The page never sees the URL; errors say the upstream status, never the URL; no
request is logged.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from ..errors import UsageError
from ..imageformat import image_format
from ..predict.sink import PREDICTIONS_DIR
from ..queue import State
from ..sources import Source
from ..store import TileStore
from ..sweep import AREA_FILE, TILES_DIR, Sweep
from ..tiles import MAX_ZOOM, Tile, bounds, center, descendant_id_range, tile_at, tile_id
from .mvt import EXTENT, encode_squares
from .overlay import BINS, CELL_LEVELS, SQUARE_LEVELS, OverlayIndex

STATIC = Path(__file__).parent / "static"
_INT = re.compile(r"^(0|[1-9][0-9]{0,8})$")
_MODEL = re.compile(r"^[A-Za-z0-9._-]{1,80}$")
BLOCK_LEVELS = 6  # the progress layer draws blocks of map tiles at most 6 zooms above them
OVERVIEW_LEVELS = 4  # a stored sweep's imagery is mosaicked from its tiles up to 4 zooms above them
PROXY_LEVELS = 10  # a streamed sweep's imagery is proxied this many zooms above its own
MAX_DETECTIONS = 50_000
STATE_NAMES = {int(s): s.label for s in State}

# 256 x 256 transparent PNG: a tile of the area whose imagery is not stored (yet).
_EMPTY_PNG: bytes | None = None


def _empty_png() -> bytes:
    global _EMPTY_PNG
    if _EMPTY_PNG is None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGBA", (256, 256), (0, 0, 0, 0)).save(buf, "PNG", optimize=True)
        _EMPTY_PNG = buf.getvalue()
    return _EMPTY_PNG


def static_files(root: Path = STATIC) -> dict[str, Path]:
    """The page's files by URL path (``app.js``, ``vendor/maplibre-gl.js``): the only files
    ``/static/`` serves."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = p
    return out


CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".txt": "text/plain",
                 ".svg": "image/svg+xml", ".png": "image/png"}


class Viewer:
    """The viewer of one sweep. ``make_app()`` gives the aiohttp application; the CLI runs
    it with :func:`serve`."""

    def __init__(self, sweep_dir: Path, pmtiles: Path | None = None, cache_dir: Path | None = None) -> None:
        self.sweep = Sweep.open(sweep_dir)
        self.path = Path(sweep_dir)
        self.sweep.open_queue().close()  # any backend (SQLite file, PostgreSQL): missing or unreachable is one line
        self._queues = threading.local()  # one connection per pool thread
        self.zoom = self.sweep.zoom
        self.block_zoom = self.sweep.block_zoom
        self.block_zoom_min = self.sweep.block_zoom_min  # adaptive blocks lie at several zooms
        self.bbox = [float(v) for v in self.sweep.plan_config["bbox"]]
        self.static = static_files()
        self.pmtiles = Path(pmtiles) if pmtiles is not None else None
        if self.pmtiles is not None and not self.pmtiles.is_file():
            raise UsageError(f"PMTiles file {str(self.pmtiles)!r} does not exist")
        self.imagery, self.imagery_note = self._imagery_mode()
        self.overlay = OverlayIndex(self.path, self.zoom, cache_dir=cache_dir)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="view")
        self._stores: dict[int, TileStore] = {}
        self._session: aiohttp.ClientSession | None = None
        self._progress_cache: tuple[float, dict[str, Any]] | None = None
        self._overlay_version: dict[str, str] = {}

    # --- setup ----------------------------------------------------------------------------

    def _imagery_mode(self) -> tuple[str, str]:
        if self.pmtiles is not None:
            return "pmtiles", f"imagery from {self.pmtiles.name} (PMTiles, read with HTTP Range)"
        stored = False
        for bz in range(self.block_zoom_min, self.block_zoom + 1):
            try:
                stored = stored or any(True for _ in os.scandir(self.path / TILES_DIR / str(bz)))
            except FileNotFoundError:
                pass
        if stored:
            return "store", "imagery from the sweep's tile store"
        src = self.sweep.source
        if src is None:
            return "none", "no imagery: nothing stored and no source recorded yet"
        try:
            src.check_env()
        except UsageError as exc:
            return "none", f"no imagery: {exc}"
        self.source: Source = src
        return "proxy", f"imagery proxied from {src.name} (tokens added by this server, never sent to the page)"

    def _recheck_imagery(self) -> None:
        """A sweep planned but not yet fetched gets its source (or its first shard) once a
        run starts: look again, at most every 2 s, while there is no imagery."""
        now = time.monotonic()
        if self.imagery != "none" or now - getattr(self, "_imagery_checked", -1e9) < 2.0:
            return
        self._imagery_checked = now
        try:
            self.sweep.config = Sweep.open(self.path).config
        except UsageError:
            return
        self.imagery, self.imagery_note = self._imagery_mode()

    def info(self) -> dict[str, Any]:
        self._recheck_imagery()
        pc = self.sweep.plan_config
        models = [m.to_json() for m in self.overlay.reload_models()]
        minzoom = {"store": max(0, self.zoom - OVERVIEW_LEVELS), "pmtiles": self.zoom}.get(self.imagery, max(0, self.zoom - PROXY_LEVELS))
        return {
            "sweep": self.path.resolve().name,
            "zoom": self.zoom,
            "block_zoom": self.block_zoom,
            "bbox": self.bbox,
            "tiles": int(pc["tiles"]),
            "blocks": int(pc["blocks"]),
            "fraction": pc.get("fraction", 1.0),
            "imagery": {"mode": self.imagery, "note": self.imagery_note, "minzoom": minzoom, "maxzoom": self.zoom},
            "models": models,
            "overlay": {"cell_levels": CELL_LEVELS, "square_levels": SQUARE_LEVELS, "bins": BINS},
            "blocks_minzoom": max(0, self.block_zoom - BLOCK_LEVELS),
        }

    def make_app(self, host: str = "127.0.0.1") -> web.Application:
        middlewares = [_errors]
        if host in LOOPBACK:
            middlewares.insert(0, _loopback_host)
        app = web.Application(middlewares=middlewares)
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/static/{path:.+}", self._static)
        r.add_get("/api/info", self._info)
        r.add_get("/api/area.geojson", self._area)
        r.add_get("/api/progress", self._progress)
        r.add_get("/api/tile", self._tile)
        r.add_get("/api/detections.geojson", self._detections)
        r.add_get("/api/lines.geojson", self._lines)
        r.add_get("/imagery/{z}/{x}/{y}", self._imagery)
        r.add_get("/overlay/{model}/{z}/{x}/{y}.mvt", self._overlay)
        r.add_get("/blocks/{z}/{x}/{y}.mvt", self._blocks)
        if self.pmtiles is not None:
            r.add_get("/pmtiles/imagery.pmtiles", self._pmtiles)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for s in self._stores.values():
            s.close()
        self.overlay.close()
        self.sweep.close()

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # --- page -----------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        p = self.static.get(request.match_info["path"])
        if p is None:
            raise web.HTTPNotFound(text="no such file\n")
        ctype = CONTENT_TYPES.get(p.suffix, "application/octet-stream")
        immutable = request.match_info["path"].startswith("vendor/")
        return web.Response(body=p.read_bytes(), content_type=ctype,
                            headers={"Cache-Control": "public, max-age=86400" if immutable else "no-cache"})

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.info), headers={"Cache-Control": "no-cache"})

    async def _area(self, request: web.Request) -> web.Response:
        return web.Response(body=(self.path / AREA_FILE).read_bytes(), content_type="application/geo+json",
                            headers={"Cache-Control": "no-cache"})

    # --- progress -------------------------------------------------------------------------

    def _ro(self, path: Path) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def _queue(self) -> Any:
        """This thread's connection to the sweep's queue (through the Queue protocol)."""
        q = getattr(self._queues, "q", None)
        if q is None:
            q = self._queues.q = self.sweep.open_queue()
        return q

    def progress(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._progress_cache is not None and now - self._progress_cache[0] < 1.0:
            return self._progress_cache[1]
        st = self._queue().stats(window=1.0)
        last_done = st.attempts_total  # any lease or ack changes the version (was: the last done_at)
        blocks = {STATE_NAMES[int(s)]: int(n) for s, n in st.blocks.items()}
        tiles = {STATE_NAMES[int(s)]: int(n) for s, n in st.tiles.items()}
        predicted: dict[str, int] = {}
        from ..predict.ledger import open_ledger

        try:
            db = open_ledger(self.path)  # beside the queue, wherever it lives
        except sqlite3.OperationalError:
            db = None
        if db is not None:
            try:
                predicted.update(db.predicted_by_folder())
            except sqlite3.OperationalError:
                pass
            finally:
                db.close()
        version = f"{blocks['done']}-{blocks['leased']}-{blocks['dead']}-{last_done}-" + "-".join(f"{v}" for v in predicted.values())
        out = {"blocks": blocks, "tiles": tiles, "predicted_blocks": predicted, "version": version,
               "running": blocks["leased"] > 0}
        self._progress_cache = (now, out)
        return out

    async def _progress(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.progress), headers={"Cache-Control": "no-cache"})

    def blocks_tile(self, z: int, x: int, y: int) -> bytes:
        if self.block_zoom - z > BLOCK_LEVELS:
            return encode_squares("blocks", [])
        rows: list[tuple[int, int, int, int]] = []
        q = self._queue()
        for bz in range(self.block_zoom_min, self.block_zoom + 1):  # one zoom unless adaptive
            if z >= bz:
                b = Tile(bz, x >> (z - bz), y >> (z - bz))
                rec = q.get(tile_id(b))
                got = [rec] if rec is not None else []
            else:
                got = list(q.records(*descendant_id_range(Tile(z, x, y), bz)))
            rows += [(bz, r["x"], r["y"], int(r["state"])) for r in got if r["state"] != State.PENDING and r["z"] == bz]
        squares, values = [], []
        for bz, bx, by, state in rows:
            if z >= bz:
                d = z - bz
                size = EXTENT << d
                ox, oy = ((bx << d) - x) * EXTENT, ((by << d) - y) * EXTENT
                squares.append((max(ox, -64), max(oy, -64), min(ox + size, EXTENT + 64), min(oy + size, EXTENT + 64)))
            else:
                d = bz - z
                cell = EXTENT >> d
                rx, ry = bx - (x << d), by - (y << d)
                squares.append((rx * cell, ry * cell, (rx + 1) * cell, (ry + 1) * cell))
            values.append((STATE_NAMES[int(state)],))
        return encode_squares("blocks", squares, ("state",), values)

    async def _blocks(self, request: web.Request) -> web.Response:
        z, x, y = _zxy(request)
        body = await self._run(self.blocks_tile, z, x, y)
        return _mvt(body, "no-cache")

    # --- imagery --------------------------------------------------------------------------

    def _in_area(self, t: Tile) -> bool:
        w, s, e, n = bounds(t)
        W, S, E, N = self.bbox
        return w < E and e > W and s < N and n > S

    def _store_get(self, t: Tile) -> bytes | None:
        import threading

        key = threading.get_ident()
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = self.sweep.store
        return store.get(t)

    def _overview(self, t: Tile) -> bytes | None:
        """A tile above the sweep zoom, mosaicked from its stored descendants (JPEG,
        decoded at reduced scale); None when none is stored."""
        import io

        from PIL import Image

        d = self.zoom - t.z
        n = 1 << d
        cell = 256 // n
        canvas: Image.Image | None = None
        for dy in range(n):
            for dx in range(n):
                data = self._store_get(Tile(self.zoom, (t.x << d) + dx, (t.y << d) + dy))
                if not data:
                    continue
                try:
                    src = Image.open(io.BytesIO(data))
                    src.draft("RGB", (cell, cell))
                    im = src.convert("RGBA").resize((cell, cell), Image.Resampling.BILINEAR)
                except Exception:  # an undecodable tile stays a hole
                    continue
                if canvas is None:
                    canvas = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
                canvas.paste(im, (dx * cell, dy * cell))
        if canvas is None:
            return None
        buf = io.BytesIO()
        alpha = canvas.getextrema()[-1]  # RGBA: the alpha band's (min, max)
        if isinstance(alpha, tuple) and alpha[0] < 255:  # holes: keep them transparent
            canvas.save(buf, "PNG")
        else:
            canvas.convert("RGB").save(buf, "JPEG", quality=85)
        return buf.getvalue()

    async def _imagery(self, request: web.Request) -> web.StreamResponse:
        z, x, y = _zxy(request)
        t = Tile(z, x, y)
        self._recheck_imagery()
        if self.imagery == "store":
            if not (self.zoom - OVERVIEW_LEVELS <= z <= self.zoom) or not self._in_area(t):
                raise web.HTTPNotFound(text="no such tile in this sweep\n")
            data = await self._run(self._store_get if z == self.zoom else self._overview, t)
            if data is None:  # planned, not stored (yet): transparent, asked again later
                return web.Response(body=_empty_png(), content_type="image/png", headers={"Cache-Control": "no-cache"})
            return _image(data, "public, max-age=86400" if z == self.zoom else "public, max-age=60")
        if self.imagery == "proxy":
            if not (self.zoom - PROXY_LEVELS <= z <= self.zoom) or not self._in_area(t):
                raise web.HTTPNotFound(text="no such tile in this sweep\n")
            return await self._proxy(t)
        raise web.HTTPNotFound(text="this sweep has no imagery to show\n")

    async def _proxy(self, t: Tile) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, connect=10),
                                                  connector=aiohttp.TCPConnector(limit=16))
        try:
            url = self.source.url(t)
            headers = self.source.request_headers()
        except UsageError:
            raise web.HTTPBadGateway(text="the source needs an environment variable this server does not have\n") from None
        for attempt in range(3):
            try:
                async with self._session.get(url, headers=headers, allow_redirects=True) as resp:
                    status = resp.status
                    body = await resp.read() if status == 200 else b""
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status, body = -1, b""
            if status == 200 and image_format(body):
                return _image(body, "public, max-age=3600")
            if status in (404, 204):
                return web.Response(body=_empty_png(), content_type="image/png", headers={"Cache-Control": "max-age=3600"})
            if status in (401, 403):
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        # Never the URL: it may hold the token.
        what = "was unreachable" if status == -1 else f"answered {status}" if status != 200 else "sent a body that is not an image"
        raise web.HTTPBadGateway(text=f"the sweep's source {what}\n")

    async def _pmtiles(self, request: web.Request) -> web.StreamResponse:
        assert self.pmtiles is not None
        return web.FileResponse(self.pmtiles, headers={"Cache-Control": "public, max-age=3600",
                                                       "Content-Type": "application/octet-stream"})

    # --- overlay, click, download ---------------------------------------------------------

    def _model(self, name: str | None) -> str:
        if not name or not _MODEL.match(name) or self.overlay.model(name) is None:
            raise web.HTTPNotFound(text="no such model in this sweep\n")
        return name

    async def _overlay(self, request: web.Request) -> web.Response:
        model = self._model(request.match_info["model"])
        z, x, y = _zxy(request)
        t = _threshold(request.query.get("t", "0.5"))
        # The page puts the progress version (it moves when the ledger does) in the URL: the
        # first request of a new version looks for new parts at once.
        v = request.query.get("v", "")[:200]
        fresh = self._overlay_version.get(model) != v
        self._overlay_version[model] = v
        body = await self._run(self.overlay.tile, model, z, x, y, t, fresh)
        return _mvt(body, "max-age=2")

    def tile_info(self, t: Tile) -> dict[str, Any]:
        row = None
        q = self._queue()
        for bz in range(self.block_zoom, self.block_zoom_min - 1, -1):  # adaptive: the ancestor queued
            block = Tile(bz, t.x >> (self.zoom - bz), t.y >> (self.zoom - bz))
            bid = tile_id(block)
            rec = q.get(bid)
            if rec is not None:
                row = (rec["state"], rec["attempts"], rec["tiles"])
                break
        if row is None:
            bz = self.block_zoom
            block = Tile(bz, t.x >> (self.zoom - bz), t.y >> (self.zoom - bz))
            bid = tile_id(block)
        lon, lat = center(t)
        out: dict[str, Any] = {
            "z": t.z, "x": t.x, "y": t.y, "lon": round(lon, 7), "lat": round(lat, 7),
            "bounds": [round(v, 7) for v in bounds(t)],
            "block": {"z": bz, "x": block.x, "y": block.y, "id": bid,
                      "state": STATE_NAMES[int(row[0])] if row else None,
                      "attempts": int(row[1]) if row else None, "tiles": int(row[2]) if row else None},
            "in_plan": row is not None,
            "predictions": [],
        }
        from ..predict.ledger import open_ledger

        db = open_ledger(self.path) if row is not None else None
        if db is None:
            return out
        try:
            parts = db.block_parts(bid)  # the part holding the block's winning rows
        finally:
            db.close()
        models = {m.key: m for m in self.overlay.models}
        for key, part in parts:
            m = models.get(key)
            if m is None:
                continue
            import pyarrow.parquet as pq

            table = pq.read_table(self.path / PREDICTIONS_DIR / part, columns=["x", "y", *m.labels, "label"],
                                  filters=[("x", "=", t.x), ("y", "=", t.y)])
            if table.num_rows:
                r = table.slice(0, 1).to_pylist()[0]
                out["predictions"].append({
                    "model": m.folder, "name": m.name,
                    "scores": {lb: (None if r[lb] is None else round(float(r[lb]), 4)) for lb in m.labels},
                    "label": r["label"], "threshold": m.threshold,
                })
        return out

    async def _tile(self, request: web.Request) -> web.Response:
        q = request.query
        z, x, y = (_int(q.get(k), k) for k in ("z", "x", "y"))
        if z != self.zoom:
            raise web.HTTPBadRequest(text=f"tiles of this sweep are at zoom {self.zoom}\n")
        _check_grid(z, x, y)
        return web.json_response(await self._run(self.tile_info, Tile(z, x, y)), headers={"Cache-Control": "no-cache"})

    def detections(self, folder: str, t: float, box: tuple[float, float, float, float]) -> dict[str, Any]:
        from .overlay import _q

        m = self.overlay.model(folder)
        assert m is not None
        w, s, e, n = box
        Z = self.zoom
        a, b = tile_at(w, n, Z), tile_at(e, s, Z)
        from ..predict.ledger import part_sources, winning_rows_sql

        rows_sql = winning_rows_sql(part_sources(self.path, m.key))  # the ledger's winning rows only
        feats: list[dict[str, Any]] = []
        truncated = False
        if rows_sql is not None and m.labels:
            score = f"GREATEST({', '.join(_q(lb) for lb in m.labels)})"
            cols = ", ".join(_q(lb) for lb in m.labels)
            cur = self.overlay._cur()
            rows = cur.execute(
                f"SELECT x, y, block, lon, lat, {cols}, label FROM ({rows_sql}) "
                f"WHERE x BETWEEN $x0 AND $x1 AND y BETWEEN $y0 AND $y1 AND {score} >= $t ORDER BY block, x, y LIMIT {MAX_DETECTIONS + 1}",
                {"x0": a.x, "x1": b.x, "y0": a.y, "y1": b.y, "t": t},
            ).fetchall()
            truncated = len(rows) > MAX_DETECTIONS
            for r in rows[:MAX_DETECTIONS]:
                x, y = int(r[0]), int(r[1])
                W, S, E, N = bounds(Tile(Z, x, y))
                props: dict[str, Any] = {"z": Z, "x": x, "y": y, "block": int(r[2]), "lon": r[3], "lat": r[4]}
                for i, lb in enumerate(m.labels):
                    props[lb] = None if r[5 + i] is None else round(float(r[5 + i]), 4)
                props["label"] = r[5 + len(m.labels)]
                feats.append({"type": "Feature", "properties": props, "geometry": {
                    "type": "Polygon", "coordinates": [[[W, S], [E, S], [E, N], [W, N], [W, S]]]}})
        return {"type": "FeatureCollection", "features": feats,
                "properties": {"model": m.name, "threshold": t, "bbox": list(box), "truncated": truncated,
                               "max_features": MAX_DETECTIONS}}

    async def _detections(self, request: web.Request) -> web.Response:
        q = request.query
        folder = self._model(q.get("model"))
        t = _threshold(q.get("t", "0.5"))
        try:
            box = tuple(float(v) for v in q.get("bbox", "").split(","))
        except ValueError:
            raise web.HTTPBadRequest(text="bbox must be W,S,E,N in degrees\n") from None
        if len(box) != 4 or not (-180 <= box[0] < box[2] <= 180 and -90 <= box[1] < box[3] <= 90):
            raise web.HTTPBadRequest(text="bbox must be W,S,E,N in degrees\n")
        box = (box[0], max(box[1], -85.05), box[2], min(box[3], 85.05))
        doc = await self._run(self.detections, folder, t, box)
        return web.Response(
            body=json.dumps(doc).encode(), content_type="application/geo+json",
            headers={"Content-Disposition": f'attachment; filename="detections-{folder}-t{t:g}.geojson"',
                     "Cache-Control": "no-cache"},
        )


    def lines(self, folder: str, t: float) -> dict[str, Any]:
        """The model's detections at score >= t traced into lines, recomputed only when
        the ledger's parts change."""
        from ..traced import lines_geojson, sweep_lines
        from .overlay import ledger_parts

        m = self.overlay.model(folder)
        assert m is not None
        key = (folder, round(t, 4), tuple(ledger_parts(self.path, m.key)))
        cache = self.__dict__.setdefault("_lines_cache", {})
        if key not in cache:
            try:
                lines, _, name = sweep_lines(self.path, model=m.name, threshold=t)
            except Exception as exc:  # noqa: BLE001 - e.g. a run's first part not committed yet: the next refresh tries again
                return {"type": "FeatureCollection", "features": [], "properties": {"error": f"{type(exc).__name__}: {exc}"}}
            cache.clear()
            cache[key] = lines_geojson(lines, name)
        return cache[key]  # type: ignore[no-any-return]

    async def _lines(self, request: web.Request) -> web.Response:
        folder = self._model(request.query.get("model"))
        t = _threshold(request.query.get("t", "0.5"))
        doc = await self._run(self.lines, folder, t)
        return web.Response(body=json.dumps(doc).encode(), content_type="application/geo+json",
                            headers={"Cache-Control": "no-cache"})


# --- helpers -----------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    resp = await handler(request)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    return resp


def _int(v: str | None, what: str) -> int:
    if v is None or not _INT.match(v):
        raise web.HTTPBadRequest(text=f"{what} must be a whole number\n")
    return int(v)


def _check_grid(z: int, x: int, y: int) -> None:
    if z > MAX_ZOOM:
        raise web.HTTPBadRequest(text=f"zoom must be 0..{MAX_ZOOM}\n")
    if x >= 1 << z or y >= 1 << z:
        raise web.HTTPNotFound(text="tile outside the grid\n")


def _zxy(request: web.Request) -> tuple[int, int, int]:
    mi = request.match_info
    z, x, y = _int(mi["z"], "z"), _int(mi["x"], "x"), _int(mi["y"], "y")
    _check_grid(z, x, y)
    return z, x, y


def _threshold(v: str) -> float:
    try:
        t = float(v)
    except ValueError:
        raise web.HTTPBadRequest(text="t must be a number in 0..1\n") from None
    if not 0.0 <= t <= 1.0:
        raise web.HTTPBadRequest(text="t must be a number in 0..1\n")
    return t


def _mvt(body: bytes, cache: str) -> web.Response:
    return web.Response(body=body, content_type="application/vnd.mapbox-vector-tile", headers={"Cache-Control": cache})


def _image(data: bytes, cache: str) -> web.Response:
    fmt = image_format(data) or "octet-stream"
    ctype = "application/octet-stream" if fmt == "octet-stream" else f"image/{fmt}"
    return web.Response(body=data, content_type=ctype, headers={"Cache-Control": cache})


LOOPBACK = ("127.0.0.1", "localhost", "::1")
_HOST = re.compile(r"^(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$")


@web.middleware
async def _loopback_host(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Served on loopback, answer only requests addressed to loopback: a web page whose
    name an attacker re-points at 127.0.0.1 (DNS rebinding) sends its own Host and is refused."""
    if not _HOST.match(request.headers.get("Host", "")):
        raise web.HTTPForbidden(text="this viewer answers only requests to 127.0.0.1 / localhost\n")
    return await handler(request)


async def serve(viewer: Viewer, host: str, port: int, on_ready: Callable[[str], None], stop: asyncio.Event) -> None:
    """Run the viewer on ``host:port`` until ``stop`` is set. ``on_ready(url)`` is called
    once it listens. A port in use is a :class:`UsageError`."""
    runner = web.AppRunner(viewer.make_app(host), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use; pass another --port (or --port 0 for any free one)") from None
        raise UsageError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    addresses = runner.addresses  # the port we got (port 0: a free one)
    real_port = addresses[0][1] if addresses else port
    shown = f"[{host}]" if ":" in host else host
    on_ready(f"http://{shown}:{real_port}/")
    for folder in list(viewer.overlay._models):  # warm the overlay cache in the background
        asyncio.get_running_loop().run_in_executor(viewer.pool, viewer.overlay.refresh, folder, True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
