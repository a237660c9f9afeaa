"""An HTTP tile server over a simulated :class:`~tilesweep.sim.world.World`, with faults.

Routes (``EXT`` is ``jpg``, ``jpeg``, ``png`` or ``webp``; ``@2x`` gives 512 px tiles)::

    /{z}/{x}/{y}.EXT   /{z}/{x}/{y}@2x.EXT      XYZ
    /tms/{z}/{x}/{y}.EXT                        TMS (rows from the south)
    /q/{quadkey}.EXT   /q/{quadkey}@2x.EXT      Bing quadkeys
    /wms?REQUEST=GetMap&SRS=EPSG:3857&BBOX=..&WIDTH=..&HEIGHT=..&FORMAT=image/jpeg
    /static/{west,south,east,north}/{W}x{H}.EXT  a static-image API (degrees)
    /health   /stats                            liveness, counters (JSON)

The two area routes serve any box on the tile grid of a zoom (whole 256 px tiles, at most
4,096 px a side): the image is the tiles' pixels side by side, encoded once, so a lossless
crop of it gives the bytes a tile request gets. A box off the grid is a 400.

Order of checks per tile request: parse (400 for a malformed path, 404 for a tile outside
the grid or deeper than zoom 20), per-client rate limit (429), coverage (404), then the
request's fault is drawn from ``(fault seed, z, x, y, attempt)`` and its latency slept.
Rendered tiles are kept in an LRU of encoded bytes bounded by ``cache_mb``; renders run in
a thread pool so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import struct
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from aiohttp import web

from ..tiles import Tile, from_quadkey, tms_y
from .faults import Faults
from .world import FORMATS, MAX_SIM_ZOOM, World, encode, normalise_format

_NAME = re.compile(r"^(\d+)(@2x)?\.(jpg|jpeg|png|webp)$")
_QNAME = re.compile(r"^([0-3]*)(@2x)?\.(jpg|jpeg|png|webp)$")

OUTCOMES = (
    "ok", "http_500", "http_503", "http_429", "reset", "truncate", "wrong_type", "slow_body", "wrong_size",
    "rate_limited", "not_found", "bad_request", "area_requests", "area_tiles",
)

MAX_AREA_PX = 4096
"""The widest and tallest image the area routes serve (16 x 16 tiles of 256 px)."""

_HALF_M = 20037508.342789244  # half the side of the Web-Mercator square, metres

_HTML = (
    b"<!DOCTYPE html><html><head><title>Service notice</title></head>"
    b"<body><h1>We'll be right back</h1><p>The tile service is under maintenance.</p></body></html>"
)


class _LRUBytes:
    """An LRU of encoded tiles (or pixel arrays: ``sizeof=nbytes``) bounded by total bytes."""

    def __init__(self, max_bytes: int, sizeof: Any = len) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._sizeof = sizeof
        self._d: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: Any, value: Any) -> None:
        size = self._sizeof(value)
        if size > self.max_bytes:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= self._sizeof(old)
        self._d[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, v = self._d.popitem(last=False)
            self.bytes -= self._sizeof(v)

    def __len__(self) -> int:
        return len(self._d)


class _Attempts:
    """Per-tile request counters, bounded (least recently used tiles are forgotten)."""

    def __init__(self, max_tiles: int) -> None:
        self.max_tiles = max_tiles
        self._d: OrderedDict[Tile, int] = OrderedDict()

    def next(self, tile: Tile) -> int:
        n = self._d.pop(tile, 0)
        self._d[tile] = n + 1
        if len(self._d) > self.max_tiles:
            self._d.popitem(last=False)
        return n


class _Buckets:
    """Token buckets per client key: ``rate`` tokens/s, at most ``burst``."""

    def __init__(self, rate: float, burst: float, max_clients: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._d: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float) -> float:
        """0 if a token was taken, else seconds until one is available."""
        tokens, last = self._d.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._d[client] = (tokens, now)
        if len(self._d) > self.max_clients:
            self._d.popitem(last=False)
        return wait


class SimServer:
    """The simulated tile server; an async context manager (``async with SimServer(...)``).

    ``url`` is ``http://HOST:PORT`` once started; :meth:`template` gives URL templates for
    every route kind. ``stats`` counts requests by outcome (also at ``/stats``)."""

    def __init__(
        self,
        world: World | None = None,
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cache_mb: float = 256.0,
        max_tracked_tiles: int = 1_000_000,
        workers: int | None = None,
        quality: int = 85,
        area_faults: Faults | None = None,
    ) -> None:
        self.world = world if world is not None else World(0)
        self.faults = faults if faults is not None else Faults()
        # faults of area requests of more than one tile (super-tiles); None: ``faults``
        self.area_faults = area_faults
        self.host = host
        self.port = port
        self.quality = quality
        self.stats: Counter[str] = Counter()
        self._cache = _LRUBytes(int(cache_mb * 1_000_000))
        # pixels of 256 px tiles, for the area routes (which stitch them): as much again
        self._arrays = _LRUBytes(int(cache_mb * 1_000_000), sizeof=lambda a: a.nbytes)
        self._attempts = _Attempts(max_tracked_tiles)
        f = self.faults
        self._buckets = (
            _Buckets(f.rate_limit, float(f.rate_burst or max(1.0, math.ceil(f.rate_limit)))) if f.rate_limit else None
        )
        self._covered: dict[Tile, bool] = {}
        # _arrays, _covered and stats["renders"] are used from the render threads too
        self._lock = threading.Lock()
        self._inflight: dict[Any, asyncio.Future[bytes]] = {}
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/q/{name}", self._quadkey)
        app.router.add_get("/wms", self._wms)
        app.router.add_get("/static/{bbox}/{name}", self._static)
        app.router.add_get("/tms/{z}/{x}/{name}", self._tms)
        app.router.add_get("/{z}/{x}/{name}", self._xyz)
        return app

    async def start(self) -> "SimServer":
        self._executor = ThreadPoolExecutor(max_workers=self._workers or 4, thread_name_prefix="sim-render")
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server  # the asyncio server: find the port we got
        assert server is not None
        sock = server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]
        host = self.host if ":" not in self.host else f"[{self.host}]"
        self.url = f"http://{host}:{self.port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def __aenter__(self) -> "SimServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def template(self, ext: str = "jpg", scale: int = 1, scheme: str = "xyz") -> str:
        """A URL template for this server: scheme ``xyz`` ({z}/{x}/{y}), ``tms`` ({-y}),
        ``quadkey``, or a bbox template: ``wms`` (GetMap, {bbox} in EPSG:3857) or ``static``
        ({bbox_4326}); ``scale`` 2 asks for 512 px tiles (tile schemes only)."""
        s = "@2x" if scale == 2 else ""
        if scheme == "xyz":
            return f"{self.url}/{{z}}/{{x}}/{{y}}{s}.{ext}"
        if scheme == "tms":
            return f"{self.url}/tms/{{z}}/{{x}}/{{-y}}{s}.{ext}"
        if scheme == "quadkey":
            return f"{self.url}/q/{{quadkey}}{s}.{ext}"
        if scheme == "wms":
            mime = FORMATS[normalise_format(ext)]
            return (f"{self.url}/wms?SERVICE=WMS&VERSION=1.1.1&REQUEST=GetMap&LAYERS=world&STYLES=&SRS=EPSG:3857"
                    f"&BBOX={{bbox}}&WIDTH={{width}}&HEIGHT={{height}}&FORMAT={mime}")
        if scheme == "static":
            return f"{self.url}/static/{{bbox_4326}}/{{width}}x{{height}}.{ext}"
        raise ValueError(f"URL scheme {scheme!r} is not xyz, tms, quadkey, wms or static")

    # --- handlers ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _stats(self, request: web.Request) -> web.Response:
        body = {k: self.stats.get(k, 0) for k in ("requests", *OUTCOMES, "renders", "cache_hits", "bytes")}
        body["cache_tiles"] = len(self._cache)
        body["cache_bytes"] = self._cache.bytes
        return web.json_response(body)

    def _bad(self, why: str) -> web.Response:
        self.stats["requests"] += 1
        self.stats["bad_request"] += 1
        return web.Response(status=400, text=f"bad request: {why}\n")

    async def _xyz(self, request: web.Request) -> web.StreamResponse:
        m = _NAME.match(request.match_info["name"])
        zs, xs = request.match_info["z"], request.match_info["x"]
        if not m or not zs.isdigit() or not xs.isdigit():
            return self._bad("expected /{z}/{x}/{y}.jpg")
        return await self._tile(request, int(zs), int(xs), int(m.group(1)), m.group(2), m.group(3))

    async def _tms(self, request: web.Request) -> web.StreamResponse:
        m = _NAME.match(request.match_info["name"])
        zs, xs = request.match_info["z"], request.match_info["x"]
        if not m or not zs.isdigit() or not xs.isdigit():
            return self._bad("expected /tms/{z}/{x}/{y}.jpg")
        z, y = int(zs), int(m.group(1))
        if z > 30:
            return await self._tile(request, z, int(xs), y, m.group(2), m.group(3))
        return await self._tile(request, z, int(xs), tms_y(Tile(z, 0, y)), m.group(2), m.group(3))

    async def _quadkey(self, request: web.Request) -> web.StreamResponse:
        m = _QNAME.match(request.match_info["name"])
        if not m or len(m.group(1)) > 30:
            return self._bad("expected /q/{quadkey}.jpg")
        t = from_quadkey(m.group(1)) if len(m.group(1)) <= 24 else Tile(len(m.group(1)), 0, 0)
        return await self._tile(request, t.z, t.x, t.y, m.group(2), m.group(3))

    def _is_covered(self, tile: Tile) -> bool:
        with self._lock:
            hit = self._covered.get(tile)
        if hit is None:
            import shapely

            from ..tiles import bounds

            w, s, e, n = bounds(tile)
            hit = bool(shapely.intersects(self.faults.coverage, shapely.box(w, s, e, n)))
            with self._lock:
                if len(self._covered) > 100_000:
                    self._covered.clear()
                self._covered[tile] = hit
        return hit

    async def _tile(self, request: web.Request, z: int, x: int, y: int, scale: str | None, ext: str) -> web.StreamResponse:
        st = self.stats
        st["requests"] += 1
        if z > MAX_SIM_ZOOM or y < 0 or x >= (1 << z) or y >= (1 << z):
            st["not_found"] += 1
            return web.Response(status=404, text="no such tile\n")
        tile = Tile(z, x, y)
        f = self.faults
        if self._buckets is not None:
            wait = self._buckets.take(request.remote or "?", time.monotonic())
            if wait > 0:
                st["rate_limited"] += 1
                return web.Response(status=429, text="rate limit exceeded\n", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if f.coverage is not None and not self._is_covered(tile):
            st["not_found"] += 1
            return web.Response(status=404, text="outside coverage\n")
        attempt = self._attempts.next(tile)
        kind = f.draw(z, x, y, attempt) if f.any_fault else None
        delay = f.latency_s(z, x, y, attempt)
        if delay > 0:
            await asyncio.sleep(delay)
        fmt = normalise_format(ext)
        size = 512 if scale else 256
        return await self._answer(request, kind, lambda: self._render(tile, size, fmt), fmt, f)

    async def _answer(self, request: web.Request, kind: str | None, render: Any, fmt: str, f: Faults) -> web.StreamResponse:
        """The response of a request whose fault is ``kind`` (None: none), drawn from ``f``;
        ``render()`` gives the right body (awaited only when one is sent)."""
        st = self.stats
        if kind == "http_500":
            st[kind] += 1
            return web.Response(status=500, text="internal server error\n")
        if kind == "http_503":
            st[kind] += 1
            return web.Response(status=503, text="service unavailable\n")
        if kind == "http_429":
            st[kind] += 1
            return web.Response(status=429, text="too many requests\n", headers={"Retry-After": str(int(math.ceil(f.retry_after)))})
        if kind == "reset":
            st[kind] += 1
            _abort(request)
            return web.Response(status=500)  # never sent: aiohttp finds the transport closed
        body = await render()
        ctype = FORMATS[fmt]
        if kind == "wrong_size":
            st[kind] += 1
            loop = asyncio.get_running_loop()
            half = await loop.run_in_executor(self._executor, _half_size, body, fmt, self.quality)
            return web.Response(body=half, content_type=ctype)
        if kind == "wrong_type":
            st[kind] += 1
            return web.Response(status=200, body=_HTML, content_type="text/html")
        if kind == "truncate":
            st[kind] += 1
            resp = web.StreamResponse(status=200, headers={"Content-Type": ctype})
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            transport = request.transport
            if transport is not None:
                transport.close()  # flushes what was written, then FIN: the body is short
            return resp
        if kind == "slow_body":
            st[kind] += 1
            resp = web.StreamResponse(status=200, headers={"Content-Type": ctype})
            resp.content_length = len(body)
            await resp.prepare(request)
            n = 8
            step = math.ceil(len(body) / n)
            await resp.write(body[:1])  # headers and a first byte at once, the rest trickled
            for i in range(n):
                await asyncio.sleep(f.slow_body_s / n)
                await resp.write(body[max(1, i * step) : (i + 1) * step])
            await resp.write_eof()
            return resp
        st["ok"] += 1
        st["bytes"] += len(body)
        return web.Response(body=body, content_type=ctype, headers={"Cache-Control": "max-age=86400"})

    async def _render(self, tile: Tile, size: int, fmt: str) -> bytes:
        return await self._cached((tile, size, fmt), self._encode_tile, tile, size, fmt)

    def _encode_tile(self, tile: Tile, size: int, fmt: str) -> bytes:
        return encode(self._pixels(tile, size), fmt, self.quality)

    def _pixels(self, tile: Tile, size: int = 256) -> Any:
        """The tile's pixels. Runs in a render thread. Kept in an LRU once an area route has
        been asked (they stitch them), so a server of tiles only keeps encoded bytes."""
        key = (tile, size)
        with self._lock:
            arr = self._arrays.get(key)
        if arr is None:
            arr = self.world.render_array(tile, size)
            with self._lock:
                self.stats["renders"] += 1
                if self.stats["area_requests"]:
                    self._arrays.put(key, arr)
        return arr

    def _encode_area(self, z: int, x0: int, y0: int, nx: int, ny: int, fmt: str) -> bytes:
        import numpy as np

        blank = np.full((256, 256, 3), 255, np.uint8)  # a tile outside coverage: white, as a WMS draws no data

        def pixels(t: Tile) -> Any:
            return self._pixels(t) if self.faults.coverage is None or self._is_covered(t) else blank

        rows = [np.concatenate([pixels(Tile(z, x0 + i, y0 + j)) for i in range(nx)], axis=1) for j in range(ny)]
        return encode(np.concatenate(rows, axis=0), fmt, self.quality)

    async def _cached(self, key: Any, fn: Any, *args: Any) -> bytes:
        """``fn(*args)`` in a render thread, once per key (an LRU of encoded bytes; concurrent
        requests for one key share one render)."""
        hit = self._cache.get(key)
        if hit is not None:
            self.stats["cache_hits"] += 1
            return hit  # type: ignore[no-any-return]
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, fn, *args)
        self._inflight[key] = fut  # type: ignore[assignment]
        try:
            body = await asyncio.shield(fut)
        finally:
            self._inflight.pop(key, None)
        self._cache.put(key, body)
        return body

    # --- area routes (WMS GetMap, static images) ----------------------------------------

    async def _wms(self, request: web.Request) -> web.StreamResponse:
        q = {k.upper(): v for k, v in request.query.items()}
        if q.get("REQUEST", "").lower() != "getmap":
            return self._bad("only REQUEST=GetMap is served")
        if (q.get("SRS") or q.get("CRS") or "").upper() not in ("EPSG:3857", "EPSG:900913"):
            return self._bad("SRS (or CRS) must be EPSG:3857")
        fmt = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp"}.get(q.get("FORMAT", "image/jpeg").lower())
        if fmt is None:
            return self._bad("FORMAT must be image/jpeg, image/png or image/webp")
        try:
            minx, miny, maxx, maxy = (float(v) for v in q["BBOX"].split(","))
            width, height = int(q["WIDTH"]), int(q["HEIGHT"])
        except (KeyError, ValueError):
            return self._bad("BBOX=minx,miny,maxx,maxy, WIDTH and HEIGHT are needed")
        return await self._area(request, minx, miny, maxx, maxy, width, height, fmt)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        m = re.match(r"^(\d+)x(\d+)\.(jpg|jpeg|png|webp)$", request.match_info["name"])
        try:
            w, s_, e, n = (float(v) for v in request.match_info["bbox"].strip("[]").split(","))
        except ValueError:
            m = None
        if not m:
            return self._bad("expected /static/{west,south,east,north}/{W}x{H}.jpg")
        (minx, miny), (maxx, maxy) = _mercator(w, s_), _mercator(e, n)
        return await self._area(request, minx, miny, maxx, maxy, int(m.group(1)), int(m.group(2)), normalise_format(m.group(3)))

    async def _area(self, request: web.Request, minx: float, miny: float, maxx: float, maxy: float,
                    width: int, height: int, fmt: str) -> web.StreamResponse:
        """An image of whole tiles: the box must lie on the tile grid of one zoom."""
        grid = _on_grid(minx, miny, maxx, maxy, width, height)
        if isinstance(grid, str):
            return self._bad(grid)
        z, x0, y0, nx, ny = grid
        st = self.stats
        st["requests"] += 1
        st["area_requests"] += 1
        f = self.faults
        if self._buckets is not None:
            wait = self._buckets.take(request.remote or "?", time.monotonic())
            if wait > 0:
                st["rate_limited"] += 1
                return web.Response(status=429, text="rate limit exceeded\n", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        tiles = [Tile(z, x0 + i, y0 + j) for j in range(ny) for i in range(nx)]
        if f.coverage is not None and not any(self._is_covered(t) for t in tiles):
            st["not_found"] += 1
            return web.Response(status=404, text="outside coverage\n")
        attempt = self._attempts.next(("area", z, x0, y0, nx, ny))  # type: ignore[arg-type]
        if self.area_faults is not None and nx * ny > 1:
            f = self.area_faults
        kind = f.draw(z, x0, y0, attempt, n=nx) if f.any_fault else None
        delay = f.latency_s(z, x0, y0, attempt, n=nx)
        if delay > 0:
            await asyncio.sleep(delay)
        if kind is None:
            st["area_tiles"] += nx * ny
        return await self._answer(request, kind, lambda: self._cached(("area", z, x0, y0, nx, ny, fmt), self._encode_area,
                                                                      z, x0, y0, nx, ny, fmt), fmt, f)


def _mercator(lon: float, lat: float) -> tuple[float, float]:
    """EPSG:3857 metres of a point in degrees."""
    lat = max(-85.0511287798, min(85.0511287798, lat))
    return lon * _HALF_M / 180.0, math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) * _HALF_M / math.pi


def _on_grid(minx: float, miny: float, maxx: float, maxy: float, width: int, height: int) -> tuple[int, int, int, int, int] | str:
    """``(z, x0, y0, nx, ny)`` of a box of whole 256 px tiles, or why it is not one."""
    if not (0 < width <= MAX_AREA_PX and 0 < height <= MAX_AREA_PX):
        return f"WIDTH and HEIGHT must be 1..{MAX_AREA_PX} px"
    if width % 256 or height % 256:
        return "WIDTH and HEIGHT must be whole 256 px tiles"
    if not (maxx > minx and maxy > miny):
        return "BBOX must be minx,miny,maxx,maxy with max > min"
    nx, ny = width // 256, height // 256
    side = (maxx - minx) / nx  # metres per tile
    zf = math.log2(2 * _HALF_M / side)
    z = round(zf)
    if abs(zf - z) > 1e-4 or not 0 <= z <= MAX_SIM_ZOOM or abs((maxy - miny) / ny - side) > 1e-3 * side:
        return "BBOX and WIDTH/HEIGHT are not whole tiles of one zoom (the simulator serves tile-aligned boxes)"
    side = 2 * _HALF_M / (1 << z)
    xf, yf = (minx + _HALF_M) / side, (_HALF_M - maxy) / side
    x0, y0 = round(xf), round(yf)
    if abs(xf - x0) > 1e-3 or abs(yf - y0) > 1e-3 or x0 < 0 or y0 < 0 or x0 + nx > (1 << z) or y0 + ny > (1 << z):
        return f"BBOX is not on the zoom-{z} tile grid (the simulator serves tile-aligned boxes)"
    return z, x0, y0, nx, ny


def _half_size(body: bytes, fmt: str, quality: int) -> bytes:
    """The image at half its pixel size (the ``wrong_size`` fault)."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(body)) as img:
        return encode(np.asarray(img.convert("RGB").reduce(2)), fmt, quality)


def _abort(request: web.Request) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), no response bytes."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def sim_server(world: World | None = None, faults: Faults | None = None, **kwargs: Any) -> SimServer:
    """``async with sim_server(world, faults=Faults(...), port=0) as srv: srv.url``."""
    return SimServer(world, faults, **kwargs)


@contextlib.contextmanager
def run_in_thread(world: World | None = None, faults: Faults | None = None, **kwargs: Any) -> Iterator[SimServer]:
    """Run a :class:`SimServer` on its own event loop in a background thread, for sync code:
    ``with run_in_thread(World(0)) as srv: urllib.request.urlopen(srv.url + "/0/0/0.jpg")``."""
    server = SimServer(world, faults, **kwargs)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sim-server", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield server
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


async def _serve_forever(server: SimServer, ready: Any = None) -> None:
    async with server:
        if ready is not None:
            ready(server)
        await asyncio.Event().wait()


def serve(world: World | None = None, faults: Faults | None = None, *, ready: Any = None, **kwargs: Any) -> None:
    """Serve until interrupted (Ctrl-C). ``ready(server)`` is called once listening."""
    server = SimServer(world, faults, **kwargs)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(server, ready))
