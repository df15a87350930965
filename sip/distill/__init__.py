"""Knowledge distillation: KD losses, teachers, precomputed teacher logits, and the ``sip distill`` /
``sip logits`` runs.

Importing this package registers sip's timm architectures (``sip_rednet_*`` involution networks and
``sip_civt_*`` multi-token distilled ViTs).
"""

from sip import involution as _involution  # noqa: F401  (registers sip_rednet_* with timm)
from sip.distill import civt as _civt  # noqa: F401  (registers sip_civt_* with timm)
from sip.distill.logits import StoreMismatchError, TeacherLogitsStore, ViewConfig, dataset_fingerprint
from sip.distill.losses import KD_LOSSES, build_kd_loss, register_kd_loss
from sip.distill.run import (
    DistillRecipe,
    LogitsRecipe,
    LossSection,
    StoreSection,
    run_distillation,
    run_logits,
)
from sip.distill.teachers import Teacher, TeacherSection, build_teacher, build_teachers

__all__ = [
    "KD_LOSSES",
    "DistillRecipe",
    "LogitsRecipe",
    "LossSection",
    "StoreMismatchError",
    "StoreSection",
    "Teacher",
    "TeacherLogitsStore",
    "TeacherSection",
    "ViewConfig",
    "build_kd_loss",
    "build_teacher",
    "build_teachers",
    "dataset_fingerprint",
    "register_kd_loss",
    "run_distillation",
    "run_logits",
]
