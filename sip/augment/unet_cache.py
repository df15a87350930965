"""Feature caching between denoising steps (DeepCache) for any diffusers ``UNet2DConditionModel``.

DeepCache (Ma, Fang & Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024) observes that
a UNet's deep features change little from one denoising step to the next, while its shallow skip branch
carries the detail that does change. Every ``interval``-th UNet call is a *full* call whose block outputs
are kept; on the calls in between (*cache* calls) the UNet recomputes only its shallowest branch -- the
input convolution, the last layer of the last up block (its final resnet and the attention after it) and
the output head, with the step's own time embedding -- and takes every other block's output from the last
full call. This is DeepCache's default for Stable Diffusion (the shallowest branch, ``cache_branch_id=0``
in the authors' ``DeepCacheSDHelper``), in uniform mode.

Why sip has its own (about 150 lines) rather than the ``DeepCache`` package (0.1.1, Dec 2023): that
helper keeps its step state across pipeline calls (the first step of a call is counted from the first
call ever made, so a later call at another img2img strength can start on a cache step with the previous
batch's features) and finds the step by looking the timestep up in the scheduler's list (wrong for
schedulers that repeat timesteps, e.g. Heun). Here the state lives in one ``with`` block -- one pipeline
call -- and steps are counted as UNet calls.

The modules' ``forward`` attributes are swapped only inside :func:`feature_cache` and restored on exit,
so the UNet (and its ``state_dict``) is unchanged outside a call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from sip.augment.token_merge import MAX_MERGE_RATIO, token_merging
from sip.augment.unet_patch import patched_forwards



@dataclass
class CacheState:
    """What one :func:`feature_cache` block knows: the interval, the UNet calls so far and the kept outputs.

    Attributes:
        interval (int): a full UNet call every ``interval`` calls.
        calls (int): UNet calls so far in this block.
        full_calls (int): how many of them ran the whole UNet.
        reuse (bool): whether the current call is a cache call.
        key (tuple | None): (shape, dtype, device) of the last full call's input; a cache call needs the same.
        outputs (dict): the last full call's output of each cached module, by module index.
    """

    interval: int
    calls: int = 0
    full_calls: int = 0
    reuse: bool = False
    key: tuple | None = None
    outputs: dict[int, Any] = field(default_factory=dict)


def check_cacheable(unet: nn.Module) -> None:
    """Raise a ``ValueError`` unless ``unet`` has the down / up block structure feature caching needs."""
    blocks = [getattr(unet, name, None) for name in ("down_blocks", "up_blocks")]
    if not all(isinstance(b, nn.ModuleList) and len(b) > 0 for b in blocks):
        raise ValueError(f"generate.cache_interval > 1 needs a UNet with down_blocks and up_blocks (a diffusers "
                         f"UNet2DConditionModel, as in Stable Diffusion 1.x/2.x/XL); got {type(unet).__name__}. "
                         f"Set generate.cache_interval: 1 for this model.")


def cached_modules(unet: nn.Module) -> list[nn.Module]:
    """The modules whose outputs a cache call takes from the last full call.

    Every down block, the mid block, every up block but the last, and every layer of the last up block
    but its final resnet and the attention that follows it. That final resnet reads the input
    convolution's output through the outermost skip connection: with the output head it is the branch a
    cache call recomputes. An up block without a ``resnets`` list is recomputed whole.
    """
    check_cacheable(unet)
    modules = [*unet.down_blocks, getattr(unet, "mid_block", None), *unet.up_blocks[:-1]]
    last = unet.up_blocks[-1]
    resnets = list(getattr(last, "resnets", None) or [])
    attentions = list(getattr(last, "attentions", None) or [])
    if len(resnets) > 1:
        # CrossAttnUpBlock2D runs resnets[i] then attentions[i]; UpBlock2D has no attentions
        modules += resnets[:-1] + attentions[: len(resnets) - 1]
    return [m for m in modules if m is not None]


def _copied(value: Any) -> Any:
    """A copy of the tensors in a module output (tensor, tuple or list of them), other values as they are.

    Cache calls hand out copies: some UNet paths edit a block's output in place (FreeU scales the up
    path's features, a T2I-Adapter adds its residuals with ``+=``), which must not reach the cache.
    """
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_copied(v) for v in value)
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


def _start_call(state: CacheState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """UNet forward pre-hook: decide whether this call is a full or a cache call."""
    sample = args[0] if args else kwargs["sample"]
    key = (tuple(sample.shape), sample.dtype, sample.device)
    step, state.calls = state.calls, state.calls + 1
    # a changed input (another batch size, resolution or dtype) always gets a full call
    state.reuse = step % state.interval != 0 and key == state.key
    if not state.reuse:
        state.key = key
        state.full_calls += 1


def _cached_forward(state: CacheState, index: int, forward: Callable) -> Callable:
    def forward_or_reuse(*args: Any, **kwargs: Any) -> Any:
        if state.reuse and index in state.outputs:
            return _copied(state.outputs[index])
        out = forward(*args, **kwargs)
        if state.interval > 1:
            state.outputs[index] = out
        return out

    return forward_or_reuse


@contextmanager
def feature_cache(unet: nn.Module, interval: int) -> Iterator[CacheState]:
    """Within the block, run the whole UNet every ``interval`` calls and only its shallowest branch between.

    Use it around one pipeline call (one denoising loop): the first UNet call in the block is always a full
    one, and nothing is kept after it. ``interval=1`` patches the modules but reuses nothing: the images are
    the uncached ones, byte for byte.

    Args:
        unet (nn.Module): a diffusers ``UNet2DConditionModel`` (or one with ``down_blocks``, ``mid_block``,
            ``up_blocks`` called the same way).
        interval (int): a full UNet call every ``interval`` calls (>= 1); one call is one denoising step for
            the usual schedulers (classifier-free guidance batches both branches into one call).

    Yields:
        CacheState: counts of calls and full calls (``state.full_calls``) as the block runs.

    Example::

        with feature_cache(pipe.unet, interval=3):
            images = pipe(prompt, num_inference_steps=30).images   # 10 full UNet calls, 20 cheap ones
    """
    if isinstance(interval, bool) or int(interval) != interval or interval < 1:
        raise ValueError(f"cache interval must be an integer >= 1 (1 = off), got {interval!r}")
    state = CacheState(int(interval))
    try:
        with patched_forwards(unet, cached_modules(unet), partial(_cached_forward, state),
                              partial(_start_call, state)):
            yield state
    finally:
        state.outputs.clear()


def check_speedup_settings(cache_interval: int, token_merge_ratio: float, compile: bool = False) -> None:
    """Raise ``ValueError`` for generate.cache_interval / generate.token_merge_ratio values sip cannot honour."""
    if isinstance(cache_interval, bool) or int(cache_interval) != cache_interval or cache_interval < 1:
        raise ValueError(f"cache_interval must be an integer >= 1 (1 = off, N = the full UNet every N steps), "
                         f"got {cache_interval!r}")
    if not 0.0 <= token_merge_ratio <= MAX_MERGE_RATIO:
        raise ValueError(f"token_merge_ratio must be in [0, {MAX_MERGE_RATIO}] (0 = off; ToMe keeps one token "
                         f"of every 2x2 cell), got {token_merge_ratio}")
    if compile and (cache_interval > 1 or token_merge_ratio > 0):
        raise ValueError("compile cannot be combined with cache_interval > 1 or token_merge_ratio > 0: both "
                         "patch UNet modules for each call, which would recompile the UNet every call")


def unet_speedups(unet, cache_interval: int, token_merge_ratio: float) -> ExitStack:
    """Feature caching and token merging around one pipeline call (nothing when both are off)."""
    stack = ExitStack()
    if cache_interval > 1:
        stack.enter_context(feature_cache(unet, cache_interval))
    if token_merge_ratio > 0:
        stack.enter_context(token_merging(unet, token_merge_ratio))
    return stack
