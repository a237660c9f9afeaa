"""A deliberately slow Python model for tests/test_predict.py (``helpers.slow_model:score``):
the mean green of a 32 px input, after sleeping ``TILESWEEP_TEST_SLEEP`` seconds (default
0.15) per batch, so a test can kill `tilesweep predict` in the middle of its work."""

from __future__ import annotations

import os
import time

import numpy as np


def score(batch: np.ndarray) -> np.ndarray:
    time.sleep(float(os.environ.get("TILESWEEP_TEST_SLEEP", "0.15")))
    return batch[:, 1].mean(axis=(1, 2))[:, None]


score.input_size = 32  # type: ignore[attr-defined]
score.labels = ["green"]  # type: ignore[attr-defined]
