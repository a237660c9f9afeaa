"""Loopback tile servers that misbehave on purpose: huge bodies behind image magic,
bodies that trickle in a few bytes a second, 404 or empty 200s for everything, a refused
port. Real sockets (http.server in a thread); each counts the requests it got."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections import Counter
from typing import Iterator

JPEG_MAGIC_ZEROS = b"\xff\xd8\xff\xe0"  # JPEG magic (SOI + APP0), then only zeros follow


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "zeros"
    body_bytes = 50 * 2**20
    chunked = False
    trickle_bps = 2.0
    prefix = JPEG_MAGIC_ZEROS
    pace_s = 0.0  # sleep between 64 KB pieces of a body
    world: dict = {}  # mostly_ok: the body of each path, or of "*" (rendered before, so answers are quick)
    bad_paths: frozenset = frozenset()  # mostly_ok: these paths trickle
    counts: Counter = Counter()

    def do_GET(self) -> None:  # noqa: N802
        self.counts[self.path] += 1
        self.counts["requests"] += 1
        try:
            getattr(self, f"_{self.mode}")()
        except (BrokenPipeError, ConnectionResetError):  # the client cut the transfer: what we want
            self.close_connection = True

    def _zeros(self) -> None:
        """200 image/jpeg: JPEG magic then ``body_bytes`` of zeros, with a length or chunked."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(self.prefix) + self.body_bytes))
        self.end_headers()
        block = b"\0" * 65536
        left = self.body_bytes
        first = self.prefix
        while left > 0:
            piece = first + block[: min(left, len(block))]
            left -= len(piece) - len(first)
            first = b""
            if self.chunked:
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            else:
                self.wfile.write(piece)
            if self.pace_s:
                self.wfile.flush()
                time.sleep(self.pace_s)
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _trickle(self) -> None:
        """200 image/jpeg with a 20 KB Content-Length, sent ``trickle_bps`` bytes a second."""
        body = self.prefix + b"\0" * 20000
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for b in body:
            self.wfile.write(bytes([b]))
            self.wfile.flush()
            time.sleep(1.0 / self.trickle_bps)

    def _mostly_ok(self) -> None:
        """``world[path]`` (e.g. the simulator's tiles), except ``bad_paths``, which trickle."""
        if self.path in self.bad_paths:
            return self._trickle()
        body = self.world.get(self.path) or self.world["*"]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _empty(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def hostile_server(mode: str, **attrs: object) -> Iterator[tuple[str, Counter]]:
    """A loopback server answering every request per ``mode`` (``zeros``, ``trickle``,
    ``not_found``, ``empty``); ``attrs`` override the handler's settings (``body_bytes``,
    ``chunked``, ``trickle_bps``, ``prefix``). Yields ``(template, counts)``: counts has
    ``requests`` and one entry per path."""
    counts: Counter = Counter()
    handler = type("H", (_Handler,), {"mode": mode, "counts": counts, **attrs})
    server = _Server(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/{{z}}/{{x}}/{{y}}.jpg", counts
    finally:
        server.shutdown()
        server.server_close()


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of connections at once must not overflow the backlog
    daemon_threads = True


def refused_template() -> str:
    """A template on a loopback port where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.jpg"
