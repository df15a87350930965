"""Train any timm classifier on real images, sip's synthetic images, or a mix of both.

``run_training(recipe, run_dir)`` reads top to bottom: 1. check the recipe and the run folder,
2. build the data, 3. build the model (timm registry; unknown names list close matches), 4. build
preprocessing from the model's own timm data config, 5. optimiser and schedule (AdamW, linear warm-up
then cosine), 6. resume from the last checkpoint if there is one, 7. the epoch loop (progress bar,
top-1/top-5 on the validation split, metrics as JSON lines, safetensors checkpoints), 8. the test set, once,
and the final model.

The loop itself (:func:`fit`) is shared with distillation (``sip.distill``), which only swaps the loss.
Runs are deterministic: the order of each epoch, every item's augmentation and every step's dropout are
seeded from ``(run.seed, epoch, position)`` and ``(run.seed, step)``, so a run resumed from a checkpoint
ends with the same weights as an uninterrupted one (on the same machine and thread count).

Run folder::

    config.yaml          the resolved recipe
    metrics.jsonl        one JSON line per epoch (train loss/accuracy, validation top-1/top-5, lr, time)
    checkpoint/          model.safetensors + state.pt (optimizer, scheduler, counters) of the last save
    model.safetensors    final weights; its metadata names the timm model, its kwargs, the classes and the
                         preprocessing, so ``sip.distill.teachers`` can rebuild it without the recipe
    final_metrics.json   what run_training returns: test_* (the test set, read once, here), val_*, best_epoch
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sip.models.checkpoints import model_metadata
from sip.models.classifiers import check_model_name
from sip.models.input_checks import check_trainable
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
from sip.train.evaluate import merge_heads
from sip.train.loop import fit, make_accelerator
from sip.train.recipe import TrainRecipe
from sip.train.run_dir import prepare_run_dir
from sip.train.soft_labels import SoftTargets

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# sip train
# ----------------------------------------------------------------------------------------------------

def run_training(recipe: TrainRecipe, run_dir: str | Path) -> dict[str, Any]:
    """Train ``recipe.model`` on ``recipe.data``; write everything under ``run_dir``.

    Args:
        recipe (TrainRecipe): the resolved recipe.
        run_dir (str | Path): output folder; a checkpoint there is resumed (``run.resume``).

    Returns:
        dict: final metrics (``test_top1`` = ``top1``, ``test_top5``, ``test_loss``, ``val_top1``, ``best_val_top1``,
        ``best_epoch``, ``steps``, timings, ...).
    """
    # 1. check the recipe and the run folder (fail before any data or model is built)
    check_model_name(recipe.model.name)
    run_dir, resume = prepare_run_dir(recipe, run_dir)
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    accelerator = make_accelerator(recipe.run, recipe.data.img_size)

    # 2. data: the label space comes from the test set; the validation split is disjoint from shots and test
    classes = class_names(recipe.data)
    train_images = build_train_images(recipe.data, classes, recipe.run.seed)
    val_images = build_val_images(recipe.data, classes)  # every epoch and every choice
    test_images = build_test_images(recipe.data)  # once, at the end

    # 3. model (seeded init)
    seed_everything(recipe.run.seed)
    model, create_kwargs = build_model(recipe.model, len(classes), recipe.data.img_size)

    # 4. preprocessing from the model's timm data config
    input_config = resolve_input_config(model, recipe.data)
    check_trainable(model, img_size=min(input_config["input_size"][-2:]), batch_size=recipe.data.batch_size,
                    name=recipe.model.name)
    train_tf, eval_tf = build_transforms(input_config, recipe.data)

    soft = SoftTargets.build(train_images, classes) if recipe.data.soft_labels else None

    def make_item(images, index, rng):
        image, label = images[index]
        item = {"image": train_tf(image), "label": label}
        if soft is not None:  # data.soft_labels: the metadata's soft_label (one-hot where there is none)
            item["soft_target"] = soft(images, index)
        return item

    view = EpochView(train_images, make_item, recipe.run.seed, recipe.data.repeat,
                     accelerator.process_index, accelerator.num_processes)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)

    def step_fn(model, batch, epoch, step):
        x = batch["image"].to(accelerator.device, non_blocking=True)
        y = batch["label"].to(accelerator.device, non_blocking=True)
        logits = merge_heads(model(x))
        target = batch["soft_target"].to(accelerator.device) if "soft_target" in batch else y
        return {"ce": criterion(logits.float(), target)}, logits, y

    # 5.-8. optimiser, schedule, resume, loop, final save
    meta = model_metadata(recipe.model.name, create_kwargs, classes, input_config)
    logger.info("training %s (%d classes) on %s", recipe.model.name, len(classes), train_images)
    result = fit(model=model, train_view=view, val_images=val_images, test_images=test_images, eval_transform=eval_tf,
                 step_fn=step_fn, optim=recipe.optim, run=recipe.run, data=recipe.data, run_dir=run_dir, accelerator=accelerator,
                 model_meta=meta, resume=resume, desc=recipe.model.name)
    return result.metrics


__all__ = ["run_training"]
