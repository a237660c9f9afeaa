"""Models: adapters for ONNX, PyTorch and Python callables, and the shipped demo model.

>>> from tilesweep.model import load_model, score_tiles
>>> model = load_model("demo")                  # or "my.onnx", "net.pt", "pkg.mod:fn"
>>> scores = score_tiles(model, [rgb_tile])      # float32[1, len(model.info.labels)]
>>> scores, where = score_and_place(model, [rgb_tile])  # and where in the tile: float32[1, 1, 2]

See docs/model.md for the demo model and for bringing your own.
"""

from .base import (
    META_KEYS, InputSpec, Model, ModelInfo, describe, info_from_metadata, info_to_metadata, peak_positions, predict_pixels,
    prepare, score_and_place, score_tiles, split_output,
)
from .load import DEMO_PATH, load_model
from .onnxrt import OnnxModel
from .pyfunc import CallableModel

__all__ = [
    "DEMO_PATH", "META_KEYS", "CallableModel", "InputSpec", "Model", "ModelInfo", "OnnxModel",
    "describe", "info_from_metadata", "info_to_metadata", "load_model", "peak_positions", "predict_pixels", "prepare",
    "score_and_place", "score_tiles", "split_output",
]
