"""How a teacher-logits store draws its views (:class:`ViewConfig`). The views themselves — a crop box in an
image's own pixels plus a horizontal flip, drawn like timm's ``RandomResizedCrop``, and the model input a view
gives at any input size — live in :mod:`sip.train.views` (shared with ``sip train``) and are re-exported here.

A stored view (:class:`sip.distill.logits.TeacherLogitsStore`) is replayed by the student with the same
crop and flip, resized to its own input size, so the teachers' logits belong to exactly what the student
sees; online distillation draws its views with the same :func:`sample_view`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sip.train.views import apply_view, identity_view, sample_view, view_input

__all__ = ["ViewConfig", "apply_view", "identity_view", "sample_view", "view_input"]


@dataclass(frozen=True)
class ViewConfig:
    """How the stored views are drawn (the same distribution as timm's RandomResizedCrop + flip).

    Attributes:
        views: views stored per image; more views = more augmentation diversity for the student, at
            ``views`` teacher passes per image, once.
        identity_view: view 0 is the whole image, unflipped (what a data-free student's label is).
        scale, ratio: RandomResizedCrop area and aspect ranges.
        hflip: flip probability.
        seed: with the sample id and view index, fixes every view.
    """

    views: int = 4
    identity_view: bool = True
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.views <= 0:
            raise ValueError(f"views must be positive, got {self.views}")
