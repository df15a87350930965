"""Each epoch, the synthetic images the student has not learnt yet (``select:`` of a ``sip distill`` recipe).

The data-free KD loop's second form (issue "Data that teaches", item 4): before epoch ``e`` (from
``select.start_epoch`` on), every image of the synthetic pool is scored by KL(teacher || student) of their
softmaxes at ``select.temperature`` on the whole image (the teachers' and the student's evaluation inputs, no
augmentation), and the epoch draws its synthetic items from the ``select.keep`` share with the highest scores only
(of each class, with ``select.class_balanced``): the same number of synthetic items as without selection, so the
epoch's length and the schedule do not change. Real images are never scored nor dropped.

Each epoch's choice is written to ``RUN/selection/epoch-<e>.json`` (the chosen sample ids, the mean KL of the
chosen and of the whole pool, per class) before the epoch starts, atomically and by the main process only; a run
resumed inside the epoch reads it back instead of scoring again with weights that have moved, so its plan is the
uninterrupted run's. The teachers are frozen, so their probabilities are computed once per run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sip.data.durable import atomic_write
from sip.data.mixing import MixedImages

logger = logging.getLogger(__name__)

__all__ = ["SelectSection", "DivergenceSelector", "choose"]
CACHE_BYTES = 512 << 20  # the pool's decoded inputs are kept between epochs up to this size (float16)


@dataclass(frozen=True)
class SelectSection:
    """Which synthetic images each epoch draws from (``select:``); ``keep: 1.0`` (the default) is off."""

    keep: float = 1.0  # share of the synthetic pool an epoch draws from: the highest teacher-student KL; 1.0 = all
    start_epoch: int = 1  # first epoch (0-based) that selects; earlier epochs draw from the whole pool
    class_balanced: bool = True  # keep that share of each class's images (else the top of the whole pool)
    temperature: float = 1.0  # the KL compares softmax(logits / temperature) of teacher and student
    batch_size: int = 256  # images per forward pass when scoring (speed only)

    def __post_init__(self):
        if not (isinstance(self.keep, (int, float)) and math.isfinite(self.keep) and 0.0 < self.keep <= 1.0):
            raise ValueError(f"select.keep must be a share in (0, 1] of the synthetic pool, got {self.keep!r}")
        if self.start_epoch < 0:
            raise ValueError(f"select.start_epoch must be >= 0, got {self.start_epoch}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"select.temperature must be a finite number > 0, got {self.temperature!r}")
        if self.batch_size < 1:
            raise ValueError(f"select.batch_size must be >= 1, got {self.batch_size}")

    @property
    def active(self) -> bool:
        return self.keep < 1.0

    def check(self, data: Any, online_teachers: bool, epochs: int) -> None:
        """Refuse a selection this recipe cannot run (called by the distill recipe's own checks)."""
        if not self.active:
            for key in ("start_epoch", "class_balanced", "temperature", "batch_size"):
                if getattr(self, key) != getattr(SelectSection, key):
                    raise ValueError(f"select.{key} is set but select.keep is 1.0 (no selection): set select.keep "
                                     f"below 1 or remove select.{key}")
            return
        if data.synthetic is None:
            raise ValueError("select.keep < 1 chooses among synthetic images, but data.synthetic is null")
        if data.mix.mode == "swap":
            raise ValueError("select.keep < 1 needs data.mix.mode ratio or concat (swap replaces each real image "
                             "by its own variants, which a selection would leave without any)")
        if not online_teachers:
            raise ValueError("select.keep < 1 scores the pool with the teachers: give teachers: (online), not only "
                             "a logits store")
        if self.start_epoch >= epochs:
            raise ValueError(f"select.start_epoch {self.start_epoch} is not before optim.epochs {epochs}: no epoch "
                             "would select; lower it or set select.keep: 1.0")


def choose(scores: np.ndarray, labels: np.ndarray, keep: float, class_balanced: bool) -> np.ndarray:
    """Indices of the ``keep`` share with the highest ``scores`` (of each class when ``class_balanced``; ties go
    to the lower index), sorted. At least one per class present (balanced) or one in all."""
    order = np.lexsort((np.arange(len(scores)), -scores))  # highest first, stable
    if not class_balanced:
        return np.sort(order[: max(1, round(keep * len(scores)))])
    picks = []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        picks.append(members[: max(1, round(keep * len(members)))])
    return np.sort(np.concatenate(picks))


class DivergenceSelector:
    """The ``before_epoch`` hook of :func:`sip.train.loop.fit` that restricts the epoch's synthetic draws.

    Args:
        section (SelectSection): the recipe's ``select:``.
        images (MixedImages): the training images (their ``synthetic`` set is scored).
        teachers (Sequence): :class:`~sip.distill.teachers.Teacher` objects (probabilities averaged by weight).
        eval_transform: the student's evaluation transform (PIL → normalised tensor, as sip evaluates it).
        student_config (dict): the student's timm input config (its ``mean`` / ``std`` undo the normalisation, so
            each teacher sees the same pixels through its own, as the online teachers do in training).
        run_dir (Path): where ``selection/epoch-<e>.json`` go.
        accelerator: the run's (main process writes, every process reads).
    """

    def __init__(self, section: SelectSection, images: MixedImages, teachers: Sequence[Any], eval_transform,
                 student_config: dict[str, Any], run_dir: Path, accelerator):
        self.section, self.images, self.teachers = section, images, list(teachers)
        self.eval_transform, self.student_config = eval_transform, student_config
        self.folder, self.accelerator = Path(run_dir) / "selection", accelerator
        self._inputs: torch.Tensor | None = None  # the student's inputs of the pool, decoded once (float16)
        self._cacheable: bool | None = None
        self._teacher_probs: torch.Tensor | None = None

    # -- scoring ---------------------------------------------------------------------------------------
    def _decode(self, start: int, stop: int) -> torch.Tensor:
        syn = self.images.synthetic
        return torch.stack([self.eval_transform(syn[j][0]) for j in range(start, stop)])

    def _input_batches(self):
        """The pool's student inputs in batches: decoded once and kept (float16) while the whole pool fits in
        :data:`CACHE_BYTES`, else decoded again at each scoring."""
        n, bs = len(self.images.synthetic), self.section.batch_size
        if self._cacheable is None:  # decided once, from one image's size
            self._cacheable = n * self._decode(0, 1).numel() * 2 <= CACHE_BYTES
        if self._inputs is None and self._cacheable:
            self._inputs = torch.cat([self._decode(s, min(s + bs, n)).half() for s in range(0, n, bs)])
        for start in range(0, n, bs):
            yield (self._inputs[start : start + bs].float() if self._inputs is not None
                   else self._decode(start, min(start + bs, n)))

    def _teacher_view(self, x: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        """The student's normalised input as the teacher's: same pixels, its normalisation, channels and size."""
        sc = self.student_config
        pixels = x * torch.tensor(sc["std"]).view(1, -1, 1, 1) + torch.tensor(sc["mean"]).view(1, -1, 1, 1)
        channels, size = int(config["input_size"][0]), tuple(int(v) for v in config["input_size"][-2:])
        if channels == 1 and pixels.shape[1] == 3:
            pixels = (pixels * pixels.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif channels == 3 and pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if tuple(pixels.shape[-2:]) != size:
            pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True,
                                                     align_corners=False)
        return (pixels - torch.tensor(config["mean"]).view(1, -1, 1, 1)) / torch.tensor(config["std"]).view(1, -1, 1, 1)

    @torch.inference_mode()
    def _log_probs(self, model: torch.nn.Module, config: dict[str, Any] | None) -> torch.Tensor:
        """log softmax(logits / T) of the pool: the student's (``config`` None) or a teacher's."""
        device, t = self.accelerator.device, self.section.temperature
        out = []
        for x in self._input_batches():
            x = x if config is None else self._teacher_view(x, config)
            logits = model(x.to(device))
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            out.append((logits.float() / t).log_softmax(-1).cpu())
        return torch.cat(out)

    def teacher_probs(self) -> torch.Tensor:
        """The teachers' probabilities of the pool (weighted mean), computed once: the teachers are frozen."""
        if self._teacher_probs is None:
            total = sum(t.weight for t in self.teachers)
            self._teacher_probs = sum(self._log_probs(t.model, t.input_config).exp() * (t.weight / total)
                                      for t in self.teachers)
        return self._teacher_probs

    def scores(self, student: torch.nn.Module) -> np.ndarray:
        """KL(teacher || student) of every synthetic image, in the synthetic set's order."""
        was_training = student.training
        student.eval()
        try:
            log_s = self._log_probs(student, None)
        finally:
            student.train(was_training)
        p_t = self.teacher_probs()
        return (p_t * (p_t.clamp_min(1e-12).log() - log_s)).sum(-1).numpy().astype(np.float64)

    # -- the hook --------------------------------------------------------------------------------------
    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.json"

    def __call__(self, student: torch.nn.Module, epoch: int) -> None:
        s = self.section
        if not s.active or epoch < s.start_epoch:
            self.images.restrict_synthetic(None)
            return
        path, syn = self.path(epoch), self.images.synthetic
        if self.accelerator.is_main_process and not path.is_file():
            scores = self.scores(student)
            chosen = choose(scores, syn.labels, s.keep, s.class_balanced)
            per_class = {syn.classes[c]: round(float(scores[syn.labels == c].mean()), 6)
                         for c in np.unique(syn.labels)}
            record = {"epoch": epoch, "keep": s.keep, "pool": len(syn), "chosen": len(chosen),
                      "mean_kl_pool": round(float(scores.mean()), 6),
                      "mean_kl_chosen": round(float(scores[chosen].mean()), 6), "mean_kl_by_class": per_class,
                      "ids": [syn.sample_id(int(j)) for j in chosen]}
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, (json.dumps(record) + "\n").encode())
            logger.info("epoch %d: %d of %d synthetic images chosen, mean KL %.4f (pool %.4f)", epoch + 1,
                        len(chosen), len(syn), record["mean_kl_chosen"], record["mean_kl_pool"])
        self.accelerator.wait_for_everyone()
        record = json.loads(path.read_text(encoding="utf-8"))
        index = {syn.sample_id(j): j for j in range(len(syn))}
        missing = [i for i in record["ids"] if i not in index]
        if missing:
            raise ValueError(f"{path} names synthetic images this run's data.synthetic does not hold (e.g. "
                             f"{missing[:3]}): the run folder was made with other data; use a new folder")
        self.images.restrict_synthetic(np.array([index[i] for i in record["ids"]], dtype=np.int64))
