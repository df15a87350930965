"""Detection KD losses: each a small ``nn.Module`` with one fixed signature, its formula and paper in its
docstring, zero when the student's outputs equal the teacher's. A detection distillation step sums them as
named, weighted terms (``kd_cls``, ``kd_box``, ``kd_feat``) beside the detector's own box losses.

Shapes follow torchvision's dense heads (FCOS, RetinaNet): class logits ``[N, A, K]`` over all anchors
``A`` of all pyramid levels, box regression ``[N, A, 4]``, pyramid features ``[N, C, H_l, W_l]`` per level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ClassScoreKD(nn.Module):
    """Dense class-score distillation: the teacher's per-location, per-class sigmoid scores as soft targets.

    .. math:: L = \\frac{T^2}{N A} \\sum_{n,a,k} \\mathrm{KL}\\big(\\mathrm{Bern}(\\sigma(t_{nak}/T))\\,\\|\\,
              \\mathrm{Bern}(\\sigma(s_{nak}/T))\\big)

    Hinton et al.'s KD ("Distilling the Knowledge in a Neural Network", 2015) applied to every anchor of a
    one-stage detector with sigmoid classifiers, as in Chen et al., "Learning Efficient Object Detection Models
    with Knowledge Distillation", NeurIPS 2017 (there with softmax over classes). Binary KL, so it is 0 exactly
    when the scores agree.

    Args:
        temperature (float): softens both score maps (T² keeps the gradient scale). Defaults to 1.0.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"kd.temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        s, t = student_logits.float() / T, teacher_logits.float() / T
        p = torch.sigmoid(t)
        # KL(Bern(p) || Bern(q)) = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)), in log-sigmoid form
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return kl.sum(-1).mean() * T * T


def edge_distribution(edges: torch.Tensor, low: float, high: float, bins: int, sigma: float) -> torch.Tensor:
    """Box edges (``[..., 4]`` regression values) as logits of a distribution over ``bins`` values in
    ``[low, high]``: a Gaussian of width ``sigma`` (in bin units) around each value (``[..., 4, bins]``). Lets
    LD distil heads that regress one number per edge (FCOS, RetinaNet) as it distils GFL's edge distributions."""
    support = torch.linspace(low, high, bins, device=edges.device, dtype=torch.float32)
    step = (high - low) / max(bins - 1, 1)
    return -((edges.float().unsqueeze(-1) - support) / (sigma * step)) ** 2 / 2


class LocalizationDistillation(nn.Module):
    """Localization distillation (LD): each box edge as a distribution, the teacher's softened one the target.

    .. math:: L = \\frac{T^2}{\\sum w} \\sum_{n,a} w_{na} \\sum_{e=1}^{4}
              \\mathrm{KL}\\big(\\mathrm{softmax}(z^t_{nae}/T)\\,\\|\\,\\mathrm{softmax}(z^s_{nae}/T)\\big)

    Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022. ``z`` are edge-distribution
    logits (a GFL head's, or :func:`edge_distribution` of a regression head's edges); ``w`` weights locations
    (LD's distillation region; here the teacher's top class score, so background locations count little).

    Args:
        temperature (float): LD's T (10 in the paper for GFL heads). Defaults to 10.0.
    """

    def __init__(self, temperature: float = 10.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"kd.box_temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student_edges: torch.Tensor, teacher_edges: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        T = self.temperature
        target = F.softmax(teacher_edges.float() / T, -1)
        kl = (target * (F.log_softmax(teacher_edges.float() / T, -1)
                        - F.log_softmax(student_edges.float() / T, -1))).sum(-1).sum(-1)  # [N, A]
        w = torch.ones_like(kl) if weight is None else weight.float()
        return (kl * w).sum() / w.sum().clamp_min(1e-6) * T * T


class FeatureImitation(nn.Module):
    """Focal feature imitation on the pyramid: squared error between student and teacher features, object
    pixels and background weighted apart.

    .. math:: L = \\sum_l \\frac{1}{N C H_l W_l} \\sum (\\alpha M_l + \\beta (1 - M_l)) (F^s_l - F^t_l)^2

    The focal part of FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022),
    with ``M_l`` the ground-truth boxes' mask at level ``l``; with ``beta = 0`` it is fine-grained imitation of
    object regions (Wang et al., "Distilling Object Detectors with Fine-grained Feature Imitation", CVPR 2019).
    Student and teacher pyramids must have the same channels (``detector.fpn_channels``): no adapter is trained.

    Args:
        alpha (float): weight of object pixels. Defaults to 1.0.
        beta (float): weight of background pixels. Defaults to 0.5.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.5):
        super().__init__()
        if alpha < 0 or beta < 0 or alpha + beta == 0:
            raise ValueError(f"kd.feat_alpha / feat_beta must be >= 0, not both 0, got {alpha}, {beta}")
        self.alpha, self.beta = alpha, beta

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                boxes: Sequence[torch.Tensor], image_size: int) -> torch.Tensor:
        total = student_feats[0].new_zeros((), dtype=torch.float32)
        for s, t in zip(student_feats, teacher_feats):
            if s.shape != t.shape:
                raise ValueError(f"feature imitation needs equal pyramid shapes, got student {tuple(s.shape)} and "
                                 f"teacher {tuple(t.shape)}: give both detectors the same detector.fpn_channels and "
                                 "pyramid strides")
            mask = box_mask(boxes, s.shape[-2:], image_size).to(s.device)
            weight = self.alpha * mask + self.beta * (1 - mask)
            total = total + (weight[:, None] * (s.float() - t.float()) ** 2).mean()
        return total


def box_mask(boxes: Sequence[torch.Tensor], hw: tuple[int, int], image_size: int) -> torch.Tensor:
    """1 inside any of each image's boxes (xyxy px of an ``image_size`` scene) on an ``hw`` grid, else 0."""
    h, w = int(hw[0]), int(hw[1])
    mask = torch.zeros(len(boxes), h, w)
    for n, bs in enumerate(boxes):
        for x1, y1, x2, y2 in bs.tolist():
            c1, r1 = int(x1 * w / image_size), int(y1 * h / image_size)
            c2, r2 = max(int(-(-x2 * w // image_size)), c1 + 1), max(int(-(-y2 * h // image_size)), r1 + 1)
            mask[n, r1:r2, c1:c2] = 1
    return mask


__all__ = ["ClassScoreKD", "FeatureImitation", "LocalizationDistillation", "box_mask", "edge_distribution"]
