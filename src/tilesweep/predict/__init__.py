"""Prediction: run a model over a sweep's tiles into group-committed Parquet parts.

>>> from tilesweep.sweep import Sweep
>>> from tilesweep.model import load_model
>>> from tilesweep.predict import predict_sweep
>>> with Sweep.open("my-sweep") as sweep:
...     report = predict_sweep(sweep, load_model("demo"))   # offline: from the tile store
>>> report.tiles, report.positives, report.tiles_per_s

Streaming from the source, with nothing stored (what ``tilesweep run`` does)::

    from tilesweep.predict import StreamFetch
    predict_sweep(sweep, model, stream=StreamFetch(sweep.source))

Fetching into the store and scoring each block, acked once its shard and its rows are
durable (``tilesweep run --keep-tiles``: each runner tees, :class:`tilesweep.runner.Tee`)::

    predict_sweep(sweep, model, stream=StreamFetch(sweep.source, workers=2, keep_tiles=True))

Rows land in ``SWEEP/predictions/{model}/part-*.parquet``; ``predictions/ledger.sqlite``
records which blocks are done (see :mod:`tilesweep.predict.sink` and docs/predict.md).
"""

from .pipeline import (
    FlowMeter, PredictReport, PredictSettings, StageMeter, StreamFetch, blocks_to_predict, predict_sweep, probe,
)
from .sink import (
    BASE_COLUMNS, LEDGER_FILE, PREDICTIONS_DIR, BlockRows, PredictionSink, PredictionTotals, ledger_totals,
    model_folder, model_key,
)
from ..tiles import centres_array as centres  # the sink's name for it

__all__ = [
    "BASE_COLUMNS", "LEDGER_FILE", "PREDICTIONS_DIR", "BlockRows", "FlowMeter", "PredictReport", "PredictSettings",
    "PredictionSink", "PredictionTotals", "StageMeter", "StreamFetch", "blocks_to_predict", "centres", "ledger_totals",
    "model_folder", "model_key", "predict_sweep", "probe",
]
