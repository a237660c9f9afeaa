"""The imagery simulator: a local tile provider with ground truth and injectable faults.

>>> from tilesweep.sim import World, Faults, run_in_thread
>>> world = World(seed=0)
>>> jpeg = world.render(Tile(18, 137_000, 91_000))            # bytes, deterministic
>>> towers = world.towers((8.5, 47.3, 8.6, 47.4))              # ground truth
>>> with run_in_thread(world, Faults(http_503=0.1)) as srv:   # real HTTP on loopback
...     srv.template()                                         # 'http://127.0.0.1:PORT/{z}/{x}/{y}.jpg'

See docs/simulator.md for the world's design, the routes and the fault model.
"""

from importlib import import_module
from typing import Any

# Names are imported on first use (PEP 562), so that `tilesweep fetch` does not pay for
# the simulator's web server (aiohttp) just because the CLI lists `tilesweep sim`, nor
# `tilesweep query` for numpy (tilesweep.tiles).
_WHERE = {
    "Tile": ".tiles",  # tilesweep.tiles
    "FAULT_KINDS": "faults", "Faults": "faults",
    "SimServer": "server", "run_in_thread": "server", "serve": "server", "sim_server": "server",
    "as_geometry": "truth", "iter_truth": "truth", "read_truth": "truth", "tile_has_tower": "truth",
    "towers_in_tile": "truth", "truth": "truth", "write_geojson": "truth", "write_parquet": "truth",
    "write_truth": "truth",
    "FORMATS": "world", "MAX_SIM_ZOOM": "world", "SIZES": "world", "STEEL": "world", "Tower": "world",
    "World": "world", "encode": "world", "tiles_in_bbox": "world",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = import_module(f".{module}", __name__)
    # Bind every name of that module now: importing a submodule sets the package attribute
    # of the same name (`truth`), which must go on meaning the function.
    for other, where in _WHERE.items():
        if where == module:
            globals()[other] = getattr(mod, other)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "FAULT_KINDS", "FORMATS", "MAX_SIM_ZOOM", "SIZES", "STEEL",
    "Faults", "SimServer", "Tile", "Tower", "World",
    "as_geometry", "encode", "iter_truth", "read_truth", "run_in_thread", "serve", "sim_server",
    "tile_has_tower", "tiles_in_bbox", "towers_in_tile", "truth", "write_geojson", "write_parquet", "write_truth",
]
