"""Give an exported demo model its ``heatmap`` output (the 8 x 8 map of "tower centre here"
logits before the global max), without retraining: the same weights, the same ``tower``
scores, and a second output that tilesweep reads as positions (tilesweep.model.onnxrt).

    pip install onnx
    python training/add_heatmap_output.py src/tilesweep/model/demo.onnx

The last convolution's output tensor is renamed ``heatmap`` and listed as a graph output;
no node is added. ``train_demo_model.py`` exports both outputs itself; this was run once on
the demo model trained before it did.
"""

from __future__ import annotations

import sys

import onnx


def add_heatmap(path: str) -> None:
    model = onnx.load(path)
    g = model.graph
    if any(o.name == "heatmap" for o in g.output):
        print(f"{path} has a heatmap output already")
        return
    pool = next(n for n in g.node if n.op_type == "ReduceMax")
    conv_out = pool.input[0]
    for n in g.node:
        n.input[:] = ["heatmap" if i == conv_out else i for i in n.input]
        n.output[:] = ["heatmap" if o == conv_out else o for o in n.output]
    g.output.append(onnx.helper.make_tensor_value_info("heatmap", onnx.TensorProto.FLOAT, ["n", 1, 8, 8]))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    print(f"{path}: heatmap output added")


if __name__ == "__main__":
    add_heatmap(sys.argv[1])
