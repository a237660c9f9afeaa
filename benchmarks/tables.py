"""Tables out of core, side by side: the seed's taxi case and a predictions table.

    python benchmarks/tables.py                     # full size: two ~1.4 GB CSVs, 100M predictions
    python benchmarks/tables.py --rows 2000000 --pred-rows 10000000   # reduced
    python benchmarks/tables.py --quick             # tiny, installed engines only (tests)

1. Two CSVs shaped like NYC FHV trips (dispatching_base_num, pickup_datetime,
   dropoff_datetime, PULocationID, DOLocationID, SR_Flag: null for the first 90% of rows,
   then sometimes 1; PULocationID sometimes empty), generated here with DuckDB.
   concat + fillna(0) + groupby(PULocationID).count(), by pandas, Dask (LocalCluster),
   Vaex (its own venv, ``--vaex-python``; it pins pandas<3), Polars streaming, DuckDB direct
   and `tilesweep query`; then `tilesweep convert` to Parquet and the same query again.
2. A predictions table (z, x, y, lon, lat, score, label, model) of ``--pred-rows`` rows:
   counts per label, top 1,000 by score, counts per district polygon (tilesweep's
   STR-tree counter over streamed batches), detections export to GeoJSON (streamed).

Every case runs as its own subprocess: wall time, and peak RSS of its whole process tree
(children included: Dask's workers) sampled every 20 ms. The wall time includes the
interpreter's start-up and the engine's imports; each case also reports its engine time,
measured inside the process: from after the imports (Dask: after its LocalCluster is up)
to the result, and for the `tilesweep` commands the time the command itself reports
(from after its start-up to the output written), so the converted-vs-raw ratio of the
query itself is visible apart from the start-up both pay. With ``--cap 4G`` each case runs
once more inside a cgroup whose memory limit is the cap (v2 ``memory.max`` +
``memory.swap.max=0``, or v1 ``memory.limit_in_bytes``; root only), with the cgroup's own
peak and whether the OOM killer struck. Results: a Markdown table on stdout and JSON in
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
FULL_ROWS = 25_000_000  # per file: ~1.4 GB of CSV each (~56 bytes a row)
FULL_PRED_ROWS = 100_000_000
ENGINES = ("pandas", "dask", "vaex", "polars", "duckdb", "tilesweep")


# --- data ----------------------------------------------------------------------------------


def make_csv(path: Path, rows: int, seed: int) -> None:
    """An FHV-shaped CSV of ``rows`` rows, written by DuckDB (streamed)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = true")
    late = int(rows * 0.9)
    con.execute(f"""
        COPY (
          SELECT 'B' || lpad(((hash(i + {seed}) % 900) + 10)::VARCHAR, 5, '0') AS dispatching_base_num,
                 TIMESTAMP '2019-01-01' + INTERVAL (i * 2 % 31536000) SECOND AS pickup_datetime,
                 TIMESTAMP '2019-01-01' + INTERVAL (i * 2 % 31536000 + 300 + hash(i) % 3000) SECOND AS dropoff_datetime,
                 CASE WHEN hash(i * 7 + {seed}) % 20 = 0 THEN NULL ELSE (hash(i + {seed}) % 265 + 1)::INTEGER END AS PULocationID,
                 (hash(i * 3 + {seed}) % 265 + 1)::INTEGER AS DOLocationID,
                 CASE WHEN i >= {late} AND i % 10 = 0 THEN 1 END AS SR_Flag
          FROM range({rows}) t(i)
        ) TO '{path}' (FORMAT csv, HEADER true)""")
    con.close()


def make_predictions(path: Path, rows: int) -> None:
    """A predictions Parquet file shaped like a sweep's parts (zoom 18 over ~Switzerland)."""
    import duckdb

    con = duckdb.connect()
    side = max(1, int(rows ** 0.5))
    con.execute(f"""
        COPY (
          SELECT 18::TINYINT AS z, (136000 + i % {side})::INTEGER AS x, (91000 + i // {side})::INTEGER AS y,
                 (136000 + i % {side} + 0.5) / 262144.0 * 360 - 180 AS lon,
                 degrees(atan(sinh(pi() * (1 - 2 * (91000 + i // {side} + 0.5) / 262144.0)))) AS lat,
                 (CASE WHEN hash(i) % 100 < 3 THEN 0.5 + (hash(i * 5) % 500) / 1000.0
                       ELSE (hash(i * 5) % 500) / 1000.0 END)::FLOAT AS score,
                 hash(i) % 100 < 3 AS label, 'demo' AS model
          FROM range({rows}) t(i)
        ) TO '{path}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 1000000)""")
    con.close()


