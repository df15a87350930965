"""One distillation step: what a training item holds, and how a batch becomes named loss terms.

Patient and consistent distillation (Beyer, Zhai, Royer, Markeeva, Anil & Kolesnikov, "Knowledge
distillation: A good teacher is patient and consistent", CVPR 2022) asks that the teacher label exactly
the view the student is trained on — the same crop, the same flip and, for "function matching", the same
mixup / CutMix of two images. :class:`DistillStep` keeps that invariant in all three ways of getting the
teacher's outputs:

- online teachers: each item carries the student's view and, per teacher input configuration, the same
  view at the teacher's input size; a batch is mixed once (the same partner, λ and box for every
  input), and the teachers run on the mixed batch;
- stored logits (``sip logits``): an item replays one of the views the store holds, with the logits
  that belong to it; a batch mix cannot be replayed from per-image logits, so the recipe refuses it;
- no teacher (``loss: ce``): labels only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sip.distill.losses import loss_terms
from sip.distill.mixup import BatchMixConfig, draw_batch_mix
from sip.train.evaluate import merge_heads
from sip.train.views import ViewAugmentation, apply_view, sample_view, view_input

__all__ = ["DistillStep", "TeacherInputs"]


@dataclass
class TeacherInputs:
    """Online teachers grouped by input configuration: teachers with the same preprocessing share one
    input tensor per item (``teacher_image_<g>``).

    Attributes:
        models: the teacher networks, in the recipe's order.
        group_of: for each teacher, the index of its input group.
        configs: the timm input config of each group.
        tails: each group's tensor transform (to tensor + normalise).
    """

    models: list[nn.Module]
    group_of: list[int]
    configs: list[dict[str, Any]]
    tails: list[Any]

    @classmethod
    def from_teachers(cls, teachers: Sequence[Any], input_transform) -> TeacherInputs:
        keys: list[Any] = []
        configs: list[dict[str, Any]] = []
        for t in teachers:
            if t.input_key() not in keys:
                keys.append(t.input_key())
                configs.append(t.input_config)
        return cls([t.model for t in teachers], [keys.index(t.input_key()) for t in teachers], configs,
                   [input_transform(c) for c in configs])


class DistillStep:
    """Items and steps of one distillation run.

    Args:
        loss_fn (nn.Module): a KD loss (``sip.distill.losses``); its named terms are returned.
        input_config (dict): the student's timm input config; ``student_tail`` its tensor transform.
        student_tail: PIL image → normalised tensor at the student's input size.
        data: the recipe's data section (crop scale / ratio, flip probability, and what sip train adds after
            the crop: color_jitter, auto_augment, re_prob — replayed on the teachers' inputs).
        teachers (TeacherInputs | None): online teachers, or None.
        store: a :class:`~sip.distill.logits.TeacherLogitsStore` to replay, or None.
        store_columns (Sequence[int]): the store's teacher columns this run uses.
        mix (BatchMixConfig | None): mixup / CutMix applied to each batch (online teachers or labels only).
        use_labels (bool): false = data-free: the labels are never given to the loss.
        num_classes (int): for the mixed labels.
        seed (int): the run seed (batch mixes are drawn from (seed, epoch, step)).
        device: where batches go.
        soft_targets (SoftTargets, optional): ``data.soft_labels``: each item's metadata soft label is its label
            target (mixed like the labels under mixup / CutMix); None: the one-hot labels.
    """

    def __init__(self, loss_fn: nn.Module, *, input_config: dict[str, Any], student_tail, data: Any,
                 teachers: TeacherInputs | None = None, store: Any = None, store_columns: Sequence[int] = (),
                 mix: BatchMixConfig | None = None, use_labels: bool = True, num_classes: int, seed: int,
                 device: torch.device | str = "cpu", soft_targets: Any = None):
        if teachers is not None and store is not None:
            raise ValueError("DistillStep takes online teachers or a logits store, not both")
        mix = mix if mix is not None and mix.enabled else None
        if mix is not None and store is not None:
            raise ValueError("mixup / CutMix needs the teachers to label each mixed image, which stored per-image "
                             "logits cannot: drop `logits:` (teachers run online on the mixed batch) or set "
                             "batch_mix.mixup_alpha and batch_mix.cutmix_alpha to 0")
        self.loss_fn, self.input_config, self.student_tail, self.data = loss_fn, input_config, student_tail, data
        self.teachers, self.store, self.columns = teachers, store, list(store_columns)
        self.mix, self.use_labels, self.num_classes, self.seed = mix, use_labels, num_classes, seed
        self.device = torch.device(device)
        self.soft_targets = soft_targets
        # sip train's augmentation after the crop (auto-augment / colour jitter, random erasing), drawn once per
        # item and replayed on every teacher's input
        self.augment = ViewAugmentation(data.color_jitter, data.auto_augment, data.re_prob, input_config)
        if self.augment.active and store is not None:
            raise ValueError("data.re_prob, data.color_jitter and data.auto_augment change each view after its crop, "
                             "which a logits store (labelled crops and flips) cannot replay: set them to 0 / null, "
                             "or drop `logits:` so the teachers label the augmented view online")

    @property
    def online(self) -> bool:
        return self.teachers is not None

    # -- items --------------------------------------------------------------------------------------------
    def make_item(self, images: Any, index: int, rng: random.Random) -> dict[str, Any]:
        """Item ``index``: the student's view, the teachers' inputs of the same view or the stored logits."""
        image, label = images[index]
        item: dict[str, Any] = {"label": label}
        if self.soft_targets is not None:
            item["soft_target"] = self.soft_targets(images, index)
        if self.store is not None:
            v = rng.randrange(self.store.num_views)
            view, logits = self.store.get(images.sample_id(index), v)
            item["teacher_logits"] = logits[self.columns]
        else:
            d = self.data
            view = sample_view(rng, image.width, image.height, d.scale, d.ratio, d.hflip)
        if not self.augment.active:
            item["image"] = view_input(image, view, self.input_config, self.student_tail)
            if self.online:
                for g, (cfg, tail) in enumerate(zip(self.teachers.configs, self.teachers.tails)):
                    item[f"teacher_image_{g}"] = view_input(image, view, cfg, tail)
            return item
        draw = self.augment.draw(rng)  # the same ops, seeds and erased box for the student and every teacher
        item["image"] = self._augmented(image, view, draw, self.input_config)
        if self.online:
            for g, cfg in enumerate(self.teachers.configs):
                item[f"teacher_image_{g}"] = self._augmented(image, view, draw, cfg)
        return item

    def _augmented(self, image, view, draw, cfg: dict[str, Any]) -> torch.Tensor:
        size = list(cfg["input_size"])[-2:]
        return self.augment.apply(apply_view(image, view, size, cfg["interpolation"]), draw, cfg)

    # -- steps --------------------------------------------------------------------------------------------
    def teacher_logits(self, batch: dict[str, Any], mix) -> torch.Tensor | None:
        """``[K, B, C]`` teacher logits for this (mixed) batch: online, from the store, or None."""
        if self.store is not None:
            return batch["teacher_logits"].to(self.device).transpose(0, 1)
        if not self.online:
            return None
        inputs = {}
        with torch.no_grad():
            outs = []
            for model, g in zip(self.teachers.models, self.teachers.group_of):
                if g not in inputs:
                    x = batch[f"teacher_image_{g}"].to(self.device, non_blocking=True)
                    inputs[g] = mix(x) if mix is not None else x
                z = model(inputs[g])
                outs.append((z[0] if isinstance(z, (tuple, list)) else z).float())
        return torch.stack(outs)

    def __call__(self, model: nn.Module, batch: dict[str, Any], epoch: int, step: int):
        """``(terms, logits, labels)`` for :func:`sip.train.loop.fit`."""
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        mix = None
        if self.mix is not None:
            m = draw_batch_mix(self.mix, x.shape[0], tuple(x.shape[-2:]), self.seed, epoch, step)
            if m.lam < 1.0:
                mix = _SameMix(m, tuple(x.shape[-2:]))
        if "soft_target" in batch:  # data.soft_labels: the metadata's distributions are the label targets
            y_target = batch["soft_target"].to(self.device, non_blocking=True)
            targets = y_target if mix is None else mix.mix_soft(y_target)
        else:
            targets = y if mix is None else mix.targets(y, self.num_classes)
        student_in = x if mix is None else mix(x)
        teacher_out = self.teacher_logits(batch, mix)
        student_out = model(student_in)
        terms = loss_terms(self.loss_fn, student_out, teacher_out, targets if self.use_labels else None)
        # train accuracy against the hard labels only on unmixed batches (a mixed image has two)
        labels = y if self.use_labels and mix is None else None
        return terms, merge_heads(student_out), labels


class _SameMix:
    """One batch's mix applied alike to inputs of any size (the CutMix box is scaled to each)."""

    def __init__(self, mix, size: tuple[int, int]):
        self.mix, self.size = mix, size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mix
        if m.box is None or tuple(x.shape[-2:]) == self.size:
            return m.apply(x)
        (h0, w0), (h, w) = self.size, x.shape[-2:]
        top, left, bh, bw = m.box
        box = (round(top * h / h0), round(left * w / w0), round(bh * h / h0), round(bw * w / w0))
        return type(m)(m.perm, m.lam, box).apply(x)

    def targets(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        return self.mix.mix_targets(y, num_classes)

    def mix_soft(self, targets: torch.Tensor) -> torch.Tensor:
        """Soft targets ``[B, C]`` mixed as the images are (``lam`` of each, ``1 - lam`` of its partner's)."""
        m = self.mix
        return targets if m.lam >= 1.0 else targets * m.lam + targets[m.perm] * (1.0 - m.lam)
