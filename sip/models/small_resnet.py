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
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

__all__ = ["sip_resnet10t_small", "sip_resnet18_small", "without_stem_pool"]


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
})


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