def districts(path: Path, pred: Path) -> None:
    """A 4 x 4 grid of district polygons over the predictions' extent."""
    import duckdb

    w, s, e, n = duckdb.sql(f"SELECT min(lon), min(lat), max(lon), max(lat) FROM '{pred}'").fetchall()[0]
    feats = []
    for i in range(4):
        for j in range(4):
            a, b = w + (e - w) * i / 4, s + (n - s) * j / 4
            c, d = w + (e - w) * (i + 1) / 4 + 1e-9, s + (n - s) * (j + 1) / 4 + 1e-9
            feats.append({"type": "Feature", "properties": {"district": f"d{i}{j}"},
                          "geometry": {"type": "Polygon", "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


# --- the cases (run in a child process: `tables.py --case NAME --input ...`) --------------------


def case(name: str, inputs: list[str], extra: str) -> dict:
    """Run one case in this process; returns {groups, total} (for a correctness check) and
    engine_s, the seconds of the work itself (see the module doc)."""
    res = _case(name, inputs, extra)
    if "engine_s" not in res:
        res["engine_s"] = round(time.perf_counter() - _T0[0], 3)
    return res


_T0 = [0.0]


def _start() -> None:
    """The engine's clock starts here: after the imports (and a cluster's start)."""
    _T0[0] = time.perf_counter()


_REPORTED = re.compile(r"\sin\s+(\d+(?:\.\d+)?)\s+s\b")
_WIDE = {**os.environ, "COLUMNS": "1000"}  # the command's one line stays one line


def _reported_seconds(stdout: str) -> float:
    """The seconds a tilesweep command prints on its last line ('... in 1.23 s')."""
    found = _REPORTED.findall(stdout)
    if not found:
        raise SystemExit(f"no time in the command's output: {stdout[-200:]!r}")
    return float(found[-1])


def _case(name: str, inputs: list[str], extra: str) -> dict:
    key = "PULocationID"
    parquet = inputs[0].endswith(".parquet")
    if name == "pandas":
        import pandas as pd

        _start()
        frames = [pd.read_parquet(f) if parquet else pd.read_csv(f) for f in inputs]
        r = pd.concat(frames).fillna(0).groupby(key).count()
        return {"groups": len(r), "total": int(r.iloc[:, 0].sum())}
    if name == "dask":
        import dask.dataframe as dd
        from dask.distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="1.5GiB", processes=True,
                          dashboard_address=None) as cluster, Client(cluster):
            _start()
            df = dd.read_parquet(inputs) if parquet else dd.read_csv(inputs, assume_missing=True,
                                                                     dtype={"dispatching_base_num": "object"})
            r = df.fillna(0).groupby(key).count().compute()
        return {"groups": len(r), "total": int(r.iloc[:, 0].sum())}
    if name == "vaex":
        import vaex

        _start()
        if parquet:
            df = vaex.open_many(inputs)
        else:
            df = vaex.concat([vaex.from_csv_arrow(f, lazy=True) for f in inputs])
        df = df.fillna(0)
        r = df.groupby(key, agg="count")
        return {"groups": len(r), "total": int(r["count"].sum())}
    if name == "polars":
        import polars as pl

        _start()
        lf = pl.scan_parquet(inputs) if parquet else pl.scan_csv(inputs)  # default inference: it copes here
        r = lf.fill_null(0).group_by(key).agg(pl.len().alias("n")).collect(engine="streaming")
        return {"groups": r.height, "total": int(r["n"].sum())}
    if name == "duckdb":
        import duckdb

        _start()
        con = duckdb.connect(config={"memory_limit": "1GB", "threads": str(os.cpu_count() or 2)})
        src = f"read_parquet({inputs!r})" if parquet else f"read_csv({inputs!r})"
        rows = con.execute(f"SELECT coalesce({key}, 0) AS k, count(*) AS n FROM {src} GROUP BY k").fetchall()
        return {"groups": len(rows), "total": sum(n for _, n in rows)}
    if name == "tilesweep":
        out = Path(extra) / "tilesweep-result.csv"
        files = ", ".join(f"'{f}'" for f in inputs)
        src = f"read_parquet([{files}])" if parquet else f"read_csv([{files}])"
        done = subprocess.run([sys.executable, "-m", "tilesweep", "query",
                               f"SELECT coalesce({key}, 0) AS k, count(*) AS n FROM {src} GROUP BY k",
                               "--memory-limit", "1GB", "-o", str(out)], check=True, capture_output=True, text=True,
                              env=_WIDE)
        import csv

        rows = list(csv.DictReader(open(out)))
        return {"groups": len(rows), "total": sum(int(r["n"]) for r in rows), "engine_s": _reported_seconds(done.stdout)}
    if name == "convert":
        out = Path(extra) / "trips.parquet"
        # the default memory settings: what a user gets (peak RSS < 1 GB is the target)
        done = subprocess.run([sys.executable, "-m", "tilesweep", "convert", *inputs, str(out), "--quiet"],
                              check=True, capture_output=True, text=True, env=_WIDE)
        import pyarrow.parquet as pq

        return {"groups": 0, "total": pq.read_metadata(out).num_rows, "engine_s": _reported_seconds(done.stdout)}
    # the predictions table, through tilesweep: its modules (numpy, pyarrow, shapely) are
    # imported before the clock starts, as the other cases' engines are
    import tilesweep
    import tilesweep.geoout
    import tilesweep.summarize  # noqa: F401

    _start()

    src = f"'{inputs[0]}'"
    if name == "pred-labels":
        rows = tilesweep.query(f"SELECT label, count(*) FROM {src} GROUP BY label", memory_limit="1GB").fetchall()
        return {"groups": len(rows), "total": sum(n for _, n in rows)}
    if name == "pred-top":
        rows = tilesweep.query(f"SELECT x, y, score FROM {src} ORDER BY score DESC LIMIT 1000", memory_limit="1GB").fetchall()
        return {"groups": len(rows), "total": len(rows)}
    if name == "pred-districts":
        import numpy as np
        import shapely

        from tilesweep.sql import stream
        from tilesweep.summarize import load_polygons

        geoms, _ = load_polygons(extra)
        tree = shapely.STRtree(geoms)
        counts = np.zeros(len(geoms), np.int64)
        for b in stream(tilesweep.query(f"SELECT lon, lat FROM {src} WHERE label", memory_limit="1GB")):
            _, hit = tree.query(shapely.points(b.column(0).to_numpy(), b.column(1).to_numpy()), predicate="intersects")
            counts += np.bincount(hit, minlength=len(geoms))
        return {"groups": len(geoms), "total": int(counts.sum())}
    if name == "pred-export":
        import duckdb

        from tilesweep.geoout import write_batches
        from tilesweep.sql import connect, stream

        con = connect("1GB")
        rel = con.sql(f"SELECT z, x, y, lon, lat, score, model FROM {src} WHERE label")
        n = write_batches(stream(rel), list(rel.columns), Path(extra), "geojson", "point", con=con, rel=rel)
        return {"groups": 0, "total": n}
    raise SystemExit(f"unknown case {name}")


# --- measuring ---------------------------------------------------------------------------


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


class Cgroup:
    """A memory-capped cgroup (v2 if mounted with the memory controller, else v1)."""

    def __init__(self, cap_bytes: int, name: str) -> None:
        self.v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
        if self.v2:
            base = Path("/sys/fs/cgroup")
            if "memory" not in (base / "cgroup.controllers").read_text().split():
                raise OSError("cgroup v2 without the memory controller")
            self.path = base / f"tilesweep-bench-{name}-{os.getpid()}"
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(cap_bytes))
            try:
                (self.path / "memory.swap.max").write_text("0")
            except OSError:
                pass
        else:
            line = next(ln for ln in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in ln)
            base = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/")
            self.path = base / f"tilesweep-bench-{name}-{os.getpid()}"
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(cap_bytes))
            try:
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(cap_bytes))
            except OSError:
                pass
        self.cap = cap_bytes

    def join(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_and_oom(self) -> tuple[int, int]:
        if self.v2:
            peak = int((self.path / "memory.peak").read_text()) if (self.path / "memory.peak").exists() else -1
            events = dict(ln.split() for ln in (self.path / "memory.events").read_text().splitlines())
            return peak, int(events.get("oom_kill", 0))
        peak = int((self.path / "memory.max_usage_in_bytes").read_text())
        ctl = dict(ln.split() for ln in (self.path / "memory.oom_control").read_text().splitlines())
        return peak, int(ctl.get("oom_kill", 0))

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def measure(name: str, inputs: list[str], extra: str, python: str, cap: int | None, timeout: float) -> dict:
    cmd = [python, str(HERE), "--case", name, "--extra", extra, "--input", *inputs]
    group = None
    if cap is not None:
        group = Cgroup(cap, name)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent / "src")}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=group.join if group else None)
    peak = 0
    try:
        while p.poll() is None:
            peak = max(peak, _tree_rss(p.pid))
            if time.perf_counter() - started > timeout:
                p.kill()
            time.sleep(0.02)
        out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
    wall = time.perf_counter() - started
    res: dict = {"case": name, "wall_s": round(wall, 2), "peak_rss_mb": round(peak / 1e6), "rc": p.returncode}
    if group is not None:
        cg_peak, ooms = group.peak_and_oom()
        res.update(cap_mb=round(cap / 2**20), cgroup_peak_mb=round(cg_peak / 1e6), oom_kills=ooms)
        group.remove()
    if p.returncode == 0:
        res.update(json.loads(out.strip().splitlines()[-1]))
    else:
        tail = (err or out).strip().splitlines()
        res["error"] = "killed (OOM)" if res.get("oom_kills") or p.returncode in (-9, 137) else (tail[-1][:160] if tail else f"exit {p.returncode}")
    return res


