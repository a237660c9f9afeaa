"""HTTP GETs on the running asyncio loop through libcurl's multi interface (pycurl).

Why libcurl and not aiohttp: a tile is a small body (5-50 KB), so a sweep is bound by the
CPU spent per request, not by bandwidth. Measured on loopback against nginx on the 2-core
machine this project is built on (``docs/fetch.md``), aiohttp spends ~200 us of CPU per
tile and libcurl's multi interface driven from Python ~35 us: the same core fetches ~5x as
many tiles, and HTTP/2 multiplexing to real providers comes for free.

:class:`CurlTransport` is driven by the asyncio loop itself (libcurl's *socket action*
API): libcurl tells us which sockets to watch (``loop.add_reader`` / ``add_writer``) and
when to wake it (``loop.call_later``); we never block and never spawn a thread. So it works
on any loop (the default one or uvloop) and scales to thousands of connections (no
``select()`` and its 1,024-descriptor limit).

One transport serves one loop; it is not thread-safe (nor is anything on a loop).
"""

from __future__ import annotations

import asyncio
import math
from typing import NamedTuple

import pycurl

__all__ = ["CurlTransport", "Response", "curl_reason"]

MAX_BODY_BYTES = 4 * 2**20
"""Default limit of one body (4 MiB): a 512 px JPEG is ~50-150 KB and a lossless 512 px
PNG at most ~1 MB, so no map tile is that large (``FetchSettings.max_tile_bytes``)."""

E_OVER_BUDGET = -2
"""``Response.error`` of a transfer cut because the bodies in flight together would pass
the transport's ``max_inflight_bytes`` (transient: it is tried again later)."""


class Response(NamedTuple):
    """One finished GET. ``status`` is the HTTP status (0 when no response arrived, and then
    ``error`` is libcurl's error code and ``message`` its text); ``retry_after`` is the
    ``Retry-After`` header in seconds (seconds or an HTTP date), None when absent or 0."""

    status: int
    body: bytes
    content_type: str | None
    retry_after: float | None
    error: int = 0
    message: str = ""


# libcurl error codes -> (our short reason, retry?)
_REASONS: dict[int, tuple[str, bool]] = {
    pycurl.E_OPERATION_TIMEDOUT: ("timeout", True),
    pycurl.E_COULDNT_CONNECT: ("cannot connect", True),
    pycurl.E_COULDNT_RESOLVE_HOST: ("cannot resolve host", True),
    pycurl.E_COULDNT_RESOLVE_PROXY: ("cannot resolve proxy", True),
    pycurl.E_PARTIAL_FILE: ("truncated", True),
    pycurl.E_GOT_NOTHING: ("disconnected", True),
    pycurl.E_SEND_ERROR: ("reset", True),
    pycurl.E_RECV_ERROR: ("reset", True),
    pycurl.E_SSL_CONNECT_ERROR: ("tls error", True),
    pycurl.E_HTTP2: ("http/2 error", True),
    getattr(pycurl, "E_HTTP2_STREAM", 92): ("http/2 error", True),
    getattr(pycurl, "E_WEIRD_SERVER_REPLY", 8): ("bad response", True),
    getattr(pycurl, "E_BAD_CONTENT_ENCODING", 61): ("bad response", True),
    pycurl.E_TOO_MANY_REDIRECTS: ("too many redirects", False),
    pycurl.E_FILESIZE_EXCEEDED: ("body over the tile byte limit", False),
    E_OVER_BUDGET: ("bodies in flight over the byte budget", True),
    pycurl.E_UNSUPPORTED_PROTOCOL: ("unsupported protocol", False),
    pycurl.E_URL_MALFORMAT: ("malformed url", False),
    getattr(pycurl, "E_PEER_FAILED_VERIFICATION", 60): ("tls certificate not trusted", False),
    getattr(pycurl, "E_SSL_CACERT_BADFILE", 77): ("tls: cannot read the CA bundle", False),
}


