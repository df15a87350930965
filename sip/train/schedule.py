"""The one learning-rate schedule (linear warm-up, then cosine decay) and the one exponential moving average
of weights that sip's training code and its scripts share."""

from __future__ import annotations

import math

import torch
from torch import nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """The learning-rate factor at ``step`` (0-based): linear warm-up over ``warmup_steps`` steps (step ``s``
    gets ``(s + 1) / (warmup_steps + 1)``), then a cosine from 1 down to ``floor`` at ``total_steps``.

    Args:
        step (int): the optimiser step about to be taken.
        warmup_steps (int): warm-up length; 0 starts at the peak.
        total_steps (int): where the cosine reaches ``floor`` (it stays there after).
        floor (float, optional): the final factor (``min_lr_ratio``). Defaults to 0.0.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """An exponential moving average of a module's floating-point state: ``ema ← decay · ema + (1 − decay) ·
    weights`` after each step (integer buffers are copied).

    Args:
        model (nn.Module): the module whose state is averaged (its current state is the start).
        decay (float): the weight of the average's past; 0.999 averages over ~1,000 steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the module's current state into the average."""
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.state[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        """Load the average into ``model``."""
        model.load_state_dict(self.state)