def available(engine: str, vaex_python: str | None) -> str | None:
    """None if the engine can run, else why not."""
    if engine == "vaex":
        if not vaex_python:
            return "no --vaex-python (Vaex needs a venv of its own: it pins pandas<3, dask<2024.9)"
        ok = subprocess.run([vaex_python, "-c", "import vaex"], capture_output=True)
        return None if ok.returncode == 0 else f"vaex does not import in {vaex_python}"
    mod = {"pandas": "pandas", "dask": "distributed", "polars": "polars", "duckdb": "duckdb", "tilesweep": "tilesweep"}[engine]
    try:
        __import__(mod)
    except ImportError:
        return f"{mod} is not installed"
    return None


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper().rstrip("IB").rstrip("B")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


class _Done(Exception):
    """The cases asked for (--only) are done."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--input", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=FULL_ROWS, help=f"rows per CSV file (default {FULL_ROWS:,}: ~1.4 GB each)")
    ap.add_argument("--pred-rows", type=int, default=FULL_PRED_ROWS, help="rows of the predictions table")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, installed engines only, no cap (for tests)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--vaex-python", default=os.environ.get("TILESWEEP_VAEX_PYTHON"), help="python of a venv with vaex")
    ap.add_argument("--cap", default=None, help="also run each case in a cgroup with this memory limit, e.g. 4G")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--only", choices=("all", "csv"), default="all",
                    help="csv: only the raw-CSV cases (no convert, Parquet or predictions)")
    a = ap.parse_args()
    if a.case:
        print(json.dumps(case(a.case, a.input or [], a.extra)))
        return
    if a.quick:
        a.rows, a.pred_rows, a.cap = 20_000, 50_000, None
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="tilesweep-tables-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    skipped: dict[str, str] = {}
    try:
        t0 = time.perf_counter()
        csvs = [work / "fhv_a.csv", work / "fhv_b.csv"]
        for i, f in enumerate(csvs):
            if not f.exists():
                make_csv(f, a.rows, seed=i)
        print(f"# data: 2 CSVs of {a.rows:,} rows, {sum(f.stat().st_size for f in csvs) / 1e9:.2f} GB "
              f"({time.perf_counter() - t0:.0f} s to generate)", file=sys.stderr)
        engines = [e for e in a.engines.split(",") if e]
        for e in engines:
            why = available(e, a.vaex_python)
            if why:
                skipped[e] = why
        runnable = [e for e in engines if e not in skipped]
        caps = [None] + ([parse_size(a.cap)] if a.cap else [])
        try:
            if a.cap:
                Cgroup(parse_size(a.cap), "probe").remove()
        except (OSError, StopIteration) as exc:
            skipped["cgroup cap"] = f"cannot make a memory cgroup here: {exc}"
            caps = [None]
        for cap in caps:
            for e in runnable:
                py = a.vaex_python if e == "vaex" else sys.executable
                r = measure(e, [str(f) for f in csvs], str(work), py, cap, a.timeout)
                r.update(engine=e, input="csv")
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
        if a.only == "csv":
            raise _Done
        conv = measure("convert", [str(f) for f in csvs], str(work), sys.executable, None, a.timeout)
        conv.update(engine="tilesweep convert", input="csv -> parquet")
        results.append(conv)
        print(json.dumps(conv), file=sys.stderr)
        parquet = work / "trips.parquet"
        if parquet.exists():
            for cap in caps:
                for e in runnable:
                    py = a.vaex_python if e == "vaex" else sys.executable
                    r = measure(e, [str(parquet)], str(work), py, cap, a.timeout)
                    r.update(engine=e, input="parquet")
                    results.append(r)
                    print(json.dumps(r), file=sys.stderr)
        pred = work / "predictions.parquet"
        t0 = time.perf_counter()
        if not pred.exists():
            make_predictions(pred, a.pred_rows)
        print(f"# predictions: {a.pred_rows:,} rows, {pred.stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
        areas = work / "districts.geojson"
        districts(areas, pred)
        for name, extra in (("pred-labels", ""), ("pred-top", ""), ("pred-districts", str(areas)),
                            ("pred-export", str(work / "detections.geojson"))):
            r = measure(name, [str(pred)], extra, sys.executable, None, a.timeout)
            r.update(engine="tilesweep", input=f"predictions {a.pred_rows:,} rows")
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    except _Done:
        pass
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, skipped, a)
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": a.rows, "pred_rows": a.pred_rows, "results": results, "skipped": skipped}, indent=1))


def print_table(results: list[dict], skipped: dict[str, str], a: argparse.Namespace) -> None:
    print("| case | engine | input | wall (process) | engine time (in process) | peak RSS (tree) | under cap | result |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        capped = f"{r['cap_mb']:,} MiB cap: peak {r['cgroup_peak_mb']:,} MB, {r['oom_kills']} OOM kills" if "cap_mb" in r else ""
        outcome = r.get("error") or f"{r.get('groups', 0):,} groups, {r.get('total', 0):,} rows"
        engine = f"{r['engine_s']:.2f} s" if "engine_s" in r else ""
        print(f"| {r['case']} | {r['engine']} | {r['input']} | {r['wall_s']:.1f} s | {engine} | {r['peak_rss_mb']:,} MB | {capped} | {outcome} |")
    for e, why in skipped.items():
        print(f"| {e} | skipped | | | | | {why} |")
    if not results:
        return
    ok = [r for r in results if r.get("rc") == 0 and "cap_mb" not in r]
    totals = {r.get("total") for r in ok if r["input"] in ("csv", "parquet") and r["case"] not in ("convert",)}
    if len(totals) > 1:
        print(f"\nWARNING: the engines disagree on the row total: {sorted(totals)}")
    for line in ratios(ok):
        print(line)


def ratios(ok: list[dict]) -> list[str]:
    """The converted query against the fastest raw-CSV query, by wall time and by engine
    time, and tilesweep's raw-CSV query against Polars streaming."""
    def by(case: str, inp: str) -> dict | None:
        return next((r for r in ok if r["case"] == case and r["input"] == inp), None)

    raw = [r for r in ok if r["input"] == "csv" and r["case"] in ENGINES]
    conv = by("tilesweep", "parquet")
    lines = []
    for key, what in (("wall_s", "wall time (process)"), ("engine_s", "engine time (in process)")):
        have = [r for r in raw if key in r]
        if conv is not None and have and key in conv and conv[key] > 0:
            best = min(have, key=lambda r: r[key])
            lines.append(f"converted query (tilesweep, Parquet) vs fastest raw-CSV query ({best['case']}), {what}: "
                         f"{best[key]:.2f} s / {conv[key]:.2f} s = {best[key] / conv[key]:.1f}x")
        ts, pl = by("tilesweep", "csv"), by("polars", "csv")
        if ts is not None and pl is not None and key in ts and key in pl and pl[key] > 0:
            lines.append(f"tilesweep query vs Polars streaming on raw CSV, {what}: {ts[key]:.2f} s / {pl[key]:.2f} s "
                         f"= {ts[key] / pl[key]:.2f}x")
    return [""] + lines if lines else []


if __name__ == "__main__":
    main()
