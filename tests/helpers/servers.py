"""Small HTTP servers for tests that need a source the simulator does not play."""

from __future__ import annotations

import contextlib
import http.server
import threading
from typing import Iterator


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def forbidden_server() -> Iterator[str]:
    """A loopback server that answers 403 to every request (a wrong token); yields its
    tile URL template."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/{{z}}/{{x}}/{{y}}.jpg"
    finally:
        server.shutdown()
        server.server_close()
