"""tilesweep: run a model over every map tile of a country, on one machine."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb

    from .sweep import Sweep

__version__ = "0.1.0"


def query(
    sql: str,
    sweep: Sweep | str | os.PathLike[str] | None = None,
    *,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> duckdb.DuckDBPyRelation:
    """Run DuckDB SQL over CSV / Parquet / JSON files, or over a sweep's ``predictions``,
    ``tiles``, ``blocks`` and ``plan`` (``sweep``: a folder or a Sweep); returns a lazy
    ``duckdb.DuckDBPyRelation``. See :mod:`tilesweep.sql`."""
    from .sql import query as _query

    return _query(sql, sweep, memory_limit=memory_limit, threads=threads)
