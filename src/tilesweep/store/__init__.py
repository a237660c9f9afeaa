"""Packed, append-only tile shards (one per block), memory-mapped reads, and exports.

See ``docs/store.md`` for the on-disk format and the crash-safety argument."""

from .export import export_dir, export_mbtiles, export_pmtiles, sniff_format
from .shard import (
    CorruptShardError,
    ShardBusyError,
    ShardReader,
    ShardSummary,
    ShardWriter,
    Status,
)
from .store import TileStore, VerifyReport

__all__ = [
    "CorruptShardError",
    "ShardBusyError",
    "ShardReader",
    "ShardSummary",
    "ShardWriter",
    "Status",
    "TileStore",
    "VerifyReport",
    "export_dir",
    "export_mbtiles",
    "export_pmtiles",
    "sniff_format",
]
