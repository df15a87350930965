"""A ViT with one distillation token per teacher (CivT, Co-advise, CVPR 2022), registered with timm.

DeiT (Touvron et al., ICML 2021) appends one *distillation token* to the class token; its output head
is trained to match the teacher. Co-advise (Ren, Gao, Hua, Xue, Tian, He, Zhao: "Co-advise: Cross
Inductive Bias Distillation", CVPR 2022) gives the student one such token *per teacher* — there a
convolutional and an involution teacher, whose different inductive biases advise the transformer
together — and averages all heads at inference. :class:`MultiTokenDistilledViT` is timm's
``VisionTransformer`` with ``num_distill_tokens`` extra tokens and heads, returning
``(cls_logits, dist_logits_1, ..., dist_logits_K)`` in training when ``distilled_training`` is set
(as timm's ``VisionTransformerDistilled`` does for K = 1) and the mean of all heads otherwise.

Registered names (any ViT keyword can override them, e.g. ``img_size=28, patch_size=4, depth=6``):
``sip_civt_tiny`` (DeiT-Ti layout: embed 192, 12 blocks, 3 heads) and ``sip_civt_small`` (DeiT-S).
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

__all__ = ["MultiTokenDistilledViT", "sip_civt_small", "sip_civt_tiny"]


class MultiTokenDistilledViT(VisionTransformer):
    """timm ``VisionTransformer`` + ``num_distill_tokens`` distillation tokens, each with its own head.

    Args:
        num_distill_tokens (int, optional): one per teacher. Defaults to 2.
        **kwargs: ``VisionTransformer`` arguments (class-token pooling is required).
    """

    def __init__(self, *args, num_distill_tokens: int = 2, **kwargs):
        weight_init = kwargs.pop("weight_init", "")
        if kwargs.get("no_embed_class") or kwargs.get("reg_tokens") or kwargs.get("dynamic_img_size"):
            raise ValueError("MultiTokenDistilledViT supports the classic layout only "
                             "(no no_embed_class, reg_tokens or dynamic_img_size)")
        super().__init__(*args, **kwargs, weight_init="skip")
        if self.global_pool != "token":
            raise ValueError("the distilled heads read the class and distillation tokens: global_pool must be 'token'")
        if num_distill_tokens < 1:
            raise ValueError(f"num_distill_tokens must be >= 1, got {num_distill_tokens}")
        self.num_distill_tokens = num_distill_tokens
        self.num_prefix_tokens = 1 + num_distill_tokens
        self.dist_tokens = nn.Parameter(torch.zeros(1, num_distill_tokens, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens,
                                                  self.embed_dim))
        self.heads_dist = nn.ModuleList(
            nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
            for _ in range(num_distill_tokens))
        self.distilled_training = False  # set True (set_distilled_training) to get every head in training
        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        if weight_init != "skip":
            self.init_weights(needs_reset=False)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        trunc_normal_(self.dist_tokens, std=0.02)
        super().init_weights(mode=mode or self.weight_init_mode, needs_reset=needs_reset)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_tokens"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "", "token"):
            raise ValueError("the distilled heads read the class and distillation tokens")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.heads_dist = nn.ModuleList(nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
                                        for _ in range(self.num_distill_tokens))

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1, 2) if x.ndim == 4 else x
        b = x.shape[0]
        x = torch.cat((self.cls_token.expand(b, -1, -1), self.dist_tokens.expand(b, -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        tokens = [self.head_drop(x[:, i]) for i in range(self.num_prefix_tokens)]
        if pre_logits:
            return torch.stack(tokens).mean(0)
        outs = [self.head(tokens[0])] + [head(t) for head, t in zip(self.heads_dist, tokens[1:])]
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return tuple(outs)
        return torch.stack(outs).mean(0)


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": ("head", "heads_dist"),
            **kwargs}


# register_model reads this module attribute, so it must exist before the entry points below.
default_cfgs = generate_default_cfgs({"sip_civt_tiny": _cfg(), "sip_civt_small": _cfg()})


def _create(variant: str, pretrained: bool = False, **kwargs) -> MultiTokenDistilledViT:
    return build_model_with_cfg(MultiTokenDistilledViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg={"out_indices": 3, "feature_cls": "getter"}, **kwargs)


@register_model
def sip_civt_tiny(pretrained: bool = False, **kwargs) -> MultiTokenDistilledViT:
    """CivT-Ti: DeiT-Ti (patch 16, embed 192, 12 blocks, 3 heads) with one distillation token per teacher."""
    args = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3}
    return _create("sip_civt_tiny", pretrained, **dict(args, **kwargs))


@register_model
def sip_civt_small(pretrained: bool = False, **kwargs) -> MultiTokenDistilledViT:
    """CivT-S: DeiT-S (patch 16, embed 384, 12 blocks, 6 heads) with one distillation token per teacher."""
    args = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}
    return _create("sip_civt_small", pretrained, **dict(args, **kwargs))
