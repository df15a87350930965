"""Mixup / CutMix between the images of a batch, reproducible from (seed, epoch, step).

Patient and consistent distillation (Beyer et al., "Knowledge distillation: A good teacher is patient
and consistent", CVPR 2022) trains the student on exactly the view the teacher labelled, including
mixup between images ("function matching"): the teacher's soft labels are computed on the *mixed*
image, not mixed from the two images' labels. For an online teacher that only needs the teacher to run
on the student's mixed batch; for stored teacher logits the mix itself must be replayable, so every
random choice here comes from a generator seeded by (run seed, epoch, step), never from global state.

Mixup (Zhang et al., ICLR 2018): ``x = λ·x_i + (1-λ)·x_j`` with ``λ ~ Beta(α, α)``.
CutMix (Yun et al., ICCV 2019): a box of area ``1-λ`` of ``x_j`` pasted into ``x_i``; ``λ`` is then
corrected to the box's real area after clipping at the border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sip.ids import stable_seed


@dataclass(frozen=True)
class BatchMixConfig:
    """Which mix a batch gets.

    Attributes:
        mixup_alpha: Beta(α, α) for mixup; 0 = no mixup. Beyer et al. use 1.0 for function matching.
        cutmix_alpha: Beta(α, α) for CutMix; 0 = no CutMix.
        prob: probability that a batch is mixed at all (1.0 = always).
        switch_prob: when both are on, the probability of CutMix instead of mixup for a batch.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        for name in ("prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class BatchMix:
    """One batch's mix: partner index per sample, the weight λ of the sample itself, and the CutMix box.

    ``box`` is ``(top, left, height, width)`` in pixels, or None for mixup (or no mix: ``lam == 1``).
    """

    perm: torch.Tensor
    lam: float
    box: tuple[int, int, int, int] | None = None

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The mixed batch (a new tensor; ``images`` is left unchanged)."""
        if self.lam >= 1.0:
            return images
        partner = images[self.perm]
        if self.box is None:
            return images * self.lam + partner * (1.0 - self.lam)
        top, left, h, w = self.box
        out = images.clone()
        out[..., top:top + h, left:left + w] = partner[..., top:top + h, left:left + w]
        return out

    def mix_targets(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Soft targets ``λ·onehot(y_i) + (1-λ)·onehot(y_j)`` (for a hard-label term on mixed images)."""
        one_hot = torch.nn.functional.one_hot(targets, num_classes).float()
        if self.lam >= 1.0:
            return one_hot
        return one_hot * self.lam + one_hot[self.perm] * (1.0 - self.lam)


def draw_batch_mix(config: BatchMixConfig, batch_size: int, image_size: tuple[int, int], seed: int, epoch: int,
                   step: int) -> BatchMix:
    """The mix of batch ``step`` of ``epoch``: the same numbers in every process and every rerun.

    Args:
        config (BatchMixConfig): which mixes and how strong.
        batch_size (int): samples in the batch.
        image_size (tuple[int, int]): ``(height, width)`` of the images (CutMix boxes).
        seed (int): the run seed.
        epoch (int): 0-based epoch.
        step (int): 0-based step within the epoch.
    """
    identity = BatchMix(torch.arange(batch_size), 1.0)
    if not config.enabled or batch_size < 2:
        return identity
    rng = np.random.default_rng(stable_seed("batch-mix", seed, epoch, step))
    if rng.random() >= config.prob:
        return identity
    use_cutmix = config.cutmix_alpha > 0 and (config.mixup_alpha <= 0 or rng.random() < config.switch_prob)
    lam = float(rng.beta(config.cutmix_alpha if use_cutmix else config.mixup_alpha,
                         config.cutmix_alpha if use_cutmix else config.mixup_alpha))
    perm = torch.from_numpy(rng.permutation(batch_size))
    if not use_cutmix:
        return BatchMix(perm, lam)
    h, w = image_size
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    area = (bottom - top) * (right - left)
    return BatchMix(perm, 1.0 - area / float(h * w), (top, left, bottom - top, right - left))