def curl_reason(error: int) -> tuple[str, bool]:
    """(short reason, transient?) for a libcurl error code: ``"timeout"``, ``"reset"``,
    ``"truncated"``, ``"cannot connect"``...; unknown codes are ``"curl error N"``, transient."""
    return _REASONS.get(error, (f"curl error {error}", True))


def _ca_bundle() -> str | None:
    """certifi's CA bundle when installed: wheels of libcurl do not always know where the
    system keeps its certificates. None: libcurl's default."""
    try:
        import certifi
    except ImportError:  # pragma: no cover - certifi is a dependency
        return None
    return certifi.where()


class CurlTransport:
    """GETs over a pool of reused connections, on the running loop.

    - ``max_connections``: open connections at most (also the handles kept for reuse).
    - ``per_host``: connections per host at most; 0: no separate limit.
    - ``connect_timeout_s``, ``total_timeout_s``: seconds (millisecond resolution).
    - ``read_timeout_s``: the longest silence while a response arrives, in seconds,
      rounded up to a whole second (libcurl's low-speed limit: under 1 byte/s for that long).
    - ``min_speed_bps``: a transfer slower than this (bytes/s) for ``read_timeout_s`` is cut
      ("timeout"): silence, and a server that trickles a few bytes a second.
    - ``max_body_bytes``: a body over this is cut (``E_FILESIZE_EXCEEDED``), from its
      ``Content-Length`` before it is read, and while it is read when it has none (chunked).
    - ``max_inflight_bytes``: the bytes of all bodies being received together; a transfer
      whose next chunk would pass it is cut with :data:`E_OVER_BUDGET`. 0: no budget. So
      memory in flight is bounded in bytes, not only in requests.
    - ``headers``: sent with every request (``User-Agent`` among them).
    - ``trust_env``: honour ``http_proxy`` / ``https_proxy`` / ``no_proxy`` and ``~/.netrc``.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        per_host: int = 0,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 30.0,
        total_timeout_s: float = 60.0,
        headers: dict[str, str] | None = None,
        trust_env: bool = False,
        min_speed_bps: int = 1,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_inflight_bytes: int = 0,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._max_body = int(max_body_bytes)
        self._budget = int(max_inflight_bytes)
        self._total_ms = max(1, round(total_timeout_s * 1000))
        self.inflight_bytes = 0  # bytes of the bodies being received now
        self.max_inflight_bytes_seen = 0
        self._multi = pycurl.CurlMulti()
        m = self._multi
        m.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        m.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        # No M_MAX_TOTAL_CONNECTIONS: the caller bounds transfers in flight, and with
        # HTTP/1.1 each needs one connection; a libcurl cap would only park transfers.
        m.setopt(pycurl.M_MAXCONNECTS, max_connections)  # keep them all alive for reuse
        if per_host:
            m.setopt(pycurl.M_MAX_HOST_CONNECTIONS, per_host)
        self._max_handles = max_connections
        self._options: list[tuple[int, object]] = [
            (pycurl.NOSIGNAL, 1),
            (pycurl.FOLLOWLOCATION, 1),
            (pycurl.MAXREDIRS, 5),
            (pycurl.CONNECTTIMEOUT_MS, max(1, round(connect_timeout_s * 1000))),
            (pycurl.TIMEOUT_MS, max(1, round(total_timeout_s * 1000))),
            (pycurl.LOW_SPEED_LIMIT, max(1, int(min_speed_bps))),
            (pycurl.LOW_SPEED_TIME, max(1, math.ceil(read_timeout_s))),
            (pycurl.MAXFILESIZE_LARGE, self._max_body),
            (pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in (headers or {}).items()]),
        ]
        if not trust_env:
            self._options.append((pycurl.PROXY, ""))  # "": ignore *_proxy in the environment
        else:
            self._options.append((pycurl.NETRC, pycurl.NETRC_OPTIONAL))
        ca = _ca_bundle()
        if ca:
            self._options.append((pycurl.CAINFO, ca))
        self._free: list[pycurl.Curl] = []
        self._active: set[pycurl.Curl] = set()
        self._watched: dict[int, int] = {}  # fd -> pycurl.POLL_IN | POLL_OUT | POLL_INOUT
        self._timer: asyncio.TimerHandle | None = None
        self._kick_scheduled = False
        self._closed = False

    # --- requests ----------------------------------------------------------------------

    async def get(self, url: str, timeout_s: float | None = None, max_body_bytes: int | None = None) -> Response:
        """GET ``url``; never raises for what the network or server does (see
        :class:`Response`), only on cancellation (the transfer is dropped) or when closed.
        ``timeout_s``: this request's whole time, instead of ``total_timeout_s``;
        ``max_body_bytes``: this request's body limit, instead of the transport's."""
        if self._closed:
            raise RuntimeError("transport is closed")
        c = self._free.pop() if self._free else self._new_handle()
        chunks: list[bytes] = []
        fut: asyncio.Future[Response] = self._loop.create_future()
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.TIMEOUT_MS, self._total_ms if timeout_s is None else max(1, round(timeout_s * 1000)))
        # HTTPS: wait for the TLS handshake (ALPN) to tell whether a connection can carry
        # many requests (HTTP/2) before opening more. Cleartext HTTP/1.1 would only learn
        # that from a first response, holding every other request back until then.
        c.setopt(pycurl.PIPEWAIT, url.startswith("https:"))
        limit = self._max_body if max_body_bytes is None else int(max_body_bytes)
        c.setopt(pycurl.MAXFILESIZE_LARGE, limit)  # set on every request: handles are reused
        c.setopt(pycurl.WRITEFUNCTION, self._writer(c, chunks, limit))
        c.chunks = chunks
        c.size = 0  # body bytes received (counted in inflight_bytes until it ends)
        c.over = 0  # why the write callback cut the transfer: E_FILESIZE_EXCEEDED / E_OVER_BUDGET
        c.future = fut
        self._multi.add_handle(c)
        self._active.add(c)
        self._kick()
        try:
            return await fut
        finally:
            # Cancelled before it finished: the handle is still this request's. (Once
            # finished, the handle is recycled at once and may already carry another
            # request: never touch it then.)
            if c.future is fut and c in self._active:
                self._active.discard(c)
                self._multi.remove_handle(c)
                self._recycle(c)
                self._kick()

    def _writer(self, c: pycurl.Curl, chunks: list[bytes], limit: int):  # type: ignore[no-untyped-def]
        """The write callback of one request: keeps the chunks, and cuts the transfer
        (returns 0: libcurl ends it with a write error) when the body passes
        ``max_body_bytes`` (a chunked body has no length for MAXFILESIZE to check first) or
        the bodies in flight would pass ``max_inflight_bytes``."""
        append = chunks.append
        budget = self._budget

        def write(chunk: bytes) -> int | None:
            n = len(chunk)
            if c.size + n > limit:
                c.over = pycurl.E_FILESIZE_EXCEEDED
                return 0
            if budget and self.inflight_bytes + n > budget:
                c.over = E_OVER_BUDGET
                return 0
            c.size += n
            self.inflight_bytes += n
            if self.inflight_bytes > self.max_inflight_bytes_seen:
                self.max_inflight_bytes_seen = self.inflight_bytes
            append(chunk)
            return None

        return write

    def _new_handle(self) -> pycurl.Curl:
        c = pycurl.Curl()
        for opt, value in self._options:
            c.setopt(opt, value)
        return c

    def _recycle(self, c: pycurl.Curl) -> None:
        self.inflight_bytes -= c.size
        c.size = 0
        if c.chunks is not None:
            # The idle handle's write callback still refers to this list until its next
            # request: empty it, or every pooled handle keeps its last body alive
            # (156 cut 4 MiB bodies held 630 MB after they had failed).
            c.chunks.clear()
        c.chunks = c.future = None
        if len(self._free) < self._max_handles and not self._closed:
            self._free.append(c)
        else:
            c.close()

    def _finish(self, c: pycurl.Curl, error: int, message: str) -> None:
        self._active.discard(c)
        self._multi.remove_handle(c)
        fut: asyncio.Future[Response] = c.future
        if not fut.done():
            if error and c.over:  # cut by our write callback (CURLE_WRITE_ERROR): say why
                error, message = c.over, ("body over the byte limit" if c.over == pycurl.E_FILESIZE_EXCEEDED
                                          else "bodies in flight over the byte budget")
            if error:
                fut.set_result(Response(0, b"", None, None, error, message))
            else:
                retry_after = c.getinfo(pycurl.RETRY_AFTER) or None
                fut.set_result(Response(
                    c.getinfo(pycurl.RESPONSE_CODE), b"".join(c.chunks), c.getinfo(pycurl.CONTENT_TYPE),
                    float(retry_after) if retry_after else None,
                ))
        self._recycle(c)

    # --- libcurl <-> loop -----------------------------------------------------------------

    def _on_socket(self, what: int, fd: int, multi: object, data: object) -> None:
        """libcurl asks to watch ``fd`` for ``what`` (or to stop: POLL_REMOVE, which libcurl
        sends before it closes a socket, so a reused descriptor number starts afresh)."""
        if self._watched.get(fd, 0) == what:
            return
        loop = self._loop
        old = self._watched.pop(fd, 0)
        if old & pycurl.POLL_IN:
            loop.remove_reader(fd)
        if old & pycurl.POLL_OUT:
            loop.remove_writer(fd)
        if what == pycurl.POLL_REMOVE or self._closed:
            return
        if what & pycurl.POLL_IN:
            loop.add_reader(fd, self._act, fd, pycurl.CSELECT_IN)
        if what & pycurl.POLL_OUT:
            loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
        self._watched[fd] = what

    def _on_timer(self, ms: int) -> None:
        """libcurl wants ``socket_action(SOCKET_TIMEOUT)`` in ``ms`` ms (-1: never)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if ms >= 0 and not self._closed:
            self._timer = self._loop.call_later(ms / 1000.0, self._on_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        self._act(pycurl.SOCKET_TIMEOUT, 0)

    def _kick(self) -> None:
        """Run ``socket_action(SOCKET_TIMEOUT)`` once soon, whatever libcurl's timer says.
        Insurance, at one call per loop iteration: libcurl calls the timer callback only
        when its earliest expiry changes, and a transfer just added (or waiting for a free
        connection under a per-host limit) should not depend on that bookkeeping to start."""
        if not self._kick_scheduled and not self._closed:
            self._kick_scheduled = True
            self._loop.call_soon(self._kicked)

    def _kicked(self) -> None:
        self._kick_scheduled = False
        self._act(pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, events: int) -> None:
        if self._closed:
            return
        m = self._multi
        while True:
            ret, _ = m.socket_action(fd, events)
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        while True:
            left, ok, failed = m.info_read()
            for c in ok:
                self._finish(c, 0, "")
            for c, error, message in failed:
                self._finish(c, error, message)
            if ok or failed:
                self._kick()  # a freed connection may let a parked transfer start
            if not left:
                break

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def close(self) -> None:
        """Drop every transfer (their callers get CancelledError) and every connection."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for c in list(self._active):
            self._active.discard(c)
            self._multi.remove_handle(c)
            if c.future is not None and not c.future.done():
                c.future.cancel()
            c.close()
        for fd, what in self._watched.items():
            if what & pycurl.POLL_IN:
                self._loop.remove_reader(fd)
            if what & pycurl.POLL_OUT:
                self._loop.remove_writer(fd)
        self._watched.clear()
        self._multi.close()
        for c in self._free:
            c.close()
        self._free.clear()
