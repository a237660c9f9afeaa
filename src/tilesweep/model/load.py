"""``load_model(spec)``: the one way the CLI and the library turn a ``--model`` value
into a :class:`~tilesweep.model.base.Model`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from .base import Model
from .onnxrt import Device, OnnxModel
from .pyfunc import is_callable_spec, load_callable
from .torchmodel import TORCH_SUFFIXES, load_torch_file

DEMO_PATH = Path(__file__).with_name("demo.onnx")
"""The shipped demo model: does a zoom-18 tile hold a power tower? (docs/model.md)"""


def load_model(spec: str | os.PathLike[str], *, device: Device = "auto", threads: int | None = None) -> Model:
    """The model ``spec`` names:

    - ``demo``: the shipped power-tower model (ONNX, :data:`DEMO_PATH`);
    - a path ending in ``.onnx``: an ONNX model (onnxruntime);
    - a path ending in ``.pt``, ``.pth``, ``.ts`` (TorchScript) or ``.pt2``
      (``torch.export``): a PyTorch model, if PyTorch is installed;
    - ``module:function``: a Python callable or model object.

    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``; ``threads`` caps
    the CPU threads of one batch. A bad spec raises one-line :class:`UsageError`
    naming it."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device {device!r} is not auto, cpu or cuda")
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
        return load_torch_file(text, device=device, threads=threads)
    if is_callable_spec(text) and not Path(text).exists():
        return load_callable(text, device=device, threads=threads)
    raise UsageError(
        f"model {text!r} is not 'demo', a .onnx / .pt / .pth / .ts / .pt2 file or module:function"
    )
