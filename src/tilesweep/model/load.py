"""``load_model(spec)``: the one way the CLI and the library turn a ``--model`` value
into a :class:`~tilesweep.model.base.Model`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from .base import Model
from .onnxrt import Device, OnnxModel
from .pyfunc import is_callable_spec, load_callable
from .torchmodel import TORCH_SUFFIXES, Precision, check_precision, load_torch_file

DEMO_PATH = Path(__file__).with_name("demo.onnx")
"""The shipped demo model: does a zoom-18 tile hold a power tower? (docs/model.md)"""


def load_model(spec: str | os.PathLike[str], *, device: Device = "auto", threads: int | None = None,
               precision: Precision = "fp32", channels_last: bool = False) -> Model:
    """The model ``spec`` names:

    - ``demo``: the shipped power-tower model (ONNX, :data:`DEMO_PATH`);
    - a path ending in ``.onnx``: an ONNX model (onnxruntime);
    - a path ending in ``.pt``, ``.pth``, ``.ts`` (TorchScript) or ``.pt2``
      (``torch.export``): a PyTorch model, if PyTorch is installed;
    - ``module:function``: a Python callable or model object.

    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``; ``threads`` caps
    the CPU threads of one batch. ``precision`` (``fp32``, ``bf16``, ``fp16``: autocast)
    and ``channels_last`` apply to PyTorch models only (:class:`~.torchmodel.TorchModel`);
    asked of another model they are a one-line error. A bad spec raises one-line
    :class:`UsageError` naming it."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device {device!r} is not auto, cpu or cuda")
    check_precision(precision, os.fspath(spec))
    model = _load(spec, device, threads, precision, channels_last)
    if (precision != "fp32" or channels_last) and not hasattr(model, "precision"):
        asked = " and ".join(([f"precision {precision}"] if precision != "fp32" else []) + (["channels_last"] if channels_last else []))
        raise UsageError(f"model {model.name} is not a PyTorch model: {asked} applies to PyTorch models only")
    return model


def _load(spec: str | os.PathLike[str], device: Device, threads: int | None, precision: Precision, channels_last: bool) -> Model:
    text = os.fspath(spec)
    if not text.strip():
        raise UsageError("model '' is empty: give demo, a .onnx/.pt file or module:function")
    if text == "demo":
        return OnnxModel(DEMO_PATH, name="demo", device=device, threads=threads)
    if Path(text).is_dir():
        raise UsageError(f"model {text!r} is a folder, not a model file: give demo, a .onnx/.pt file or module:function")
    suffix = Path(text).suffix.lower()
    if suffix == ".onnx":
        return OnnxModel(text, device=device, threads=threads)
    if suffix in TORCH_SUFFIXES:
        return load_torch_file(text, device=device, threads=threads, precision=precision, channels_last=channels_last)
    if is_callable_spec(text) and not Path(text).exists():
        return load_callable(text, device=device, threads=threads, precision=precision, channels_last=channels_last)
    raise UsageError(
        f"model {text!r} is not 'demo', a .onnx / .pt / .pth / .ts / .pt2 file or module:function"
    )
