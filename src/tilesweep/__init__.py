"""tilesweep: run a model over every map tile of a country, on one machine."""

__version__ = "0.1.0"


def query(sql, sweep=None, *, memory_limit=None, threads=None):  # type: ignore[no-untyped-def]
    """Run DuckDB SQL over CSV / Parquet / JSON files, or over a sweep's ``predictions``,
    ``tiles``, ``blocks`` and ``plan`` (``sweep``: a folder or a Sweep); returns a lazy
    ``duckdb.DuckDBPyRelation``. See :mod:`tilesweep.sql`."""
    from .sql import query as _query

    return _query(sql, sweep, memory_limit=memory_limit, threads=threads)
