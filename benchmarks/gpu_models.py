"""PyTorch models for running `benchmarks/predict.py` on a GPU (``--model gpu_models:demo``).

onnxruntime's CUDA build is a separate wheel of several hundred MB; a GPU machine usually
has PyTorch already. So this module rebuilds the shipped demo model in PyTorch from the
weights inside ``demo.onnx`` (its graph is plain: 3x3 convolutions with ReLU, a 1x1
convolution, the spatial max and a sigmoid), and offers a heavy model beside it, so that
both cases of the benchmark can be shown: f < m (a small model waits for tiles) and
f > m (the model is the limit and must stay busy).

- ``demo``: the demo model, same weights, same scores (to float rounding) as demo.onnx;
- ``heavy``: torchvision's ResNet-50 with random weights and one output, at 256 px: a
  stand-in for a production-size model (its scores mean nothing).

Both are ``torch.nn.Module`` objects, loaded by ``tilesweep.model.pyfunc`` (which runs them
on CUDA when it is there) with the metadata attributes it reads.
"""

from __future__ import annotations

import torch
from torch import nn

from tilesweep.model.load import DEMO_PATH


class _DemoNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(DEMO_PATH))
        weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.graph.initializer}
        meta = {p.key: p.value for p in graph.metadata_props}
        layers: list[nn.Module] = []
        for node in graph.graph.node:
            if node.op_type == "Conv":
                attrs = {a.name: list(a.ints) for a in node.attribute}
                w, b = weights[node.input[1]], weights[node.input[2]]
                conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(attrs["kernel_shape"]), tuple(attrs["strides"]),
                                 attrs["pads"][0])
                conv.weight.data.copy_(w)
                conv.bias.data.copy_(b)
                layers.append(conv)
            elif node.op_type == "Relu":
                layers.append(nn.ReLU(inplace=True))
            elif node.op_type not in ("ReduceMax", "Sigmoid"):
                raise ValueError(f"demo.onnx has an op this rebuild does not know: {node.op_type}")
        self.body = nn.Sequential(*layers)
        self.input_size = int(meta["input_size"])
        self.mean, self.std = meta["mean"], meta["std"]
        self.fit, self.labels, self.threshold = meta["fit"], meta["labels"], float(meta["threshold"])
        self.channel_order = meta["channel_order"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x).amax(dim=(2, 3)))


class _Heavy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet50(num_classes=1)
        self.input_size = 256
        self.labels = "score"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def __getattr__(name: str) -> nn.Module:
    # built on first use: `gpu_models:heavy` does not pay for `demo`, nor the other way
    if name == "demo":
        return _DemoNet().eval()
    if name == "heavy":
        return _Heavy().eval()
    raise AttributeError(name)


def _main() -> None:
    """``python benchmarks/gpu_models.py --quick``: the rebuilt demo model gives the
    scores of demo.onnx on a few simulator tiles (exit 1 when not); the test suite runs
    it where PyTorch and onnx are installed."""
    import argparse
    import sys

    import numpy as np

    from tilesweep.decode import decode
    from tilesweep.model import load_model, score_tiles
    from tilesweep.sim import World
    from tilesweep.tiles import Tile

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--quick", action="store_true", help="8 tiles (the only mode: this module is a model library)")
    p.add_argument("--tiles", type=int, default=8)
    a = p.parse_args()
    world = World(1)
    images = [decode(world.render(Tile(18, 137000 + i, 92000 + i))) for i in range(8 if a.quick else a.tiles)]
    want = score_tiles(load_model("demo", device="cpu"), images)
    got = score_tiles(load_model("gpu_models:demo", device="cpu"), images)
    diff = float(np.max(np.abs(want - got)))
    print(f"gpu_models:demo against demo.onnx on {len(images)} tiles: largest score difference {diff:.2e}")
    if diff > 1e-4:
        sys.exit(f"the rebuilt demo model disagrees with demo.onnx by {diff:.2e}")


if __name__ == "__main__":
    _main()
