"""Fetching tiles over HTTP: asyncio + libcurl, bounded, rate-limited, retried, validated.

One :class:`Fetcher` owns one :class:`~tilesweep.transport.CurlTransport` (and its
connection pool) for one :class:`~tilesweep.sources.Source`. :meth:`Fetcher.fetch_many` streams results as they
complete, with at most ``concurrency`` tiles in flight, pulling tiles lazily from its input,
so memory holds only the tiles in flight whatever the size of the sweep.

Every tile ends in exactly one :class:`TileResult` status:

- ``"ok"``: 200 with an image body (magic bytes of JPEG, PNG, WebP, GIF, TIFF or AVIF, and
  a content type that is ``image/*``, octet-stream or absent, when ``validate``).
- ``"empty"``: 404, 204 or 200 with an empty body: the source has no tile there. Recorded,
  never retried.
- ``"failed"``: a permanent answer (400, 401, 403, other 4xx), not retried; or transient
  faults (5xx, 408, 429, connection resets and disconnects, timeouts, truncated or
  non-image bodies) still failing after ``retries`` retries. ``error`` names the tile and the
  last reason, never the URL (which may hold a token).

Retries sleep ``uniform(0, min(backoff_max_s, backoff_base_s * 2**k))`` before retry ``k``
(exponential backoff with full jitter), except that a 429 or 503 with ``Retry-After``
(seconds or an HTTP date) sleeps that long, capped at ``backoff_max_s``. The optional
``rate`` is a token bucket shared by every request of the fetcher, retries included.

When ``auth_failures_to_stop`` results in a row are 401 or 403 (a wrong or expired token),
:meth:`Fetcher.fetch` (and so :meth:`Fetcher.fetch_many`) raises :class:`SourceError`
instead of failing every remaining tile of the sweep one by one.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, NamedTuple

import pycurl

from . import __version__
from .block import TileStatus
from .errors import UsageError
from .imageformat import image_format, tile_sized
from .sources import Source
from .tiles import Tile
from .transport import MAX_BODY_BYTES, CurlTransport, curl_reason

try:  # optional: a faster event loop for fetch_tiles(); not a dependency
    import uvloop as _uvloop
except ImportError:  # pragma: no cover - depends on the environment
    _uvloop = None

log = logging.getLogger(__name__)

OK, EMPTY, FAILED = TileStatus.OK, TileStatus.EMPTY, TileStatus.FAILED  # the one tile-outcome encoding

_OCTET = frozenset({"application/octet-stream", "binary/octet-stream"})


class SourceError(UsageError):
    """The source refuses every request (401/403): a wrong token, header or URL. Raised by
    :meth:`Fetcher.fetch` and :meth:`Fetcher.fetch_many`; a :class:`~tilesweep.errors.UsageError`, so the CLI prints
    one line and exits 2."""


@dataclass(frozen=True)
class FetchSettings:
    """Limits, timeouts and retry policy of a :class:`Fetcher`. Times are seconds.

    - ``concurrency``: tiles in flight at once (also the connection pool size); thousands
      work, the open-file limit is raised to fit when the hard limit allows.
    - ``per_host``: connections per host; 0 means ``concurrency``.
    - ``rate``: requests per second over the whole fetcher (retries count); None: no cap.
    - ``retries``: attempts after the first for transient faults.
    - ``backoff_base_s`` / ``backoff_max_s``: full-jitter exponential backoff; the max also
      caps ``Retry-After``.
    - ``connect_timeout_s``: TCP (+TLS) connect; ``read_timeout_s``: the longest silence
      while reading (whole seconds: rounded up); ``total_timeout_s``: one whole request,
      including any wait for a pooled connection.
    - ``validate``: check magic bytes and content type of 200 bodies.
    - ``trust_env``: use ``http(s)_proxy`` / ``no_proxy`` and ``~/.netrc`` from the
      environment; off, proxies in the environment are ignored.
    - ``auth_failures_to_stop``: :meth:`Fetcher.fetch` raises :class:`SourceError` for
      the this-many-th 401/403 result in a row, with no ok or empty result between (0: never).
    - ``max_tile_bytes``: a body over this many bytes is cut while it arrives and the tile
      fails, not retried (default 4 MiB: no map tile is that large).
    - ``max_inflight_bytes``: the bytes of all bodies being received at once; a transfer
      that would pass it is cut and retried later (0: no budget). Memory in flight is then
      bounded in bytes whatever the server sends, not only in requests.
    - ``min_speed_bps``: a transfer slower than this for ``read_timeout_s`` is cut ("timeout"):
      a server that trickles a few bytes a second costs ``read_timeout_s``, not ``total_timeout_s``.
    - ``tile_budget_s``: seconds one tile may take over all its attempts (requests and
      backoff sleeps; not the wait for the ``rate``): no attempt runs past it, so it bounds
      what one bad tile can cost its block per lease (docs/sources.md, "Worst case").
    """

    concurrency: int = 256
    per_host: int = 0
    rate: float | None = None
    retries: int = 6
    backoff_base_s: float = 0.2
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 60.0
    user_agent: str = f"tilesweep/{__version__}"
    validate: bool = True
    auth_failures_to_stop: int = 50
    trust_env: bool = False
    max_tile_bytes: int = MAX_BODY_BYTES
    max_inflight_bytes: int = 256 * 2**20
    min_speed_bps: int = 1024
    tile_budget_s: float = 120.0

    def __post_init__(self) -> None:
        if not (isinstance(self.concurrency, int) and self.concurrency >= 1):
            raise UsageError(f"concurrency {self.concurrency!r} must be an integer >= 1")
        if not (isinstance(self.per_host, int) and self.per_host >= 0):
            raise UsageError(f"per-host connection limit {self.per_host!r} must be an integer >= 0")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise UsageError(f"rate {self.rate!r} must be > 0 requests/s (or unset)")
        if not (isinstance(self.retries, int) and self.retries >= 0):
            raise UsageError(f"retries {self.retries!r} must be an integer >= 0")
        for name in ("backoff_base_s", "backoff_max_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"{name}={v!r} must be a finite number >= 0")
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise UsageError(f"{name}={v!r} must be a finite number > 0")
        if self.auth_failures_to_stop < 0:
            raise UsageError(f"auth_failures_to_stop {self.auth_failures_to_stop!r} must be >= 0")
        if not (isinstance(self.max_tile_bytes, int) and 1024 <= self.max_tile_bytes <= 2**31):
            raise UsageError(f"max tile bytes {self.max_tile_bytes!r} must be an integer in 1024..{2**31:,} (default {MAX_BODY_BYTES:,})")
        if not (isinstance(self.max_inflight_bytes, int) and (self.max_inflight_bytes == 0 or self.max_inflight_bytes >= self.max_tile_bytes)):
            raise UsageError(f"max in-flight bytes {self.max_inflight_bytes!r} must be 0 (no budget) or at least max tile bytes ({self.max_tile_bytes:,})")
        if not (isinstance(self.min_speed_bps, int) and self.min_speed_bps >= 1):
            raise UsageError(f"min speed {self.min_speed_bps!r} must be an integer >= 1 byte/s")
        if not (self.tile_budget_s > 0 and math.isfinite(self.tile_budget_s)):
            raise UsageError(f"tile budget {self.tile_budget_s!r} must be a finite number of seconds > 0")


class TileResult(NamedTuple):
    """What became of one tile: ``status`` is a :class:`~tilesweep.block.TileStatus`,
    ``OK`` (``data`` holds the bytes), ``EMPTY`` (no tile there) or ``FAILED`` (``error``
    says why); it also equals its word, ``"ok"``, ``"empty"``, ``"failed"``. ``attempts`` counts
    our requests; ``http_status`` is the last HTTP status, None if no response came."""

    tile: Tile
    status: TileStatus
    data: bytes | None
    attempts: int
    error: str | None
    http_status: int | None


class FetchStats:
    """Running counters of a :class:`Fetcher`: ``requests`` sent (retries included),
    results ``ok`` / ``empty`` / ``failed``, ``retries``, ``bytes`` of ok bodies,
    ``by_reason`` (every answer that was not ok, e.g. ``"http 503"``, ``"reset"``,
    ``"timeout"``, ``"truncated"``, ``"not an image"``, ``"http 404"``), and the number of
    requests ``in_flight`` now and at most (``max_in_flight``)."""

    __slots__ = ("requests", "ok", "empty", "failed", "retries", "bytes", "by_reason", "in_flight", "max_in_flight")

    def __init__(self) -> None:
        self.requests = 0
        self.ok = 0
        self.empty = 0
        self.failed = 0
        self.retries = 0
        self.bytes = 0
        self.by_reason: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def results(self) -> int:
        return self.ok + self.empty + self.failed

    def snapshot(self) -> dict[str, Any]:
        """A plain dict copy (``by_reason`` as a dict), for logs, JSON and progress bars."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "empty": self.empty,
            "failed": self.failed,
            "retries": self.retries,
            "bytes": self.bytes,
            "by_reason": dict(self.by_reason),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }

    def __repr__(self) -> str:
        return f"FetchStats({self.snapshot()})"


