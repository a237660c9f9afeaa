"""The imagery simulator: a local tile provider with ground truth and injectable faults.

>>> from tilesweep.sim import World, Faults, run_in_thread
>>> world = World(seed=0)
>>> jpeg = world.render(Tile(18, 137_000, 91_000))            # bytes, deterministic
>>> towers = world.towers((8.5, 47.3, 8.6, 47.4))              # ground truth
>>> with run_in_thread(world, Faults(http_503=0.1)) as srv:   # real HTTP on loopback
...     srv.template()                                         # 'http://127.0.0.1:PORT/{z}/{x}/{y}.jpg'

See docs/simulator.md for the world's design, the routes and the fault model.
"""

from ..tiles import Tile
from .faults import FAULT_KINDS, Faults
from .server import SimServer, run_in_thread, serve, sim_server
from .truth import (
    as_geometry,
    iter_truth,
    read_truth,
    tile_has_tower,
    towers_in_tile,
    truth,
    write_geojson,
    write_parquet,
    write_truth,
)
from .world import FORMATS, MAX_SIM_ZOOM, SIZES, STEEL, Tower, World, encode, tiles_in_bbox

__all__ = [
    "FAULT_KINDS", "FORMATS", "MAX_SIM_ZOOM", "SIZES", "STEEL",
    "Faults", "SimServer", "Tile", "Tower", "World",
    "as_geometry", "encode", "iter_truth", "read_truth", "run_in_thread", "serve", "sim_server",
    "tile_has_tower", "tiles_in_bbox", "towers_in_tile", "truth", "write_geojson", "write_parquet", "write_truth",
]
