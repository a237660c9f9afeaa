"""PyTorch models: TorchScript files (``.pt``, ``.pth``, ``.ts``), ``torch.export``
programs (``.pt2``) and ``torch.nn.Module`` objects named as ``module:attr``.

PyTorch is optional: without it, loading such a model is one clear :class:`UsageError`.
Metadata (see :mod:`tilesweep.model.base`) comes from a ``tilesweep.json`` extra file
saved beside the weights (``torch.jit.save(m, path, _extra_files={"tilesweep.json":
...})``, or ``torch.export.save(..., extra_files=...)``), or from attributes of a module.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from ..errors import UsageError
from .base import ModelInfo, info_from_metadata
from .onnxrt import Device, file_digest

EXTRA_FILE = "tilesweep.json"
TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".pt2")

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
"""``fp32``: as the weights are; ``bf16`` / ``fp16``: ``torch.autocast`` to that type (the
weights stay fp32; convolutions and matrix products run in the lower precision)."""


def check_precision(precision: str, where: str) -> None:
    """One-line :class:`UsageError` for a precision that is not fp32, bf16 or fp16."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not fp32, bf16 or fp16")


def import_torch(what: str) -> Any:
    """``import torch``, or a one-line :class:`UsageError` saying that ``what`` needs it."""
    try:
        import torch
    except ImportError:
        raise UsageError(f"model {what} needs PyTorch, which is not installed here (pip install torch, or export the model to ONNX)") from None
    return torch


def _pick_device(torch: Any, device: Device, where: str) -> Any:
    has_cuda = bool(torch.cuda.is_available())
    if device == "cuda" and not has_cuda:
        raise UsageError(f"model {where}: device cuda asked for, but PyTorch sees no CUDA device")
    return torch.device("cuda" if has_cuda and device != "cpu" else "cpu")


class TorchModel:
    """A ``torch.nn.Module`` (scripted, exported or eager) run in inference mode.

    The module takes ``float32[N, 3, size, size]`` and returns ``[N, C]`` scores (or
    ``[N]`` for one label). ``threads`` sets ``torch.set_num_threads`` (process-wide).

    ``precision``: ``fp32`` (default), or ``bf16`` / ``fp16`` mixed precision through
    ``torch.autocast`` on the model's device (scores still come back as float32; on a GPU
    with tensor cores a ResNet-50 runs several times faster; the scores move by a few
    thousandths, see tests/test_gpu_paths.py). ``channels_last``: the module's weights and
    each input batch in NHWC memory order, which cuDNN's convolutions prefer; a module that
    cannot be moved (some TorchScript or exported programs) keeps its layout and
    :attr:`channels_last` says False."""

    def __init__(
        self,
        module: Any,
        meta: Mapping[str, Any],
        *,
        name: str,
        digest: str = "",
        device: Device = "auto",
        threads: int | None = None,
        precision: Precision = "fp32",
        channels_last: bool = False,
    ) -> None:
        check_precision(precision, name)
        torch = import_torch(name)
        self.torch = torch
        self.name = name
        self.digest = digest
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.device_ = _pick_device(torch, device, name)
        self.module = module.to(self.device_) if hasattr(module, "to") else module
        try:
            self.module.eval()
        except (AttributeError, NotImplementedError):  # torch.export modules are fixed in eval form
            pass
        self.info: ModelInfo = info_from_metadata(meta, name)
        spec = self.info.input
        # (x / 255 - mean) / std as one multiply-add on the device, per channel in model order
        std = torch.tensor(spec.std, dtype=torch.float32, device=self.device_).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device_).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        self._bgr = spec.channel_order == "BGR"
        self.precision: Precision = precision
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.channels_last = False
        if channels_last:
            try:
                self.module = self.module.to(memory_format=torch.channels_last)
                self.channels_last = True
            except Exception:  # noqa: BLE001 - a module that cannot be moved keeps NCHW
                self.channels_last = False

    def _run(self, x: Any) -> Any:
        """The module on ``x`` (float32 NCHW on the device) in inference mode, with the
        precision and memory order asked for; float32 ``[N, C]`` back on the CPU."""
        torch = self.torch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(self.device_.type, dtype=self._autocast_dtype)
               if self._autocast_dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            out = self.module(x)
        return out.detach().float().cpu().numpy()

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``."""
        return str(self.device_.type)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32[N, 3, size, size]`` -> ``float32[N, C]`` scores."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device_)
        return self._run(x).reshape(len(batch), -1)

    accepts_device_pixels = True
    """:meth:`predict_pixels` also takes a torch tensor already on the device (the GPU
    decode path, :mod:`tilesweep.predict.gpudecode`)."""

    def predict_pixels(self, pixels: Any) -> np.ndarray:
        """``uint8[N, size, size, 3]`` RGB -> ``float32[N, C]``: the uint8 pixels go to the
        device as they are and are normalised there (what :func:`tilesweep.decode.normalise`
        does on the CPU, same numbers to float rounding). ``pixels``: a numpy array, or a
        torch tensor (on any device: one decoded on the GPU is not moved)."""
        torch = self.torch
        if isinstance(pixels, torch.Tensor):
            x = pixels.to(self.device_, non_blocking=True)
        else:
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)).to(self.device_)
        x = x.permute(0, 3, 1, 2)
        if self._bgr:
            x = x.flip(1)
        x = x.float().mul_(self._scale).add_(self._shift)
        if not self.channels_last:
            x = x.contiguous()
        return self._run(x).reshape(len(pixels), -1)

    def __repr__(self) -> str:
        extra = (f", precision={self.precision!r}" if self.precision != "fp32" else "") + (", channels_last" if self.channels_last else "")
        return f"TorchModel({self.name!r}, device={self.device!r}{extra})"


def load_torch_file(path: str | os.PathLike[str], *, device: Device = "auto", threads: int | None = None,
                    precision: Precision = "fp32", channels_last: bool = False) -> TorchModel:
    """Load a TorchScript (``.pt``, ``.pth``, ``.ts``) or ``torch.export`` (``.pt2``) file
    (``precision``, ``channels_last``: see :class:`TorchModel`)."""
    p = Path(path)
    where = os.fspath(path)
    if not p.is_file():
        raise UsageError(f"model file {where!r} does not exist")
    torch = import_torch(repr(where))
    extra = {EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():  # torch.jit.* warn that they are deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            if p.suffix == ".pt2":
                program = torch.export.load(where, extra_files=extra)
                if _pick_device(torch, device, where).type == "cuda":
                    from torch.export.passes import move_to_device_pass

                    program = move_to_device_pass(program, "cuda")
                module = program.module()
            else:
                module = torch.jit.load(where, map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError, ValueError, pickle errors ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        kind = "torch.export program" if p.suffix == ".pt2" else "TorchScript archive"
        raise UsageError(
            f"model file {where!r} is not a loadable {kind} ({first}); save it with "
            "torch.jit.save / torch.export.save, or name a module:function that builds it"
        ) from None
    raw = extra.get(EXTRA_FILE) or ""
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, TypeError):
        raise UsageError(f"model file {where!r}: its {EXTRA_FILE} is not JSON") from None
    if not isinstance(meta, dict):
        raise UsageError(f"model file {where!r}: its {EXTRA_FILE} is not a JSON object")
    return TorchModel(module, meta, name=p.name, digest=file_digest(p), device=device, threads=threads,
                      precision=precision, channels_last=channels_last)
