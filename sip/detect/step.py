"""The detection training step for :func:`sip.train.loop.fit`: the detector's own losses (named terms as
torchvision names them: ``classification``, ``bbox_regression``, FCOS's ``bbox_ctrness``) and, with a
teacher, the detection KD terms (``kd_cls``, ``kd_box``, ``kd_feat``), the teacher run online on the
student's very batch (the same scenes, the same flips)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sip.detect.kd_losses import ClassScoreKD, FeatureImitation, LocalizationDistillation, edge_distribution


@dataclass(frozen=True)
class KDSection:
    """Detection KD: a teacher detector and the weight of each term (0 leaves a term out)."""

    teacher: str | None = None  # run folder / .safetensors of a sip detector (sip train task: detection); null = no KD
    gt: float = 1.0  # weight of the detector's own losses on the scene boxes (0: the teacher's outputs only)
    cls: float = 1.0  # dense class-score KD (ClassScoreKD)
    box: float = 1.0  # localization distillation of the box edges (LD)
    feat: float = 0.0  # focal feature imitation on the pyramid (FGD focal part; needs equal fpn_channels)
    temperature: float = 1.0  # class-score KD temperature
    box_temperature: float = 10.0  # LD temperature (the paper's 10)
    box_bins: int = 16  # LD: values each edge's distribution spans
    box_max: float = 8.0  # LD: largest edge value binned (FCOS: distance / stride)
    feat_alpha: float = 1.0  # feature imitation weight on object pixels
    feat_beta: float = 0.5  # ... and on background pixels

    def __post_init__(self):
        weights = {"kd.gt": self.gt, "kd.cls": self.cls, "kd.box": self.box, "kd.feat": self.feat}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"kd weights must be >= 0, got {weights}")
        if self.teacher and not (self.cls or self.box or self.feat):
            raise ValueError("kd.teacher is set but kd.cls, kd.box and kd.feat are all 0: set a KD weight or remove "
                             "kd.teacher")
        if not self.teacher and self.gt == 0:
            raise ValueError("kd.gt is 0 without kd.teacher: nothing would be learned; set kd.teacher or kd.gt > 0")
        if self.box_bins < 2 or self.box_max <= 0:
            raise ValueError(f"kd.box_bins must be >= 2 and kd.box_max > 0, got {self.box_bins}, {self.box_max}")


def dense_forward(model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None):
    """A torchvision FCOS / RetinaNet forward split open: (its losses on ``targets`` or {}, head outputs,
    pyramid features). Same computation as ``model(images, targets)`` in training mode."""
    from torchvision.models.detection import FCOS

    image_list, targets = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    head = model.head(features)
    losses: dict[str, torch.Tensor] = {}
    if targets is not None:
        anchors = model.anchor_generator(image_list, features)
        if isinstance(model, FCOS):
            losses = model.compute_loss(targets, head, anchors, [f.size(2) * f.size(3) for f in features])
        else:
            losses = model.compute_loss(targets, head, anchors)
    return losses, head, features


def check_teacher(kd: KDSection, student: nn.Module, teacher: nn.Module) -> None:
    """Raise ``ValueError`` when the dense KD terms cannot compare ``student`` and ``teacher`` location by location:
    another head, other pyramid strides (levels), or, with ``kd.feat``, other pyramid channels."""
    if type(student) is not type(teacher):
        raise ValueError(f"kd.teacher is a {type(teacher).__name__}, the student a {type(student).__name__}: the "
                         "dense KD terms compare head outputs anchor by anchor; give both the same detector.head")
    s, t = student.backbone, teacher.backbone
    if list(s.strides) != list(t.strides):
        raise ValueError(f"kd.teacher's pyramid has strides {list(t.strides)}, the student's {list(s.strides)}: the "
                         "dense KD terms compare locations one to one; give a ViT student detector.patch_size "
                         f"{2 * min(t.strides)} (strides patch/2, patch, 2·patch)")
    if kd.feat and s.out_channels != t.out_channels:
        raise ValueError(f"kd.feat: feature imitation needs equal pyramids, the student's has {s.out_channels} "
                         f"channels (detector.fpn_channels), kd.teacher's {t.out_channels}: set detector.fpn_channels: "
                         f"{t.out_channels} or kd.feat: 0")


def make_detection_step(kd: KDSection, teacher: nn.Module | None, device, image_size: int, box_low: float):
    """The :data:`sip.train.loop.StepFn` of a detection run (``box_low``: the smallest regression value LD bins:
    0 for FCOS's distances, ``-kd.box_max`` for RetinaNet's deltas)."""
    cls_kd = ClassScoreKD(kd.temperature)
    box_kd = LocalizationDistillation(kd.box_temperature)
    feat_kd = FeatureImitation(kd.feat_alpha, kd.feat_beta)

    def edges(regression: torch.Tensor) -> torch.Tensor:
        return edge_distribution(regression, box_low, kd.box_max, kd.box_bins, sigma=1.0)

    def step_fn(model: nn.Module, batch: dict[str, Any], epoch: int, step: int):
        images = list(batch["image"].to(device, non_blocking=True))
        targets = [{"boxes": b.to(device), "labels": y.to(device)} for b, y in zip(batch["boxes"], batch["labels"])]
        if teacher is None:
            return model(images, targets), None, None
        losses, head, feats = dense_forward(model, images, targets if kd.gt else None)
        with torch.no_grad():
            _, t_head, t_feats = dense_forward(teacher, images, None)
        terms = {name: kd.gt * v for name, v in losses.items()}
        if kd.cls:
            terms["kd_cls"] = kd.cls * cls_kd(head["cls_logits"], t_head["cls_logits"])
        if kd.box:
            weight = torch.sigmoid(t_head["cls_logits"].float()).amax(-1)
            terms["kd_box"] = kd.box * box_kd(edges(head["bbox_regression"]), edges(t_head["bbox_regression"]), weight)
        if kd.feat:
            terms["kd_feat"] = kd.feat * feat_kd(feats, t_feats, [t["boxes"] for t in targets], image_size)
        return terms, None, None

    return step_fn


__all__ = ["KDSection", "check_teacher", "dense_forward", "make_detection_step"]
