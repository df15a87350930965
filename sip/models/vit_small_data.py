"""Vision Transformers for small datasets: Shifted Patch Tokenization and Locality Self-Attention.

Lee, Lee & Song, "Vision Transformer for Small-Size Datasets" (2021, arXiv:2112.13492) give a ViT two
inductive biases it lacks when trained from scratch on few images:

- **Shifted Patch Tokenization (SPT)**: the image is concatenated with four copies shifted by half a
  patch in the four diagonal directions (zero fill), then split into patches; each patch vector is
  layer-normalised and linearly projected. A token thereby sees a wider receptive field (its
  neighbours' borders) at the cost of a 5× wider first projection.
- **Locality Self-Attention (LSA)**: the softmax temperature is a learned parameter (initialised to
  ``1/sqrt(head_dim)``) instead of fixed, and each token's attention to itself is masked out
  (``-inf`` on the diagonal), which sharpens the attention distribution towards other tokens.

Reported gains (their Table 2): ViT 73.81 → 76.92% on CIFAR-100, 57.07 → 61.07% on Tiny-ImageNet.

Both are timm building blocks (``embed_layer=``, ``attn_layer=`` of timm's ``VisionTransformer``), so
they work unchanged in the plain ViT, timm's distilled DeiT and sip's multi-token CivT. Registered
names (call :func:`sip.models.classifiers.register_sip_models` or build through
:func:`sip.models.classifiers.create_model`):

- ``sip_vit_spt_lsa_tiny``: plain ViT (embed 192, 9 blocks, 12 heads, MLP ratio 2: the paper's layout)
- ``sip_deit_spt_lsa_tiny_distilled``: the same with DeiT's distillation token and head
- ``sip_civt_spt_lsa_tiny``: the same with one distillation token per teacher (CivT)

Each takes ``spt`` / ``lsa`` (default True) so an ablation switches one off in the same architecture,
and any ViT keyword (``img_size=28, patch_size=4, embed_dim=128, depth=4, num_heads=4``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sip.models.civt import MultiTokenDistilledViT

__all__ = ["LocalitySelfAttention", "ShiftedPatchTokenization", "shift_diagonally"]


def shift_diagonally(x: torch.Tensor, shift: int) -> torch.Tensor:
    """The four diagonal shifts of SPT, concatenated after the input along channels.

    Args:
        x (torch.Tensor): images ``(B, C, H, W)``.
        shift (int): pixels to shift by (half a patch in SPT).

    Returns:
        torch.Tensor: ``(B, 5C, H, W)``: ``x``, then ``x`` moved left-up, right-up, left-down,
        right-down by ``shift`` pixels, the uncovered border filled with zeros.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    out = [x]
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift))
    # A view of the padded image offset by (dy, dx) is the image moved by (-dy, -dx).
    for dy, dx in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        top, left = shift + dy * shift, shift + dx * shift
        out.append(padded[..., top:top + h, left:left + w])
    return torch.cat(out, dim=1)


