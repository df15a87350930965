"""A plain ViT as a detector's backbone, through ViTDet's simple feature pyramid.

Li, Mao, Girshick & He, "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022: the
pyramid is built from the ViT's last feature map alone, with no FPN over stages. The patch tokens of the last
block (after the ViT's final LayerNorm; class and distillation tokens dropped) are laid back on their
``S/p × S/p`` grid (stride ``p``, the patch size), and one branch per level rescales that map: a 2×2 stride-2
transposed conv (stride ``p/2``), the identity (stride ``p``), a 2×2 max-pool (stride ``2p``). Each branch ends
in a 1×1 conv to ``fpn_channels`` and a 3×3 conv, each followed by the recipe's norm (``detector.norm``:
BatchNorm or GroupNorm, where ViTDet uses LayerNorm), as in the paper with no activation. Three levels, so a ViT
with 16-px patches has the strides 8, 16, 32 of a ResNet's FPN: the same heads, and dense KD between a ResNet
teacher and a ViT student location by location.

The ViT is built for the scene size: its position embeddings are made for the scene's token grid (nothing is
interpolated), so a scene must be an even number of whole patches (the max-pooled level halves the grid).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# names that build a timm VisionTransformer: timm's ViTs / DeiTs and sip's SPT + LSA ViTs (sip.models.vit_small_data)
VIT_PREFIXES = ("vit_", "deit_", "deit3_", "sip_vit_", "sip_deit_", "sip_civt_")
# create_model arguments sip sets itself: the scene size, detector.patch_size, a headless model, no hub weights
RESERVED_KWARGS = ("img_size", "patch_size", "num_classes", "pretrained", "in_chans", "features_only",
                   "out_indices", "norm_layer")


def is_vit_name(name: str) -> bool:
    """Whether ``name`` is a ViT the detector builds through :class:`ViTPyramidBackbone`."""
    return name.startswith(VIT_PREFIXES)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one ``dim``-channel map of stride ``patch`` → three maps of ``channels``
    channels at strides ``patch / 2``, ``patch``, ``2 · patch``.

    Args:
        dim (int): the ViT's embedding width.
        channels (int): channels of every level (``detector.fpn_channels``).
        patch (int): the ViT's patch size (even).
        norm (Callable[[int], nn.Module]): the norm layer after each conv, given its channels.
    """

    def __init__(self, dim: int, channels: int, patch: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        half = max(dim // 2, 1)
        self.rescale = nn.ModuleList([nn.ConvTranspose2d(dim, half, kernel_size=2, stride=2), nn.Identity(),
                                      nn.MaxPool2d(kernel_size=2, stride=2)])
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, channels, 1, bias=False), norm(channels),
                          nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm(channels))
            for c in (half, dim, dim))
        self.strides = [patch // 2, patch, patch * 2]

    def forward(self, grid: torch.Tensor) -> list[torch.Tensor]:
        return [project(rescale(grid)) for rescale, project in zip(self.rescale, self.project)]


class ViTPyramidBackbone(nn.Module):
    """A timm ``VisionTransformer`` and its simple feature pyramid: image batch → ``OrderedDict`` of levels
    (strides ``self.strides``), each with ``self.out_channels`` channels, as torchvision's detection heads expect
    (the interface of :class:`sip.detect.models.PyramidBackbone`)."""

    def __init__(self, vit: nn.Module, channels: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.vit = vit
        self.grid = tuple(vit.patch_embed.grid_size)
        patch = vit.patch_embed.patch_size
        self.pyramid = SimpleFeaturePyramid(vit.embed_dim, channels, int(patch[0]), norm)
        self.out_channels = channels
        self.strides = self.pyramid.strides

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]  # [B, h·w, D], row-major patches
        b, _, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, *self.grid)
        return OrderedDict((f"p{s}", f) for s, f in zip(self.strides, self.pyramid(grid)))


def check_scene_size(img_size: int, patch: int, name: str) -> None:
    """Raise ``ValueError`` (naming ``detector.patch_size`` and ``scenes.size``) unless ``img_size`` px scenes are
    an even number of whole ``patch``-px patches: the ViT's token grid must be whole, the pooled level exact."""
    if patch < 2 or patch % 2:
        raise ValueError(f"detector.patch_size {patch} ({name}): an even patch size is needed (the pyramid's finest "
                         "level has stride patch_size / 2)")
    if img_size % (2 * patch):
        fits = [p for p in range(2, img_size // 2 + 1, 2) if img_size % (2 * p) == 0]
        raise ValueError(f"scenes of {img_size} px do not fit detector.patch_size {patch} ({name}): the ViT's token "
                         f"grid must be an even number of whole patches (scenes a multiple of {2 * patch} px); set "
                         f"detector.patch_size to one of {fits[-6:]} or write scenes with scenes.size a multiple of "
                         f"{2 * patch}")


def build_vit_backbone(name: str, img_size: int, patch_size: int | None, kwargs: dict[str, Any], channels: int,
                       norm: Callable[[int], nn.Module]) -> ViTPyramidBackbone:
    """The ViT ``name`` (sip's own or timm's) built headless for ``img_size`` px scenes, and its simple pyramid.

    Args:
        name (str): a timm / sip ViT name (``sip_vit_spt_lsa_tiny``, ``vit_tiny_patch16_224``, ...).
        img_size (int): the scene size (the ViT's position embeddings are made for it).
        patch_size (int, optional): the patch size; None = the model's own.
        kwargs (dict): other ``create_model`` arguments (``embed_dim``, ``depth``, ``num_heads``, ``spt``, ...).
        channels (int): channels of every pyramid level.
        norm (Callable[[int], nn.Module]): the pyramid convs' norm layer.

    Raises:
        ValueError: a size the ViT cannot take, a bad argument, or a model that is not a timm VisionTransformer.
    """
    from timm.models.vision_transformer import VisionTransformer

    from sip.models.classifiers import create_model

    if patch_size is not None:  # before building: timm's PatchEmbed would floor a partial grid silently
        check_scene_size(img_size, patch_size, name)
    args = {**kwargs, "img_size": img_size, "num_classes": 0, **({"patch_size": patch_size} if patch_size else {})}
    try:
        vit = create_model(name, args)
    except (ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"detector.backbone {name!r} on {img_size} px scenes (detector.patch_size {patch_size}, "
                         f"detector.backbone_kwargs {kwargs}): {e}") from e
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"detector.backbone {name!r} builds a {type(vit).__name__}, not a timm VisionTransformer: "
                         "name a ViT (sip_vit_spt_lsa_tiny, vit_tiny_patch16_224, ...) or a timm ResNet")
    patch = tuple(int(p) for p in vit.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"detector.backbone {name!r}: square patches are needed, got {patch}")
    check_scene_size(img_size, patch[0], name)  # the model's own patch size (detector.patch_size: null)
    return ViTPyramidBackbone(vit, channels, norm)


__all__ = ["SimpleFeaturePyramid", "ViTPyramidBackbone", "build_vit_backbone", "check_scene_size", "is_vit_name"]
