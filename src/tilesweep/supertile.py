"""Super-tile requests: one request for an n x n block of tiles, cut into tiles.

A bbox source (:class:`~tilesweep.sources.Source` with ``{bbox}``/``{bbox_4326}``,
``{width}``, ``{height}``, and ``supertile=n``) is fetched by a :class:`SuperTileFetcher`:
a :class:`~tilesweep.fetch.Fetcher` whose :meth:`~SuperTileFetcher.fetch` still answers one
:class:`~tilesweep.fetch.TileResult` per tile, so the worker, the shard store and the
accounting are the same as for single tiles.

- **Groups.** A super-tile is the quadtree cell of ``n x n`` tiles at zoom ``z - log2 n``
  (the n-multiple grid at the sweep's zoom). Blocks are cells of at least 16 x 16 tiles
  (adaptive blocks at the default 256 tiles), so a super-tile never straddles two blocks
  (:func:`check_blocks` refuses a sweep whose blocks are smaller than ``n x n``).
- **Announced tiles.** The worker tells the fetcher a block's tiles before it asks for
  them (:meth:`~SuperTileFetcher.expect`): a group with at least ``min_tiles`` of them is
  one request, whose answer is cut into exactly those tiles (tiles of the cell that were
  not planned are dropped); a sparser group, and a tile nobody announced, is asked for
  alone (a 1 x 1 bbox request, ``tile_size`` px).
- **Validation** is that of a single tile (status, content type, magic bytes, a header
  that gives a size) plus the exact size: ``n * tile_size`` px each way (``1 * tile_size``
  for single requests). The body limit is ``max_tile_bytes`` per tile carried, so
  ``n * n * max_tile_bytes`` for a super-tile, and never above ``max_inflight_bytes``.
- **Outcomes.** A super-tile answer that is ok gives each of its tiles ``ok`` (cut by
  :mod:`tilesweep.tilecut`), 404/204/empty gives each ``empty``, and transient faults
  (5xx, 429, resets, timeouts, truncation, a transfer cut for the in-flight byte budget)
  are retried as one request with the fetcher's backoff and tile budget; when they are
  spent, the super-tile falls back to one request per tile (each with its own retries), as
  does an answer the server will not give right (a wrong pixel size, a 200 that is no
  image, e.g. a WMS ServiceException for a request over its MAXSIZE, a 4xx other than
  401/403/404, a body over the limit, an image that does not cut). 401/403 fail the tiles
  at once (and count once towards ``auth_failures_to_stop``: one request).
- **Requests in flight.** ``concurrency`` (``--concurrency``) counts requests: an
  announced tile that shares a super-tile's request takes no slot
  (:meth:`~SuperTileFetcher.holds_slot`), so 256 in flight are 256 super-tiles, not 16.
  Super-tile requests are also bounded by the in-flight byte budget: at most
  ``max_inflight_bytes // (n * n * EXPECTED_TILE_BYTES)`` at once (64 of 8 x 8 tiles in
  the 256 MiB default; ``max_super_in_flight``), so a full ``concurrency`` of big answers
  is not cut for the budget and retried; the others wait (holding their slot).
  When a super-tile falls back, its other tiles' single requests take the caller's
  request slots (``request_slots``: the worker's, so they count in ``--concurrency`` and
  shrink with its 429/503 throttle), or under :meth:`fetch_many` a semaphore of
  ``concurrency`` of their own.
- **Stats.** ``requests`` counts HTTP requests (a super-tile is one); ``ok``/``empty``/
  ``failed`` count tiles; ``bytes`` counts the bytes received; ``super_requests`` and
  ``fallbacks`` (super-tiles asked for again tile by tile) are counted on the fetcher. The
  first tile of a super-tile carries its request's ``attempts``, the others 0 (they had no
  request of their own), so ``requests == sum(attempts)`` and a block's ``retries`` count
  requests repeated, as for single tiles (a super-tile that fell back is not in the sum).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections import defaultdict
from typing import AsyncIterable, AsyncIterator, Callable, Iterable

from .errors import UsageError
from .fetch import EMPTY, FAILED, OK, Fetcher, FetchSettings, TileResult, _Attempt
from .imageformat import image_size
from .sources import Source
from .tilecut import CutError, cut
from .tiles import Tile

DEFAULT_MIN_FILL = 0.25
"""A super-tile is asked for when at least this share of its n x n tiles is wanted
(``min_tiles = ceil(fill * n * n)``): see docs/sources.md, "Super-tiles", for the measure."""

EXPECTED_TILE_BYTES = 64 * 2**10
"""Bytes of one tile assumed when bounding super-tiles in flight by the in-flight byte
budget (a 256 px aerial JPEG is 15-50 kB): at most ``max_inflight_bytes // (n * n *
EXPECTED_TILE_BYTES)`` super-tile requests at once (64 of 8 x 8 in the 256 MiB default)."""

_n: contextvars.ContextVar[int] = contextvars.ContextVar("tilesweep_supertile_n", default=1)
"""Tiles on a side of the request being made in this task (1: a single tile)."""


def open_fetcher(source: Source, settings: FetchSettings = FetchSettings()) -> Fetcher:
    """The fetcher for ``source``: a :class:`SuperTileFetcher` for a bbox source, else a
    plain :class:`~tilesweep.fetch.Fetcher` (``async with open_fetcher(src, s) as f``)."""
    return SuperTileFetcher(source, settings) if source.is_bbox else Fetcher(source, settings)


def check_blocks(source: Source, zoom: int, block_zoom: int) -> None:
    """``UsageError`` when ``source``'s super-tiles would straddle the sweep's blocks: a
    block holds ``2**(zoom - block_zoom)`` tiles on a side (the finest blocks of the sweep)
    and a super-tile ``source.supertile``; and when the zoom has fewer tiles than one."""
    n = source.supertile
    if n == 1:
        return
    side = 1 << max(0, zoom - block_zoom)
    if side < n:
        raise UsageError(
            f"--super {n} needs blocks of at least {n} x {n} tiles; this sweep's blocks are {side} x {side} "
            f"(block zoom {block_zoom} at zoom {zoom}): use --super {side if side > 1 else 1} or plan with coarser blocks"
        )
    if (1 << zoom) < n:
        raise UsageError(f"--super {n} is more tiles on a side than zoom {zoom} has ({1 << zoom})")


def tiles_per_request(n: int, tiles_per_block: float, block_tiles: int, min_fill: float = DEFAULT_MIN_FILL) -> float:
    """Tiles one request is expected to bring, at most 16 (the worker leases this many
    times a tile source's blocks): ``n * n`` times the share of a block's ``block_tiles``
    cells that are planned (``tiles_per_block`` of them, e.g. a sample's), when that fills
    a super-tile to ``min_fill``; else 1 (too sparse to group: single requests)."""
    if n <= 1 or block_tiles <= 0:
        return 1.0
    per_cell = n * n * min(1.0, tiles_per_block / block_tiles)
    return min(16.0, per_cell) if per_cell >= max(1, math.ceil(min_fill * n * n)) else 1.0


class _Group:
    __slots__ = ("wanted", "task", "leader")

    def __init__(self, wanted: set[Tile], leader: Tile) -> None:
        self.wanted = wanted
        self.leader = leader  # the first announced: its request slot is the group's
        self.task: asyncio.Future[dict[Tile, TileResult] | None] | None = None


class SuperTileFetcher(Fetcher):
    """A :class:`~tilesweep.fetch.Fetcher` of a bbox source that asks for ``n x n`` tiles
    per request (``n = source.supertile``) where enough of them are wanted (``min_tiles``,
    default ``ceil(DEFAULT_MIN_FILL * n * n)``). Same interface: :meth:`fetch` one tile,
    :meth:`fetch_many`; announce tiles first with :meth:`expect` (``fetch_many`` does)."""

    def __init__(self, source: Source, settings: FetchSettings = FetchSettings(), *, min_tiles: int | None = None) -> None:
        if not source.is_bbox:
            raise UsageError(f"source {source.redacted()!r} is not a bbox template: it has no super-tiles")
        super().__init__(source, settings)
        self.n = source.supertile
        self.min_tiles = max(1, math.ceil(DEFAULT_MIN_FILL * self.n * self.n)) if min_tiles is None else int(min_tiles)
        if self.n == 1:
            self.min_tiles = 2  # a group of one tile is one tile: never a group
        self._groups: dict[tuple[int, int, int], _Group] = {}
        # single requests of super-tiles that fell back, beyond the group's own slot
        self._spare = asyncio.Semaphore(max(1, settings.concurrency))
        # super-tile requests in flight: as many as the in-flight byte budget holds at
        # EXPECTED_TILE_BYTES a tile (more would be cut for the budget and retried)
        budget = settings.max_inflight_bytes
        self.max_super_in_flight = max(1, budget // (self.n * self.n * EXPECTED_TILE_BYTES)) if budget else settings.concurrency
        self._super_slots = asyncio.Semaphore(self.max_super_in_flight)
        self.super_requests = 0  # super-tiles asked for (each retried as one request)
        self.fallbacks = 0  # super-tiles whose tiles were asked for one by one instead

    # --- what a request is -------------------------------------------------------------

    def _url(self, tile: Tile) -> str:
        return self.source.area_url(tile, _n.get())

    def _body_limit(self) -> int:
        """``max_tile_bytes`` per tile of the request being made (a single: one tile's)."""
        s = self.settings
        n = _n.get()
        limit = s.max_tile_bytes * n * n
        if s.max_inflight_bytes:
            limit = min(limit, s.max_inflight_bytes)
        return min(limit, 2**31)

    def _judge(self, body: bytes, content_type: str | None) -> _Attempt:
        a = super()._judge(body, content_type)
        n = _n.get()
        if a.kind == "retry" and n > 1:
            # a 200 that is no image for an area (a WMS ServiceException for a request over
            # the server's MAXSIZE): asking again gets the same; ask tile by tile at once
            return a._replace(kind="fatal")
        if a.kind != OK:
            return a
        if n == 1 and len(body) > self.settings.max_tile_bytes:  # the transport allows a super-tile's bytes
            return _Attempt("fatal", None, f"body over {self.settings.max_tile_bytes:,} bytes (max tile bytes)", 200, None)
        want = n * self.source.tile_size
        size = image_size(body)
        if size != (want, want):
            got = "no size in its header" if size is None else f"{size[0]}x{size[1]} px"
            return _Attempt("fatal", None, f"wrong size: {got}, expected {want}x{want}", 200, None)
        return a

    async def _request(self, tile: Tile, n: int) -> TileResult:
        """One request (retried as the fetcher retries a tile) for the ``n x n`` tiles from
        ``tile`` (north-west)."""
        token = _n.set(n)
        try:
            return await Fetcher.fetch(self, tile)
        finally:
            _n.reset(token)

    # --- grouping ----------------------------------------------------------------------

    def expect(self, tiles: Iterable[Tile]) -> Callable[[], None]:
        """Announce tiles that will be asked for (a block's): each super-tile with at least
        ``min_tiles`` of them becomes one request. Returns the call that forgets them (and
        cancels their requests still in flight): call it when the block is over."""
        n = self.n
        by: defaultdict[tuple[int, int, int], list[Tile]] = defaultdict(list)
        for t in tiles:
            by[(t[0], t[1] // n, t[2] // n)].append(Tile(*t))
        mine: list[tuple[tuple[int, int, int], _Group]] = []
        for key, listed in by.items():
            wanted = set(listed)
            if len(wanted) >= self.min_tiles:
                g = _Group(wanted, listed[0])
                self._groups[key] = g
                mine.append((key, g))

        def forget() -> None:
            for key, g in mine:
                if self._groups.get(key) is g:
                    del self._groups[key]
                if g.task is not None and not g.task.done():
                    g.task.cancel()

        return forget

    def holds_slot(self, tile: Tile) -> bool:
        """False for an announced tile of a super-tile other than its first: it shares the
        first one's request, so it takes no request slot (``--concurrency`` counts requests)."""
        g = self._groups.get((tile[0], tile[1] // self.n, tile[2] // self.n))
        return g is None or tile not in g.wanted or tile == g.leader

    async def fetch(self, tile: Tile) -> TileResult:
        """One tile: cut from its super-tile's answer when it was announced with enough
        others (:meth:`expect`), else asked for alone."""
        tile = Tile(*tile)
        key = (tile.z, tile.x // self.n, tile.y // self.n)
        g = self._groups.get(key)
        if g is None or tile not in g.wanted:
            return await self._request(tile, 1)
        if g.task is None:
            g.task = asyncio.ensure_future(self._fetch_group(key, g))
        try:
            results = await asyncio.shield(g.task)
        finally:
            g.wanted.discard(tile)
            if not g.wanted and self._groups.get(key) is g:
                del self._groups[key]
        r = results.pop(tile, None) if results is not None else None
        if r is None:  # the super-tile fell back to single requests
            if tile == g.leader:
                return await self._request(tile, 1)  # in the group's slot
            slots = self.request_slots  # the others took no slot: take the caller's (the worker's)
            if slots is None:
                async with self._spare:  # or bound them here (fetch_many)
                    return await self._request(tile, 1)
            await slots.acquire()
            try:
                return await self._request(tile, 1)
            finally:
                slots.release()
        return r

    async def _fetch_group(self, key: tuple[int, int, int], g: _Group) -> dict[Tile, TileResult] | None:
        """The super-tile's request, and its tiles' results; None: ask tile by tile."""
        z, gx, gy = key
        n = self.n
        nw = Tile(z, gx * n, gy * n)
        wanted = sorted(g.wanted)
        k = len(wanted)
        st = self.stats
        self.super_requests += 1
        async with self._super_slots:
            r = await self._request(nw, n)
        label = f"super-tile {z}/{nw.x}/{nw.y} ({n}x{n})"
        if r.status == OK:
            assert r.data is not None
            # the body still counts against the in-flight byte budget until it is cut
            held = self._hold_bytes(len(r.data))
            try:
                parts = await asyncio.get_running_loop().run_in_executor(
                    None, cut, r.data, self.source.tile_size, [(t.x - nw.x, t.y - nw.y) for t in wanted],
                    self.settings.max_tile_bytes)
            except CutError as exc:
                st.ok -= 1
                st.by_reason["cannot cut"] += 1
                self.fallbacks += 1
                self._log_fallback(label, str(exc))
                return None
            finally:
                held()
                r = r._replace(data=None)
            st.ok += k - 1
            return {t: TileResult(t, OK, data, r.attempts if i == 0 else 0, None, r.http_status)
                    for i, (t, data) in enumerate(zip(wanted, parts))}
        if r.status == EMPTY:
            st.empty += k - 1
            return {t: TileResult(t, EMPTY, None, r.attempts if i == 0 else 0, None, r.http_status) for i, t in enumerate(wanted)}
        reason = (r.error or "failed").split(": ", 1)[-1]
        if r.http_status not in (401, 403):
            # the server will not give this super-tile right (a wrong size, a non-image 200,
            # a 4xx), or not within its retries (5xx, timeouts, cut for the byte budget):
            # each tile alone may well work, so ask tile by tile rather than fail them
            st.failed -= 1
            self.fallbacks += 1
            self._log_fallback(label, reason)
            return None
        st.failed += k - 1
        return {t: TileResult(t, FAILED, None, r.attempts if i == 0 else 0, f"tile {t.z}/{t.x}/{t.y}: {label}: {reason}", r.http_status)
                for i, t in enumerate(wanted)}

    def _hold_bytes(self, nbytes: int) -> Callable[[], None]:
        """Count ``nbytes`` (a received body) in the transport's bytes in flight; returns
        the call that stops counting them."""
        transport = self._transport
        if transport is None:
            return _nothing
        transport.inflight_bytes += nbytes

        def release() -> None:
            transport.inflight_bytes -= nbytes

        return release

    def _log_fallback(self, label: str, reason: str) -> None:
        from .fetch import log

        log.info("%s from %s: %s; its tiles are asked for one by one", label, self.source.redacted(), reason)

    async def fetch_many(self, tiles: Iterable[Tile] | AsyncIterable[Tile]) -> AsyncIterator[TileResult]:
        """As :meth:`Fetcher.fetch_many`, announcing the input in windows of
        ``concurrency * n^2`` tiles (at most 65,536), so that tiles of one super-tile that
        come near each other (a block's, or any order near it) share one request."""
        size = min(65536, max(self.settings.concurrency, 4) * self.n * self.n)
        async for chunk in _windows(tiles, size):
            forget = self.expect(chunk)
            try:
                async for r in super().fetch_many(chunk):
                    yield r
            finally:
                forget()


def _nothing() -> None:
    pass


async def _windows(tiles: Iterable[Tile] | AsyncIterable[Tile], size: int) -> AsyncIterator[list[Tile]]:
    chunk: list[Tile] = []
    if hasattr(tiles, "__aiter__"):
        async for t in tiles:  # type: ignore[union-attr]
            chunk.append(t)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    else:
        for t in tiles:  # type: ignore[union-attr]
            chunk.append(t)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


__all__ = ["DEFAULT_MIN_FILL", "EXPECTED_TILE_BYTES", "SuperTileFetcher", "check_blocks", "open_fetcher", "tiles_per_request"]
