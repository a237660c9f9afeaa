"""Every benchmark script runs in its quick mode (issue 16), so that a renamed field or a
changed summary line breaks a test, not a user's first benchmark.

Each ``benchmarks/*.py`` is run as a script with ``--quick`` (a few hundred tiles, a few
seconds); a script without a quick mode fails here. Scripts that need a tool skip, naming
it, where it is absent (.ci/run installs nginx, curl and aria2c when it runs as root).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def _nginx() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


def _modules(*names: str) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


# script -> (what it needs that is missing here, as words; empty when it can run)
def missing(script: str) -> list[str]:
    if script in ("fetch.py", "predict.py", "memory.py"):
        return [] if _nginx() else ["nginx"]
    if script == "gpu_models.py":
        return [f"the Python module {m}" for m in _modules("torch", "onnx")]
    return []


TREE_SCRIPTS = ("fetch.py", "predict.py", "memory.py")  # share one rendered simulator tree


@pytest.fixture(scope="session")
def tree_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_quick_mode_runs(script, tree_cache, request):
    lacking = missing(script.name)
    if lacking:
        pytest.skip(f"benchmarks/{script.name} needs {', '.join(lacking)}")
    if script.name == "tables.py":  # the same run tests/test_tables_bench.py checks the results of
        res, _ = request.getfixturevalue("tables_quick")
    else:
        args = [sys.executable, str(script), "--quick"]
        if script.name in TREE_SCRIPTS:
            args += ["--cache", str(tree_cache)]
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
        res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"benchmarks/{script.name} --quick: exit {res.returncode}\nstdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stdout.strip(), "a benchmark prints its table on stdout"
    if script.name == "fetch.py":  # every client that is installed has its row
        assert "tilesweep -w 1" in res.stdout
        for tool in ("curl", "aria2c"):
            assert (tool in res.stdout) == (shutil.which(tool) is not None), (tool, res.stdout)
