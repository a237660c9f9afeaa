"""`tilesweep view`: the sweep on a map, in the browser, from a server on this machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UsageError


def view(
    sweep_dir: str = typer.Argument(..., help="Sweep folder (holds sweep.toml)."),
    port: int = typer.Option(8765, "--port", "-p", help="TCP port; 0 picks a free one."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback serves to the network."),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
    pmtiles: Optional[Path] = typer.Option(None, "--pmtiles", help="Show imagery from this PMTiles archive (`tilesweep export`) instead."),
) -> None:
    """Serve SWEEP_DIR on a local web map: imagery, prediction overlay, area, progress."""
    import asyncio
    import signal

    from .view.server import LOOPBACK, Viewer, serve

    if not 0 <= port <= 65535:
        raise UsageError(f"port {port} is outside 0..65535")
    from .storage import is_url

    if is_url(sweep_dir):
        raise UsageError(f"sweep {sweep_dir!r} is on object storage: `view` serves a local sweep folder only (not built for a URL yet)")
    viewer = Viewer(Path(sweep_dir), pmtiles=pmtiles)
    models = viewer.overlay.models
    print(f"{sweep_dir}: {viewer.imagery_note}", flush=True)
    if not models:
        print(f"{sweep_dir}: no predictions yet; the map shows imagery and progress only", flush=True)
    else:
        print(f"{sweep_dir}: overlay of {', '.join(m.name for m in models)}", flush=True)
    if host not in LOOPBACK:
        print(f"WARNING: listening on {host}: anyone who can reach this machine on the network can see this sweep "
              "(its imagery and predictions). Use the default --host 127.0.0.1 to keep it to this machine.",
              file=sys.stderr, flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(url: str) -> None:
            print(f"serving {sweep_dir} at {url} (read-only; Ctrl-C to stop)", flush=True)
            if open_browser:
                import webbrowser

                webbrowser.open(url)

        await serve(viewer, host, port, ready, stop)

    try:
        asyncio.run(main())
    except UsageError:
        viewer.overlay.close()
        raise


def register(app: typer.Typer) -> None:
    """Add `view` to the `tilesweep` command."""
    app.command("view")(view)
