"""What a model is to tilesweep: an input spec, labels and ``predict``.

A model takes ``float32[N, 3, H, W]`` (already resized, reordered and normalised as its
:class:`InputSpec` says) and returns ``float32[N, C]`` scores, one column per label.
:func:`score_tiles` does the fitting around it: decoded tiles in, one score row per tile
out, whatever the tile size.

Models describe themselves with string metadata (ONNX ``metadata_props``, a TorchScript
``tilesweep.json`` extra file, attributes of a Python callable), under these keys:

- ``input_size``: square input side, px (default: the graph's fixed side)
- ``channel_order``: ``RGB`` or ``BGR`` (default ``RGB``)
- ``mean``, ``std``: per channel, 0..1 units, comma-separated (default ``0,0,0``, ``1,1,1``)
- ``fit``: ``resize`` or ``chip`` (see :func:`tilesweep.decode.fit`; default ``resize``)
- ``labels``: comma-separated names, one per score column (default ``score``/``score_i``)
- ``threshold``: score at or above which a label counts as present (default 0.5)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..decode import ChannelOrder, fit, normalise
from ..errors import UsageError

FitMode = Literal["resize", "chip"]

META_KEYS = ("input_size", "channel_order", "mean", "std", "fit", "labels", "threshold")
"""The metadata keys tilesweep reads from a model (other keys are kept, not read)."""


@dataclass(frozen=True)
class InputSpec:
    """How a tile becomes a model input.

    ``size``: square side in px. ``channel_order``: ``RGB`` or ``BGR``. ``mean`` and
    ``std``: per channel, in 0..1 units, in the model's channel order; the input is
    ``(x / 255 - mean) / std``. ``fit``: ``resize`` resamples a tile to ``size``;
    ``chip`` cuts tiles whose side is a multiple of ``size`` into chips and scores the
    tile as the maximum over its chips."""

    size: int = 256
    channel_order: ChannelOrder = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    fit: FitMode = "resize"


@dataclass(frozen=True)
class ModelInfo:
    """Everything about a model but its weights: input spec, labels, threshold, metadata."""

    input: InputSpec
    labels: tuple[str, ...]
    threshold: float = 0.5
    metadata: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Model(Protocol):
    """A model tilesweep can run. ``predict`` maps ``float32[N, 3, size, size]`` to
    ``float32[N, len(labels)]``; ``name`` is what predictions record in their ``model``
    column; ``digest`` is a hash of the weights file (empty for callables)."""

    name: str
    digest: str
    info: ModelInfo

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


def predict_pixels(model: Model, pixels: np.ndarray) -> np.ndarray:
    """Scores of ``uint8[N, size, size, 3]`` RGB inputs: the model's own
    ``predict_pixels`` when it has one (a GPU model uploads the uint8 pixels, 4x fewer bytes
    than float32, and normalises them on the device), else :func:`tilesweep.decode.normalise`
    on the CPU, then ``predict``."""
    own = getattr(model, "predict_pixels", None)
    if own is not None and (isinstance(pixels, np.ndarray) or getattr(model, "accepts_device_pixels", False)):
        return own(pixels)  # type: ignore[no-any-return]
    if not isinstance(pixels, np.ndarray):  # a torch tensor decoded on the GPU, for a model that wants numpy
        pixels = pixels.cpu().numpy()
        if own is not None:
            return own(pixels)  # type: ignore[no-any-return]
    from ..decode import normalise

    spec = model.info.input
    return model.predict(normalise(pixels, spec.mean, spec.std, spec.channel_order))


def _floats3(value: Any, key: str, where: str) -> tuple[float, float, float]:
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        out = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise UsageError(f"model {where}: {key} {value!r} is not three numbers")
    return out  # type: ignore[return-value]


def info_from_metadata(
    meta: Mapping[str, Any],
    where: str,
    *,
    graph_size: int | None = None,
    n_outputs: int | None = None,
) -> ModelInfo:
    """Read :data:`META_KEYS` from ``meta`` (strings, or plain Python values for
    callables). ``graph_size`` is the input side the weights fix, if they do;
    ``n_outputs`` the number of score columns, if known. ``where`` names the model in
    the one-line :class:`UsageError` raised for a bad or missing value."""
    raw = meta.get("input_size")
    if raw is None:
        if graph_size is None:
            raise UsageError(f"model {where}: the input size is neither fixed by the graph nor given as input_size metadata")
        size = graph_size
    else:
        try:
            size = int(raw)
        except (TypeError, ValueError):
            raise UsageError(f"model {where}: input_size {raw!r} is not a whole number of pixels") from None
        if graph_size is not None and graph_size != size:
            raise UsageError(f"model {where}: input_size {size} disagrees with the graph's input side {graph_size}")
    if size < 8:
        raise UsageError(f"model {where}: input_size {size} is too small (8 px at least)")
    order = str(meta.get("channel_order", "RGB")).upper()
    if order not in ("RGB", "BGR"):
        raise UsageError(f"model {where}: channel_order {meta.get('channel_order')!r} is not RGB or BGR")
    mean = _floats3(meta.get("mean", (0.0, 0.0, 0.0)), "mean", where)
    std = _floats3(meta.get("std", (1.0, 1.0, 1.0)), "std", where)
    if min(std) <= 0:
        raise UsageError(f"model {where}: std {std} must be positive")
    how = str(meta.get("fit", "resize")).lower()
    if how not in ("resize", "chip"):
        raise UsageError(f"model {where}: fit {meta.get('fit')!r} is not resize or chip")
    raw_labels = meta.get("labels")
    if raw_labels is None:
        n = 1 if n_outputs is None else n_outputs
        labels = ("score",) if n == 1 else tuple(f"score_{i}" for i in range(n))
    else:
        labels = tuple(s.strip() for s in (raw_labels.split(",") if isinstance(raw_labels, str) else raw_labels))
        if not labels or any(not s for s in labels):
            raise UsageError(f"model {where}: labels {raw_labels!r} has an empty name")
        if n_outputs is not None and len(labels) != n_outputs:
            raise UsageError(f"model {where}: {len(labels)} labels {labels} for {n_outputs} score columns")
    try:
        threshold = float(meta.get("threshold", 0.5))
    except (TypeError, ValueError):
        raise UsageError(f"model {where}: threshold {meta.get('threshold')!r} is not a number") from None
    spec = InputSpec(size, order, mean, std, how)  # type: ignore[arg-type]
    return ModelInfo(spec, labels, threshold, {str(k): str(v) for k, v in meta.items()})


def info_to_metadata(info: ModelInfo) -> dict[str, str]:
    """The metadata strings that describe ``info`` (what :func:`info_from_metadata` reads)."""
    s = info.input
    out = dict(info.metadata)
    out.update(
        input_size=str(s.size),
        channel_order=s.channel_order,
        mean=",".join(f"{v:.6g}" for v in s.mean),
        std=",".join(f"{v:.6g}" for v in s.std),
        fit=s.fit,
        labels=",".join(info.labels),
        threshold=f"{info.threshold:g}",
    )
    return out


def check_scores(scores: Any, n: int, info: ModelInfo, where: str) -> np.ndarray:
    """``scores`` as ``float32[n, len(labels)]`` (a 1-D vector is taken as one column);
    :class:`UsageError` naming the model when the shape is wrong."""
    try:
        a = np.asarray(scores, dtype=np.float32)
    except (TypeError, ValueError):
        shown = repr(scores) if len(repr(scores)) <= 40 else repr(scores)[:37] + "..."
        raise UsageError(f"model {where} returned {type(scores).__name__} {shown} for {n} inputs, not scores (float[{n}, {len(info.labels)}])") from None
    if a.ndim == 1 and len(info.labels) == 1:
        a = a[:, None]
    if a.shape != (n, len(info.labels)):
        raise UsageError(f"model {where} returned scores of shape {a.shape} for {n} inputs, expected ({n}, {len(info.labels)})")
    return a


def prepare(images: Sequence[np.ndarray], spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Fit and normalise decoded tiles (each ``uint8[H, W, 3]`` RGB) for a model.

    Returns ``(batch, owner)``: ``float32[M, 3, size, size]`` and ``int64[M]``, the index
    of the tile each row came from (``M > len(images)`` when tiles are chipped)."""
    parts = [fit(img, spec.size, spec.fit) for img in images]
    owner = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
    if not parts:
        return np.zeros((0, 3, spec.size, spec.size), np.float32), owner
    batch = normalise(np.concatenate(parts), spec.mean, spec.std, spec.channel_order)
    return batch, owner


