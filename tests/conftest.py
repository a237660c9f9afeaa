import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_geojson(tmp_path: Path):
    """Write a GeoJSON document to a file and return its path."""

    def write(doc, name="area.geojson") -> Path:
        p = tmp_path / name
        p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        return p

    return write


@pytest.fixture(scope="session")
def tables_quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``benchmarks/tables.py --quick --out R.json``, run once per session with every
    engine (those not installed are skipped by the script, saying why): tests/test_tables_bench.py
    reads its results, tests/test_benchmarks_quick.py its exit status and table. Returns
    (the finished process, the JSON file's path)."""
    out = tmp_path_factory.mktemp("tables-bench") / "r.json"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    return res, out
