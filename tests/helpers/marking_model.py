"""A slow Python model that leaves a trace (``helpers.marking_model:score``): after
sleeping ``TILESWEEP_TEST_SLEEP`` seconds (default 0.2) per batch it appends the batch size
to the file ``TILESWEEP_TEST_MARKS`` (when set), so a test can signal `predict` / `run`
once the model has scored some tiles and then check that they were kept."""

from __future__ import annotations

import os
import time

import numpy as np


def score(batch: np.ndarray) -> np.ndarray:
    time.sleep(float(os.environ.get("TILESWEEP_TEST_SLEEP", "0.2")))
    marks = os.environ.get("TILESWEEP_TEST_MARKS")
    if marks:
        with open(marks, "a") as f:
            f.write(f"{len(batch)}\n")
    return batch[:, 1].mean(axis=(1, 2))[:, None]


score.input_size = 32  # type: ignore[attr-defined]
score.labels = ["green"]  # type: ignore[attr-defined]
