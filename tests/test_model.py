"""Decoding, fitting tiles to models, the model adapters and the demo model's accuracy."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tilesweep.decode import DecodeError, chips, decode, fit, normalise, resize, sniff
from tilesweep.errors import UsageError
from tilesweep.model import (
    DEMO_PATH, InputSpec, info_from_metadata, load_model, peak_positions, predict_pixels, prepare, score_and_place, score_tiles,
)
from tilesweep.model.evaluate import evaluate, precision_recall, sample_tiles, tile_truth
from tilesweep.sim import World, encode
from tilesweep.tiles import tile_at

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (optional: pip install -e '.[train]')")

HELD_OUT_SEED = 2024
"""World seed of the accuracy test: neither the training seed (0) nor the seed the
training script checks itself on (1)."""
HELD_OUT_AREA = (-74.1, 40.6, -73.9, 40.8)  # 40.7 N, where no training area lies


@pytest.fixture(scope="module")
def tile_rgb() -> np.ndarray:
    """A 256 px simulator tile with a tower in it, uint8[256, 256, 3]."""
    world = World(0)
    t = world.towers((8.5, 47.3, 8.6, 47.4))[0]
    return world.render_array(tile_at(t.lon, t.lat, 18))


# --- decode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
@pytest.mark.parametrize("size", [256, 512])
def test_decode_round_trip(tile_rgb, fmt, size):
    rgb = tile_rgb if size == 256 else np.asarray(Image.fromarray(tile_rgb).resize((512, 512)))
    data = encode(rgb, fmt, quality=90)
    assert sniff(data) == fmt
    out = decode(data)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    err = np.abs(out.astype(int) - rgb.astype(int)).mean()
    if fmt == "png":
        assert np.array_equal(out, rgb)
    else:
        assert err < 4.0, f"{fmt} decodes {err:.2f} grey levels off on average"
    pil = decode(data, use_pillow=True)
    assert np.abs(pil.astype(int) - out.astype(int)).max() <= 2  # same image, either decoder


def test_decode_converts_grey_palette_and_alpha_to_rgb(tile_rgb):
    for mode in ("L", "P", "RGBA"):
        buf = io.BytesIO()
        Image.fromarray(tile_rgb).convert(mode).save(buf, "PNG")
        out = decode(buf.getvalue())
        assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    buf = io.BytesIO()
    Image.fromarray(tile_rgb).convert("L").save(buf, "JPEG")
    grey = decode(buf.getvalue())
    assert grey.shape == (256, 256, 3) and np.array_equal(grey[..., 0], grey[..., 2])


@pytest.mark.parametrize("data", [b"", b"<html>Service Unavailable</html>", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_decode_rejects_non_images(data):
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_decode_rejects_truncated_bodies(tile_rgb, fmt):
    data = encode(tile_rgb, fmt)
    with pytest.raises(DecodeError, match="bytes"):
        decode(data[: len(data) // 2])


# --- fitting tiles to a model ------------------------------------------------------------------


def test_resize_shapes_and_box_average(tile_rgb):
    half = resize(tile_rgb, 128)
    assert half.shape == (128, 128, 3) and half.dtype == np.uint8
    box = tile_rgb.reshape(128, 2, 128, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(half - box).max() <= 1.0  # an exact 2x reduction averages 2 x 2 boxes
    assert resize(tile_rgb, 224).shape == (224, 224, 3)
    assert resize(tile_rgb, (200, 300)).shape == (200, 300, 3)
    assert resize(tile_rgb, 512).shape == (512, 512, 3)
    assert resize(tile_rgb, 256) is tile_rgb


def test_chips_order_nw_ne_sw_se():
    big = np.arange(512 * 512 * 3, dtype=np.uint32).reshape(512, 512, 3).astype(np.uint8)
    c = chips(big, 256)
    assert c.shape == (4, 256, 256, 3)
    for k, (r, q) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.array_equal(c[k], big[r * 256 : (r + 1) * 256, q * 256 : (q + 1) * 256])
    assert chips(big, 128).shape == (16, 128, 128, 3)
    with pytest.raises(ValueError, match="200 px chips"):
        chips(big, 200)


def test_fit_resizes_or_chips(tile_rgb):
    big = np.concatenate([np.concatenate([tile_rgb] * 2, 1)] * 2, 0)
    assert fit(tile_rgb, 256).shape == (1, 256, 256, 3)
    assert fit(tile_rgb, 224).shape == (1, 224, 224, 3)
    assert fit(big, 256, "resize").shape == (1, 256, 256, 3)
    assert fit(big, 256, "chip").shape == (4, 256, 256, 3)
    assert fit(tile_rgb, 224, "chip").shape == (1, 224, 224, 3)  # not a multiple: resized


def test_normalise_scales_orders_and_standardises():
    img = np.zeros((2, 4, 4, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 51, 0
    x = normalise(img)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    assert np.allclose(x[:, 0], 1.0) and np.allclose(x[:, 1], 0.2) and np.allclose(x[:, 2], 0.0)
    bgr = normalise(img, channel_order="BGR")
    assert np.allclose(bgr[:, 0], 0.0) and np.allclose(bgr[:, 2], 1.0)
    z = normalise(img, mean=(0.5, 0.2, 0.1), std=(0.25, 0.5, 0.1))
    assert np.allclose(z[:, 0], 2.0) and np.allclose(z[:, 1], 0.0, atol=1e-6) and np.allclose(z[:, 2], -1.0)
    with pytest.raises(ValueError):
        normalise(img[0])


def test_prepare_keeps_track_of_chips(tile_rgb):
    big = np.concatenate([np.concatenate([tile_rgb] * 2, 1)] * 2, 0)
    batch, owner = prepare([tile_rgb, big], InputSpec(size=256, fit="chip"))
    assert batch.shape == (5, 3, 256, 256) and owner.tolist() == [0, 1, 1, 1, 1]


# --- adapters -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return load_model("demo", threads=1)


def test_demo_model_loads_with_its_metadata(demo):
    info = demo.info
    assert demo.name == "demo" and len(demo.digest) == 16 and demo.device in ("cpu", "cuda")
    assert info.labels == ("tower",) and info.input.size == 128 and info.input.channel_order == "RGB"
    assert info.input.fit == "resize" and info.threshold == 0.5
    assert all(0.0 < v < 1.0 for v in info.input.mean + info.input.std)
    assert info.metadata["train_world_seed"] == "0" and info.metadata["zoom"] == "18"
    assert DEMO_PATH.stat().st_size < 3_000_000


def test_demo_model_scores_are_probabilities(demo, tile_rgb):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(tile_rgb).resize((512, 512)))
    scores = score_tiles(demo, [tile_rgb, noise, np.zeros_like(tile_rgb), big])
    assert scores.shape == (4, 1) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    assert scores[0, 0] > 0.5  # the fixture tile holds a tower
    raw = demo.predict(prepare([tile_rgb] * 3, demo.info.input)[0])
    # the score, then where in the tile the tower is (x, y: fractions of the tile)
    assert demo.info.positions == ("tower",) and demo.info.width == 3
    assert raw.shape == (3, 3) and np.allclose(raw[:, 0], scores[0, 0], atol=1e-5)
    assert np.all((raw[:, 1:] > 0) & (raw[:, 1:] < 1))


def test_callable_model_from_a_helper_module(tile_rgb):
    m = load_model("helpers.models:greenness")
    assert m.name == "helpers.models:greenness" and m.info.input.size == 64 and m.info.labels == ("green",)
    s = score_tiles(m, [tile_rgb, np.zeros_like(tile_rgb)])
    assert s.shape == (2, 1) and s[1, 0] == 0.0
    assert abs(s[0, 0] - tile_rgb[..., 1].mean() / 255) < 0.01


def test_callable_model_channel_order_and_labels(tile_rgb):
    m = load_model("helpers.models:channel_means")
    assert m.info.labels == ("first", "second", "third") and m.info.input.channel_order == "BGR"
    s = score_tiles(m, [tile_rgb])[0]
    assert abs(s[0] - tile_rgb[..., 2].mean() / 255) < 0.01  # BGR: blue comes first
    assert abs(s[2] - tile_rgb[..., 0].mean() / 255) < 0.01


def test_chipping_model_scores_a_tile_by_its_best_chip():
    big = np.zeros((512, 512, 3), np.uint8)
    big[256:, 256:] = 200  # only the south-east chip is bright
    m = load_model("helpers.models:brightest_chip")
    s = score_tiles(m, [big, big[:256, :256]])
    assert s.shape == (2, 1) and abs(s[0, 0] - 200 / 255) < 1e-5 and s[1, 0] == 0.0


def test_model_object_is_used_as_it_is(tile_rgb):
    m = load_model("helpers.models:constant")
    assert m.name == "constant"
    assert score_tiles(m, [tile_rgb, tile_rgb]).tolist() == [[0.75], [0.75]]


def test_wrong_score_shape_is_a_usage_error(tile_rgb):
    m = load_model("helpers.models:wrong_shape")
    with pytest.raises(UsageError, match=r"helpers.models:wrong_shape returned scores of shape \(1, 2\)"):
        score_tiles(m, [tile_rgb])


@pytest.mark.parametrize(
    "spec, named",
    [
        ("nonsense", "'nonsense'"),
        ("", "''"),
        ("model.tflite", "'model.tflite'"),
        ("no/such/model.onnx", "'no/such/model.onnx'"),
        ("no/such/model.pt", "'no/such/model.pt'"),
        ("no_such_module_xyz:fn", "no_such_module_xyz"),
        ("helpers.models:no_such_fn", "no_such_fn"),
        ("helpers.models:NOT_CALLABLE", "helpers.models:NOT_CALLABLE"),
    ],
)
def test_bad_specs_are_one_line_usage_errors(spec, named):
    with pytest.raises(UsageError) as err:
        load_model(spec)
    msg = str(err.value)
    assert named in msg and "\n" not in msg


def test_a_file_that_is_not_onnx_is_a_usage_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(UsageError, match="broken.onnx' is not a loadable ONNX model") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "meta, match",
    [
        ({}, "input size is neither"),
        ({"input_size": "big"}, "input_size 'big'"),
        ({"input_size": "64", "mean": "0.5,0.5"}, "mean '0.5,0.5'"),
        ({"input_size": "64", "std": "1,0,1"}, "std"),
        ({"input_size": "64", "channel_order": "GRB"}, "channel_order 'GRB'"),
        ({"input_size": "64", "fit": "crop"}, "fit 'crop'"),
        ({"input_size": "64", "labels": "a,b"}, "2 labels"),
        ({"input_size": "64", "threshold": "high"}, "threshold 'high'"),
        ({"input_size": "64", "positions": "tower"}, "positions 'tower' must name labels of \\('score',\\)"),
        ({"input_size": "64", "labels": "a", "positions": "a,a"}, "positions 'a,a'"),
        ({"input_size": "64", "fit": "chip", "positions": "score"}, "positions need fit resize"),
    ],
)
def test_bad_metadata_names_the_value(meta, match):
    with pytest.raises(UsageError, match=match):
        info_from_metadata(meta, "m.onnx", n_outputs=1)


def test_metadata_disagreeing_with_the_graph():
    with pytest.raises(UsageError, match="disagrees"):
        info_from_metadata({"input_size": "128"}, "m.onnx", graph_size=224)
    assert info_from_metadata({}, "m.onnx", graph_size=224).input.size == 224


@needs_torch
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_file_with_metadata(tmp_path, tile_rgb):
    import json

    net = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()))
    path = tmp_path / "means.pt"
    meta = {"input_size": "48", "labels": "r,g,b", "channel_order": "RGB"}
    torch.jit.save(net, str(path), _extra_files={"tilesweep.json": json.dumps(meta)})
    m = load_model(path, device="cpu")
    assert m.name == "means.pt" and m.info.input.size == 48 and m.info.labels == ("r", "g", "b")
    s = score_tiles(m, [tile_rgb])
    assert s.shape == (1, 3) and np.allclose(s[0], tile_rgb.reshape(-1, 3).mean(0) / 255, atol=0.01)


@needs_torch
def test_torch_export_program_with_metadata(tmp_path, tile_rgb):
    import json

    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    batch = torch.export.Dim("n", min=1, max=4096)
    program = torch.export.export(net, (torch.zeros(2, 3, 40, 40),), dynamic_shapes=({0: batch},))
    path = tmp_path / "means.pt2"
    torch.export.save(program, str(path), extra_files={"tilesweep.json": json.dumps({"input_size": "40", "labels": "r,g,b"})})
    m = load_model(path, device="cpu")
    assert m.info.input.size == 40 and m.info.labels == ("r", "g", "b")
    s = score_tiles(m, [tile_rgb] * 3)
    assert s.shape == (3, 3) and np.allclose(s[2], tile_rgb.reshape(-1, 3).mean(0) / 255, atol=0.01)


@needs_torch
def test_torch_module_named_as_module_attr(tile_rgb):
    m = load_model("helpers.torch_models:net", device="cpu")
    assert m.info.input.size == 32 and m.info.labels == ("mean",)
    assert abs(score_tiles(m, [tile_rgb])[0, 0] - tile_rgb.mean() / 255) < 0.01


@needs_torch
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_torch_model_normalises_uint8_pixels_as_the_cpu_does(order):
    """A torch model takes uint8 pixels and normalises them on its device; the scores are
    those of normalising on the CPU and calling predict."""
    from tilesweep.model.torchmodel import TorchModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
    meta = {"input_size": "24", "labels": "a,b,c,d", "channel_order": order, "mean": "0.4,0.5,0.3", "std": "0.2,0.1,0.3"}
    m = TorchModel(net, meta, name="t", device="cpu")
    pixels = np.random.default_rng(1).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    spec = m.info.input
    expected = m.predict(normalise(pixels, spec.mean, spec.std, spec.channel_order))
    assert np.allclose(predict_pixels(m, pixels), expected, atol=1e-5)


def test_predict_pixels_normalises_for_models_that_take_floats(tile_rgb):
    m = load_model("helpers.models:channel_means", device="cpu")
    pixels = fit(tile_rgb, m.info.input.size)
    spec = m.info.input
    assert np.array_equal(predict_pixels(m, pixels), m.predict(normalise(pixels, spec.mean, spec.std, spec.channel_order)))


@needs_torch
def test_a_file_that_is_not_torchscript_is_a_usage_error(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UsageError, match="weights.pt' is not a loadable TorchScript archive") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_torch_model_without_torch_says_so(tmp_path):
    """Runs in a child process where ``import torch`` fails, as on a machine without it."""
    pt = tmp_path / "net.pt"
    pt.write_bytes(b"whatever")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        from tilesweep.errors import UsageError
        from tilesweep.model import load_model
        try:
            load_model({str(pt)!r})
        except UsageError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"model {str(pt)!r} needs PyTorch, which is not installed here (pip install torch, or export the model to ONNX)"


# --- ground truth and metrics ----------------------------------------------------------------


def test_precision_recall_counts():
    pr = precision_recall([True, True, False, False, True], [True, False, True, False, True])
    assert (pr.right, pr.predicted, pr.found, pr.actual) == (2, 3, 2, 3)
    assert pr.precision == pytest.approx(2 / 3) and pr.recall == pytest.approx(2 / 3)
    assert precision_recall([False], [False]).precision == 1.0


def test_tile_truth_matches_the_simulator():
    world = World(HELD_OUT_SEED)
    tiles = sample_tiles(world, HELD_OUT_AREA, 18, n_random=10, max_tower_tiles=10)
    for t in tiles:
        truth = tile_truth(world, t)
        assert truth.strict == world.tile_has_tower(t)
        assert truth.outer >= truth.strict >= truth.inner  # margins only widen or narrow


# --- accuracy -----------------------------------------------------------------------------------


def test_demo_model_precision_and_recall_on_a_held_out_world(demo):
    """A few hundred tiles of a world the model never saw: every tile with a tower among
    60 chosen from ground truth, their neighbours (wires, towers cut by the edge) and
    random tiles; rendered as JPEG, decoded and scored as in a sweep."""
    assert str(HELD_OUT_SEED) != demo.info.metadata["train_world_seed"]
    world = World(HELD_OUT_SEED)
    tiles = sample_tiles(world, HELD_OUT_AREA, 18, n_random=80, max_tower_tiles=60, seed=3)
    result = evaluate(demo, world, tiles)
    print(result)
    assert 300 <= result.tiles <= 700
    assert result.strict.actual >= 60 and result.strict.actual <= result.tiles // 2
    assert result.strict.precision >= 0.9, result
    assert result.strict.recall >= 0.9, result


def test_peak_positions_on_maps_with_known_answers():
    h = np.zeros((4, 1, 8, 8), np.float32)
    h[0, 0, 2, 5] = 3.0  # one cell: its centre
    h[1, 0, 4, 1] = h[1, 0, 4, 2] = 2.0  # two equal cells side by side: between them
    h[2, 0, 0, 7] = 1.0  # a corner: the clipped neighbourhood does not pull it outward
    h[2, 0, 0, 6] = 0.5
    h[3] = -5.0  # flat: the first cell's centre, no NaN
    p = peak_positions(h)
    assert p.shape == (4, 1, 2) and p.dtype == np.float32
    assert p[0, 0] == pytest.approx(((5 + 0.5) / 8, (2 + 0.5) / 8))
    assert p[1, 0] == pytest.approx((2.0 / 8, 4.5 / 8))
    assert p[2, 0] == pytest.approx(((1.0 * 7.5 + 0.5 * 6.5) / 1.5 / 8, 0.5 / 8))
    assert p[3, 0] == pytest.approx((0.5 / 8, 0.5 / 8))
    # neither an offset nor a positive scale of the map moves a position
    rng = np.random.default_rng(3)
    m = rng.normal(size=(5, 2, 8, 8))
    assert np.allclose(peak_positions(m), peak_positions(3.0 * m + 7.0), atol=1e-6)
    with pytest.raises(ValueError, match="float\\[N, C, h, w\\]"):
        peak_positions(np.zeros((2, 8, 8)))


def test_demo_model_places_towers_near_the_truth():
    """Where in a tile the demo model says the tower stands (its heatmap's peak), on tiles of
    a world seed it never saw that hold exactly one tower: a median ~7 m off at zoom 18,
    where the tile centre is ~40 m off."""
    from tilesweep.tiles import Tile, lnglat_to_fraction

    world, demo = World(seed=7, line_density=1.0), load_model("demo")
    origin = tile_at(8.55, 47.425, 18)
    found = []
    for dx in range(60):
        for dy in range(60):
            t = Tile(18, origin.x + dx, origin.y + dy)
            towers = world.towers_in_tile(t)
            if len(towers) == 1:
                found.append((t, towers[0]))
        if len(found) >= 40:
            break
    scores, where = score_and_place(demo, [decode(world.render(t)) for t, _ in found])
    assert where is not None and where.shape == (len(found), 1, 2)
    off, centre = [], []
    for (t, tower), s, (fx, fy) in zip(found, scores[:, 0], where[:, 0]):
        if s < 0.5:
            continue
        tx, ty = (v * (1 << 18) for v in lnglat_to_fraction(tower.lon, tower.lat))
        m_per_tile = 40_075_016.0 * np.cos(np.radians(tower.lat)) / (1 << 18)
        off.append(np.hypot(tx - t.x - fx, ty - t.y - fy) * m_per_tile)
        centre.append(np.hypot(tx - t.x - 0.5, ty - t.y - 0.5) * m_per_tile)
    assert len(off) >= 30
    assert np.median(off) < 12 and np.max(off) < 30 and np.median(centre) > 25, (np.median(off), np.max(off))
