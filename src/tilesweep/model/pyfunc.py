"""Python models named ``module:attr`` (``mypkg.models:score``).

``attr`` (dots allowed: ``module:Class.method``) is resolved after importing ``module``
from ``sys.path`` (the current directory included) and may be:

- an object that already is a :class:`~tilesweep.model.base.Model` (has ``name``,
  ``digest``, ``info`` and ``predict``): used as it is;
- a ``torch.nn.Module`` instance: run through :class:`~tilesweep.model.torchmodel.TorchModel`;
- any other callable ``f(batch: float32[N, 3, size, size]) -> float32[N, C]``.

For the last two, optional attributes on the object describe it, with the metadata keys
of :mod:`tilesweep.model.base` as names: ``input_size`` (default 256), ``channel_order``,
``mean``, ``std``, ``fit``, ``labels`` (a list or a comma-separated string) and
``threshold``.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any, Callable

import numpy as np

from ..errors import UsageError
from .base import META_KEYS, Model, ModelInfo, info_from_metadata

SPEC_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
"""``module.path:attr.path``: Python identifiers joined by dots, one colon."""


def is_callable_spec(spec: str) -> bool:
    """Whether ``spec`` reads as ``module:attr`` (and so is not a file path)."""
    return bool(SPEC_RE.match(spec))


def resolve(spec: str) -> Any:
    """Import ``module`` and return its ``attr``; :class:`UsageError` naming what is missing."""
    if not is_callable_spec(spec):
        raise UsageError(f"model {spec!r} is not module:function")
    mod_name, attr = spec.split(":", 1)
    if "" not in sys.path:  # `tilesweep` run as a console script: let the cwd's modules import
        sys.path.insert(0, "")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"model {spec!r}: cannot import module {mod_name!r} ({exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"model {spec!r}: {mod_name!r} has no attribute {attr!r}") from None
    return obj


def _meta_of(obj: Any) -> dict[str, Any]:
    meta = {k: getattr(obj, k) for k in META_KEYS if getattr(obj, k, None) is not None}
    meta.setdefault("input_size", 256)
    return meta


class CallableModel:
    """A plain Python function (or callable object) as a model."""

    def __init__(self, fn: Callable[[np.ndarray], Any], info: ModelInfo, name: str) -> None:
        self.fn = fn
        self.info = info
        self.name = name
        self.digest = ""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``float32[N, 3, size, size]`` -> ``float32[N, C]`` (shape checked by the caller;
        an answer that is not numbers is a :class:`UsageError` naming the model)."""
        from .base import check_scores

        return check_scores(self.fn(batch), len(batch), self.info, self.name)

    def __repr__(self) -> str:
        return f"CallableModel({self.name!r})"


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def load_callable(spec: str, *, device: str = "auto", threads: int | None = None, precision: str = "fp32",
                  channels_last: bool = False) -> Model:
    """The model ``module:attr`` names (see the module docstring); ``precision`` and
    ``channels_last`` apply to a ``torch.nn.Module`` (:class:`~.torchmodel.TorchModel`)."""
    obj = resolve(spec)
    if isinstance(obj, Model) and isinstance(getattr(obj, "info", None), ModelInfo):
        return obj
    if _is_torch_module(obj):
        from .torchmodel import TorchModel

        return TorchModel(obj, _meta_of(obj), name=spec, device=device, threads=threads,  # type: ignore[arg-type]
                          precision=precision, channels_last=channels_last)  # type: ignore[arg-type]
    if not callable(obj):
        raise UsageError(f"model {spec!r} is a {type(obj).__name__}, not a function or model")
    return CallableModel(obj, info_from_metadata(_meta_of(obj), spec), spec)
