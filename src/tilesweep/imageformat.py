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


MAX_TILE_PX = 4096
"""The largest width or height a map tile may have (256 and 512 are usual, 1024 is rare)."""

_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def image_size(data: bytes, fmt: str | None = None) -> tuple[int, int] | None:
    """``(width, height)`` read from the header of a JPEG, PNG, WebP or GIF (``fmt`` as
    :func:`image_format` names it, sniffed when None), without decoding; None when the
    header does not hold a size (magic bytes followed by zeros or garbage) or the format
    is another. Reads at most 256 JPEG segments, so a hostile body costs microseconds."""
    fmt = fmt or image_format(data)
    if fmt == "jpeg":
        i, n = 2, len(data)
        for _ in range(256):
            if i + 4 > n or data[i] != 0xFF:
                return None
            m = data[i + 1]
            if m == 0xFF:  # fill byte
                i += 1
                continue
            if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
                i += 2
                continue
            if m in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
                return None
            length = (data[i + 2] << 8) | data[i + 3]
            if length < 2:
                return None
            if m in _JPEG_SOF:
                if i + 9 > n:
                    return None
                return (data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6]
            i += 2 + length
        return None
    if fmt == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if fmt == "webp":
        kind = data[12:16]
        if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
            return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
        if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X" and len(data) >= 30:
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        return None
    if fmt == "gif":
        if len(data) < 10:
            return None
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    return None


def tile_sized(data: bytes, fmt: str | None = None) -> bool:
    """Whether ``data`` can be a map tile: its header gives a size of 1..:data:`MAX_TILE_PX`
    pixels each way. TIFF and AVIF (rare as tiles) are let through on their magic bytes."""
    fmt = fmt or image_format(data)
    if fmt in ("tiff", "avif"):
        return True
    size = image_size(data, fmt)
    return size is not None and 1 <= size[0] <= MAX_TILE_PX and 1 <= size[1] <= MAX_TILE_PX
