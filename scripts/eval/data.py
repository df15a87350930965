"""Fashion-MNIST at the shipped model's 32 px, grey, and the conversions between grey arrays, RGB arrays
and the PIL images the generator takes."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

from sip.data.fashion_mnist import load_fashion_mnist_arrays, select_shots

from .config import CLASSES, SIZE


@lru_cache(maxsize=2)
def fashion_mnist_32(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as grey uint8 [N, 32, 32] and labels, resized exactly as ``FashionMNISTSource(size=32)``
    does (bicubic 28 → 32; its RGB channels are this grey image three times)."""
    images, labels = load_fashion_mnist_arrays(split)  # type: ignore[arg-type]
    out = np.stack([np.asarray(Image.fromarray(im, mode="L").resize((SIZE, SIZE), Image.BICUBIC)) for im in images])
    return out, labels


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [..., 3] → grey uint8 with PIL's ``convert("L")`` arithmetic (ITU-R 601-2 luma)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def to_pil(grey: np.ndarray) -> Image.Image:
    """A grey 32×32 array as the RGB PIL image ``FashionMNISTSource(size=32)`` yields."""
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb_array(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def balanced_sources(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices, the same number per class, chosen by ``seed`` (:func:`select_shots`)."""
    return select_shots(labels, count // len(CLASSES), seed)


def subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Every index when ``count`` covers the split, else ``count`` balanced ones chosen by ``seed``."""
    return np.arange(len(labels)) if count >= len(labels) else balanced_sources(labels, count, seed)
