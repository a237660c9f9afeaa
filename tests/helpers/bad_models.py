"""Models that misbehave, for tests/test_predict_edges.py, loaded as ``helpers.bad_models:NAME``."""

from __future__ import annotations

import os

import numpy as np


def returns_string(batch: np.ndarray) -> str:
    return "not scores"


def raises(batch: np.ndarray) -> np.ndarray:
    raise RuntimeError("weights not loaded")


def raises_after_probe(batch: np.ndarray) -> np.ndarray:
    """Answers the one-tile probe, then raises on the first real batch."""
    if len(batch) == 1 and not batch.any():
        return np.zeros((1, 1), np.float32)
    raise RuntimeError("CUDA out of memory (simulated)")


def nan_until_fixed(batch: np.ndarray) -> np.ndarray:
    """NaN for every tile, until TILESWEEP_TEST_MODEL_FIXED=1 (the same model, fixed)."""
    if os.environ.get("TILESWEEP_TEST_MODEL_FIXED") == "1":
        return batch[:, 1].mean(axis=(1, 2))[:, None]
    if len(batch) == 1 and not batch.any():
        return np.zeros((1, 1), np.float32)  # the probe sees numbers
    return np.full((len(batch), 1), np.nan, np.float32)


for fn in (returns_string, raises, raises_after_probe, nan_until_fixed):
    fn.input_size = 32  # type: ignore[attr-defined]
