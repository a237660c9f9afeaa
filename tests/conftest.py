import json
from pathlib import Path

import pytest

from helpers.pgserver import pg_server  # noqa: F401 - a session-wide PostgreSQL server on loopback


@pytest.fixture
def write_geojson(tmp_path: Path):
    """Write a GeoJSON document to a file and return its path."""

    def write(doc, name="area.geojson") -> Path:
        p = tmp_path / name
        p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        return p

    return write
