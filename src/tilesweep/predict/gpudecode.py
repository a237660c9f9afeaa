"""Decoding on the GPU: a block's JPEG tiles in one batched nvJPEG call.

``torchvision.io.decode_jpeg(list_of_tensors, device="cuda")`` decodes a list of JPEGs on
the GPU in one call (nvJPEG; reported above 8,000 images/s of 0.37 MP on an A100, i.e. well
above 20,000 tiles/s of 256 px). :class:`GpuDecoder` does that for a whole block, fits the
tiles to the model's input on the device (:func:`fit_tensor`: the same box average as
:func:`tilesweep.decode.resize` for integer reductions, antialiased bilinear otherwise,
chips as :func:`tilesweep.decode.chips`) and hands the model ``uint8[M, size, size, 3]``
already on the GPU, so neither the decoded pixels nor the model's input cross the bus.

Tiles that are not JPEG (PNG, WebP) and JPEGs that nvJPEG refuses are decoded on the CPU
(:func:`tilesweep.decode.decode`) and uploaded; bytes that are no image are ``bad``, as on
the CPU path. Needs PyTorch and torchvision with CUDA: :func:`gpu_decode_available` says
whether this machine has them, and why not.

nvJPEG's IDCT is not libjpeg-turbo's: pixels may differ by a unit or two, so scores agree
with the CPU path to a tolerance, not bit for bit (benchmarks/device_check.sh measures it).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Sequence

import numpy as np

from ..decode import decode, sniff

Fit = Literal["resize", "chip"]


@functools.lru_cache(maxsize=1)
def gpu_decode_available() -> tuple[bool, str]:
    """``(True, "")`` when torchvision decodes JPEG on a CUDA device here (checked once, by
    decoding a tiny JPEG there), else ``(False, why)``."""
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, "PyTorch sees no CUDA device"
    try:
        import torchvision.io as tvio
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision built for another torch
        return False, f"torchvision does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    try:
        probe = _tiny_jpeg()
        out = tvio.decode_jpeg([torch.frombuffer(bytearray(probe), dtype=torch.uint8)], device="cuda")
        torch.cuda.synchronize()
        if out[0].shape[0] != 3:
            return False, "torchvision's GPU decode gave an unexpected shape"
    except Exception as exc:  # noqa: BLE001 - no nvJPEG in this build, a driver error ...
        return False, f"torchvision cannot decode JPEG on the GPU here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return True, ""


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


def fit_tensor(x: Any, size: int, how: Fit = "resize") -> Any:
    """Fit ``uint8[n, 3, H, W]`` images (a torch tensor, any device) to ``size`` px model
    inputs: ``uint8[m, size, size, 3]`` (NHWC, as :func:`tilesweep.decode.fit` gives),
    ``m = n`` except for chips. Same rules as ``fit``: chips when ``how`` is ``chip`` and
    both sides are multiples of ``size``; an exact integer reduction averages k x k boxes
    rounding half up (what Pillow's ``reduce`` does: the same pixels); other ratios use
    antialiased bilinear resampling (within a unit or two of Pillow's)."""
    import torch
    import torch.nn.functional as F

    n, _, H, W = x.shape
    if (H, W) == (size, size):
        return x.permute(0, 2, 3, 1)
    if how == "chip" and H % size == 0 and W % size == 0:
        r, c = H // size, W // size
        chips = x.reshape(n, 3, r, size, c, size).permute(0, 2, 4, 3, 5, 1)  # n, r, c, size, size, 3
        return chips.reshape(n * r * c, size, size, 3)
    xf = x.float()
    if H % size == 0 and W % size == 0 and H // size == W // size:
        k = H // size
        y = torch.floor(F.avg_pool2d(xf, k) + 0.5)
    else:
        y = F.interpolate(xf, size=(size, size), mode="bilinear", antialias=True, align_corners=False).round_()
    return y.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class GpuDecoder:
    """Decode and fit whole blocks on ``device`` (default ``cuda``) for a ``size`` px
    model input. :meth:`decode_block` returns ``(pixels, owner, bad)``: a device tensor
    ``uint8[M, size, size, 3]``, the tile index of each input (``int64[M]``) and
    ``bool[n_tiles]`` for the tiles that did not decode."""

    def __init__(self, size: int, how: Fit = "resize", device: str = "cuda") -> None:
        import torch
        import torchvision.io as tvio

        self.torch, self.tvio = torch, tvio
        self.size, self.how, self.device = size, how, torch.device(device)
        self._rgb = tvio.ImageReadMode.RGB

    def _cpu(self, data: bytes) -> Any:
        img = decode(data)  # raises DecodeError (a ValueError)
        return self.torch.from_numpy(np.ascontiguousarray(img)).to(self.device).permute(2, 0, 1)

    def decode_block(self, datas: Sequence[bytes]) -> tuple[Any, np.ndarray, np.ndarray]:
        torch = self.torch
        n = len(datas)
        bad = np.zeros(n, bool)
        images: list[Any] = [None] * n
        jpeg = [i for i, d in enumerate(datas) if sniff(d) == "jpeg"]
        if jpeg:
            raw = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpeg]
            try:
                out = self.tvio.decode_jpeg(raw, mode=self._rgb, device=self.device)
                for i, img in zip(jpeg, out):
                    images[i] = img
            except RuntimeError:  # one bad JPEG fails the batch: one by one, to find it
                for i, r in zip(jpeg, raw):
                    try:
                        images[i] = self.tvio.decode_jpeg(r, mode=self._rgb, device=self.device)
                    except RuntimeError:
                        pass  # the CPU tries below: a broken JPEG is then bad
        for i in range(n):
            if images[i] is None:
                try:
                    images[i] = self._cpu(datas[i])
                except ValueError:
                    bad[i] = True
        # fit, one shape at a time (a block's tiles nearly always share one)
        per_tile: list[Any] = [None] * n
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if img is not None:
                by_shape.setdefault(tuple(img.shape[1:]), []).append(i)
        for idx in by_shape.values():
            fitted = fit_tensor(torch.stack([images[i] for i in idx]), self.size, self.how)
            k = len(fitted) // len(idx)
            for j, i in enumerate(idx):
                per_tile[i] = fitted[j * k : (j + 1) * k]
        parts = [p for p in per_tile if p is not None]
        if not parts:
            return torch.zeros((0, self.size, self.size, 3), dtype=torch.uint8, device=self.device), np.zeros(0, np.int64), bad
        owner = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(per_tile) if p is not None])
        return torch.cat(parts).contiguous(), owner, bad


__all__ = ["GpuDecoder", "fit_tensor", "gpu_decode_available"]
