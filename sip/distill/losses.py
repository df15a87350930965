"""Knowledge-distillation losses: one registry, one signature.

Every loss is a small ``nn.Module`` with ``terms(student_out, teacher_out, targets) -> {name: scalar}``,
its weighted terms (``"ce"``: the ground-truth part, ``"kd"``: the teacher part), and
``forward(...) -> scalar``, their sum (what is back-propagated). The training step logs each term, so
``metrics.jsonl`` shows the balance of hard and soft terms (as timm's ``LogitDistillationTask`` returns
``task_loss`` and ``kd_loss``). A loss of your own may implement ``forward`` only; it is then logged as one
term, ``"loss"``. Arguments:

- ``student_out``: logits ``[B, C]``, or for students with distillation tokens a tuple
  ``(cls_logits, dist_logits_1, ..., dist_logits_K)`` (timm's distilled DeiT models return
  ``(cls, dist)`` in training once ``set_distilled_training(True)`` is called; sip's ``sip_civt_*``
  return one distillation output per teacher).
- ``teacher_out``: logits ``[B, C]`` of one teacher, or ``[K, B, C]`` (a stacked tensor or a sequence)
  of K teachers.
- ``targets``: hard labels ``[B]`` (int64), class probabilities ``[B, C]`` (the mixed labels of a mixup /
  CutMix batch), or ``None`` when there are none (data-free distillation, where the teacher's soft outputs
  are the only labels; the ground-truth weight must then be 0).

Build one by name with :func:`build_kd_loss`; add your own with ``@register_kd_loss("name")``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sip.registry import Registry

KD_LOSSES: Registry[type[nn.Module]] = Registry("KD loss")


def register_kd_loss(name: str, overwrite: bool = False) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a loss buildable by ``name`` (in recipes: ``loss.name``)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        KD_LOSSES.register(name, cls, overwrite=overwrite)
        cls.registry_name = name
        return cls

    return wrap


def build_kd_loss(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered loss; an unknown name lists the valid ones, a wrong argument the valid ones."""
    cls = KD_LOSSES.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"KD loss {name!r} takes {', '.join(accepted) or 'no arguments'}; got {sorted(kwargs)}") from e


def kd_loss_arguments(name: str) -> list[str]:
    """The constructor arguments of a registered loss (a recipe passes only those it sets)."""
    return [p for p in inspect.signature(KD_LOSSES.get(name).__init__).parameters if p != "self"]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def _as_logits(student_out) -> torch.Tensor:
    """A single logit tensor: a tuple of heads is averaged (what the model predicts at inference)."""
    if isinstance(student_out, (tuple, list)):
        return torch.stack([o.float() for o in student_out]).mean(0)
    return student_out.float()


def _teachers(teacher_out) -> torch.Tensor:
    """Teacher logits as ``[K, B, C]`` float."""
    if isinstance(teacher_out, (tuple, list)):
        teacher_out = torch.stack(list(teacher_out))
    if teacher_out.ndim == 2:
        teacher_out = teacher_out.unsqueeze(0)
    if teacher_out.ndim != 3:
        raise ValueError(f"teacher logits must be [B, C] or [K, B, C], got shape {tuple(teacher_out.shape)}")
    return teacher_out.float()


def _check_classes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student predicts {student.shape[-1]} classes but the teacher {teacher.shape[-1]}")
    if student.shape[0] != teacher.shape[-2]:
        raise ValueError(f"batch sizes differ: student {student.shape[0]}, teacher {teacher.shape[-2]}")


def _normalised_weights(weights: Sequence[float] | None, k: int, device) -> torch.Tensor:
    if not weights:
        return torch.full((k,), 1.0 / k, device=device)
    if len(weights) != k:
        raise ValueError(f"{len(weights)} teacher weights given for {k} teachers")
    w = torch.tensor([float(x) for x in weights], device=device)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {list(weights)}")
    return w / w.sum()


def soft_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(p_teacher ‖ softmax(z_s / T))``, batch mean, for already-softened teacher probabilities."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, teacher_probs, reduction="batchmean") * temperature**2


def _hard_part(logits: torch.Tensor, targets: torch.Tensor | None, weight: float, label_smoothing: float,
               name: str) -> torch.Tensor:
    """``weight · CE(logits, targets)``; ``targets`` hard ``[B]`` or soft ``[B, C]`` (mixed labels)."""
    if weight == 0:
        return logits.new_zeros(())
    if targets is None:
        raise ValueError(f"{name}: no ground-truth labels (data-free?) but their weight is {weight}; set alpha=1")
    if targets.is_floating_point() and targets.shape != logits.shape:
        raise ValueError(f"{name}: soft targets must be [B, C] = {tuple(logits.shape)}, got {tuple(targets.shape)}")
    return weight * F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class NamedTermsLoss(nn.Module):
    """A loss whose value is the sum of named, already weighted terms (see the module docstring)."""

    def terms(self, student_out, teacher_out, targets) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, student_out, teacher_out, targets) -> torch.Tensor:
        return torch.stack(list(self.terms(student_out, teacher_out, targets).values())).sum()


