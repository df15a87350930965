"""sip.data.images: to_rgb (every PIL mode, bit depths, transparency, EXIF) and load_image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sip.data.sources import (
    DEBIAN_FASHION_MNIST,
    load_image,
    to_rgb,
)

HAS_DEBIAN_FMNIST = (DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAS_DEBIAN_FMNIST, reason="apt-get install dataset-fashion-mnist")



# --------------------------------------------------------------------------------------------------
# to_rgb / load_image
# --------------------------------------------------------------------------------------------------

def _grad(w: int = 6, h: int = 4) -> np.ndarray:
    return np.arange(w * h, dtype=np.uint8).reshape(h, w) * 10


MODES = {
    "RGB": lambda: Image.fromarray(np.dstack([_grad()] * 3)),
    "RGBA": lambda: Image.fromarray(np.dstack([_grad()] * 3 + [np.full((4, 6), 255, np.uint8)])),
    "LA": lambda: Image.fromarray(_grad()).convert("LA"),
    "L": lambda: Image.fromarray(_grad()),
    "1": lambda: Image.fromarray(_grad()).convert("1"),
    "P": lambda: Image.fromarray(np.dstack([_grad()] * 3)).quantize(colors=8),
    "CMYK": lambda: Image.fromarray(np.dstack([_grad()] * 3)).convert("CMYK"),
    "YCbCr": lambda: Image.fromarray(np.dstack([_grad()] * 3)).convert("YCbCr"),
    "I;16": lambda: Image.fromarray(_grad().astype(np.uint16) * 257),
    "I": lambda: Image.fromarray(_grad().astype(np.int32) * 257),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_to_rgb_every_mode(mode):
    image = MODES[mode]()
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (6, 4)
    arr = np.asarray(rgb).astype(int)
    if mode != "1":
        # a grey ramp stays a grey ramp: brightness increases left to right in the top row
        grey = arr[0].mean(axis=-1)
        assert np.all(np.diff(grey) >= 0) and grey[-1] > grey[0] + 20, (mode, grey)


def test_to_rgb_composites_transparency_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[0, 1, 3] = 255  # opaque red-ish
    rgba[1, :, 3] = 128  # half
    out = np.asarray(to_rgb(Image.fromarray(rgba)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 0, 0)
    assert 120 <= out[1, 0, 1] <= 135  # green: half of the white background


def test_to_rgb_palette_transparency_on_white():
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="L").convert("P")
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    out = np.asarray(to_rgb(palette))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (200, 0, 0)


def test_to_rgb_16_bit_full_range():
    deep = Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))
    assert deep.mode == "I;16"
    out = np.asarray(to_rgb(deep))
    assert out[0, 0, 0] == 0 and 120 <= out[0, 1, 0] <= 135 and out[0, 2, 0] == 255
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_to_rgb_applies_exif_orientation(tmp_path):
    image = Image.fromarray(np.dstack([_grad(40, 20)] * 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.mode == "RGB" and loaded.size == (20, 40)


def test_load_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=rf"cannot read image {bad}"):
        load_image(bad)
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=rf"cannot read image {truncated}"):
        load_image(truncated)


# --------------------------------------------------------------------------------------------------
# Issue 16: decompression bombs, bit depths
# --------------------------------------------------------------------------------------------------

def test_load_image_refuses_decompression_bomb_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000), 1).save(bomb)  # ~90 KB on disk, 400 Mpixel decoded
    with pytest.raises(ValueError, match=rf"cannot read image {bomb}: decompression bomb"):
        load_image(bomb)


def test_to_rgb_16_bit_scaled_by_bit_depth_not_maximum(tmp_path):
    uniform = Image.fromarray(np.full((4, 4), 20000, np.uint16))
    assert np.all(np.asarray(to_rgb(uniform)) == 78)  # 20000 / 257, as PIL and torchvision
    uniform.save(tmp_path / "deep.png")  # 16-bit PNG opens as I;16 or I depending on Pillow
    assert np.all(np.asarray(load_image(tmp_path / "deep.png")) == 78)


def test_to_rgb_32_bit_int_and_float():
    small = Image.fromarray(np.full((2, 2), 20000, np.int32), mode="I")
    assert np.all(np.asarray(to_rgb(small)) == 78)  # fits in 16 bits: a 16-bit image opened as I
    wide = Image.fromarray(np.array([[0, 2**31 - 1]], np.int32), mode="I")
    out = np.asarray(to_rgb(wide))
    assert out[0, 0, 0] <= 128 and out[0, 1, 0] >= 127 and out.dtype == np.uint8
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
    assert list(np.asarray(to_rgb(unit))[0, :, 0]) == [0, 128, 255]
    byte_range = Image.fromarray(np.array([[0.0, 100.0, 300.0, np.nan]], np.float32), mode="F")
    assert list(np.asarray(to_rgb(byte_range))[0, :, 0]) == [0, 100, 255, 0]
