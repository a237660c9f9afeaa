"""Models that misbehave (issue 16): one that returns a string or raises is one line, exit
2; one that returns NaN for every tile ends loudly (exit 1, NaN told apart from
undecodable), and `tilesweep predictions drop` lets the fixed model predict again."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.cli import status_json, tilesweep

from tilesweep.sim import World, run_in_thread

TESTS = Path(__file__).parent
ENV = {"PYTHONPATH": str(TESTS)}
BBOX = "8.500,47.300,8.516,47.310"  # 156 tiles at zoom 18, 16 blocks at zoom 16


@pytest.fixture(scope="module")
def sim():
    with run_in_thread(World(seed=5)) as srv:
        yield srv


@pytest.fixture
def sweep(fetched_copy):
    """The 156-tile sweep fetched from World(seed=5), fetched once per session (tests/conftest.py), this test's copy."""
    return fetched_copy(BBOX, 18, 16, 5)


def rows(sweep):
    return sum(pq.read_metadata(p).num_rows for p in (sweep / "predictions").rglob("part-*.parquet"))


@pytest.mark.parametrize("model, words", [
    ("helpers.bad_models:returns_string", "returned str 'not scores'"),
    ("helpers.bad_models:raises", "raised RuntimeError: weights not loaded"),
    ("helpers.bad_models:raises_after_probe", "raised RuntimeError: CUDA out of memory (simulated)"),
])
def test_a_model_that_returns_a_string_or_raises_is_one_line(sweep, model, words):
    res = tilesweep("predict", sweep, "--model", model, "--quiet", check=False, env=ENV)
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert words in res.stderr and model in res.stderr
    assert rows(sweep) == 0


def test_all_nan_is_loud_and_predictions_can_be_dropped_and_redone(sweep):
    model = "helpers.bad_models:nan_until_fixed"
    res = tilesweep("predict", sweep, "--model", model, "--quiet", check=False, env=ENV)
    assert res.returncode == 1, res
    assert "156 of 156 rows have no scores" in res.stderr, res.stderr
    assert "the model returned NaN for 156, 0 tiles did not decode" in res.stderr
    assert f"tilesweep predictions drop {sweep} --model {model}" in res.stderr
    assert "156 NaN from the model" in res.stdout and "0 undecodable" in res.stdout
    # the fixed model has nothing to do until its predictions are dropped
    fixed = {**ENV, "TILESWEEP_TEST_MODEL_FIXED": "1"}
    again = tilesweep("predict", sweep, "--model", model, "--quiet", env=fixed)
    assert "0 tiles scored" in again.stdout
    res = tilesweep("predictions", "drop", sweep, "--model", model)
    assert "16 blocks, 1 part" in res.stdout, res.stdout
    assert rows(sweep) == 0 and status_json(sweep)["predictions"] == []
    redo = tilesweep("predict", sweep, "--model", model, "--quiet", env=fixed)
    assert "156 tiles scored" in redo.stdout and "0 undecodable" in redo.stdout
    table = pq.read_table(next((sweep / "predictions").rglob("part-*.parquet")))
    assert table.num_rows == 156 and table.column("label").null_count == 0


def test_drop_of_an_unknown_model_names_it(sweep):
    tilesweep("predict", sweep, "--model", "demo", "--quiet")
    res = tilesweep("predictions", "drop", sweep, "--model", "nope", check=False)
    assert res.returncode == 2 and "model 'nope' has no predictions" in res.stderr and "demo" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert rows(sweep) == 156


def test_a_streamed_run_can_be_redone_after_a_drop(tmp_path, sim):
    """`run` streams tiles without keeping them: after a drop, the same run fetches the
    blocks again and predicts each tile once."""
    s = tmp_path / "r"
    tilesweep("plan", BBOX, s, "--zoom", 18, "--block-zoom", 16)
    tilesweep("run", s, "--source", sim.template(), "--model", "demo", "--quiet")
    assert rows(s) == 156
    tilesweep("predictions", "drop", s, "--model", "demo")
    assert rows(s) == 0
    res = tilesweep("run", s, "--model", "demo", "--quiet")
    assert "156 tiles scored" in res.stdout, res.stdout
    assert rows(s) == 156
