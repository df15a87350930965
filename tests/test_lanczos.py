"""sip.data.lanczos: separable Lanczos resizing against PIL, orders, dtypes, v2 pipelines, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from sip.data.lanczos import LanczosResize, lanczos_kernel, lanczos_resize, parse_interpolation


@pytest.mark.parametrize("shape", [(28, 28, 224, 224), (28, 28, 56, 40), (100, 80, 28, 33), (224, 224, 28, 28),
                                   (31, 17, 32, 64)])
def test_order_3_matches_pils_lanczos_within_rounding(shape):
    h, w, oh, ow = shape
    a = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(a).resize((ow, oh), Image.LANCZOS)).astype(int)
    ours = lanczos_resize(torch.from_numpy(a).permute(2, 0, 1), (oh, ow), order=3).permute(1, 2, 0).numpy()
    diff = np.abs(pil - ours.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01


def test_kernel_is_one_at_zero_zero_at_integers_and_outside_the_window():
    assert lanczos_kernel(np.array([0.0]), 5)[0] == pytest.approx(1.0)
    assert np.allclose(lanczos_kernel(np.array([1.0, 2.0, -3.0, 4.0]), 5), 0.0, atol=1e-12)
    assert np.all(lanczos_kernel(np.array([5.0, 5.5, -7.0]), 5) == 0.0)
    assert lanczos_kernel(np.array([3.5]), 3)[0] == 0.0 and lanczos_kernel(np.array([3.5]), 5)[0] != 0.0


def test_constant_image_stays_constant_and_same_size_is_identity():
    flat = torch.full((3, 28, 28), 0.37)
    for order in (2, 3, 4, 5):
        assert torch.allclose(lanczos_resize(flat, 224, order), torch.full((3, 224, 224), 0.37), atol=1e-6)
        assert torch.allclose(lanczos_resize(flat, 9, order), torch.full((3, 9, 9), 0.37), atol=1e-6)
    x = torch.rand(2, 3, 20, 24)
    assert torch.equal(lanczos_resize(x, (20, 24)), x)


def test_order_5_differs_from_order_3_and_keeps_dtype_and_batch_dims():
    x = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    y5, y3 = lanczos_resize(x, 64, 5), lanczos_resize(x, 64, 3)
    assert y5.shape == (4, 3, 64, 64) and y5.dtype == torch.uint8
    assert not torch.equal(y5, y3)
    f = lanczos_resize(x.float() / 255, 64, 5)
    assert f.dtype == torch.float32 and f.shape == y5.shape


def test_antialias_low_passes_when_shrinking():
    # A one-pixel checkerboard has only the Nyquist frequency: shrinking it with antialiasing gives ~grey.
    board = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 1.0
    soft = lanczos_resize(board[None], 21, 3, antialias=True)
    hard = lanczos_resize(board[None], 21, 3, antialias=False)
    assert soft.std() < 0.05 < hard.std()


def test_transform_in_a_v2_pipeline_on_tensors_tv_tensors_and_pil():
    pipe = v2.Compose([LanczosResize(56, order=5), v2.ToDtype(torch.float32, scale=True)])
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    assert pipe(x).shape == (3, 56, 56)
    img = tv_tensors.Image(x)
    out = LanczosResize(56)(img)
    assert isinstance(out, tv_tensors.Image) and out.shape == (3, 56, 56)
    pil = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8), "L")
    out = LanczosResize((40, 30), order=3)(pil)
    assert isinstance(out, Image.Image) and out.size == (30, 40) and out.mode == "L"
    ref = np.asarray(pil.resize((30, 40), Image.LANCZOS)).astype(int)
    assert np.abs(np.asarray(out).astype(int) - ref).max() <= 1


@pytest.mark.parametrize("order", [0, 1, 6, 3.5])
def test_an_order_outside_2_to_5_is_a_clear_error(order):
    with pytest.raises(ValueError, match="order must be one of"):
        LanczosResize(32, order=order)


def test_parse_interpolation():
    assert parse_interpolation("lanczos5") == ("lanczos", 5)
    assert parse_interpolation("Lanczos3") == ("lanczos", 3)
    assert parse_interpolation("bicubic") == ("bicubic", None)
    with pytest.raises(ValueError, match="lanczos7"):
        parse_interpolation("lanczos7")


def test_recipes_select_lanczos_for_training_and_evaluation(tmp_path):
    import random as _random

    from PIL import Image as _Image

    from sip.config import ConfigError, load_config
    from sip.train.inputs import build_transforms
    from sip.train.recipe import TrainRecipe

    recipe = load_config(TrainRecipe, overrides=["data.interpolation=lanczos5", "data.img_size=32", "data.re_prob=0.5"])
    cfg = {"input_size": [3, 32, 32], "interpolation": "lanczos5", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    train_tf, eval_tf = build_transforms(cfg, recipe.data)
    image = _Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    _random.seed(0)
    assert train_tf(image).shape == (3, 32, 32)
    # evaluation = the whole image through LanczosResize(order 5), then normalised
    expected = LanczosResize(32, order=5)(image)
    got = eval_tf(image)
    from torchvision.transforms.functional import pil_to_tensor

    assert torch.allclose(got, (pil_to_tensor(expected).float() / 255 - 0.5) / 0.5, atol=1e-6)
    with pytest.raises((ValueError, ConfigError), match="Lanczos order"):
        load_config(TrainRecipe, overrides=["data.interpolation=lanczos7"])