def loss_terms(loss_fn: nn.Module, student_out, teacher_out, targets) -> dict[str, torch.Tensor]:
    """Named terms of any KD loss: its ``terms`` when it has them, else ``{"loss": loss_fn(...)}``."""
    if isinstance(loss_fn, NamedTermsLoss):
        return loss_fn.terms(student_out, teacher_out, targets)
    return {"loss": loss_fn(student_out, teacher_out, targets)}


class _KDLoss(NamedTermsLoss):
    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature, self.alpha, self.label_smoothing = float(temperature), float(alpha), float(label_smoothing)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, label_smoothing={self.label_smoothing}"


# ----------------------------------------------------------------------------------------------------
# the losses
# ----------------------------------------------------------------------------------------------------

@register_kd_loss("ce")
class CrossEntropy(NamedTermsLoss):
    """Plain supervised cross-entropy, ignoring the teacher: the no-distillation baseline.

    ``L = CE(z_s, y)`` (with optional label smoothing); a tuple of heads is averaged first.
    """

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def terms(self, student_out, teacher_out, targets):
        return {"ce": _hard_part(_as_logits(student_out), targets, 1.0, self.label_smoothing, "ce")}


@register_kd_loss("deit_soft")
class DeiTSoftKD(_KDLoss):
    """DeiT soft distillation through the distillation token (Touvron, Cord, Douze, Massa, Sablayrolles,
    Jégou, "Training data-efficient image transformers & distillation through attention", ICML 2021, Eq. 2).

    ``L = (1 − α) · CE(z_cls, y) + α · T² · KL(softmax(z_t / T) ‖ softmax(z_dist / T))``

    ``student_out`` must be ``(z_cls, z_dist)`` (timm's ``deit_*_distilled_*`` after
    ``set_distilled_training(True)``). The paper uses T = 3, α = 0.1.

    Args:
        temperature (float, optional): T. Defaults to 3.
        alpha (float, optional): Defaults to 0.1.
        label_smoothing (float, optional): for the class-token term. Defaults to 0.
    """

    def __init__(self, temperature: float = 3.0, alpha: float = 0.1, label_smoothing: float = 0.0):
        super().__init__(temperature, alpha, label_smoothing)

    def terms(self, student_out, teacher_out, targets):
        z_cls, z_dist = _two_heads(student_out, "deit_soft")
        z_t = _teachers(teacher_out)
        _check_classes(z_dist, z_t)
        p_t = F.softmax(z_t / self.temperature, dim=-1).mean(0)
        soft = soft_kl(z_dist, p_t, self.temperature)
        return {"ce": _hard_part(z_cls, targets, 1 - self.alpha, self.label_smoothing, "deit_soft"),
                "kd": self.alpha * soft}


@register_kd_loss("deit_hard")
class DeiTHardKD(NamedTermsLoss):
    """DeiT hard-label distillation through the distillation token (Touvron et al., ICML 2021, Eq. 3).

    ``L = ½ · CE(z_cls, y) + ½ · CE(z_dist, argmax z_t)``

    ``student_out`` must be ``(z_cls, z_dist)``. Without labels (``targets=None``) only the second term
    is used, at weight 1.

    Args:
        label_smoothing (float, optional): applied to both terms (the paper smooths the teacher's label
            too). Defaults to 0.
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def terms(self, student_out, teacher_out, targets):
        z_cls, z_dist = _two_heads(student_out, "deit_hard")
        z_t = _teachers(teacher_out)
        _check_classes(z_dist, z_t)
        y_t = F.softmax(z_t, dim=-1).mean(0).argmax(-1)
        dist = F.cross_entropy(z_dist, y_t, label_smoothing=self.label_smoothing)
        if targets is None:
            return {"kd": dist}
        return {"ce": _hard_part(z_cls, targets, 0.5, self.label_smoothing, "deit_hard"), "kd": 0.5 * dist}


@register_kd_loss("multi_teacher")
class MultiTeacherKD(_KDLoss):
    """Distillation from K teachers through their weighted, averaged soft targets (the ensemble
    teacher of Hinton et al. 2015; per-teacher weights as in You, Xu, Xu & Tao, "Learning from Multiple
    Teacher Networks", KDD 2017).

    ``p_t = Σ_k w_k · softmax(z_t^k / T)`` with ``Σ_k w_k = 1``

    ``L = (1 − α) · CE(z_s, y) + α · T² · KL(p_t ‖ softmax(z_s / T))``

    Args:
        temperature (float, optional): T. Defaults to 4.
        alpha (float, optional): Defaults to 0.5.
        weights (Sequence[float], optional): w_k, normalised to sum 1. Defaults to equal weights.
        label_smoothing (float, optional): Defaults to 0.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, weights: Sequence[float] | None = None,
                 label_smoothing: float = 0.0):
        super().__init__(temperature, alpha, label_smoothing)
        self.weights = list(weights) if weights else None

    name = "multi_teacher"

    def _soft_targets(self, z_t: torch.Tensor) -> torch.Tensor:
        w = _normalised_weights(self.weights, z_t.shape[0], z_t.device)
        return (w[:, None, None] * F.softmax(z_t / self.temperature, dim=-1)).sum(0)

    def terms(self, student_out, teacher_out, targets):
        z_s = _as_logits(student_out)
        z_t = _teachers(teacher_out)
        _check_classes(z_s, z_t)
        soft = soft_kl(z_s, self._soft_targets(z_t), self.temperature)
        return {"ce": _hard_part(z_s, targets, 1 - self.alpha, self.label_smoothing, self.name),
                "kd": self.alpha * soft}


