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
- ``positions``: comma-separated labels (a subset of ``labels``) for which the model also
  says *where* in its input it found them (default none; an ONNX graph with a ``heatmap``
  output has them for every label, :mod:`tilesweep.model.onnxrt`)

**Positions.** A model with positions returns ``float32[N, C + 2 K]``: its ``C`` scores,
then for each of its ``K`` positioned labels, in that order, ``x`` and ``y``: where in the
input image the label's evidence peaks, as fractions ``0..1`` of its side (``x`` east,
``y`` south; pixel ``i`` spans ``i/size .. (i+1)/size``). A resized tile is the whole input,
so these are fractions of the tile; predictions then record each such label's point as
``LABEL_lon`` / ``LABEL_lat`` (degrees), which ``detections`` and the tracer use instead of
the tile centre (a tile at zoom 18 is ~150 m across; a heatmap's peak puts a tower within
~10 m). Positions need ``fit`` ``resize``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..decode import ChannelOrder, fit, normalise
from ..errors import UsageError

FitMode = Literal["resize", "chip"]

META_KEYS = ("input_size", "channel_order", "mean", "std", "fit", "labels", "threshold", "positions")
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
    positions: tuple[str, ...] = ()
    """Labels for which the model also returns where in its input it found them (see the
    module's *Positions*), in the order of ``labels``."""

    @property
    def width(self) -> int:
        """Columns of the model's output rows: ``len(labels) + 2 * len(positions)``."""
        return len(self.labels) + 2 * len(self.positions)


@runtime_checkable
class Model(Protocol):
    """A model tilesweep can run. ``predict`` maps ``float32[N, 3, size, size]`` to
    ``float32[N, info.width]`` (scores, then positions if it has any); ``name`` is what predictions record in their ``model``
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
            return own(pixels)
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
    return out


def info_from_metadata(
    meta: Mapping[str, Any],
    where: str,
    *,
    graph_size: int | None = None,
    n_outputs: int | None = None,
    positioned: bool = False,
) -> ModelInfo:
    """Read :data:`META_KEYS` from ``meta`` (strings, or plain Python values for
    callables). ``graph_size`` is the input side the weights fix, if they do;
    ``n_outputs`` the number of score columns, if known; ``positioned``: the weights give
    a position for every label (an ONNX ``heatmap`` output). ``where`` names the model in
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
    raw_pos = meta.get("positions")
    if raw_pos is None:
        positions = labels if positioned else ()
    else:
        positions = tuple(s.strip() for s in (raw_pos.split(",") if isinstance(raw_pos, str) else raw_pos) if s.strip())
        unknown = [p for p in positions if p not in labels]
        if unknown or len(set(positions)) != len(positions):
            raise UsageError(f"model {where}: positions {raw_pos!r} must name labels of {labels}, each once")
        positions = tuple(lb for lb in labels if lb in positions)
    if positions and how != "resize":
        raise UsageError(f"model {where}: positions need fit resize (a chipped tile's position is not written yet), not {how}")
    spec = InputSpec(size, order, mean, std, how)  # type: ignore[arg-type]
    return ModelInfo(spec, labels, threshold, {str(k): str(v) for k, v in meta.items()}, positions)


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
    if info.positions:
        out["positions"] = ",".join(info.positions)
    return out


def check_scores(scores: Any, n: int, info: ModelInfo, where: str) -> np.ndarray:
    """``scores`` as ``float32[n, info.width]`` (a 1-D vector is taken as one column);
    :class:`UsageError` naming the model when the shape is wrong."""
    try:
        a = np.asarray(scores, dtype=np.float32)
    except (TypeError, ValueError):
        shown = repr(scores) if len(repr(scores)) <= 40 else repr(scores)[:37] + "..."
        raise UsageError(f"model {where} returned {type(scores).__name__} {shown} for {n} inputs, not scores (float[{n}, {info.width}])") from None
    if a.ndim == 1 and info.width == 1:
        a = a[:, None]
    if a.shape != (n, info.width):
        what = f" ({len(info.labels)} scores, then x and y of {', '.join(info.positions)})" if info.positions else ""
        raise UsageError(f"model {where} returned scores of shape {a.shape} for {n} inputs, expected ({n}, {info.width}){what}")
    return a


