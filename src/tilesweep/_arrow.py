"""Arrow arrays from numpy without pyarrow's pandas check.

``pa.array()`` imports pandas whenever it is installed (pyarrow looks for pandas types in
every input), ~0.3 s CPU in each process that writes a prediction part. These build the
same arrays from numpy buffers and import nothing. The values are copied first: a zero-copy
buffer would hold an export of whatever memory the array views (a decode process's
shared-memory slot, an mmap), which then cannot be closed while the part is buffered
(``BufferError: cannot close exported pointers exist`` when a stopped run unlinks its ring)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def _validity(mask: np.ndarray | None) -> Any:
    if mask is None:
        return None
    return pa.py_buffer(np.packbits(~np.asarray(mask, bool), bitorder="little").data)


def from_numpy(values: np.ndarray, type: pa.DataType | None = None, mask: np.ndarray | None = None) -> pa.Array[Any]:
    """``pa.array(values, type, mask=mask)`` for a 1-D numeric or bool numpy array (``mask``
    True where a value is null); ``type`` only relabels the buffer (e.g. int64 as a timestamp)."""
    arr = np.array(values, copy=True, order="C")  # owns its bytes (module doc)
    if arr.ndim != 1:
        raise ValueError(f"from_numpy wants a 1-D array, not shape {arr.shape}")
    if arr.dtype == np.bool_:
        data = pa.py_buffer(np.packbits(arr, bitorder="little").data)
        typ: pa.DataType = pa.bool_()
    else:
        data = pa.py_buffer(arr.data)
        typ = pa.from_numpy_dtype(arr.dtype)
    if type is not None:
        if type.bit_width != typ.bit_width:
            raise ValueError(f"{type} is not {arr.dtype} wide")
        typ = type
    return pa.Array.from_buffers(typ, len(arr), [_validity(mask), data], null_count=-1 if mask is not None else 0)


def repeated_string(value: str, n: int) -> pa.Array[Any]:
    """``pa.array([value] * n, pa.string())``: ``n`` times one string."""
    raw = value.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(raw))
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.data), pa.py_buffer(raw * n)], null_count=0)
