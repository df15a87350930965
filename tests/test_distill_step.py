"""sip.distill.step: consistent views (the teacher sees exactly the student's, mixed, view), named loss terms in
metrics.jsonl, and the recipe errors for batch mixes that cannot be consistent."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from sip.config import ConfigError
from sip.distill.logits import StoreMismatchError
from sip.distill.losses import build_kd_loss
from sip.distill.mixup import BatchMixConfig
from sip.distill.run import run_distillation
from sip.distill.step import DistillStep, TeacherInputs

from conftest import distill_recipe


class _Recorder(nn.Module):
    """A linear classifier that remembers the last batch it was given."""

    def __init__(self, size: int, classes: int = 10, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3 * size * size, classes)
        self.seen: torch.Tensor | None = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(x.flatten(1))


class _Images:
    """Ten 16 px images with distinct content, labels 0..9."""

    def __init__(self):
        from PIL import Image

        g = torch.Generator().manual_seed(0)
        self.items = [(Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()), i % 10)
                      for i in range(10)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def sample_id(self, i):
        return f"img/{i}"


class _Data:
    scale, ratio, hflip = (0.5, 1.0), (0.75, 1.33), 0.5
    color_jitter, auto_augment, re_prob = 0.0, None, 0.0


def _step(mix: BatchMixConfig, teacher_size: int = 16, data=None):
    from sip.models.checkpoints import input_transform

    cfg = {"input_size": [3, 16, 16], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
           "crop_pct": 1.0}
    tcfg = {**cfg, "input_size": [3, teacher_size, teacher_size]}
    teacher = _Recorder(teacher_size, seed=1)

    class _T:  # the face of sip.distill.teachers.Teacher that TeacherInputs reads
        model, input_config = teacher, tcfg

        def input_key(self):
            return json.dumps(tcfg, sort_keys=True)

    step = DistillStep(build_kd_loss("hinton", temperature=2.0, alpha=0.5), input_config=cfg,
                       student_tail=input_transform(cfg), data=data or _Data(),
                       teachers=TeacherInputs.from_teachers([_T()], input_transform), mix=mix, num_classes=10, seed=3)
    images = _Images()
    items = [step.make_item(images, i, random.Random(i)) for i in range(len(images))]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    return step, teacher, batch


@pytest.mark.parametrize("mix", [BatchMixConfig(), BatchMixConfig(mixup_alpha=1.0),
                                 BatchMixConfig(cutmix_alpha=1.0)], ids=["none", "mixup", "cutmix"])
def test_teacher_sees_exactly_the_students_mixed_view(mix):
    step, teacher, batch = _step(mix)
    student = _Recorder(16)
    terms, logits, labels = step(student, batch, epoch=0, step=1)
    assert torch.equal(teacher.seen, student.seen)  # same crop, flip, partner, λ and box
    assert set(terms) == {"ce", "kd"} and all(t.ndim == 0 for t in terms.values())
    if mix.enabled:
        assert not torch.equal(student.seen, batch["image"])  # the batch was mixed
        assert labels is None  # no hard-label accuracy on a mixed batch
    else:
        assert torch.equal(student.seen, batch["image"]) and torch.equal(labels, batch["label"])


def test_mix_is_replayed_from_seed_epoch_step_and_scaled_for_larger_teacher_inputs():
    mix = BatchMixConfig(cutmix_alpha=1.0)
    step, teacher, batch = _step(mix, teacher_size=32)
    student = _Recorder(16)
    step(student, batch, 2, 5)
    first = student.seen
    step(student, batch, 2, 5)
    assert torch.equal(first, student.seen)  # same (seed, epoch, step) → same mix
    step(student, batch, 2, 6)
    assert not torch.equal(first, student.seen)
    # the teacher's 32 px input got the same partner and the box scaled ×2: where the student's pixels are
    # unchanged, the teacher's 2×2 blocks are unchanged too
    kept_student = (student.seen == batch["image"]).all(1)  # [B, 16, 16]
    kept_teacher = (teacher.seen == batch["teacher_image_0"]).all(1)  # [B, 32, 32]
    assert torch.equal(kept_teacher[:, ::2, ::2], kept_student)


def test_metrics_carry_each_named_loss_term(teachers, tmp_path):
    run_distillation(distill_recipe([teachers["test_resnet"]], "loss.name=hinton", "loss.alpha=0.5",
                                    "batch_mix.mixup_alpha=1.0"), tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert line["train_ce"] > 0 and line["train_kd"] > 0
        assert line["train_ce"] + line["train_kd"] == pytest.approx(line["train_loss"], rel=1e-4)


def test_batch_mix_that_cannot_be_consistent_is_an_error_before_training(teachers, store, tmp_path):
    with pytest.raises((ValueError, ConfigError), match="logits store"):
        distill_recipe([teachers["test_resnet"]], f"logits={store}", "batch_mix.mixup_alpha=0.8")
    with pytest.raises((ValueError, ConfigError), match="loss 'ce'"):
        distill_recipe([teachers["test_resnet"]], "loss.name=ce", "batch_mix.cutmix_alpha=1.0")
    with pytest.raises((ValueError, ConfigError), match="mixup_alpha and cutmix_alpha must be >= 0"):
        distill_recipe([teachers["test_resnet"]], "batch_mix.mixup_alpha=-1")


def test_store_with_views_of_other_augmentation_is_refused(teachers, store, tmp_path):
    both = [teachers["test_resnet"], teachers["sip_rednet_tiny"]]
    with pytest.raises(StoreMismatchError, match=r"data.scale: recipe \[0.5, 1.0\] vs store"):
        run_distillation(distill_recipe(both, f"logits={store}", "loss.name=multi_teacher", "data.scale=[0.5, 1.0]"),
                         tmp_path / "a")
    with pytest.raises(StoreMismatchError, match="data.hflip"):
        run_distillation(distill_recipe(both, f"logits={store}", "loss.name=multi_teacher", "data.hflip=0.0"),
                         tmp_path / "b")
    assert not (tmp_path / "a" / "checkpoint").exists()


class _Augmented(_Data):
    re_prob, auto_augment = 1.0, "rand-m9-mstd0.5"


@pytest.mark.parametrize("extra", [{}, {"auto_augment": None, "color_jitter": 0.4}], ids=["randaug", "jitter"])
def test_the_teacher_sees_the_students_augmented_view_erasing_included(extra):
    """data.re_prob / auto_augment / color_jitter are applied to the distilled views as sip train applies them,
    drawn once per item: every student image carries an erased box (normalised 0: the mean colour, as timm's
    const erasing), and the teacher's input is the student's, pixel for pixel (issue 26, finding 4)."""
    data = type("D", (_Augmented,), extra)()
    step, teacher, batch = _step(BatchMixConfig(), data=data)
    erased = (batch["image"] == 0).all(1).flatten(1).sum(1)  # pixels zero in every channel
    assert (erased >= 4).all()  # one box of at least 2 % of 256 pixels per image; random pixels are never 127.5
    assert torch.equal(batch["teacher_image_0"], batch["image"])
    plain = _step(BatchMixConfig())[2]
    assert not torch.equal(plain["image"], batch["image"]) and ((plain["image"] == 0).all(1).sum() == 0)
    again = _step(BatchMixConfig(), data=data)[2]
    assert torch.equal(again["image"], batch["image"])  # replayable: the same rng gives the same view
    student = _Recorder(16)
    step(student, batch, epoch=0, step=0)
    assert torch.equal(teacher.seen, student.seen)


def test_augmentation_a_logits_store_cannot_replay_is_refused():
    from sip.models.checkpoints import input_transform

    cfg = {"input_size": [3, 16, 16], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ValueError, match="data.re_prob, data.color_jitter and data.auto_augment"):
        DistillStep(build_kd_loss("hinton"), input_config=cfg, student_tail=input_transform(cfg), data=_Augmented(),
                    store=object(), num_classes=10, seed=0)


def test_sip_logits_refuses_augmentation_its_store_cannot_hold(teachers):
    from conftest import logits_recipe

    with pytest.raises(ConfigError, match="data.re_prob, data.color_jitter and data.auto_augment"):
        logits_recipe([teachers["test_resnet"]], "data.re_prob=0.25")
