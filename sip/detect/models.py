"""Detectors: torchvision's FCOS or RetinaNet heads on a timm ResNet or a ViT through a feature pyramid.

A ResNet backbone is any timm ResNet (``resnet10t``, ``resnet18``, ``resnet50``, …) built with ``features_only``
at strides 8, 16 and 32 (stages 2-4), with BatchNorm or GroupNorm (``detector.norm``: detection's batches are
small, and BatchNorm's statistics are noisy there; GroupNorm does not depend on the batch, Wu & He, ECCV 2018);
a torchvision ``FeaturePyramidNetwork`` maps the three stages to ``fpn_channels`` each. A ViT backbone (sip's
SPT + LSA ViT or a timm ViT) gets ViTDet's simple feature pyramid (:mod:`sip.detect.vit_backbone`) at strides
``patch / 2``, ``patch``, ``2 · patch``, ``detector.norm`` applied to the pyramid's convs. One anchor per location
whose size is the level's stride (FCOS assigns a box to a level by its size; RetinaNet takes 3 scales × 3 ratios
per level). COCO category ids 1..C are the heads' labels directly (index 0 is never a target).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from sip.detect.vit_backbone import RESERVED_KWARGS, build_vit_backbone, is_vit_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_PREFIXES = ("resnet", "resnext", "seresnet", "test_resnet")


@dataclass(frozen=True)
class DetectorSection:
    """Which detector: head, backbone, norm and sizes."""

    head: Literal["fcos", "retinanet"] = "fcos"  # FCOS (anchor-free, Tian et al. 2019) or RetinaNet (Lin et al. 2017)
    # a timm ResNet (resnet10t is the smallest) or a ViT (sip_vit_spt_lsa_tiny, vit_tiny_patch16_224, ...: ViTDet)
    backbone: str = "resnet18"
    # a ResNet's norm layers (its FPN has none) or a ViT pyramid's convs (the ViT keeps its LayerNorms); heads: GN
    norm: Literal["batch", "group"] = "batch"
    gn_groups: int = 8  # groups of each GroupNorm (norm: group); must divide every layer's channels (resnet10t: 24)
    fpn_channels: int = 64  # channels of every pyramid level and of the heads (a multiple of 32); 256 in the papers
    # a ViT's patch size (pyramid strides patch/2, patch, 2·patch; 16 = a ResNet's 8, 16, 32, which dense KD between
    # the two needs); scenes must be a multiple of 2·patch px; null = the model's own (16)
    patch_size: int | None = None
    # other timm.create_model arguments of the backbone (a ViT's embed_dim, depth, num_heads, spt, lsa, ...)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head_convs: int = 2  # FCOS: conv layers per head tower (4 in the paper); RetinaNet's towers are fixed at 4
    score_thresh: float = 0.05  # detections kept for evaluation score above this
    detections_per_img: int = 100  # COCO's maxDets
    checkpoint: str | None = None  # start from these weights (a run folder or .safetensors of this detector)

    def __post_init__(self):
        self._check_backbone()
        if self.fpn_channels < 8 or self.gn_groups < 1 or self.head_convs < 1:
            raise ValueError(f"detector.fpn_channels must be >= 8, gn_groups and head_convs >= 1, got "
                             f"{self.fpn_channels}, {self.gn_groups}, {self.head_convs}")
        if self.fpn_channels % 32:  # torchvision's FCOS head towers use GroupNorm(32, channels)
            raise ValueError(f"detector.fpn_channels must be a multiple of 32 (the heads' GroupNorm has 32 groups), "
                             f"got {self.fpn_channels}")
        if self.head == "retinanet" and self.head_convs != 2:
            raise ValueError("detector.head_convs is read by head fcos only (RetinaNet's towers have 4 convs): "
                             "remove detector.head_convs")
        if self.norm == "batch" and self.gn_groups != 8:
            raise ValueError("detector.gn_groups is read by norm: group only; remove it or set detector.norm: group")
        if not 0 <= self.score_thresh < 1 or self.detections_per_img < 1:
            raise ValueError("detector.score_thresh must be in [0, 1) and detections_per_img >= 1")

    def _check_backbone(self) -> None:
        resnet = self.backbone.startswith(RESNET_PREFIXES)
        if not resnet and not is_vit_name(self.backbone):
            raise ValueError(f"detector.backbone {self.backbone!r}: a timm ResNet (resnet10t, resnet18, resnet50, ...) "
                             "or a ViT (sip_vit_spt_lsa_tiny, vit_tiny_patch16_224, ...) is needed")
        if not resnet:
            from sip.models.classifiers import check_model_name

            try:
                check_model_name(self.backbone)
            except ValueError as e:
                raise ValueError(f"detector.backbone: {e}") from None
        if resnet and self.patch_size is not None:
            raise ValueError(f"detector.patch_size is read by ViT backbones only ({self.backbone} is a ResNet): "
                             "remove it")
        if self.patch_size is not None and (self.patch_size < 2 or self.patch_size % 2):
            raise ValueError(f"detector.patch_size must be an even number >= 2 (the pyramid's finest level has "
                             f"stride patch_size / 2), got {self.patch_size}")
        clash = sorted(set(RESERVED_KWARGS) & set(self.backbone_kwargs))
        if clash:
            raise ValueError(f"detector.backbone_kwargs may not set {', '.join(clash)}: sip sets them (img_size = the "
                             "scene size, patch_size = detector.patch_size, norm_layer = detector.norm)")


class PyramidBackbone(nn.Module):
    """A timm feature extractor and a feature pyramid: image batch → ``OrderedDict`` of levels (strides
    ``self.strides``), each with ``self.out_channels`` channels, as torchvision's detection heads expect."""

    def __init__(self, body: nn.Module, channels: int):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.feature_info.channels()), channels)
        self.out_channels = channels
        self.strides = list(body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((f"p{s}", f) for s, f in zip(self.strides, feats)))


