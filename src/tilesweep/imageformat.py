"""Image formats from magic bytes: the one sniffer that fetch, decode and export share."""

from __future__ import annotations


def image_format(data: bytes) -> str | None:
    """The image format of ``data`` from its leading magic bytes: ``"jpeg"``, ``"png"``,
    ``"webp"``, ``"gif"``, ``"tiff"`` or ``"avif"``; None when it is none of them."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "avif"
    return None
