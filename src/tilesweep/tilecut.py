"""Cutting one image of n x n tiles into its tiles, losslessly where the format allows.

- **JPEG**: a lossless crop (libjpeg-turbo's ``tjTransform``, through PyTurboJPEG): the
  tiles' DCT coefficients are the source's own, nothing is decoded or re-encoded. 256 px
  tiles sit on MCU boundaries (8 or 16 px), so every crop is exact. When a server encodes
  its big image block by block as it encodes a tile (the simulator does), the cut tile is
  byte for byte the tile it serves alone. About 0.4 ms a 256 px tile.
- **JPEG without libturbojpeg** (the library is a system package, ``libturbojpeg0``): decode
  with simplejpeg and re-encode each tile at quality 95: a second generation of loss
  (small at 95, but the bytes are not the source's) and ~1.5 ms a tile. :data:`JPEG_CUT`
  says which is in use; a warning says so once.
- **PNG, WebP**: decoded and each tile re-encoded without loss of pixels (PNG, lossless
  WebP; PIL keeps the image's mode, greyscale or palette): the pixels are the source's,
  the bytes are ours. A lossy WebP is re-encoded lossy at quality 90 (a second generation
  of loss; lossless would be ~4x its bytes). The JPEG fallback keeps greyscale and CMYK.

Other formats are refused (:class:`CutError`).
"""

from __future__ import annotations

import io
import logging
from typing import Any, Sequence

from .imageformat import image_format

log = logging.getLogger(__name__)

_turbo: Any = None
_turbo_failed = False


def _turbojpeg() -> Any:
    """The TurboJPEG handle (built once), or None when PyTurboJPEG or libturbojpeg is missing."""
    global _turbo, _turbo_failed
    if _turbo is None and not _turbo_failed:
        try:
            from turbojpeg import TurboJPEG

            _turbo = TurboJPEG()
        except Exception as exc:  # ImportError, or RuntimeError/OSError: no usable libturbojpeg
            _turbo_failed = True
            log.warning("lossless JPEG cutting unavailable (%s): super-tiles are re-encoded at quality 95", exc)
    return _turbo


def jpeg_cut_mode() -> str:
    """``"lossless"`` (libjpeg-turbo transform) or ``"re-encoded"`` (simplejpeg, quality 95)."""
    return "lossless" if _turbojpeg() is not None else "re-encoded"


class CutError(ValueError):
    """An image that cannot be cut into tiles (broken, or a format we do not cut)."""


def cut(body: bytes, tile_px: int, cells: Sequence[tuple[int, int]], max_bytes: int = 0) -> list[bytes]:
    """The tiles of an image of whole tiles: for each ``(column, row)`` in ``cells``
    (counted from the north-west, in tiles of ``tile_px`` pixels), that tile's encoded
    bytes, in the image's own format. The caller has checked the image's size.
    :class:`CutError` for a broken image, a format other than JPEG, PNG and WebP, or a cut
    tile over ``max_bytes`` bytes (0: no limit). A JPEG's APPn and COM markers (EXIF, ICC,
    XMP) are not copied into the tiles: a profile of megabytes would be in every one."""
    fmt = image_format(body)
    boxes = [(c * tile_px, r * tile_px, tile_px, tile_px) for c, r in cells]
    try:
        if fmt == "jpeg":
            tj = _turbojpeg()
            if tj is not None:
                out = [bytes(b) for b in tj.crop_multiple(body, boxes, copynone=True)]
            else:
                out = _jpeg_reencoded(body, boxes)
        elif fmt in ("png", "webp"):
            out = _pixels_kept(body, boxes, fmt)
        else:
            raise CutError(f"cannot cut a {fmt or 'non-image'} body into tiles (JPEG, PNG and WebP can be cut)")
    except CutError:
        raise
    except Exception as exc:  # the libraries raise OSError, ValueError, RuntimeError...
        raise CutError(f"cannot cut the {fmt} image ({len(body):,} bytes): {exc}") from None
    if max_bytes:
        big = max(len(b) for b in out) if out else 0
        if big > max_bytes:
            raise CutError(f"a cut {fmt} tile has {big:,} bytes, over {max_bytes:,} (max tile bytes)")
    return out


def _jpeg_reencoded(body: bytes, boxes: list[tuple[int, int, int, int]]) -> list[bytes]:
    import numpy as np
    import simplejpeg

    # keep a greyscale or CMYK image so (tjTransform keeps every colour space anyway)
    space = {"Gray": "GRAY", "CMYK": "CMYK"}.get(simplejpeg.decode_jpeg_header(body)[2], "RGB")
    img = simplejpeg.decode_jpeg(body, colorspace=space)
    sub = "Gray" if space == "GRAY" else "444"
    return [simplejpeg.encode_jpeg(np.ascontiguousarray(img[y : y + h, x : x + w]), quality=95, colorspace=space,
                                   colorsubsampling=sub)
            for x, y, w, h in boxes]


def _webp_lossy(body: bytes) -> bool:
    """Whether a WebP holds a lossy (``VP8 ``) rather than a lossless (``VP8L``) bitstream."""
    i = 12
    while i + 8 <= len(body):
        fourcc, size = body[i : i + 4], int.from_bytes(body[i + 4 : i + 8], "little")
        if fourcc in (b"VP8 ", b"VP8L"):
            return fourcc == b"VP8 "
        i += 8 + size + (size & 1)
    return False


def _pixels_kept(body: bytes, boxes: list[tuple[int, int, int, int]], fmt: str) -> list[bytes]:
    from PIL import Image

    lossy = fmt == "webp" and _webp_lossy(body)
    with Image.open(io.BytesIO(body)) as img:
        img.load()
        out = []
        for x, y, w, h in boxes:
            buf = io.BytesIO()
            tile = img.crop((x, y, x + w, y + h))
            if fmt == "png":
                tile.save(buf, "PNG", compress_level=6)
            elif lossy:  # a lossy WebP re-encoded losslessly would be ~4x its bytes
                tile.save(buf, "WEBP", quality=90)
            else:
                tile.save(buf, "WEBP", lossless=True)
            out.append(buf.getvalue())
        return out


__all__ = ["CutError", "cut", "jpeg_cut_mode"]