def build_backbone(section: DetectorSection, img_size: int) -> nn.Module:
    """A timm ResNet (stages at strides 8, 16, 32) with the section's norm and its FPN, or a ViT built for
    ``img_size`` px scenes with its simple pyramid, the section's norm in the pyramid's convs."""
    import timm
    from timm.layers import GroupNorm

    norm = nn.BatchNorm2d if section.norm == "batch" else partial(GroupNorm, num_groups=section.gn_groups)
    if is_vit_name(section.backbone):
        if section.norm == "group" and section.fpn_channels % section.gn_groups:
            raise ValueError(f"detector.gn_groups {section.gn_groups} must divide detector.fpn_channels "
                             f"{section.fpn_channels} (the norm of a ViT's pyramid convs)")
        return build_vit_backbone(section.backbone, img_size, section.patch_size, section.backbone_kwargs,
                                  section.fpn_channels, norm)
    try:
        body = timm.create_model(section.backbone, pretrained=False, features_only=True, out_indices=(2, 3, 4),
                                 norm_layer=norm, **section.backbone_kwargs)
    except RuntimeError as e:
        raise ValueError(f"detector.backbone {section.backbone!r}: {e}") from e
    except TypeError as e:
        raise ValueError(f"detector.backbone_kwargs {section.backbone_kwargs} with {section.backbone}: {e}") from e
    except ValueError as e:  # GroupNorm whose groups do not divide a stage's channels
        raise ValueError(f"detector.gn_groups {section.gn_groups} with {section.backbone}: {e}") from e
    return PyramidBackbone(body, section.fpn_channels)


def build_detector(section: DetectorSection, num_classes: int, img_size: int) -> nn.Module:
    """A torchvision FCOS / RetinaNet for ``num_classes`` categories (COCO ids 1..C) on ``img_size`` scenes.

    Raises:
        ValueError: scenes smaller than the largest stride, scenes that are not an even number of a ViT's patches,
            or an unusable backbone / norm setting.
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    if num_classes < 1:
        raise ValueError("a detector needs at least one class (the COCO file's categories are empty)")
    backbone = build_backbone(section, img_size)
    if img_size < max(backbone.strides):
        raise ValueError(f"scenes of {img_size} px are smaller than the detector's largest stride "
                         f"{max(backbone.strides)} ({section.backbone}, pyramid strides {backbone.strides}): make "
                         f"larger scenes (sip scenes --set scenes.size={max(backbone.strides) * 4})")
    common: dict[str, Any] = dict(min_size=img_size, max_size=img_size, image_mean=list(IMAGENET_MEAN),
                                  image_std=list(IMAGENET_STD), score_thresh=section.score_thresh,
                                  detections_per_img=section.detections_per_img,
                                  size_divisible=max(backbone.strides))  # a ViT's scene: no padding past its grid
    if section.head == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in backbone.strides), ((1.0,),) * len(backbone.strides))
        head = FCOSHead(backbone.out_channels, 1, num_classes + 1, num_convs=section.head_convs)
        return FCOS(backbone, num_classes + 1, anchor_generator=anchors, head=head, **common)
    sizes = tuple(tuple(int(s * 4 * 2 ** (k / 3)) for k in range(3)) for s in backbone.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(backbone.strides))
    return RetinaNet(backbone, num_classes + 1, anchor_generator=anchors, **common)


def detector_metadata(section: DetectorSection, classes: list[str], img_size: int) -> dict[str, Any]:
    """What a saved detector needs to be rebuilt: the section, the classes (COCO ids 1..C), the scene size."""
    from dataclasses import asdict

    from sip import __version__

    return {"format": "sip-detector", "sip_version": __version__, "detector": asdict(section),
            "classes": list(classes), "num_classes": len(classes), "img_size": img_size}


def load_detector(path: str, section: DetectorSection | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a sip-trained detector from its run folder or ``.safetensors`` (eval mode)."""
    from sip.models.checkpoints import load_checkpoint_file, load_weights

    state, meta = load_checkpoint_file(path)
    if meta.get("format") != "sip-detector":
        raise ValueError(f"{path} is not a sip detector (its metadata says {meta.get('format')!r})")
    saved = DetectorSection(**{**meta["detector"], "checkpoint": None})
    model = build_detector(section or saved, meta["num_classes"], meta["img_size"])
    load_weights(model, state, path)
    return model.eval(), meta


__all__ = ["DetectorSection", "PyramidBackbone", "build_backbone", "build_detector", "detector_metadata",
           "load_detector"]
