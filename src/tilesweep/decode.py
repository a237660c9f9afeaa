"""Tile bytes to pixels, and pixels to a model's input.

Everything here is a pure function over numpy arrays:

- :func:`decode`: JPEG, PNG or WebP bytes -> ``uint8[H, W, 3]`` RGB, rows from the north.
  JPEG goes through libjpeg-turbo (``simplejpeg``) when it is installed, Pillow otherwise.
- :func:`resize` and :func:`chips`: fit a tile to a model's square input, either by
  resampling (a 256 px tile into a 224 px model) or by cutting it into chips (a 512 px
  ``@2x`` tile into four 256 px chips).
- :func:`normalise`: a stack of ``uint8[N, H, W, 3]`` RGB images -> ``float32[N, 3, H, W]``
  in the model's channel order, ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

import io
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from .imageformat import image_format

try:  # libjpeg-turbo; optional, Pillow decodes everything when it is missing
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is absent
    _simplejpeg = None

ChannelOrder = Literal["RGB", "BGR"]
ImageFormat = Literal["jpeg", "png", "webp"]

JPEG_BACKEND = "simplejpeg" if _simplejpeg is not None else "pillow"
"""Which library decodes JPEG here: ``simplejpeg`` (libjpeg-turbo) or ``pillow``."""


class DecodeError(ValueError):
    """Bytes that are not a readable JPEG, PNG or WebP image (a truncated or HTML body)."""


def sniff(data: bytes) -> ImageFormat | None:
    """The image format from the first bytes (magic numbers), or ``None`` if unknown."""
    fmt = image_format(bytes(data[:12]))
    return fmt if fmt in ("jpeg", "png", "webp") else None  # type: ignore[return-value]


def decode(data: bytes, *, use_pillow: bool = False) -> np.ndarray:
    """Decode image bytes to ``uint8[H, W, 3]`` RGB (values 0..255, rows from the north).

    Grey, palette and alpha images are converted to RGB (alpha is dropped). JPEG uses
    libjpeg-turbo through simplejpeg unless it is missing or ``use_pillow`` is set.
    Raises :class:`DecodeError` (one line) for bytes that are not an image."""
    fmt = sniff(data)
    if fmt is None:
        raise DecodeError(f"{len(data)} bytes starting {bytes(data[:8])!r} are not a JPEG, PNG or WebP image")
    if fmt == "jpeg" and _simplejpeg is not None and not use_pillow:
        try:
            return _simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError as exc:
            raise DecodeError(f"broken JPEG ({len(data)} bytes): {exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"broken {fmt.upper()} ({len(data)} bytes): {exc}") from None


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"size {size!r} must be positive")
    return int(h), int(w)


def resize(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resample ``uint8[H, W, 3]`` to ``size`` (side in px, or ``(height, width)``).

    An exact integer reduction (256 -> 128) averages k x k pixel boxes; any other ratio
    (256 -> 224, 256 -> 384) uses antialiased bilinear resampling. Returns the input
    itself when it already has the size."""
    h, w = _size2(size)
    if img.shape[:2] == (h, w):
        return img
    pil = Image.fromarray(np.ascontiguousarray(img), "RGB")
    H, W = img.shape[:2]
    if H % h == 0 and W % w == 0 and H // h == W // w:
        return np.asarray(pil.reduce(H // h))
    return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR))


def chips(img: np.ndarray, size: int) -> np.ndarray:
    """Cut ``uint8[H, W, 3]`` into non-overlapping ``size`` px squares, row by row from
    the north-west: ``uint8[(H/size) * (W/size), size, size, 3]``.

    A 512 px tile and ``size=256`` give four chips in the order NW, NE, SW, SE. Both
    sides must be multiples of ``size`` (``ValueError`` otherwise)."""
    H, W = img.shape[:2]
    if size < 1 or H % size or W % size:
        raise ValueError(f"a {H}x{W} image does not split into {size} px chips")
    r, c = H // size, W // size
    out = img[: r * size, : c * size].reshape(r, size, c, size, img.shape[2]).swapaxes(1, 2)
    return out.reshape(r * c, size, size, img.shape[2])


def fit(img: np.ndarray, size: int, how: Literal["resize", "chip"] = "resize") -> np.ndarray:
    """Fit one ``uint8[H, W, 3]`` tile to a square ``size`` px model input.

    ``resize`` gives ``uint8[1, size, size, 3]``; ``chip`` cuts the tile into
    ``(H/size) * (W/size)`` chips when both sides are multiples of ``size`` and resizes
    otherwise (a 512 px tile into a 256 px model gives four chips; a 256 px tile into a
    224 px model is resized)."""
    H, W = img.shape[:2]
    if (H, W) == (size, size):
        return img[None]
    if how == "chip" and H % size == 0 and W % size == 0:
        return chips(img, size)
    return resize(img, size)[None]


def normalise(
    batch: np.ndarray | Sequence[np.ndarray],
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    channel_order: ChannelOrder = "RGB",
) -> np.ndarray:
    """``uint8[N, H, W, 3]`` RGB -> ``float32[N, 3, H, W]`` ready for a model.

    Pixels are scaled to 0..1 (``x / 255``), reordered to ``channel_order`` and then
    standardised per channel, ``(x - mean) / std``, with ``mean`` and ``std`` given in
    0..1 units and in the model's channel order (ImageNet's RGB values are
    ``(0.485, 0.456, 0.406)`` and ``(0.229, 0.224, 0.225)``)."""
    a = np.asarray(batch)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected uint8[N, H, W, 3], got an array of shape {a.shape}")
    if channel_order == "BGR":
        a = a[..., ::-1]
    elif channel_order != "RGB":
        raise ValueError(f"channel order {channel_order!r} is not RGB or BGR")
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    if np.any(s <= 0):
        raise ValueError(f"std {tuple(std)} must be positive")
    scale = (1.0 / (255.0 * s)).astype(np.float32)
    x = np.ascontiguousarray(a.transpose(0, 3, 1, 2)).astype(np.float32)
    x *= scale
    x -= m / s
    return x


__all__ = ["DecodeError", "JPEG_BACKEND", "ChannelOrder", "chips", "decode", "fit", "normalise", "resize", "sniff"]
