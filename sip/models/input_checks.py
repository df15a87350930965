"""Checks that a built classifier can train on the recipe's images and batches, run before the first step.

Two mistakes that otherwise train quietly into a useless model:

- **Batch 1 with BatchNorm in training mode.** Each BatchNorm layer normalises by the statistics of the
  current batch; with one image per batch they are that image's own per-channel moments (on a 1×1 map
  every value becomes 0), and the running statistics used at test time are averages of these. GroupNorm
  (Wu & He, ECCV 2018) normalises each image on its own and trains at any batch size.
- **An image too small for the network's strides.** A ResNet built for 224 px halves the image in its
  stem, its max-pool and three of its stages (32× in all). When the map reaching the last stage is already
  smaller than that stage's stride, the stage has nothing left to downsample: its output would be under one
  pixel without padding, and its 3×3 convolutions see mostly zeros. The stages' sizes are read from the
  model's timm ``feature_info`` (their reductions); a strided "same"-padded layer maps ``n`` px to
  ``ceil(n / stride)``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["check_trainable", "last_stage_input"]


def last_stage_input(model: nn.Module, img_size: int) -> tuple[int, int, int] | None:
    """The map size reaching the model's last strided stage at ``img_size`` px, and that stage's stride.

    Returns:
        (size, stride, reduction): the map size in px, the last stage's stride and the reduction of the
        layers before it (``size == ceil(img_size / reduction)``); None when the model reports no ``feature_info`` reductions or its last stage
        does not downsample (ViTs: every block at the patch size).
    """
    info: Any = getattr(model, "feature_info", None)
    if hasattr(info, "get_dicts"):  # timm's FeatureInfo wrapper on features_only models
        info = info.get_dicts()
    reductions = [int(d["reduction"]) for d in info or [] if isinstance(d, dict) and "reduction" in d]
    if not reductions:
        return None
    last = reductions[-1]
    before = [r for r in reductions if r < last]
    prev = before[-1] if before else 1
    if last == prev:
        return None
    return math.ceil(img_size / prev), last // prev, prev


def check_trainable(model: nn.Module, *, img_size: int, batch_size: int, model_key: str = "model",
                    name: str | None = None) -> None:
    """Refuse a model/data pairing that cannot train sensibly, naming the recipe key to change.

    Args:
        model (nn.Module): the built classifier.
        img_size (int): the network input size in px (the smaller side).
        batch_size (int): images per training step and process.
        model_key (str): the recipe section of the model (``model`` for ``sip train``, ``student`` for
            ``sip distill``), used in the messages. Defaults to "model".
        name (str | None): the model's name for the messages; None = its class name.

    Raises:
        ValueError: batch 1 with a BatchNorm layer, or an image smaller than the last stage's stride.
    """
    name = name or type(model).__name__
    if batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(f"data.batch_size=1 with {name}, which has BatchNorm layers: in training mode they would "
                         f"normalise each image by its own statistics. Set data.batch_size to 2 or more, or use "
                         f"GroupNorm ({model_key}.kwargs.norm_layer: groupnorm on sip_resnet50_small; "
                         f"norm_layer: groupnorm1 on sip_resnet10t_small / sip_resnet18_small)")
    stage = last_stage_input(model, img_size)
    if stage is not None and stage[0] < stage[1]:
        size, stride, before = stage
        minimum = before * (stride - 1) + 1  # the smallest n with ceil(n / before) >= stride
        raise ValueError(f"data.img_size={img_size} is too small for {name}: its stem and stages bring the image to "
                         f"{size}×{size} px before the last stage, whose stride is {stride}, so that stage's output "
                         f"would be under 1 px. Use a model for small images (sip_resnet50_small, "
                         f"sip_resnet18_small, sip_resnet10t_small: no stem max-pool) as {model_key}.name, or set "
                         f"data.img_size to at least {minimum}")
