"""The GPU-side paths of issue 13, checked where they can run.

- mixed precision and channels_last of a PyTorch model against its fp32 scores (on the
  CPU here, where PyTorch is installed; the same code runs on CUDA);
- fitting tiles on the device (tilesweep.predict.gpudecode.fit_tensor) against the CPU's
  tilesweep.decode.fit;
- decoding on the GPU (nvJPEG through torchvision) against the CPU path: only where torch,
  torchvision and CUDA are (never on this project's CI machines: the lent GPU machine runs
  it, benchmarks/device_check.sh).
"""

import numpy as np
import pytest

from tilesweep.decode import decode, fit
from tilesweep.errors import UsageError
from tilesweep.model import load_model
from tilesweep.sim import World
from tilesweep.tiles import Tile

try:
    import torch
except ImportError:  # pragma: no cover - the CI machines have no torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (optional: pip install -e '.[train]')")

BF16_TOLERANCE = 0.03
"""Largest score difference (scores in 0..1) allowed between bf16 autocast and fp32;
fp16 gets a tenth of it (10 mantissa bits against bf16's 7)."""


@pytest.fixture(scope="module")
def jpegs():
    world = World(5)
    return [world.render(Tile(18, 137010 + i % 6, 92010 + i // 6)) for i in range(12)]


def _net():
    torch.manual_seed(0)
    nn = torch.nn
    body = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 1, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Sigmoid(),
    )
    body.input_size, body.labels = 128, ["score"]
    body.mean, body.std = "0.4252,0.4523,0.2593", "0.1846,0.1383,0.0985"
    return body.eval()


DEVICES = ["cpu"] + (["cuda"] if torch is not None and torch.cuda.is_available() else [])


@needs_torch
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_and_channels_last_give_the_fp32_scores_within_tolerance(jpegs, device):
    from tilesweep.model.torchmodel import TorchModel

    pixels = np.concatenate([fit(decode(d), 128) for d in jpegs])
    net = _net()
    meta = {k: getattr(net, k) for k in ("input_size", "labels", "mean", "std")}
    ref = TorchModel(net, meta, name="net", device=device).predict_pixels(pixels)
    assert ref.std() > 1e-3, "the scores must vary for the comparison to mean anything"
    cl = TorchModel(_net(), meta, name="net", device=device, channels_last=True)
    assert cl.channels_last
    assert np.abs(cl.predict_pixels(pixels) - ref).max() < 1e-5
    for precision, tol in (("bf16", BF16_TOLERANCE), ("fp16", BF16_TOLERANCE / 10)):
        try:
            m = TorchModel(_net(), meta, name="net", device=device, precision=precision, channels_last=True)
            got = m.predict_pixels(pixels)
        except RuntimeError:  # an older CPU build without fp16 autocast
            if precision == "fp16":
                continue
            raise
        assert got.dtype == np.float32 and got.shape == ref.shape
        diff = np.abs(got - ref).max()
        assert 0 < diff < tol, f"{precision} on {device}: largest difference {diff:.4f} (tolerance {tol})"
        print(f"{precision} on {device}: largest score difference to fp32 {diff:.5f}")


def test_precision_is_refused_for_a_model_that_is_not_pytorch():
    with pytest.raises(UsageError, match="model demo is not a PyTorch model: precision bf16 applies to PyTorch models only"):
        load_model("demo", precision="bf16")
    with pytest.raises(UsageError, match="precision 'fp8' is not fp32, bf16 or fp16"):
        load_model("demo", precision="fp8")  # type: ignore[arg-type]


@needs_torch
@pytest.mark.parametrize("side,size,how", [(256, 128, "resize"), (256, 256, "resize"), (512, 256, "chip"), (256, 224, "resize")])
def test_fitting_on_the_device_gives_the_cpu_pixels(side, size, how):
    from tilesweep.predict.gpudecode import fit_tensor

    rng = np.random.default_rng(side + size)
    imgs = rng.integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    want = np.concatenate([fit(i, size, how) for i in imgs])
    got = fit_tensor(torch.from_numpy(imgs).permute(0, 3, 1, 2), size, how).numpy()
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    if size == 224:  # bilinear: Pillow's and torch's antialiased kernels round differently
        assert diff.max() <= 3 and diff.mean() < 0.5
    else:  # the same pixels: box average rounding half up, chips, or the tile as it is
        assert diff.max() == 0


def _gpu():
    if torch is None:
        return False, "PyTorch is not installed"
    from tilesweep.predict.gpudecode import gpu_decode_available

    return gpu_decode_available()


@pytest.mark.skipif(not _gpu()[0], reason=f"no GPU decode here: {_gpu()[1]}")
def test_gpu_decode_gives_the_cpu_scores_within_tolerance(jpegs):
    from tilesweep.model.torchmodel import TorchModel
    from tilesweep.predict.gpudecode import GpuDecoder

    datas = list(jpegs) + [b"<html>no tile</html>"]
    px, owner, bad = GpuDecoder(128).decode_block(datas)
    assert bad.tolist() == [False] * len(jpegs) + [True] and owner.tolist() == list(range(len(jpegs)))
    cpu = np.concatenate([fit(decode(d), 128) for d in jpegs])
    assert np.abs(px.cpu().numpy().astype(int) - cpu.astype(int)).mean() < 1.0
    net = _net()
    meta = {k: getattr(net, k) for k in ("input_size", "labels", "mean", "std")}
    m = TorchModel(net, meta, name="net", device="cuda")
    assert np.abs(m.predict_pixels(px) - m.predict_pixels(cpu)).max() < 0.02