class _RateLimiter:
    """Requests spaced ``1 / rate`` apart (a token bucket of depth one), shared by all tasks
    of a loop: each caller reserves the next free slot, then sleeps until it (no polling)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0

    async def acquire(self) -> None:
        now = asyncio.get_running_loop().time()
        t = max(now, self._next)
        self._next = t + self.interval
        if t > now:
            await asyncio.sleep(t - now)


class _Attempt(NamedTuple):
    kind: TileStatus | str  # OK | EMPTY | "retry" | "fatal"
    data: bytes | None
    reason: str | None
    http_status: int | None
    retry_after: float | None


class Fetcher:
    """Fetches tiles of one source: ``async with Fetcher(source, settings) as f:``, then
    :meth:`fetch` one tile or :meth:`fetch_many`. ``stats`` counts as it goes."""

    def __init__(self, source: Source, settings: FetchSettings = FetchSettings()) -> None:
        self.source = source
        self.settings = settings
        self.stats = FetchStats()
        self._transport: CurlTransport | None = None
        self._rate = _RateLimiter(settings.rate) if settings.rate else None
        self._rng = random.Random()
        self.on_throttle: Callable[[], None] | None = None  # called for every 429 / 503 answer
        # the caller's request slots (acquire/release: the worker's AdaptiveLimit), taken by
        # requests the caller did not start (a super-tile's fallback singles); None: our own
        self.request_slots: Any = None
        self._auth_streak = 0  # 401/403 results since the last ok or empty one
        self._auth_reason = ""

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> "Fetcher":
        await self.open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def open(self) -> None:
        """Check the environment the source needs and open the connection pool (idempotent)."""
        if self._transport is not None:
            return
        self.source.check_env()
        s = self.settings
        _ensure_open_files(s.concurrency + 64)
        headers = {"User-Agent": s.user_agent}
        headers.update(self.source.request_headers())
        self._transport = CurlTransport(
            max_connections=s.concurrency,
            per_host=s.per_host,
            connect_timeout_s=s.connect_timeout_s,
            read_timeout_s=s.read_timeout_s,
            total_timeout_s=s.total_timeout_s,
            headers=headers,
            trust_env=s.trust_env,
            min_speed_bps=s.min_speed_bps,
            max_body_bytes=self._body_limit(),
            max_inflight_bytes=s.max_inflight_bytes,
        )

    async def close(self) -> None:
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.close()

    # --- one tile ------------------------------------------------------------------------

    async def fetch(self, tile: Tile) -> TileResult:
        """Fetch one tile, retrying transient faults. Never raises for what a server does to
        one tile; raises :class:`SourceError` when this is the ``auth_failures_to_stop``-th
        401/403 in a row (the source refuses everything), and on cancellation, a closed
        fetcher, or an environment variable gone unset."""
        if self._transport is None:
            raise RuntimeError("Fetcher is not open: use 'async with Fetcher(...) as f'")
        s = self.settings
        st = self.stats
        tile = Tile(*tile)
        attempts = 0
        spent = 0.0  # seconds in requests and backoff sleeps (not in the rate's wait)
        clock = asyncio.get_running_loop().time
        while True:
            if self._rate is not None:
                await self._rate.acquire()
            attempts += 1
            t0 = clock()
            a = await self._attempt(tile, min(s.total_timeout_s, s.tile_budget_s - spent))
            spent += clock() - t0
            if a.kind == OK:
                st.ok += 1
                st.bytes += len(a.data or b"")
                self._auth_streak = 0
                return TileResult(tile, OK, a.data, attempts, None, a.http_status)
            st.by_reason[a.reason or "?"] += 1
            if a.http_status in (429, 503) and self.on_throttle is not None:
                self.on_throttle()
            if a.kind == EMPTY:
                st.empty += 1
                self._auth_streak = 0
                return TileResult(tile, EMPTY, None, attempts, None, a.http_status)
            if a.retry_after is not None:
                delay = min(s.backoff_max_s, a.retry_after)
            else:
                delay = self._rng.uniform(0.0, min(s.backoff_max_s, s.backoff_base_s * 2 ** (attempts - 1)))
            # no retry that would end past the tile's budget: it bounds what one tile costs
            out_of_time = a.kind != "fatal" and attempts <= s.retries and spent + delay >= s.tile_budget_s
            if a.kind == "fatal" or attempts > s.retries or out_of_time:
                st.failed += 1
                if a.http_status in (401, 403):
                    self._auth_streak += 1
                    self._auth_reason = a.reason or f"http {a.http_status}"
                    if 0 < s.auth_failures_to_stop <= self._auth_streak:
                        raise SourceError(
                            f"source {self.source.redacted()} answers {self._auth_reason} for every tile "
                            f"(the last {self._auth_streak}): check the token, headers and URL"
                        )
                how = ("not retried" if a.kind == "fatal" else
                       f"{attempts} attempts in {spent:.0f} s: the tile budget of {s.tile_budget_s:g} s is spent" if out_of_time
                       else f"{attempts} attempts")
                error = f"tile {tile}: {a.reason} ({how})"
                log.debug("failed %s from %s", error, self.source.redacted())
                return TileResult(tile, FAILED, None, attempts, error, a.http_status)
            st.retries += 1
            log.debug("tile %s: %s, retry %d in %.2f s", tile, a.reason, attempts, delay)
            if delay > 0:
                t0 = clock()
                await asyncio.sleep(delay)
                spent += clock() - t0

    async def _attempt(self, tile: Tile, timeout_s: float | None = None) -> _Attempt:
        transport = self._transport
        if transport is None:
            raise RuntimeError("Fetcher is closed")
        st = self.stats
        st.requests += 1
        st.in_flight += 1
        if st.in_flight > st.max_in_flight:
            st.max_in_flight = st.in_flight
        try:
            r = await transport.get(self._url(tile), timeout_s, self._body_limit())
        finally:
            st.in_flight -= 1
        code = r.status
        if code == 200:
            return self._judge(r.body, r.content_type)
        if r.error:
            reason, transient = curl_reason(r.error)
            if r.error == pycurl.E_FILESIZE_EXCEEDED:
                reason = f"body over {self._body_limit():,} bytes (max tile bytes)"
            return _Attempt("retry" if transient else "fatal", None, reason, None, None)
        phrase = f"http {code}"
        if code in (404, 204):
            return _Attempt(EMPTY, None, phrase, code, None)
        if code in (429, 503):
            return _Attempt("retry", None, phrase, code, r.retry_after)
        if code >= 500 or code == 408:
            return _Attempt("retry", None, phrase, code, None)
        if 200 < code < 300:
            return _Attempt("retry", None, f"{phrase} (expected 200)", code, None)
        return _Attempt("fatal", None, f"{phrase} {_reason_phrase(code)}".rstrip(), code, None)

    def _url(self, tile: Tile) -> str:
        """The URL of one request (a super-tile fetcher asks for areas: tilesweep.supertile)."""
        return self.source.url(tile)

    def _body_limit(self) -> int:
        """The most bytes one body may have."""
        return self.settings.max_tile_bytes

    def expect(self, tiles: Iterable[Tile]) -> Callable[[], None]:
        """Hear which tiles will be asked for next (a block's): a super-tile fetcher groups
        them into requests; this one needs nothing. Returns the call that forgets them."""
        return _nothing

    def holds_slot(self, tile: Tile) -> bool:
        """Whether fetching ``tile`` is a request of its own, to count against the requests
        in flight (a super-tile's other tiles share their first tile's request)."""
        return True

    def _judge(self, body: bytes, content_type: str | None) -> _Attempt:
        # A body shorter than its Content-Length never gets here: libcurl reports it
        # (CURLE_PARTIAL_FILE, "truncated").
        if not body:
            return _Attempt(EMPTY, None, "http 200 empty body", 200, None)
        if self.settings.validate:
            ctype = (content_type or "").split(";")[0].strip().lower()
            fmt = image_format(body)
            if (ctype and not ctype.startswith("image/") and ctype not in _OCTET) or fmt is None:
                return _Attempt("retry", None, "not an image", 200, None)
            if not tile_sized(body, fmt):  # magic bytes, then zeros (or garbage): no tile
                return _Attempt("retry", None, "bad image header", 200, None)
        return _Attempt(OK, body, None, 200, None)

    # --- many tiles ----------------------------------------------------------------------

    async def fetch_many(self, tiles: Iterable[Tile] | AsyncIterable[Tile]) -> AsyncIterator[TileResult]:
        """Results in completion order, at most ``concurrency`` requests in flight (a tile
        that shares a super-tile's request takes no slot); tiles are pulled from ``tiles``
        (sync or async iterable) only as slots free up. Raises
        :class:`SourceError` after ``auth_failures_to_stop`` 401/403 results in a row.
        Leaving early (``break``) cancels the tiles still in flight; wrap it in
        ``contextlib.aclosing`` to make that immediate."""
        limit = self.settings.concurrency
        done: asyncio.Queue[asyncio.Task[TileResult]] = asyncio.Queue()
        pending: set[asyncio.Task[TileResult]] = set()
        sharing: set[asyncio.Task[TileResult]] = set()  # tiles that share another's request
        if hasattr(tiles, "__aiter__"):
            ait = tiles.__aiter__()  # type: ignore[union-attr]
            it = None
        else:
            it = iter(tiles)  # type: ignore[arg-type]
            ait = None
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) - len(sharing) < limit:
                    try:
                        tile = next(it) if it is not None else await ait.__anext__()  # type: ignore[union-attr]
                    except (StopIteration, StopAsyncIteration):
                        exhausted = True
                        break
                    task = asyncio.ensure_future(self.fetch(tile))
                    task.add_done_callback(done.put_nowait)
                    pending.add(task)
                    if not self.holds_slot(tile):
                        sharing.add(task)
                if not pending:
                    return
                task = await done.get()
                pending.discard(task)
                sharing.discard(task)
                yield task.result()  # SourceError from fetch() ends the stream here
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


# --- sync convenience --------------------------------------------------------------------


def fetch_tiles(source: Source, tiles: Iterable[Tile], settings: FetchSettings = FetchSettings()) -> Iterator[TileResult]:
    """Synchronous :meth:`Fetcher.fetch_many` for scripts and tests: runs its own event loop
    (uvloop when installed) in a background thread and yields results as they complete.
    Closing the iterator early cancels what is in flight. A bbox source is fetched by
    super-tiles (:func:`tilesweep.supertile.open_fetcher`)."""
    loop = _uvloop.new_event_loop() if _uvloop is not None else asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tilesweep-fetch", daemon=True)
    thread.start()
    from .supertile import open_fetcher  # here: supertile builds on this module

    fetcher = open_fetcher(source, settings)  # a SuperTileFetcher for a bbox source
    agen = fetcher.fetch_many(tiles)
    end = object()

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def step() -> Any:
        try:
            return await agen.__anext__()
        except StopAsyncIteration:
            return end

    try:
        call(fetcher.open())
        while True:
            r = call(step())
            if r is end:
                return
            yield r
    finally:
        try:
            call(agen.aclose())
            call(fetcher.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()


# --- helpers -----------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date), or
    None when absent or unreadable. Never negative."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(secs):
        return None
    return max(0.0, secs)


def _nothing() -> None:
    pass


def _reason_phrase(code: int) -> str:
    """The standard reason phrase of an HTTP status ("Unauthorized"), or ""."""
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return ""


def _ensure_open_files(n: int) -> None:
    """Raise the soft open-file limit to ``n`` when the hard limit allows (thousands of
    connections need thousands of descriptors); warn when it cannot."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= n:
        return
    new = n if hard == resource.RLIM_INFINITY else min(n, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new < n:
        log.warning("open-file limit %d is below the %d that concurrency needs (ulimit -n)", new, n)


__all__ = [
    "FetchSettings", "FetchStats", "Fetcher", "SourceError", "TileResult",
    "fetch_tiles", "image_format", "parse_retry_after", "OK", "EMPTY", "FAILED",
]
