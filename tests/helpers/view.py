"""Shared parts of the viewer tests: real sweeps, the `tilesweep view` server as a
subprocess, and a tile server that wants a token."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from helpers.cli import ENV, tilesweep

ZOOM = 18
WORLD_SEED = 5
TOWER_BBOX = "8.505,47.340,8.531,47.354"  # 320 zoom-18 tiles in 4 blocks at zoom 14, 47 with a tower
SMALL_BBOX = "8.500,47.300,8.516,47.310"  # 156 tiles in 16 blocks at zoom 16
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-headless-shell",
                             "/usr/lib/chromium-headless-shell/chromium-headless-shell") if os.path.exists(p)), None)
SCREENSHOTS = Path(os.environ.get("TILESWEEP_SCREENSHOTS", Path(__file__).resolve().parents[2] / "build" / "test-screenshots"))


_KEPT: dict[str, Path] = {}


def kept_sweep(tmp_path_factory, sim_template: str, bbox: str = TOWER_BBOX, block_zoom: int = 14) -> Path:
    """A sweep fetched with --keep-tiles and scored by the demo model, made once per test
    session (the viewer only reads it; its imagery comes from the store, so the simulator
    that made it need not live on)."""
    key = f"{bbox}/{block_zoom}"
    if key not in _KEPT:
        folder = tmp_path_factory.mktemp("view") / "kept"
        tilesweep("plan", bbox, folder, "--zoom", ZOOM, "--block-zoom", block_zoom)
        tilesweep("run", folder, "--source", sim_template, "--model", "demo", "--keep-tiles", "--quiet")
        _KEPT[key] = folder
    return _KEPT[key]


@contextlib.contextmanager
def view_server(sweep: Path, *extra: str, env: dict[str, str] | None = None, python: str = sys.executable,
                cwd: Path | None = None) -> Iterator[tuple[str, subprocess.Popen, list[str]]]:
    """`tilesweep view SWEEP --port 0` as a subprocess; yields (base URL, process, its
    output lines so far, appended to as it prints)."""
    p = subprocess.Popen([python, "-m", "tilesweep", "view", str(sweep), "--port", "0", *extra],
                         env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, cwd=cwd)
    lines: list[str] = []
    url = None
    assert p.stdout is not None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"at (http://\S+/) ", line)
        if m:
            url = m.group(1)
    if url is None:
        p.kill()
        raise AssertionError(f"view did not start: {''.join(lines)}{p.stdout.read()}")
    def read() -> None:
        for line in iter(p.stdout.readline, ""):
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield url, p, lines
    finally:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        reader.join(5)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class TokenServer:
    """A loopback tile server that answers only requests carrying ``access_token=TOKEN``
    (403 otherwise), relaying the tiles of an upstream (the simulator)."""

    def __init__(self, upstream: str, token: str) -> None:
        self.upstream = upstream
        self.token = token
        self.with_token = 0
        self.without_token = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                parts = urllib.parse.urlsplit(self.path)
                if urllib.parse.parse_qs(parts.query).get("access_token") != [outer.token]:
                    outer.without_token += 1
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                outer.with_token += 1
                try:
                    with urllib.request.urlopen(outer.upstream + parts.path, timeout=30) as r:
                        body, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "image/jpeg")
                except urllib.error.HTTPError as e:
                    body, status, ctype = b"", e.code, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "TokenServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def template(self, env_name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{{z}}/{{x}}/{{y}}.jpg?access_token=${{{env_name}}}"
