"""ResNets for small images (28–64 px), registered with timm.

An ImageNet ResNet brings a 224 px image down 4× before its first stage (a stride-2 stem, then a stride-2
max-pool). On a 28 px Fashion-MNIST or 32 px CIFAR image that leaves a 7×7 map for the first stage and
1×1 for the last, and the network cannot see the details that separate a shirt from a T-shirt. The
usual remedy for small images (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, §4.2: the CIFAR-10 ResNets start at full resolution) is to downsample less at the stem.
These models keep timm's ResNet (blocks, stem, norm and activation choices; ``norm_layer="groupnorm1"``
for small batches, as the tiered stem's 24 channels do not split into 32 groups) and drop the stem's
max-pool, so the first stage runs at ½ of the input size.

Registered names (any ``timm.models.resnet.ResNet`` keyword can override them):

- ``sip_resnet10t_small``: timm's ResNet-10-T (tiered 3-conv stem, average-pool shortcuts, one basic
  block per stage), without the stem max-pool. 4.9 M parameters; ~4× the FLOPs of ``resnet10t`` at the
  same input size.
- ``sip_resnet18_small``: ResNet-18 (one 7×7 stem conv, two basic blocks per stage), without the max-pool.
- ``sip_resnet50_small``: ResNet-50 (one 7×7 stem conv, bottleneck blocks 3-4-6-3), without the max-pool:
  25.6 M parameters, its last stage at 2×2 for a 32 px input. Normalisation by ``norm_layer``:
  ``batchnorm`` (default) or ``groupnorm`` with ``gn_groups`` groups (default 32, as Wu & He, "Group
  Normalization", ECCV 2018, whose ResNet-50 keeps its accuracy at 2 images per batch where BatchNorm's
  batch statistics fail). The switch replaces every norm layer: stem, blocks and downsample shortcuts.
"""

from __future__ import annotations

import functools
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.layers import GroupNorm
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

__all__ = ["NORM_LAYERS", "group_norm", "sip_resnet10t_small", "sip_resnet18_small", "sip_resnet50_small",
           "resnet_norm_layer", "without_stem_pool"]

NORM_LAYERS = ("batchnorm", "groupnorm")  # sip_resnet50_small's norm_layer values


def without_stem_pool(model: ResNet) -> ResNet:
    """Replace the stem's max-pool of a timm ``ResNet`` by the identity (in place), and halve the
    reductions its ``feature_info`` reports past the stem."""
    model.maxpool = nn.Identity()
    for info in getattr(model, "feature_info", [])[1:]:
        info["reduction"] = max(info["reduction"] // 2, 1)
    return model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 10, "input_size": (3, 28, 28), "pool_size": (4, 4), "crop_pct": 1.0,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "conv1.0", "classifier": "fc", "fixed_input_size": False, **kwargs}


# register_model reads this module attribute, so it must exist before the entry points below.
default_cfgs = generate_default_cfgs({
    "sip_resnet10t_small.untrained": _cfg(),
    "sip_resnet18_small.untrained": _cfg(first_conv="conv1"),
    "sip_resnet50_small.untrained": _cfg(first_conv="conv1", input_size=(3, 32, 32), pool_size=(2, 2)),
})


def group_norm(num_channels: int, num_groups: int = 32, **kwargs: Any) -> GroupNorm:
    """timm's ``GroupNorm`` for ``num_channels`` channels in ``num_groups`` groups, refusing a group count that
    does not divide the channels with the recipe key to change (torch's own error names neither)."""
    if num_channels % num_groups:
        divisors = [g for g in (1, 2, 4, 8, 16, 32, 64) if num_channels % g == 0]
        raise ValueError(f"gn_groups={num_groups} does not divide the {num_channels} channels of a GroupNorm layer; "
                         f"set model.kwargs.gn_groups (student.kwargs.gn_groups in a distill recipe) to a count "
                         f"that divides every norm layer's channels, e.g. one of {divisors} (32: Wu & He's default)")
    return GroupNorm(num_channels, num_groups=num_groups, **kwargs)


def resnet_norm_layer(norm_layer: str, gn_groups: int | None) -> type[nn.Module] | functools.partial:
    """The norm layer class for ``norm_layer`` (``batchnorm`` | ``groupnorm``) and ``gn_groups``.

    Args:
        norm_layer (str): ``batchnorm`` (batch statistics; needs a few images per batch) or ``groupnorm``
            (per-image statistics over channel groups; independent of the batch).
        gn_groups (int | None): GroupNorm's group count; None = 32. Refused with ``batchnorm``.

    Raises:
        ValueError: an unknown ``norm_layer``, ``gn_groups`` below 1, or ``gn_groups`` set with ``batchnorm``.
    """
    if norm_layer not in NORM_LAYERS:
        raise ValueError(f"model.kwargs.norm_layer must be one of {', '.join(NORM_LAYERS)}, got {norm_layer!r}")
    if norm_layer == "batchnorm":
        if gn_groups is not None:
            raise ValueError(f"model.kwargs.gn_groups={gn_groups} is set but norm_layer is batchnorm; "
                             "set norm_layer: groupnorm or drop gn_groups")
        return nn.BatchNorm2d
    groups = 32 if gn_groups is None else gn_groups
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"model.kwargs.gn_groups must be a positive integer, got {gn_groups!r}")
    return functools.partial(group_norm, num_groups=groups)


def _create(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> ResNet:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights (train it with `sip train`); set pretrained: false")
    model = build_model_with_cfg(ResNet, variant, pretrained=False, **{**model_args, **kwargs})
    return without_stem_pool(model)


@register_model
def sip_resnet10t_small(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-10-T without the stem max-pool: the first stage at ½ the input size (14×14 at 28 px)."""
    args = {"block": BasicBlock, "layers": (1, 1, 1, 1), "stem_width": 32, "stem_type": "deep_tiered",
            "avg_down": True}
    return _create("sip_resnet10t_small", pretrained, args, **kwargs)


@register_model
def sip_resnet18_small(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 without the stem max-pool: the first stage at ½ the input size (14×14 at 28 px)."""
    return _create("sip_resnet18_small", pretrained, {"block": BasicBlock, "layers": (2, 2, 2, 2)}, **kwargs)


@register_model
def sip_resnet50_small(pretrained: bool = False, norm_layer: str = "batchnorm", gn_groups: int | None = None,
                       **kwargs: Any) -> ResNet:
    """ResNet-50 without the stem max-pool: the first stage at ½ the input size (16×16 at 32 px), the last at 2×2.

    Args:
        pretrained (bool): refused (no weights exist for this stem).
        norm_layer (str): ``batchnorm`` or ``groupnorm``; replaces every norm layer of the network.
        gn_groups (int | None): GroupNorm's group count (None = 32); must divide every layer's channels.
        **kwargs: any other ``timm.models.resnet.ResNet`` argument.
    """
    args = {"block": Bottleneck, "layers": (3, 4, 6, 3), "norm_layer": resnet_norm_layer(norm_layer, gn_groups)}
    return _create("sip_resnet50_small", pretrained, args, **kwargs)
