"""benchmarks/tables.py in --quick mode, with the engines that are installed, so the
benchmark the README quotes keeps running: every case exits 0 and the engines agree."""

import json


def test_tables_benchmark_quick(tables_quick):
    res, out = tables_quick  # one run per session (tests/conftest.py), every engine asked for
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    cases = {(r["case"], r["input"].split(" ")[0]): r for r in doc["results"]}
    assert all(r["rc"] == 0 for r in doc["results"]), doc["results"]
    assert cases[("duckdb", "csv")]["total"] == cases[("tilesweep", "csv")]["total"] == 40_000
    assert cases[("tilesweep", "parquet")]["groups"] == cases[("duckdb", "csv")]["groups"] == 266
    assert cases[("convert", "csv")]["total"] == 40_000
    assert cases[("pred-export", "predictions")]["total"] > 0 and cases[("pred-top", "predictions")]["total"] == 1000
    assert all(r["peak_rss_mb"] > 0 for r in doc["results"])
    assert "vaex" in doc["skipped"] or ("vaex", "csv") in cases
    assert "| case | engine |" in res.stdout
