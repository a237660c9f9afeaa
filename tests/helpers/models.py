"""Python models for tests/test_model.py, loaded as ``helpers.models:NAME``."""

from __future__ import annotations

import numpy as np

from tilesweep.model import InputSpec, ModelInfo


def greenness(batch: np.ndarray) -> np.ndarray:
    """Mean of the green channel (0..1), one column."""
    return batch[:, 1].mean(axis=(1, 2))[:, None]


greenness.input_size = 64  # type: ignore[attr-defined]
greenness.labels = ["green"]  # type: ignore[attr-defined]


def channel_means(batch: np.ndarray) -> np.ndarray:
    """Per-channel means in the model's channel order: three labels."""
    return batch.mean(axis=(2, 3))


channel_means.input_size = 32  # type: ignore[attr-defined]
channel_means.channel_order = "BGR"  # type: ignore[attr-defined]
channel_means.labels = "first,second,third"  # type: ignore[attr-defined]


def brightest_chip(batch: np.ndarray) -> np.ndarray:
    """Mean brightness of each 256 px chip (a chipping model)."""
    return batch.mean(axis=(1, 2, 3))


brightest_chip.input_size = 256  # type: ignore[attr-defined]
brightest_chip.fit = "chip"  # type: ignore[attr-defined]


def wrong_shape(batch: np.ndarray) -> np.ndarray:
    """Two columns for a model that declares one label."""
    return np.zeros((len(batch), 2), np.float32)


class Constant:
    """An object that is a tilesweep Model already: always the same score."""

    name = "constant"
    digest = ""
    info = ModelInfo(InputSpec(size=16), ("always",), 0.5)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.full((len(batch), 1), 0.75, np.float32)


constant = Constant()

NOT_CALLABLE = 42


def darkest_spot(batch: np.ndarray) -> np.ndarray:
    """Two labels, ``dark`` (1 - mean brightness) and ``bright`` (mean brightness), and a
    position for ``dark`` only: the darkest pixel (metadata ``positions``)."""
    gray = batch.mean(axis=1)  # [N, H, W]
    n, h, w = gray.shape
    spot = gray.reshape(n, -1).argmin(axis=1)
    py, px = np.divmod(spot, w)
    bright = (gray.mean(axis=(1, 2)) + 1.0) / 2.0
    return np.stack([1.0 - bright, bright, (px + 0.5) / w, (py + 0.5) / h], axis=1).astype(np.float32)


darkest_spot.input_size = 32  # type: ignore[attr-defined]
darkest_spot.mean = "0.5,0.5,0.5"  # type: ignore[attr-defined]
darkest_spot.std = "0.5,0.5,0.5"  # type: ignore[attr-defined]
darkest_spot.labels = "dark,bright"  # type: ignore[attr-defined]
darkest_spot.positions = "dark"  # type: ignore[attr-defined]
