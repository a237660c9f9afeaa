"""PyTorch models: TorchScript files (``.pt``, ``.pth``, ``.ts``), ``torch.export``
programs (``.pt2``) and ``torch.nn.Module`` objects named as ``module:attr``.

PyTorch is optional: without it, loading such a model is one clear :class:`UsageError`.
Metadata (see :mod:`tilesweep.model.base`) comes from a ``tilesweep.json`` extra file
saved beside the weights (``torch.jit.save(m, path, _extra_files={"tilesweep.json":
...})``, or ``torch.export.save(..., extra_files=...)``), or from attributes of a module.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import UsageError
from .base import ModelInfo, info_from_metadata
from .onnxrt import Device, file_digest

EXTRA_FILE = "tilesweep.json"
TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".pt2")


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
    ``[N]`` for one label). ``threads`` sets ``torch.set_num_threads`` (process-wide)."""

    def __init__(
        self,
        module: Any,
        meta: Mapping[str, Any],
        *,
        name: str,
        digest: str = "",
        device: Device = "auto",
        threads: int | None = None,
    ) -> None:
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

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``."""
        return str(self.device_.type)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32[N, 3, size, size]`` -> ``float32[N, C]`` scores."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device_)
        with torch.inference_mode():
            out = self.module(x)
        out = out.detach().float().cpu().numpy()
        return out.reshape(len(batch), -1)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """``uint8[N, size, size, 3]`` RGB -> ``float32[N, C]``: the uint8 pixels go to the
        device as they are and are normalised there (what :func:`tilesweep.decode.normalise`
        does on the CPU, same numbers to float rounding)."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)).to(self.device_)
        x = x.permute(0, 3, 1, 2)
        if self._bgr:
            x = x.flip(1)
        x = x.float().mul_(self._scale).add_(self._shift).contiguous()
        with torch.inference_mode():
            out = self.module(x)
        return out.detach().float().cpu().numpy().reshape(len(pixels), -1)

    def __repr__(self) -> str:
        return f"TorchModel({self.name!r}, device={self.device!r})"


def load_torch_file(path: str | os.PathLike[str], *, device: Device = "auto", threads: int | None = None) -> TorchModel:
    """Load a TorchScript (``.pt``, ``.pth``, ``.ts``) or ``torch.export`` (``.pt2``) file."""
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
    return TorchModel(module, meta, name=p.name, digest=file_digest(p), device=device, threads=threads)
