"""ONNX models through onnxruntime: CUDA when the installed build has it, CPU otherwise.

The input side comes from the graph (``[N, 3, H, W]`` with a fixed ``H == W``) or from the
``input_size`` metadata for graphs with free spatial axes; normalisation, channel order
and labels come from the model's ``metadata_props`` (see :mod:`tilesweep.model.base`).

A graph may have a second output named ``heatmap``, ``float32[N, C, h, w]`` (logits or
scores of each label over the input image, as a CenterNet-style or fully convolutional
classifier has before its pooling): the model then gives a position for every label
(:func:`tilesweep.model.base.peak_positions`), which predictions record as
``LABEL_lon`` / ``LABEL_lat``. The demo model has one (its 8 x 8 map of "tower here").
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import UsageError
from .base import ModelInfo, info_from_metadata, peak_positions

Device = Literal["auto", "cpu", "cuda"]


def file_digest(path: str | os.PathLike[str]) -> str:
    """First 16 hex digits of the file's SHA-256 (which weights produced a prediction)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _fixed(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


HEATMAP = "heatmap"
"""The name of the optional second output: ``float32[N, C, h, w]``, one map per label."""


class OnnxModel:
    """An ONNX image model with one ``float32[N, 3, H, W]`` input, one ``float32[N, C]``
    output of scores, and optionally a ``heatmap`` output (:data:`HEATMAP`).

    ``device``: ``auto`` uses onnxruntime's CUDA provider when the installed build has it
    (``onnxruntime-gpu``) and the CPU otherwise; ``cuda`` fails if it is missing.
    ``threads``: CPU threads for one batch (``None``: onnxruntime's default, all cores)."""

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None, device: Device = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name or self.path.name
        if not self.path.is_file():
            raise UsageError(f"model file {os.fspath(path)!r} does not exist")
        self.digest = file_digest(self.path)
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise UsageError(f"model {self.name}: device cuda asked for, but this onnxruntime has only {', '.join(available)} (install onnxruntime-gpu)")
        use_cuda = device != "cpu" and "CUDAExecutionProvider" in available
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(os.fspath(self.path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"model file {os.fspath(path)!r} is not a loadable ONNX model: {first}") from None
        self.providers: list[str] = self.session.get_providers()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            shapes = [tuple(i.shape) for i in inputs]
            raise UsageError(f"model {self.name}: expected one [N, 3, H, W] input, the graph has {shapes}")
        shape = inputs[0].shape
        if _fixed(shape[1]) not in (None, 3):
            raise UsageError(f"model {self.name}: input has {shape[1]} channels, expected 3")
        h, w = _fixed(shape[2]), _fixed(shape[3])
        if h is not None and w is not None and h != w:
            raise UsageError(f"model {self.name}: input is {h}x{w}; only square inputs are supported")
        scores_out = next((o for o in outputs if o.name != HEATMAP), outputs[0])
        heat = next((o for o in outputs if o.name == HEATMAP), None)
        out_shape = scores_out.shape
        n_out = _fixed(out_shape[1]) if len(out_shape) == 2 else (1 if len(out_shape) == 1 else None)
        if heat is not None:
            if len(heat.shape) != 4 or (n_out is not None and _fixed(heat.shape[1]) not in (None, n_out)):
                raise UsageError(f"model {self.name}: its heatmap output is {list(heat.shape)}, expected [N, {n_out or 'C'}, h, w]")
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info: ModelInfo = info_from_metadata(meta, self.name, graph_size=h, n_outputs=n_out, positioned=heat is not None)
        self._input = inputs[0].name
        self._output = scores_out.name
        self._heat = heat.name if heat is not None and self.info.positions else None
        self._placed = [self.info.labels.index(lb) for lb in self.info.positions]  # the heatmap's channels

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``: where the session runs."""
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32[N, 3, size, size]`` -> ``float32[N, info.width]``: the scores, then
        (with a heatmap) the x and y of each positioned label."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self._heat is None:
            (out,) = self.session.run([self._output], {self._input: x})
            return np.asarray(out, dtype=np.float32).reshape(len(x), -1)
        out, heat = self.session.run([self._output, self._heat], {self._input: x})
        scores = np.asarray(out, dtype=np.float32).reshape(len(x), -1)
        pos = peak_positions(np.asarray(heat)[:, self._placed])
        return np.concatenate([scores, pos.reshape(len(x), -1)], axis=1)

    def __repr__(self) -> str:
        return f"OnnxModel({os.fspath(self.path)!r}, device={self.device!r})"
