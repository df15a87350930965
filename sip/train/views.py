"""Replayable views: a crop box in an image's own pixels plus a horizontal flip, drawn like timm's
``RandomResizedCrop``; what ``sip train`` adds after them (timm's auto-augment policy or colour jitter, and
random erasing), drawn once per item and replayable; and the model input a view gives at any input size.

``sip train`` crops with :class:`ReplayableCrop` under Lanczos resizing; ``sip distill`` draws one view per item
and replays it on the student's input and on every teacher's (:class:`ViewAugmentation`), so the teachers label
exactly what the student sees, erasing included; a teacher-logits store (:mod:`sip.distill.logits`) keeps the
crop and flip of each view it labelled.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from sip.data.lanczos import LanczosResize, parse_interpolation

__all__ = ["AugmentDraw", "ReplayableCrop", "ViewAugmentation", "apply_view", "identity_view", "sample_view",
           "seed_item_rngs", "view_input"]


def seed_item_rngs(seed: int) -> None:
    """Seed what one item's augmentation draws from: Python, NumPy and torch's CPU generator.

    The same streams as :func:`sip.train.inputs.seed_everything`, without its seeding of every accelerator's
    generators: items are prepared on the CPU, and that part cost 0.2–1.6 ms a call here, a fifth of a small
    student's epoch when paid once per item.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


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


class ReplayableCrop:
    """RandomResizedCrop + flip drawn with :func:`sample_view` (timm's distribution, from Python's ``random``,
    which :class:`sip.train.inputs.EpochView` seeds per item) and resized with any interpolation sip knows,
    Lanczos included."""

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float, interpolation: str):
        self.size, self.scale, self.ratio, self.hflip, self.interpolation = size, scale, ratio, hflip, interpolation

    def __call__(self, image):
        view = sample_view(random, image.width, image.height, self.scale, self.ratio, self.hflip)
        return apply_view(image, view, self.size, self.interpolation)


# ----------------------------------------------------------------------------------------------------
# What sip train adds after the crop: auto-augment or colour jitter, and random erasing, replayable
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentDraw:
    """One item's draw of :class:`ViewAugmentation`.

    Attributes:
        seed: seeds the auto-augment / colour-jitter ops (None: the recipe has neither).
        erase: the erased box as fractions of the input ``(top, left, h, w)``, or None (not erased this time).
    """

    seed: int | None
    erase: tuple[float, float, float, float] | None


class ViewAugmentation:
    """timm's secondary transforms of ``sip train`` (an ``auto_augment`` policy, else ``color_jitter``, as
    ``timm.data.create_transform`` picks them) and its random erasing (``re_prob``; timm's ``RandomErasing``
    box distribution, one box, filled with the mean colour: the zero timm's ``const`` mode writes after
    normalisation), drawn once per item by :meth:`draw` and applied alike to any model's input by :meth:`apply`.

    Applied to the same crop at the same input size, two inputs are equal; at another size the ops' random
    choices are the same (re-seeded) and the erased box covers the same fraction of the view.

    Args:
        color_jitter (float): brightness/contrast/saturation jitter (ignored under an auto-augment policy,
            as timm does).
        auto_augment (str | None): a timm policy string (``rand-m9-mstd0.5``, ``augmix-…``, ``v0``, …).
        re_prob (float): probability of erasing one box.
        input_config (dict): the student's timm input config: its mean (auto-augment fill and erasing colour)
            and interpolation are used for every input.
    """

    def __init__(self, color_jitter: float, auto_augment: str | None, re_prob: float, input_config: dict[str, Any]):
        self.color_jitter, self.auto_augment, self.re_prob = color_jitter, auto_augment, re_prob
        self.mean = tuple(float(m) for m in input_config["mean"])
        self.interpolation = input_config["interpolation"]
        self._ops: dict[int, Any] = {}

    @property
    def photometric(self) -> bool:
        return bool(self.auto_augment or self.color_jitter)

    @property
    def active(self) -> bool:
        return self.photometric or self.re_prob > 0

    def _secondary(self, size: int):
        """timm's secondary transform for inputs of ``size`` (auto-augment translations scale with it)."""
        if size not in self._ops:
            from timm.data import create_transform

            _, secondary, _ = create_transform(
                size, is_training=True, separate=True, auto_augment=self.auto_augment,
                color_jitter=self.color_jitter or None, mean=self.mean,
                interpolation="bicubic" if self.interpolation.startswith("lanczos") else self.interpolation)
            self._ops[size] = secondary
        return self._ops[size]

    def draw(self, rng: random.Random) -> AugmentDraw:
        """This item's draw, from ``rng`` (after its crop and flip)."""
        seed = rng.getrandbits(63) if self.photometric else None
        box = None
        if self.re_prob > 0 and rng.random() < self.re_prob:  # timm RandomErasing: 10 tries at one box
            for _ in range(10):
                area = rng.uniform(0.02, 1 / 3)
                aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                h, w = math.sqrt(area * aspect), math.sqrt(area / aspect)
                if h < 1 and w < 1:
                    box = (rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w)
                    break
        return AugmentDraw(seed, box)

    def apply(self, view: Image.Image, draw: AugmentDraw, input_config: dict[str, Any]) -> torch.Tensor:
        """The normalised input of ``input_config`` for a cropped, resized ``view`` under ``draw``."""
        import torchvision.transforms.functional as F

        if draw.seed is not None:
            seed_item_rngs(draw.seed)
            view = self._secondary(min(view.size))(view)
        x = F.to_tensor(view)
        if draw.erase is not None:
            top, left, h, w = draw.erase
            height, width = x.shape[-2:]
            t, lft = round(top * height), round(left * width)
            bh, bw = max(round(h * height), 1), max(round(w * width), 1)
            x[:, t:t + bh, lft:lft + bw] = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        return F.normalize(x, list(input_config["mean"]), list(input_config["std"]))