def peak_positions(heat: np.ndarray) -> np.ndarray:
    """Where each map of ``heat`` (``float[N, C, h, w]``, logits or scores over a model's
    input; higher is more) peaks: ``float32[N, C, 2]``, ``x`` and ``y`` as fractions 0..1
    of the input's side (``x`` east, ``y`` south). The peak cell, refined by the mean of the
    cell centres of its 3 x 3 neighbourhood weighted by how far each stands above the
    neighbourhood's least value (so neither a map's offset nor its scale matters); a flat
    neighbourhood gives the peak cell's centre. On the demo model's 8 x 8 map this puts a
    tower a median ~7 m from the truth at zoom 18 (the tile centre: ~42 m; docs/model.md)."""
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 4:
        raise ValueError(f"a heatmap is float[N, C, h, w], not of shape {h.shape}")
    n, c, rows, cols = h.shape
    flat = h.reshape(n, c, rows * cols)
    peak = np.argmax(flat, axis=2)
    py, px = np.divmod(peak, cols)
    # the 3 x 3 neighbourhood, clipped at the edges (a clipped cell repeats an edge cell,
    # with weight 0 from the mask)
    off = np.array([-1, 0, 1])
    yy = py[..., None, None] + off[None, None, :, None]
    xx = px[..., None, None] + off[None, None, None, :]
    inside = (yy >= 0) & (yy < rows) & (xx >= 0) & (xx < cols)
    yc, xc = np.clip(yy, 0, rows - 1), np.clip(xx, 0, cols - 1)
    ni, ci = np.ogrid[:n, :c]
    vals = h[ni[..., None, None], ci[..., None, None], yc, xc]
    low = np.where(inside, vals, np.inf).min(axis=(2, 3), keepdims=True)
    w = np.where(inside, vals - low, 0.0)
    total = w.sum(axis=(2, 3))
    flat_nb = total <= 0
    total = np.where(flat_nb, 1.0, total)
    fy = np.where(flat_nb, py + 0.5, (w * (yc + 0.5)).sum(axis=(2, 3)) / total) / rows
    fx = np.where(flat_nb, px + 0.5, (w * (xc + 0.5)).sum(axis=(2, 3)) / total) / cols
    return np.stack([fx, fy], axis=-1).astype(np.float32)


def split_output(out: np.ndarray, info: ModelInfo) -> tuple[np.ndarray, np.ndarray | None]:
    """A model's output rows (``float32[N, info.width]``) as ``(scores float32[N, C],
    positions float32[N, K, 2] or None)``."""
    c = len(info.labels)
    if not info.positions:
        return out[:, :c], None
    return out[:, :c], out[:, c:].reshape(len(out), len(info.positions), 2)


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
    chips (a label is present in a tile if it is present in any chip). A model's positions
    are left out: :func:`score_and_place` returns them too."""
    return score_and_place(model, images, batch_size)[0]


def score_and_place(model: Model, images: Sequence[np.ndarray], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`score_tiles`, and where in each tile the model found each positioned label:
    ``(float32[N, C], float32[N, K, 2] or None)``, positions as fractions 0..1 of the tile
    (``x`` east, ``y`` south; see the module's *Positions*)."""
    info = model.info
    out = np.zeros((len(images), info.width), np.float32)
    if not len(images):
        return split_output(out, info)
    batch, owner = prepare(images, info.input)
    rows = np.concatenate(
        [check_scores(model.predict(batch[i : i + batch_size]), len(batch[i : i + batch_size]), info, model.name)
         for i in range(0, len(batch), batch_size)]
    )
    if len(batch) == len(images):
        return split_output(rows, info)
    out[:] = -np.inf  # chipped (positions need resize: one row per tile otherwise)
    np.maximum.at(out, owner, rows)
    return split_output(out, info)


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
