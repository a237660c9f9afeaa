"""A minimal Mapbox Vector Tile (MVT 2.1) encoder for axis-aligned squares.

The viewer's overlays are squares: prediction tiles, aggregate cells, blocks. Each is a
polygon of four corners in tile coordinates (``0..extent``, y down), so the encoder needs
no geometry library: one layer, polygon features, integer or float properties. Written by
hand to keep the viewer free of a compiled dependency; MapLibre reads the result as any
vector tile.
"""

from __future__ import annotations

from typing import Iterable, Sequence

EXTENT = 4096


def _varint(n: int, out: bytearray) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zz(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _field(num: int, wire: int, out: bytearray) -> None:
    _varint((num << 3) | wire, out)


def _bytes_field(num: int, payload: bytes | bytearray, out: bytearray) -> None:
    _field(num, 2, out)
    _varint(len(payload), out)
    out += payload


def _value(v: int | float | str) -> bytes:
    out = bytearray()
    if isinstance(v, bool):
        _field(7, 0, out)
        _varint(int(v), out)
    elif isinstance(v, int):
        if v >= 0:
            _field(5, 0, out)  # uint_value
            _varint(v, out)
        else:
            _field(6, 0, out)  # sint_value
            _varint(_zz(v), out)
    elif isinstance(v, float):
        import struct

        _field(3, 1, out)  # double_value
        out += struct.pack("<d", v)
    else:
        _bytes_field(1, str(v).encode(), out)
    return bytes(out)


def encode_squares(
    layer: str,
    squares: Iterable[tuple[int, int, int, int]],
    properties: Sequence[str] = (),
    values: Iterable[Sequence[int | float | str]] = (),
    extent: int = EXTENT,
) -> bytes:
    """One MVT layer of polygon squares ``(x0, y0, x1, y1)`` in tile units (y down),
    each with ``properties`` taken in order from the matching row of ``values``. An empty
    ``squares`` gives a valid tile with an empty layer."""
    keys = list(properties)
    value_index: dict[tuple[type, int | float | str], int] = {}
    value_list: list[bytes] = []
    features = bytearray()
    rows = iter(values)
    for x0, y0, x1, y1 in squares:
        row = next(rows) if keys else ()
        feat = bytearray()
        if keys:
            tags = bytearray()
            for k, v in enumerate(row):
                key = (type(v), v)
                idx = value_index.get(key)
                if idx is None:
                    idx = value_index[key] = len(value_list)
                    value_list.append(_value(v))
                _varint(k, tags)
                _varint(idx, tags)
            _bytes_field(2, tags, feat)
        _field(3, 0, feat)
        _varint(3, feat)  # POLYGON
        w, h = x1 - x0, y1 - y0
        geom = bytearray()
        # The cursor starts at (0, 0) in every feature (spec 4.3.1 is per feature).
        for v in (9, _zz(x0), _zz(y0), 26, _zz(w), 0, 0, _zz(h), _zz(-w), 0, 15):
            _varint(v, geom)
        _bytes_field(4, geom, feat)
        _bytes_field(2, feat, features)
    body = bytearray()
    _field(15, 0, body)
    _varint(2, body)
    _bytes_field(1, layer.encode(), body)
    body += features
    for name in keys:
        _bytes_field(3, name.encode(), body)
    for value in value_list:
        _bytes_field(4, value, body)
    _field(5, 0, body)
    _varint(extent, body)
    out = bytearray()
    _bytes_field(3, body, out)
    return bytes(out)
