"""``sip distill`` and ``sip logits``: recipes and the functions that run them.

``run_distillation(recipe, run_dir)`` trains a student from one or more teachers — online (the teachers
run on every batch) or from a :class:`~sip.distill.logits.TeacherLogitsStore` written by
``run_logits(recipe, out_dir)`` (no teacher forward pass at all). Both paths draw the same kind of
views (a RandomResizedCrop box + flip, timm's distribution), so online and stored KD are comparable.
Modes are recipes: data-scarce (few real shots, optionally + sip variants), full data, and data-free
(``data.real: null``, a synthetic set, ``loss.use_labels: false``: the teacher's soft outputs are the
only labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sip.config import save_config, to_dict
from sip.distill.logits import (
    StoreMismatchError,
    TeacherLogitsStore,
    ViewConfig,
    dataset_fingerprint,
    input_transform,
)
from sip.distill.losses import KD_LOSSES, build_kd_loss, kd_loss_arguments
from sip.distill.mixup import BatchMixConfig
from sip.distill.select import DivergenceSelector, SelectSection
from sip.distill.step import DistillStep, TeacherInputs
from sip.distill.teachers import Teacher, TeacherSection, build_teachers, check_teacher_classes, describe
from sip.models.checkpoints import model_metadata
from sip.models.classifiers import check_model_name
from sip.models.input_checks import check_trainable
from sip.runtime import large_input, resolve_precision
from sip.train.inputs import (
    EpochView,
    build_model,
    build_test_images,
    build_train_images,
    build_val_images,
    build_transforms,
    class_names,
    resolve_input_config,
    seed_everything,
)
from sip.train.loop import fit, make_accelerator
from sip.train.recipe import DataSection, ModelSection, OptimSection, RunSection
from sip.train.run_dir import prepare_run_dir
from sip.train.soft_labels import SoftTargets

logger = logging.getLogger(__name__)


LOSS_DEFAULTS: dict[str, Any] = {"temperature": 4.0, "alpha": 0.5, "mode": "hard", "label_smoothing": 0.0}


@dataclass(frozen=True)
class LossSection:
    """Which KD loss and its settings (each loss uses the fields it has; see sip.distill.losses)."""

    name: str = "hinton"  # ce | hinton | deit_soft | deit_hard | multi_teacher | multi_token (or your own)
    # null = not set: the value in LOSS_DEFAULTS if the loss takes that key; a key set here that the chosen
    # loss does not take is an error (see build_loss)
    temperature: float | None = None  # softens both distributions; 2-6 is usual, higher for small data (4.0)
    alpha: float | None = None  # weight of the teacher term; 1 - alpha goes to the ground-truth labels (0.5)
    mode: Literal["hard", "soft"] | None = None  # multi_token: argmax teacher labels (CivT) or softened KL
    label_smoothing: float | None = None  # on the ground-truth (and hard-teacher) cross-entropy (0.0)
    use_labels: bool = True  # false: the dataset's labels are never read (data-free: teachers only)


def _default_student() -> ModelSection:
    # ViT for 28 px: 7×7 patches of 4 px, ViT-Tiny's width (192) at half its depth
    return ModelSection(name="vit_tiny_patch16_224", patch_size=4, kwargs={"depth": 6})


@dataclass(frozen=True)
class DistillRecipe:
    """One distillation run (``sip distill``)."""

    data: DataSection = field(default_factory=DataSection)
    student: ModelSection = field(default_factory=_default_student)
    teachers: list[TeacherSection] = field(default_factory=list)  # one or more; order = logits order
    loss: LossSection = field(default_factory=LossSection)
    logits: str | None = None  # a store written by `sip logits`; null = teachers run online on every batch
    # mixup / CutMix between the images of a batch, labelled by the online teachers on the mixed images
    # ("function matching", Beyer et al. CVPR 2022); off by default
    batch_mix: BatchMixConfig = field(default_factory=BatchMixConfig)
    # each epoch, draw the synthetic items from the share the student most disagrees with its teachers on
    select: SelectSection = field(default_factory=SelectSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def output_settings(self) -> dict[str, Any]:
        """The recipe as a dict with the loss settings actually used (unset → default), for resume checks."""
        d = to_dict(self)
        accepted = kd_loss_arguments(self.loss.name) if self.loss.name in KD_LOSSES else list(LOSS_DEFAULTS)
        for k, default in LOSS_DEFAULTS.items():
            value = getattr(self.loss, k)
            d["loss"][k] = (default if value is None else value) if k in accepted else None
        return d

    def __post_init__(self):
        if not self.teachers and not self.logits:
            raise ValueError("distillation needs teachers (teachers: [...]) or a logits store (logits: DIR)")
        _check_one_teacher_weight(self.teachers, "the student learns from it alone")
        self.select.check(self.data, online_teachers=bool(self.teachers) and not self.logits, epochs=self.optim.epochs)
        if self.data.soft_labels and not self.loss.use_labels:
            raise ValueError("data.soft_labels is true but loss.use_labels is false: the labels (soft or not) are "
                             "never read; set one of them")
        if self.batch_mix.enabled:
            if self.logits:
                raise ValueError(
                    "batch_mix (mixup / CutMix) needs the teachers to label each mixed image, which a logits "
                    f"store of per-image views ({self.logits}) cannot: remove `logits:` so the teachers run "
                    "online on the mixed batch, or set batch_mix.mixup_alpha and batch_mix.cutmix_alpha to 0")
            if self.loss.name == "ce":
                raise ValueError(
                    "batch_mix with loss 'ce' learns from mixed hard labels only, never from a teacher's view of "
                    "the mixed image: pick a KD loss (hinton, multi_teacher, deit_soft, ...) or use sip train")


def _check_one_teacher_weight(teachers, why: str) -> None:
    """A lone teacher's weight is normalised to 1 whatever it is: refused rather than ignored."""
    if len(teachers) == 1 and teachers[0].weight != 1.0:
        raise ValueError(f"teachers[0].weight is {teachers[0].weight} but there is one teacher ({why}): weights are "
                         "shares normalised over several teachers; remove it")


