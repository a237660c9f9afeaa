"""The offline web viewer of a sweep: ``tilesweep view SWEEP_DIR``.

One page (MapLibre GL JS, vendored under ``static/vendor/``) over a small aiohttp server
(:mod:`tilesweep.view.server`): the sweep's imagery, the prediction overlay
(:mod:`tilesweep.view.overlay`, DuckDB over the Parquet parts), the planned area and the
progress of a running sweep. Nothing is fetched from the internet.
"""

from .overlay import OverlayIndex
from .server import Viewer, serve

__all__ = ["OverlayIndex", "Viewer", "serve"]
