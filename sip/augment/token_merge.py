"""Token merging in a UNet's largest self-attentions (ToMe for SD) for any diffusers ``UNet2DConditionModel``.

ToMe for SD (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", CVPRW 2023) merges redundant
tokens before a self-attention and copies the result back to every merged token after it, so attention's
quadratic cost and its projections run on fewer tokens. Tokens are split on a grid: in every 2x2 cell one
token is a *destination*, the other three are *sources*; the ``r`` sources most similar (cosine) to some
destination are averaged into it, ``r = int(ratio * tokens)`` (at most 3/4 of the tokens). As the paper
recommends, only self-attention is merged (not cross-attention or the MLP), and only in the
highest-resolution level that has self-attention (64x64 tokens for SD 1.x/2.x at 512 px, where attention
costs most; the 2x-downsampled level for SDXL, whose first level has no attention).

Differences from the ``tomesd`` package (0.1.3, May 2023), which sip does not use: tomesd picks each
cell's destination with one global random generator, so the same seed gives other images from call to
call; here the pick is seeded by the UNet call's index in the block and the layer's index, the same for
every image in the batch, so images stay reproducible and independent of batching. The similarity is
measured on the attention's input (after the block's norm), not on the block's input. tomesd also
replaces the whole ``BasicTransformerBlock.forward`` with a 2023 copy of it; this wraps only the
attention call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from sip.augment.unet_patch import patched_forwards

MAX_MERGE_RATIO = 0.75  # one token in each 2x2 cell is a destination: at most the other 3 can merge


@dataclass
class MergeState:
    """What one :func:`token_merging` block knows.

    Attributes:
        ratio (float): share of tokens merged away in each merged attention.
        size (tuple | None): latent (height, width) of the current UNet call.
        calls (int): UNet calls so far in this block (seeds the destination picks).
        merged (int): attention calls that ran on merged tokens.
    """

    ratio: float
    size: tuple[int, int] | None = None
    calls: int = 0
    merged: int = 0


def self_attention_levels(unet: nn.Module) -> list[tuple[int, nn.Module]]:
    """Every self-attention of the UNet with its level (how many times its block's input was downsampled).

    A self-attention is a diffusers ``Attention`` named ``attn1`` that is not a cross-attention. Down block
    ``i`` runs at level ``i``, the mid block at the deepest level, up block ``j`` at ``levels - 1 - j``.
    """
    if not all(isinstance(getattr(unet, n, None), nn.ModuleList) for n in ("down_blocks", "up_blocks")):
        raise ValueError(f"generate.token_merge_ratio > 0 needs a UNet with down_blocks and up_blocks (a diffusers "
                         f"UNet2DConditionModel, as in Stable Diffusion 1.x/2.x/XL); got {type(unet).__name__}. "
                         f"Set generate.token_merge_ratio: 0 for this model.")
    deepest = len(unet.down_blocks) - 1
    blocks = [(i, b) for i, b in enumerate(unet.down_blocks)] + [(deepest, getattr(unet, "mid_block", None))]
    blocks += [(deepest - j, b) for j, b in enumerate(unet.up_blocks)]
    return [(level, m) for level, block in blocks if block is not None for name, m in block.named_modules()
            if name.split(".")[-1] == "attn1" and hasattr(m, "to_q")
            and getattr(m, "is_cross_attention", True) is False]


def merge_targets(unet: nn.Module) -> tuple[int, list[nn.Module]]:
    """The level ToMe merges at (the highest-resolution one with self-attention) and its self-attentions."""
    found = self_attention_levels(unet)
    if not found:
        return 0, []
    level = min(lv for lv, _ in found)
    return level, [m for lv, m in found if lv == level]


def bipartite_soft_matching(x: torch.Tensor, h: int, w: int, r: int,
                            generator: torch.Generator) -> tuple[Callable, Callable]:
    """ToMe's bipartite soft matching on an ``h`` x ``w`` token grid, with 2x2 cells.

    Args:
        x (torch.Tensor): (batch, h * w, channels) tokens in row-major order; the similarity metric.
        h (int): grid height.
        w (int): grid width.
        r (int): tokens to merge away (capped at the number of source tokens).
        generator (torch.Generator): picks each cell's destination token (the same for the whole batch).

    Returns:
        (merge, unmerge): ``merge`` maps (batch, h * w, c) to (batch, h * w - r, c), averaging each merged
        source into its destination; ``unmerge`` maps back, copying a destination to its merged sources.
    """
    batch, n, _ = x.shape
    hs, ws = h // 2, w // 2
    if hs * ws == 0 or r <= 0:
        return (lambda t: t), (lambda t: t)
    device = x.device
    # 1. one destination per 2x2 cell (marked -1) at a seeded position; rows / columns past the last
    #    whole cell are all sources
    pick = torch.randint(4, (hs, ws, 1), generator=generator).to(device)
    cells = torch.zeros(hs, ws, 4, dtype=torch.int64, device=device).scatter_(2, pick, -1)
    cells = cells.view(hs, ws, 2, 2).transpose(1, 2).reshape(hs * 2, ws * 2)
    grid = torch.zeros(h, w, dtype=torch.int64, device=device)
    grid[: hs * 2, : ws * 2] = cells
    order = grid.reshape(1, -1, 1).argsort(dim=1, stable=True)  # destinations first, then sources
    n_dst = hs * ws
    src_pos, dst_pos = order[:, n_dst:], order[:, :n_dst]
    r = min(r, n - n_dst)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = t.shape[-1]
        return t.gather(1, src_pos.expand(batch, -1, c)), t.gather(1, dst_pos.expand(batch, -1, c))

    # 2. each source's most similar destination; the r best-matched sources merge
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = split(metric)
        best, best_dst = (a @ b.transpose(-1, -2)).max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True, stable=True)[..., None]
        kept, moved = ranked[:, r:], ranked[:, :r]
        moved_dst = best_dst[..., None].gather(1, moved)
        kept_pos = src_pos.expand(batch, -1, 1).gather(1, kept)
        moved_pos = src_pos.expand(batch, -1, 1).gather(1, moved)

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = split(t)
        c = t.shape[-1]
        merged = src.gather(1, moved.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, moved_dst.expand(-1, -1, c), merged, reduce="mean")
        return torch.cat([src.gather(1, kept.expand(-1, -1, c)), dst], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        c, n_kept = t.shape[-1], kept.shape[1]
        kept_out, dst = t[:, :n_kept], t[:, n_kept:]
        out = t.new_zeros(batch, n, c)
        out.scatter_(1, dst_pos.expand(batch, -1, c), dst)
        out.scatter_(1, kept_pos.expand(-1, -1, c), kept_out)
        out.scatter_(1, moved_pos.expand(-1, -1, c), dst.gather(1, moved_dst.expand(-1, -1, c)))
        return out

    return merge, unmerge


def _grid(size: tuple[int, int], level: int) -> tuple[int, int]:
    """Token grid after ``level`` stride-2 downsamplings (each rounds up, like a 3x3 stride-2 conv, padding 1)."""
    h, w = size
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def _start_call(state: MergeState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    sample = args[0] if args else kwargs["sample"]
    state.size = (int(sample.shape[-2]), int(sample.shape[-1]))
    state.calls += 1


def _merged_forward(state: MergeState, index: int, level: int, forward: Callable) -> Callable:
    def forward_on_merged_tokens(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        context = kwargs.get("encoder_hidden_states", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if context is not None or mask is not None or hidden_states.ndim != 3 or state.size is None:
            return forward(hidden_states, *args, **kwargs)
        h, w = _grid(state.size, level)
        n = hidden_states.shape[1]
        r = int(n * state.ratio)
        if h * w != n or r <= 0:  # not the grid we expect: leave this call alone
            return forward(hidden_states, *args, **kwargs)
        generator = torch.Generator().manual_seed(state.calls * 4096 + index)
        merge, unmerge = bipartite_soft_matching(hidden_states, h, w, r, generator)
        state.merged += 1
        return unmerge(forward(merge(hidden_states), *args, **kwargs))

    return forward_on_merged_tokens


@contextmanager
def token_merging(unet: nn.Module, ratio: float) -> Iterator[MergeState]:
    """Within the block, merge ``ratio`` of the tokens in the UNet's highest-resolution self-attentions.

    ``ratio=0`` patches the attentions but merges nothing: the images are the unmerged ones, byte for byte.
    The attentions' ``forward`` is swapped only inside the block and restored on exit.

    Args:
        unet (nn.Module): a diffusers ``UNet2DConditionModel``.
        ratio (float): share of tokens merged away, in [0, 0.75]; ToMe for SD suggests <= 0.5.

    Yields:
        MergeState: ``state.merged`` counts the attention calls that ran on merged tokens.

    Example::

        with token_merging(pipe.unet, 0.5):
            images = pipe(prompt).images
    """
    if isinstance(ratio, bool) or not 0.0 <= float(ratio) <= MAX_MERGE_RATIO:
        raise ValueError(f"token merge ratio must be in [0, {MAX_MERGE_RATIO}] (0 = off; one token in each 2x2 "
                         f"cell is a merge destination), got {ratio!r}")
    level, targets = merge_targets(unet)
    state = MergeState(float(ratio))
    with patched_forwards(unet, targets, lambda index, forward: _merged_forward(state, index, level, forward),
                          partial(_start_call, state)):
        yield state
