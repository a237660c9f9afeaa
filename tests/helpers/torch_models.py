"""PyTorch models for tests/test_model.py (imported only where torch is installed)."""

from __future__ import annotations

import torch


class MeanNet(torch.nn.Module):
    """Mean of all inputs of a 32 px image: one label, described by attributes."""

    input_size = 32
    labels = ["mean"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None]


net = MeanNet()
