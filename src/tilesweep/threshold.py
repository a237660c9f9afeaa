"""A model's ``--threshold`` (`tilesweep predict`, `run`, `detections`, `summarize`, ...):
checked, and given to a loaded model.

Its own module, not :mod:`tilesweep.detections`: `predict` and `run` check and apply a
threshold on every start, and must not import DuckDB, shapely and the map outputs for
it (~0.2 s CPU a start)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    from .sweep import Sweep


def check_threshold(threshold: float | None) -> float | None:
    """``threshold`` if it is in 0..1 (or None); :class:`UsageError` otherwise."""
    if threshold is None:
        return None
    t = float(threshold)
    if math.isnan(t) or not 0.0 <= t <= 1.0:
        raise UsageError(f"threshold {threshold:g} is outside 0..1")
    return t


def apply_threshold(model: Any, threshold: float | None, sweep_path: "Path | Sweep") -> Any:
    """Give a loaded model the ``--threshold`` of `tilesweep predict` / `run`: its
    ``label`` column and the ledger's positives use it. A threshold other than the one
    this model's earlier predictions in the sweep were written with is refused (one
    sweep's ``label`` column means one thing; `tilesweep detections --threshold` re-cuts
    the scores at any threshold without predicting again)."""
    import dataclasses

    threshold = check_threshold(threshold)
    if threshold is None:
        return model
    from .sql import models  # the ledger's models: SQLite only

    for m in models(sweep_path):
        if m["name"] == model.name and m["digest"] == model.digest and not math.isclose(m["threshold"], threshold):
            raise UsageError(
                f"predictions of {model.name} in {str(getattr(sweep_path, 'location', sweep_path))!r} were written with threshold {m['threshold']:g}, "
                f"not {threshold:g}; use `tilesweep detections --threshold {threshold:g}` to cut the scores anew"
            )
    model.info = dataclasses.replace(model.info, threshold=threshold)
    return model