@dataclass(frozen=True)
class StoreSection:
    """How ``sip logits`` writes its store."""

    views: int = 4  # augmented views per image (the student replays one of them each time it sees the image)
    identity_view: bool = True  # view 0 = the whole, unflipped image
    seed: int = 0  # fixes every view (with the sample id)
    dtype: Literal["float16", "float32"] = "float16"  # stored logits; float16 halves the size
    shard_size: int = 10000  # images per safetensors shard (a killed build resumes by shard)
    batch_size: int = 128  # images per teacher step (each with all its views)


@dataclass(frozen=True)
class LogitsRecipe:
    """Precompute teacher logits (``sip logits``) for a dataset (its real + synthetic images; the crop
    box and flip distribution come from ``data.scale``, ``data.ratio``, ``data.hflip``)."""

    data: DataSection = field(default_factory=DataSection)
    teachers: list[TeacherSection] = field(default_factory=list)
    store: StoreSection = field(default_factory=StoreSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        if not self.teachers:
            raise ValueError("sip logits needs at least one teacher (teachers: [{checkpoint: RUN_DIR}])")
        weighted = [i for i, t in enumerate(self.teachers) if t.weight != 1.0]
        if weighted:  # the store keeps each teacher's logits; shares are the distill recipe's teachers[i].weight
            raise ValueError(f"teachers[{weighted[0]}].weight is not read by sip logits (the store keeps every "
                             "teacher's logits): set the weights in the sip distill recipe's teachers")
        d = self.data
        if d.re_prob or d.color_jitter or d.auto_augment:
            raise ValueError("a logits store labels crops and flips only: data.re_prob, data.color_jitter and "
                             "data.auto_augment would be ignored by sip logits; set them to 0 / null (a distill "
                             "recipe that needs them runs its teachers online)")
        if d.soft_labels:
            raise ValueError("data.soft_labels is read by sip train / sip distill (label targets), not by sip logits "
                             "(the store holds teacher logits only): set data.soft_labels: false here")


# ----------------------------------------------------------------------------------------------------
# sip logits
# ----------------------------------------------------------------------------------------------------

def run_logits(recipe: LogitsRecipe, out_dir: str | Path) -> dict[str, Any]:
    """Run the recipe's teachers once over its dataset and write a :class:`TeacherLogitsStore` to ``out_dir``.

    Under ``torchrun`` / ``accelerate launch`` each process builds the shards ``s`` with ``s % world == rank``
    on the GPU of its local rank, and the last to finish writes ``store.json`` (the shards hold what a one-process
    build's do; ``store.shard_size`` sets how finely the work splits).

    Returns:
        dict: store path, samples, views, teachers, build time, how often the teachers agree with the
        dataset's labels on the whole image (``identity_view_top1``); ``complete: false`` from a process that
        finished before the others.
    """
    from sip.runtime import resolve_device
    from sip.scale.launch import detect_launch, process_device, warn_if_alone

    launch = detect_launch()  # under torchrun / accelerate launch: this process builds its share of the shards
    warn_if_alone(launch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if launch.rank == 0:
        save_config(recipe, out_dir / "config.yaml")
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    # 1. data (the whole pool: every real and every synthetic image, whatever the mix)
    classes = class_names(recipe.data)
    images = build_train_images(recipe.data, classes, recipe.run.seed)
    # 2. teachers
    teachers = build_teachers(recipe.teachers, recipe.data)
    check_teacher_classes(teachers, classes)
    # 3. views and the store
    device = resolve_device(process_device(recipe.run.device, launch))  # cuda:<local rank> under a launch
    precision = resolve_precision(recipe.run.precision, device, large_input(recipe.data.img_size))
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    views = ViewConfig(recipe.store.views, recipe.store.identity_view, tuple(recipe.data.scale),
                       tuple(recipe.data.ratio), recipe.data.hflip, recipe.store.seed)
    store = TeacherLogitsStore.build(out_dir, images.pool(), teachers, classes, views, recipe.store.batch_size,
                                     recipe.store.shard_size, recipe.store.dtype, device, recipe.data.num_workers,
                                     autocast, recipe.run.progress, launch.rank, launch.world)
    if store is None:  # other processes of the launch are still building their shards
        return {"store": str(out_dir), "complete": False, "process": launch.describe()}
    m = store.manifest
    return {"store": str(out_dir), "complete": True, "samples": m["num_samples"], "views": m["num_views"],
            "teachers": [describe(t) for t in teachers], "dtype": m["dtype"], "build_time_s": m["build_time_s"],
            "identity_view_top1": m.get("identity_view_top1"), "fingerprint": m["fingerprint"]["sha256"]}


# ----------------------------------------------------------------------------------------------------
# sip distill
# ----------------------------------------------------------------------------------------------------

def loss_kwargs(section: LossSection) -> dict[str, Any]:
    """The settings ``section`` gives its loss: those the loss takes, unset ones from :data:`LOSS_DEFAULTS`.

    Raises:
        ValueError: a key set in the recipe that the chosen loss does not take (it would be ignored silently).
    """
    accepted = kd_loss_arguments(section.name)
    unknown = [k for k in LOSS_DEFAULTS if getattr(section, k) is not None and k not in accepted]
    if unknown:
        takes = ", ".join(k for k in accepted if k in LOSS_DEFAULTS) or "none of them"
        raise ValueError(f"loss.{unknown[0]} is set but loss {section.name!r} does not take it (of "
                         f"{', '.join('loss.' + k for k in LOSS_DEFAULTS)} it takes: {takes}); remove "
                         f"{', '.join('loss.' + k for k in unknown)} from the recipe or pick a loss that uses it")
    return {k: LOSS_DEFAULTS[k] if getattr(section, k) is None else getattr(section, k)
            for k in LOSS_DEFAULTS if k in accepted}


def build_loss(section: LossSection, teachers: list[Teacher] | None = None) -> torch.nn.Module:
    """The recipe's loss with its settings (:func:`loss_kwargs`); teacher weights go to losses that take them."""
    accepted = kd_loss_arguments(section.name)
    kwargs = loss_kwargs(section)
    weights = [t.weight for t in teachers] if teachers else None
    if "weights" in accepted:
        kwargs["weights"] = weights
    elif weights and len(set(weights)) > 1:
        raise ValueError(f"loss {section.name!r} averages teachers equally; per-teacher weights {weights} need "
                         "loss multi_teacher or multi_token")
    if not section.use_labels and kwargs.get("alpha", 1.0) < 1:
        raise ValueError(f"loss.use_labels is false (data-free) but loss.alpha={kwargs['alpha']} gives the labels "
                         "weight 1 - alpha; set loss.alpha: 1.0")
    if section.name == "ce" and not section.use_labels:
        raise ValueError("loss 'ce' learns from labels only; with use_labels false nothing would be learnt")
    return build_kd_loss(section.name, **kwargs)


def check_store_views(store: TeacherLogitsStore, data: DataSection) -> None:
    """The store's views must be drawn as the recipe augments (crop scale, aspect ratio, flip): the student
    replays them, so a store made for other views would silently train on another augmentation.

    Raises:
        StoreMismatchError: naming each differing key with both values and how to fix it.
    """
    stored = store.manifest.get("views", {})
    wanted = {"scale": list(data.scale), "ratio": list(data.ratio), "hflip": data.hflip}
    differ = [f"data.{k}: recipe {v} vs store {stored[k]}" for k, v in wanted.items()
              if k in stored and [float(x) for x in (stored[k] if isinstance(stored[k], list) else [stored[k]])]
              != [float(x) for x in (v if isinstance(v, list) else [v])]]
    if differ:
        raise StoreMismatchError(
            f"logits store {store.root} holds views drawn with other augmentation settings than this recipe "
            f"({'; '.join(differ)}); rebuild the store with `sip logits` using this recipe's data section, or "
            "set the recipe's data keys to the store's")


def _check_student_heads(model: torch.nn.Module, loss_name: str, num_teachers: int, student_name: str) -> None:
    """DeiT losses need a distillation token; multi_token needs one per teacher."""
    if loss_name in ("deit_soft", "deit_hard"):
        if not hasattr(model, "set_distilled_training") or getattr(model, "num_distill_tokens", 1) != 1:
            raise ValueError(f"loss {loss_name!r} needs a student with one distillation token, e.g. "
                             f"deit_tiny_distilled_patch16_224; {student_name!r} has none")
        model.set_distilled_training(True)
    elif loss_name == "multi_token":
        tokens = getattr(model, "num_distill_tokens", None)
        if tokens is None:
            raise ValueError(f"loss 'multi_token' needs a student with one distillation token per teacher "
                             f"(sip_civt_tiny with kwargs num_distill_tokens: {num_teachers}); got {student_name!r}")
        if tokens != num_teachers:
            raise ValueError(f"the student has {tokens} distillation tokens but there are {num_teachers} teachers")
        model.set_distilled_training(True)


def run_distillation(recipe: DistillRecipe, run_dir: str | Path) -> dict[str, Any]:
    """Distil ``recipe.teachers`` (or a logits store) into ``recipe.student``; write under ``run_dir``.

    Everything that can be wrong — class counts of teachers, student and data; a store of another
    dataset or teacher; a checkpoint that is not safetensors / weights_only; an unknown timm name; a
    student without the distillation tokens the loss needs — raises before the first step.

    Returns:
        dict: final metrics (as :func:`sip.train.run.run_training`) plus ``teachers``, ``loss``, ``logits``.
    """
    # 1. check names and the run folder
    check_model_name(recipe.student.name)
    loss_kwargs(recipe.loss)  # an unknown loss name or a key it does not take fails here, before any data is read
    run_dir, resume = prepare_run_dir(recipe, run_dir)
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    accelerator = make_accelerator(recipe.run, recipe.data.img_size)
    data = recipe.data

    # 2. data and label space
    classes = class_names(data)
    train_images = build_train_images(data, classes, recipe.run.seed)
    val_images = build_val_images(data, classes)  # every epoch and every choice
    test_images = build_test_images(data)  # once, at the end

    # 3. teachers (online) or the store, each checked against the data
    teachers = build_teachers(recipe.teachers, data) if recipe.teachers else []
    check_teacher_classes(teachers, classes)
    store, columns = None, []
    if recipe.logits:
        store = TeacherLogitsStore(recipe.logits)
        store.check(dataset_fingerprint(train_images.pool()), classes=classes)
        check_store_views(store, data)
        # the recipe's teachers may be any subset of the stored ones (e.g. one teacher of an ensemble store)
        columns = store.teacher_indices([t.identity for t in teachers]) if teachers else list(range(store.num_teachers))
        missing = store.missing([ds.sample_id(i) for ds in train_images.pool() for i in range(len(ds))])
        if missing:
            raise StoreMismatchError(f"logits store {recipe.logits} lacks {len(missing)} training samples "
                                     f"(e.g. {missing[:3]}); rebuild it with `sip logits` on this data")
    num_teachers = len(columns) if store is not None else len(teachers)
    loss_fn = build_loss(recipe.loss, teachers or None)
    needs_teacher = getattr(loss_fn, "needs_teacher", True)

    # 4. student
    seed_everything(recipe.run.seed)
    student, create_kwargs = build_model(recipe.student, len(classes), data.img_size)
    _check_student_heads(student, recipe.loss.name, num_teachers, recipe.student.name)
    input_config = resolve_input_config(student, data)
    check_trainable(student, img_size=min(input_config["input_size"][-2:]), batch_size=data.batch_size,
                    model_key="student", name=recipe.student.name)
    _, eval_tf = build_transforms(input_config, data)  # evaluation exactly as sip train evaluates

    # 5. items and steps: one replayable view per image per epoch; the teachers see the same (mixed) view
    online = store is None and needs_teacher
    step = DistillStep(loss_fn, input_config=input_config, student_tail=input_transform(input_config), data=data,
                       teachers=TeacherInputs.from_teachers(teachers, input_transform) if online else None,
                       store=store, store_columns=columns, mix=recipe.batch_mix, use_labels=recipe.loss.use_labels,
                       num_classes=len(classes), seed=recipe.run.seed, device=accelerator.device,
                       soft_targets=SoftTargets.build(train_images, classes) if data.soft_labels else None)
    view = EpochView(train_images, step.make_item, recipe.run.seed, data.repeat, accelerator.process_index,
                     accelerator.num_processes)

    # 6. the shared loop
    meta = model_metadata(recipe.student.name, create_kwargs, classes, input_config)
    meta["distilled_from"] = [t.identity for t in teachers] or (store.teachers if store is not None else [])
    logger.info("distilling %s from %s (%s) on %s", recipe.student.name,
                ", ".join(describe(t) for t in teachers) or f"store {recipe.logits}", recipe.loss.name, train_images)
    selector = (DivergenceSelector(recipe.select, train_images, teachers, eval_tf, input_config, run_dir, accelerator)
                if recipe.select.active else None)
    result = fit(model=student, train_view=view, val_images=val_images, test_images=test_images,
                 eval_transform=eval_tf, step_fn=step, optim=recipe.optim, run=recipe.run, data=data,
                 run_dir=run_dir, accelerator=accelerator, model_meta=meta, resume=resume,
                 desc=f"distill {recipe.student.name}", before_epoch=selector,
                 modules_to_device=[t.model for t in teachers] if online else [])
    metrics = dict(result.metrics)
    metrics.update({"loss": recipe.loss.name, "logits": recipe.logits,
                    "teachers": [describe(t) for t in teachers] or [t["name"] for t in store.teachers]})
    if store is not None:
        metrics["store_views"] = store.num_views
    return metrics


__all__ = [
    "LOSS_DEFAULTS",
    "DistillRecipe",
    "LogitsRecipe",
    "LossSection",
    "StoreSection",
    "TeacherSection",
    "build_loss",
    "check_store_views",
    "loss_kwargs",
    "run_distillation",
    "run_logits",
]
