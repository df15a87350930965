"""Replayable views: a crop box in an image's own pixels plus a horizontal flip, drawn like timm's
``RandomResizedCrop``, and the model input a view gives at any input size.

A stored view (:class:`sip.distill.logits.TeacherLogitsStore`) is replayed by the student with the same
crop and flip, resized to its own input size, so the teachers' logits belong to exactly what the student
sees; online distillation draws its views with the same :func:`sample_view`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from sip.data.lanczos import LanczosResize, parse_interpolation

__all__ = ["ViewConfig", "apply_view", "identity_view", "sample_view", "view_input"]


@dataclass(frozen=True)
class ViewConfig:
    """How the stored views are drawn (the same distribution as timm's RandomResizedCrop + flip).

    Attributes:
        views: views stored per image; more views = more augmentation diversity for the student, at
            ``views`` teacher passes per image, once.
        identity_view: view 0 is the whole image, unflipped (what a data-free student's label is).
        scale, ratio: RandomResizedCrop area and aspect ranges.
        hflip: flip probability.
        seed: with the sample id and view index, fixes every view.
    """

    views: int = 4
    identity_view: bool = True
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.views <= 0:
            raise ValueError(f"views must be positive, got {self.views}")


def sample_view(rng: random.Random, width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                hflip: float) -> tuple[int, int, int, int, int]:
    """Draw ``(top, left, h, w, flip)``: timm's ``RandomResizedCropAndInterpolation.get_params`` (ten tries,
    then a central crop), followed by a flip with probability ``hflip``, all from ``rng``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if w <= width and h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            break
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            h, w = height, round(height * max(ratio))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = int(rng.random() < hflip)
    return top, left, h, w, flip


def identity_view(width: int, height: int) -> tuple[int, int, int, int, int]:
    return 0, 0, height, width, 0


def apply_view(image: Image.Image, view: Sequence[int], size: int | Sequence[int], interpolation: str) -> Image.Image:
    """Crop ``view``'s box from ``image``, resize to ``size`` with ``interpolation`` (a PIL filter name, or
    ``lanczos2``–``lanczos5``: :class:`sip.data.lanczos.LanczosResize`), flip if asked."""
    import torchvision.transforms.functional as F
    from timm.data.transforms import str_to_interp_mode

    top, left, h, w, flip = (int(v) for v in view)
    size = [size, size] if isinstance(size, int) else list(size)
    kind, order = parse_interpolation(interpolation)
    if kind == "lanczos":  # sip's separable Lanczos (PIL has order 3 only)
        out = LanczosResize(tuple(size), order)(F.crop(image, top, left, h, w))
    else:
        out = F.resized_crop(image, top, left, h, w, size, str_to_interp_mode(interpolation))
    return F.hflip(out) if flip else out


def view_input(image: Image.Image, view: Sequence[int], input_config: dict[str, Any], to_tensor) -> torch.Tensor:
    """One model's input for one view of one image."""
    size = list(input_config["input_size"])[-2:]
    return to_tensor(apply_view(image, view, size, input_config["interpolation"]))