def score_tiles(model: Model, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Score decoded tiles: ``float32[len(images), len(labels)]``.

    Tiles are fitted and normalised by the model's :class:`InputSpec`, run in batches of
    at most ``batch_size`` model inputs, and a chipped tile gets the maximum over its
    chips (a label is present in a tile if it is present in any chip)."""
    info = model.info
    out = np.zeros((len(images), len(info.labels)), np.float32)
    if not len(images):
        return out
    batch, owner = prepare(images, info.input)
    scores = np.concatenate(
        [check_scores(model.predict(batch[i : i + batch_size]), len(batch[i : i + batch_size]), info, model.name)
         for i in range(0, len(batch), batch_size)]
    )
    if len(batch) == len(images):
        return scores
    out[:] = -np.inf
    np.maximum.at(out, owner, scores)
    return out


def describe(model: Model) -> str:
    """One line: name, input, labels (for logs and ``--help`` output)."""
    s = model.info.input
    return (
        f"{model.name}: {s.size}x{s.size} {s.channel_order} ({s.fit}), "
        f"labels {','.join(model.info.labels)}, threshold {model.info.threshold:g}"
    )


def metadata_json(info: ModelInfo) -> str:
    """``info`` as the JSON text of a TorchScript ``tilesweep.json`` extra file."""
    return json.dumps(info_to_metadata(info), sort_keys=True)
