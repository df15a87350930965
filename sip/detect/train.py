"""``sip train`` with ``task: detection``: a torchvision FCOS / RetinaNet on a timm ResNet or a ViT trained on scene sets
(``sip scenes`` output, or any COCO folder), optionally distilled from a teacher detector, through sip's one
training loop (:func:`sip.train.loop.fit`: accelerate, resume, checkpoints, ``metrics.jsonl``) with COCO mAP
from pycocotools per epoch on the validation scenes and once on the test scenes.

Run folder: as ``sip train``'s (``config.yaml``, ``metrics.jsonl`` with ``train_classification`` /
``train_bbox_regression`` / ``train_kd_*`` and ``val_map`` / ``val_map50`` …, ``checkpoint/``,
``model.safetensors`` whose metadata rebuilds the detector, ``final_metrics.json`` with ``test_map`` …).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sip.detect.data import SceneImages, SceneSets, collate_scenes, scene_item_maker
from sip.detect.evaluate import DetectionHeldOut
from sip.detect.models import DetectorSection, build_detector, detector_metadata, load_detector
from sip.detect.step import KDSection, check_teacher, make_detection_step
from sip.train.recipe import OptimSection, RunSection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectDataSection:
    """Which scene sets train, validate and test, and how they are batched."""

    train: str | None = None  # scene folder (sip scenes -o DIR) or a folder with annotations.json; required
    val: str | None = None  # validation scenes, every run.eval_every epochs (best epoch); null = none
    test: str | None = None  # test scenes, read once at the end; required
    train_extra: list[str] = field(default_factory=list)  # more training scene sets, trained on with data.train
    classes: list[str] | None = None  # the class list every set must have (ids 1..C); null = data.train's
    hflip: float = 0.5  # horizontal flip probability of a training scene (boxes flipped with it)
    repeat: int = 1  # passes over the training scenes per epoch
    batch_size: int = 16  # scenes per step (per process); detection's batches are small
    eval_batch_size: int = 32
    num_workers: int = 0  # DataLoader workers

    def __post_init__(self):
        if not 0 <= self.hflip <= 1 or self.repeat < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.hflip must be in [0, 1]; data.repeat, batch_size, eval_batch_size >= 1")
        if self.classes is not None and not self.classes:
            raise ValueError("data.classes is an empty list (an empty class list): name the classes or set null")


@dataclass(frozen=True)
class DetectRecipe:
    """One detector training or distillation run (``sip train`` with ``task: detection``)."""

    task: Literal["detection"] = "detection"  # what sip train trains; classification recipes have no task key
    data: DetectDataSection = field(default_factory=DetectDataSection)
    detector: DetectorSection = field(default_factory=DetectorSection)
    kd: KDSection = field(default_factory=KDSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-3, weight_decay=1e-4))
    run: RunSection = field(default_factory=RunSection)

    def output_settings(self) -> dict[str, Any]:
        """The recipe as a dict with the settings the run reads, for resume and reuse checks: without
        ``kd.teacher`` the detector trains on its own losses alone and no other ``kd`` key is read."""
        from sip.config import to_dict

        d = to_dict(self)
        if not self.kd.teacher:
            d["kd"] = {"teacher": None}
        return d

    def __post_init__(self):
        if self.optim.label_smoothing:
            raise ValueError("optim.label_smoothing is a classification loss setting; a detector's class loss is "
                             "the focal loss of its head: remove optim.label_smoothing from a task: detection recipe")


def task_of(recipe: str | Path | None, overrides: list[str]) -> str:
    """The ``task`` a recipe file (and ``--set task=...``) names: ``detection`` or ``classification``."""
    from sip.config import apply_overrides, read_yaml

    data = apply_overrides(read_yaml(recipe) if recipe else {}, [o for o in overrides if o.startswith("task=")])
    return str(data.get("task", "classification"))


def _scene_sets(data: DetectDataSection) -> tuple[SceneImages | SceneSets, SceneImages | None, SceneImages]:
    """Train, validation and test scenes, their classes and scene sizes checked to agree."""
    if not data.train or not data.test:
        raise ValueError("task: detection needs data.train and data.test (scene folders written by sip scenes)")
    train = SceneImages(data.train, data.classes, "data.train")
    if data.train_extra:
        extra = [SceneImages(f, train.classes, f"data.train_extra[{i}]") for i, f in enumerate(data.train_extra)]
        train = SceneSets([train, *extra], ["data.train", *(f"data.train_extra[{i}]" for i in range(len(extra)))])
    val = SceneImages(data.val, train.classes, "data.val") if data.val else None
    test = SceneImages(data.test, train.classes, "data.test")
    for key, s in (("data.val", val), ("data.test", test)):
        if s is not None and s.size != train.size:
            raise ValueError(f"{key}: scenes of {s.size} px, data.train's are {train.size} px; write every set with "
                             "the same scenes.size")
    return train, val, test


def run_detection(recipe: DetectRecipe, run_dir: str | Path) -> dict[str, Any]:
    """Train (or distil) ``recipe.detector`` on ``recipe.data``'s scenes; write everything under ``run_dir``.

    Returns:
        dict: final metrics (``test_map``, ``test_map50``, ``val_map``, ``best_val_map``, ``best_epoch``, timings).
    """
    from sip.models.checkpoints import load_checkpoint_file, load_weights
    from sip.train.inputs import EpochView, seed_everything
    from sip.train.loop import fit, make_accelerator
    from sip.train.run_dir import prepare_run_dir

    # 1. the data and the detector, checked before the run folder is touched (bad files name their key)
    train, val, test = _scene_sets(recipe.data)
    seed_everything(recipe.run.seed)
    model = build_detector(recipe.detector, len(train.classes), train.size)
    teacher = None
    if recipe.kd.teacher:
        teacher, meta = load_detector(recipe.kd.teacher)
        if meta["classes"] != train.classes or meta["img_size"] != train.size:
            raise ValueError(f"kd.teacher {recipe.kd.teacher}: its classes / scene size ({meta['classes']}, "
                             f"{meta['img_size']} px) differ from data.train's ({train.classes}, {train.size} px)")
        check_teacher(recipe.kd, model, teacher)
        teacher.requires_grad_(False)
    if recipe.detector.checkpoint:
        state, _meta = load_checkpoint_file(recipe.detector.checkpoint)
        load_weights(model, state, recipe.detector.checkpoint)

    # 2. the run folder and the accelerator
    run_dir, resume = prepare_run_dir(recipe, run_dir)
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    accelerator = make_accelerator(recipe.run, train.size)

    # 3. the epoch view (seeded flips), the step, the evaluator; 4. the shared loop
    view = EpochView(train, scene_item_maker(recipe.data.hflip), recipe.run.seed, recipe.data.repeat,
                     accelerator.process_index, accelerator.num_processes)
    box_low = 0.0 if recipe.detector.head == "fcos" else -recipe.kd.box_max
    step_fn = make_detection_step(recipe.kd, teacher, accelerator.device, train.size, box_low)
    held_out = DetectionHeldOut(val, test, batch_size=recipe.data.eval_batch_size,
                                max_samples=recipe.run.eval_max_samples, accelerator=accelerator)
    logger.info("training %s %s on %s", recipe.detector.head, recipe.detector.backbone, train)
    result = fit(model=model, train_view=view, val_images=None, test_images=None, eval_transform=None,
                 step_fn=step_fn, optim=recipe.optim, run=recipe.run, data=recipe.data, run_dir=run_dir,
                 accelerator=accelerator, model_meta=detector_metadata(recipe.detector, train.classes, train.size),
                 resume=resume, desc=f"{recipe.detector.head}-{recipe.detector.backbone}",
                 modules_to_device=[teacher] if teacher is not None else [], held_out=held_out,
                 collate_fn=collate_scenes)
    return result.metrics


def run_detection_distillation(recipe: DetectRecipe, run_dir: str | Path) -> dict[str, Any]:
    """``sip distill`` with ``task: detection``: :func:`run_detection` of a recipe that names its teacher."""
    if not recipe.kd.teacher:
        raise ValueError("sip distill with task: detection needs kd.teacher (a sip detector run folder); a detector "
                         "trained on the scene boxes alone is `sip train` with the same recipe")
    return run_detection(recipe, run_dir)


__all__ = ["DetectDataSection", "DetectRecipe", "run_detection", "run_detection_distillation", "task_of"]