@register_kd_loss("hinton")
class HintonKD(MultiTeacherKD):
    """Knowledge distillation with a temperature (Hinton, Vinyals & Dean, "Distilling the Knowledge in a
    Neural Network", NeurIPS Deep Learning Workshop 2015, arXiv:1503.02531).

    ``L = (1 − α) · CE(z_s, y) + α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``

    The T² factor keeps the soft term's gradients on the scale of the hard term's as T changes. With K
    teachers, ``z_t`` is their weighted soft targets (see :class:`MultiTeacherKD`, equal weights).
    ``α = 1`` trains on the teacher alone (no labels needed: data-free distillation).

    Args:
        temperature (float, optional): T. Defaults to 4.
        alpha (float, optional): weight of the soft term. Defaults to 0.5.
        label_smoothing (float, optional): for the hard term. Defaults to 0.
    """

    name = "hinton"

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, label_smoothing: float = 0.0):
        super().__init__(temperature, alpha, None, label_smoothing)

    def _soft_targets(self, z_t: torch.Tensor) -> torch.Tensor:
        return F.softmax(z_t / self.temperature, dim=-1).mean(0)  # equal weights


@register_kd_loss("multi_token")
class MultiTokenKD(_KDLoss):
    """One distillation token per teacher (Co-advise / CivT: Ren et al., "Co-advise: Cross Inductive
    Bias Distillation", CVPR 2022): token k learns from teacher k, the class token from the labels.

    hard (as CivT): ``L = (1 − α) · CE(z_cls, y) + α · Σ_k w_k · CE(z_dist^k, argmax z_t^k)``

    soft: ``L = (1 − α) · CE(z_cls, y) + α · Σ_k w_k · T² · KL(softmax(z_t^k / T) ‖ softmax(z_dist^k / T))``

    ``student_out`` must be ``(z_cls, z_dist^1, …, z_dist^K)`` (``sip_civt_*`` with
    ``num_distill_tokens=K``); ``teacher_out`` is ``[K, B, C]`` in the same teacher order.

    Args:
        mode ("hard" | "soft", optional): Defaults to "hard".
        temperature (float, optional): T for "soft". Defaults to 4.
        alpha (float, optional): Defaults to 0.5.
        weights (Sequence[float], optional): w_k, normalised to sum 1. Defaults to equal weights.
        label_smoothing (float, optional): Defaults to 0.
    """

    def __init__(self, mode: str = "hard", temperature: float = 4.0, alpha: float = 0.5,
                 weights: Sequence[float] | None = None, label_smoothing: float = 0.0):
        super().__init__(temperature, alpha, label_smoothing)
        if mode not in ("hard", "soft"):
            raise ValueError(f"multi_token mode must be 'hard' or 'soft', got {mode!r}")
        self.mode = mode
        self.weights = list(weights) if weights else None

    def terms(self, student_out, teacher_out, targets):
        if not isinstance(student_out, (tuple, list)) or len(student_out) < 2:
            raise ValueError("multi_token needs a student with distillation tokens returning (cls, dist_1, ..., dist_K); "
                             "use sip_civt_* with num_distill_tokens = number of teachers")
        z_cls, dists = student_out[0].float(), [d.float() for d in student_out[1:]]
        z_t = _teachers(teacher_out)
        if len(dists) != z_t.shape[0]:
            raise ValueError(f"the student has {len(dists)} distillation tokens but there are {z_t.shape[0]} teachers")
        _check_classes(z_cls, z_t)
        w = _normalised_weights(self.weights, z_t.shape[0], z_t.device)
        terms = []
        for k, z_d in enumerate(dists):
            if self.mode == "hard":
                terms.append(F.cross_entropy(z_d, z_t[k].argmax(-1), label_smoothing=self.label_smoothing))
            else:
                terms.append(soft_kl(z_d, F.softmax(z_t[k] / self.temperature, dim=-1), self.temperature))
        distill = (w * torch.stack(terms)).sum()
        return {"ce": _hard_part(z_cls, targets, 1 - self.alpha, self.label_smoothing, "multi_token"),
                "kd": self.alpha * distill}

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, " + super().extra_repr() + f", weights={self.weights}"


def _two_heads(student_out, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(student_out, (tuple, list)) or len(student_out) != 2:
        raise ValueError(f"{name} needs a student with a distillation token returning (cls_logits, dist_logits), "
                         "e.g. timm's deit_tiny_distilled_patch16_224 (sip sets distilled training on)")
    return student_out[0].float(), student_out[1].float()
