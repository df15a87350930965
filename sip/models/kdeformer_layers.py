"""KDEformer in models: a timm attention layer for sip's ViTs and a diffusers processor for SD UNets.

Both call :func:`sip.models.kdeformer.kdeformer_attention`, which itself falls back to exact attention
for sequences shorter than ``config.min_tokens`` or a budget that covers every key, so swapping them in
changes nothing for short sequences (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention

from sip.models.kdeformer import KDEformerConfig, kdeformer_attention
from sip.models.vit_small_data import LocalitySelfAttention


def _as_config(kdeformer: KDEformerConfig | dict | None) -> KDEformerConfig:
    return KDEformerConfig(**kdeformer) if isinstance(kdeformer, dict) else kdeformer or KDEformerConfig()


class _KDEformerForward:
    """The forward both KDEformer layers share (timm's: qkv, q/k norms, attention, norm, projection), with
    the attention itself left to ``_attend``."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(f"{type(self).__name__} supports unmasked bidirectional attention only")
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = self._attend(self.q_norm(q), self.k_norm(k), v)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class KDEformerAttention(_KDEformerForward, Attention):
    """timm ``Attention`` whose softmax attention is KDEformer's estimate (ViT ``attn_layer``).

    Args:
        dim (int): token width.
        num_heads (int): heads. Defaults to 8.
        kdeformer (KDEformerConfig | dict, optional): budget and hashing. Defaults to ``KDEformerConfig()``.
        **kwargs: the other arguments of timm's ``Attention``.
    """

    def __init__(self, dim: int, num_heads: int = 8, kdeformer: KDEformerConfig | dict | None = None, **kwargs):
        kwargs.pop("depth", None)
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.kdeformer = _as_config(kdeformer)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kdeformer_attention(q, k, v, self.kdeformer, scale=self.scale)


class KDEformerLocalitySelfAttention(_KDEformerForward, LocalitySelfAttention):
    """Locality Self-Attention (learned temperature, diagonal masked) with KDEformer's estimate: the
    temperature scales the queries and the estimator excludes each query's own key. Arguments as
    :class:`KDEformerAttention`."""

    def __init__(self, dim: int, num_heads: int = 8, kdeformer: KDEformerConfig | dict | None = None, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.kdeformer = _as_config(kdeformer)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kdeformer_attention(q * self.temperature.to(q.dtype), k, v, self.kdeformer, scale=1.0,
                                   exclude_self=True)


_SWAPS = {Attention: KDEformerAttention, LocalitySelfAttention: KDEformerLocalitySelfAttention}


def use_kdeformer_in_vit(model: torch.nn.Module, config: KDEformerConfig) -> int:
    """Swap every timm ``Attention`` (and sip's Locality Self-Attention) of a trained ViT for its KDEformer
    version with the same weights (for evaluating a model trained with exact attention); layers swapped
    before get the new config. Returns how many layers use ``config`` now."""
    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, _KDEformerForward):
                child.kdeformer = config
                swapped += 1
            elif type(child) in _SWAPS:
                new = _SWAPS[type(child)].__new__(_SWAPS[type(child)])
                new.__dict__.update(child.__dict__)
                new.kdeformer = config
                setattr(module, name, new)
                swapped += 1
    return swapped


class KDEformerAttnProcessor:
    """diffusers attention processor: KDEformer for self-attention of at least ``config.min_tokens``
    tokens (the high-resolution UNet blocks), exact SDPA for everything else (cross-attention, masks,
    short sequences). Follows diffusers' ``AttnProcessor2_0`` step for step."""

    def __init__(self, config: KDEformerConfig = KDEformerConfig()):
        self.config = config

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        self_attention = encoder_hidden_states is None
        batch, seq_len, _ = hidden_states.shape if self_attention else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if self_attention:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self_attention and attention_mask is None and query.shape[-2] >= self.config.min_tokens:
            hidden_states = kdeformer_attention(query, key, value, self.config)
        else:
            hidden_states = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_kdeformer_in_unet(unet: Any, config: KDEformerConfig) -> int:
    """Give every self-attention (``attn1``) of a diffusers UNet a :class:`KDEformerAttnProcessor`
    (cross-attention keeps its processor). Returns how many processors were set."""
    processors = dict(unet.attn_processors)
    count = 0
    for name in processors:
        if name.endswith("attn1.processor"):
            processors[name] = KDEformerAttnProcessor(config)
            count += 1
    unet.set_attn_processor(processors)
    return count