class ShiftedPatchTokenization(nn.Module):
    """SPT as a timm patch-embedding layer: shift, concatenate, patchify, LayerNorm, Linear.

    Args:
        img_size (int | tuple): input size. Defaults to 224.
        patch_size (int | tuple): square patches only. Defaults to 16.
        in_chans (int): input channels. Defaults to 3.
        embed_dim (int): token width. Defaults to 768.
        bias (bool): bias of the projection. Defaults to True.
        **kwargs: the other arguments timm's ``VisionTransformer`` passes to ``embed_layer``
            (``dynamic_img_pad``, ``device``, ``dtype``); a dynamic image size is not supported.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True,
                 dynamic_img_pad: bool = False, strict_img_size: bool = True, output_fmt: str | None = None,
                 norm_layer=None, device=None, dtype=None):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"SPT takes square patches, got {self.patch_size}")
        if self.patch_size[0] < 2:
            raise ValueError("SPT shifts by half a patch: patch_size must be at least 2")
        if dynamic_img_pad or not strict_img_size or output_fmt not in (None, "NCHW"):
            raise ValueError("ShiftedPatchTokenization supports a fixed image size only (no dynamic_img_size/pad)")
        if self.img_size[0] < self.patch_size[0] or self.img_size[1] < self.patch_size[1]:
            raise ValueError(f"image size {self.img_size} is smaller than one patch {self.patch_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"image size {self.img_size} is not a multiple of the patch size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.flatten = True
        self.output_fmt = "NLC"
        patch_dim = 5 * in_chans * self.patch_size[0] * self.patch_size[1]
        self.norm_in = nn.LayerNorm(patch_dim, device=device, dtype=dtype)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.norm = nn.Identity() if norm_layer is None else norm_layer(embed_dim)

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size):
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (h, w) != self.img_size:
            raise ValueError(f"input size ({h}, {w}) does not match the model's img_size {self.img_size}")
        p = self.patch_size[0]
        x = shift_diagonally(x, p // 2)
        gh, gw = self.grid_size
        # (B, 5C, gh, p, gw, p) → (B, gh·gw, 5C·p·p): one row per patch, row-major like timm's PatchEmbed.
        x = x.reshape(b, 5 * c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 5 * c * p * p)
        return self.norm(self.proj(self.norm_in(x)))


class LocalitySelfAttention(Attention):
    """LSA: multi-head self-attention with a learned temperature and the diagonal masked.

    ``softmax(mask_diag(q kᵀ · τ)) v`` with ``τ`` a learned scalar (initialised to timm's fixed scale
    ``head_dim ** -0.5``) and ``mask_diag`` setting each token's score for itself to ``-inf``. Takes
    the arguments of timm's ``Attention``.
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        kwargs.pop("depth", None)
        super().__init__(dim, num_heads=num_heads, **kwargs)
        # log-parametrised so the temperature stays positive
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self.scale)))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @staticmethod
    def diagonal_mask(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """An additive ``(n, n)`` mask: ``-inf`` on the diagonal, 0 elsewhere."""
        return torch.zeros(n, n, device=device, dtype=dtype).fill_diagonal_(float("-inf"))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise ValueError("LocalitySelfAttention is bidirectional (is_causal is not supported)")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = self.diagonal_mask(n, device=x.device, dtype=q.dtype)
        if attn_mask is not None:
            mask = mask + (torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
                           if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype))
        x = F.scaled_dot_product_attention(q * self.temperature.to(q.dtype), k, v, attn_mask=mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0, scale=1.0)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", **kwargs}


# register_model reads this module attribute, so it must exist before the entry points below.
default_cfgs = generate_default_cfgs({
    "sip_vit_spt_lsa_tiny": _cfg(classifier="head"),
    "sip_deit_spt_lsa_tiny_distilled": _cfg(classifier=("head", "head_dist")),
    "sip_civt_spt_lsa_tiny": _cfg(classifier=("head", "heads_dist")),
})

# The paper's small-dataset layout (their CIFAR / Tiny-ImageNet ViT): embed 192, 9 blocks, 12 heads, MLP 384.
_TINY = {"patch_size": 16, "embed_dim": 192, "depth": 9, "num_heads": 12, "mlp_ratio": 2.0}


def _create(cls, variant: str, pretrained: bool, spt: bool, lsa: bool, kwargs: dict):
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights (train it with sip train / sip distill)")
    args = dict(_TINY, **kwargs)
    if spt:
        args["embed_layer"] = ShiftedPatchTokenization
    if lsa:
        args["attn_layer"] = LocalitySelfAttention
    return build_model_with_cfg(cls, variant, False, feature_cfg={"out_indices": 3, "feature_cls": "getter"},
                                **args)


@register_model
def sip_vit_spt_lsa_tiny(pretrained: bool = False, spt: bool = True, lsa: bool = True, **kwargs):
    """ViT for small datasets (SPT + LSA), the paper's tiny layout; ``spt`` / ``lsa`` switch each off."""
    return _create(VisionTransformer, "sip_vit_spt_lsa_tiny", pretrained, spt, lsa, kwargs)


@register_model
def sip_deit_spt_lsa_tiny_distilled(pretrained: bool = False, spt: bool = True, lsa: bool = True, **kwargs):
    """DeiT-style distilled ViT (class + distillation token) with SPT + LSA."""
    return _create(VisionTransformerDistilled, "sip_deit_spt_lsa_tiny_distilled", pretrained, spt, lsa, kwargs)


@register_model
def sip_civt_spt_lsa_tiny(pretrained: bool = False, spt: bool = True, lsa: bool = True, **kwargs):
    """CivT (one distillation token per teacher) with SPT + LSA."""
    return _create(MultiTokenDistilledViT, "sip_civt_spt_lsa_tiny", pretrained, spt, lsa, kwargs)
