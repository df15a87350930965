"""One LoRA per class (``lora.per_class: true``; DataDream, Kim et al., ECCV 2024, per-class setting).

Class ``i`` gets a LoRA of its own, trained on that class's shots alone, for ``steps`` steps, in
``OUT/per_class/<i>-<label>/`` (its checkpoint, validation grids and, last, ``pytorch_lora_weights.safetensors``,
which diffusers' ``load_lora_weights`` reads). Classes run one after another, each from a freshly loaded base
pipeline (no adapter of another class in its UNet) and with its own LoRA initialisation; a class whose weights are
written is skipped on a rerun, an unfinished one resumes from its checkpoint. The prior images (``prior:``), when
asked, are made once from the base model and replayed in every class's run. ``sip augment`` / ``sip synth`` load every
class's LoRA and draw each class's images under its own (:func:`sip.adapt.use.class_adapters`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sip.adapt.collective import Share
from sip.adapt.loop import CHECKPOINT_FILE, Shots, encode_shots, load_checkpoint
from sip.adapt.methods import Lora, publish
from sip.adapt.recipe import AdaptRecipe
from sip.adapt.steps import train_steps
from sip.adapt.use import LORA_FILE, PER_CLASS_DIR
from sip.ids import sanitize_label, stable_seed
from sip.models.diffusion import load_diffusion_pipeline

logger = logging.getLogger(__name__)


def class_folders(classes: list[str]) -> dict[str, str]:
    """Each class's folder relative to the run folder: ``per_class/<index>-<label>`` (the index keeps two labels
    that sanitise alike apart)."""
    return {c: f"{PER_CLASS_DIR}/{i:03d}-{sanitize_label(c)}" for i, c in enumerate(classes)}


def train_per_class(recipe: AdaptRecipe, pipe: Any, device: str, classes: list[str], images: list[Any],
                    labels: list[int], out: Path, share: Share, prior: Shots | None,
                    on_step: Callable[[int, float], None] | None,
                    record: Callable[[str, int, list, dict[str, str]], None]) -> tuple[int, dict[str, list]]:
    """Train every class's LoRA (those not finished yet); returns (steps per class, each class's losses).

    Args:
        pipe: the base pipeline already loaded (used for the first class still to train; later ones load afresh).
        record: ``(label, step, losses, finished classes' folders)``, called at each checkpoint.
    """
    folders, done, losses = class_folders(classes), {}, {}
    for i, c in enumerate(classes):
        folder = out / folders[c]
        if (folder / LORA_FILE).is_file():  # finished by an earlier run: its losses are in its last checkpoint
            done[c] = folders[c]
            losses[c] = [tuple(x) for x in load_checkpoint(folder / CHECKPOINT_FILE)[3].get("losses", [])]
            continue
        if pipe is None:
            pipe = load_diffusion_pipeline(recipe.model, "txt2img", device=device)
        with torch.random.fork_rng(devices=[]):  # each class's LoRA init from the recipe's seed and the class
            torch.manual_seed(stable_seed("adapt-init", recipe.seed, i))
            method = Lora(pipe, [c], recipe.lora, recipe.label_names)
        mine = [k for k, label in enumerate(labels) if label == i]
        shots = encode_shots(pipe, [images[k] for k in mine], [0] * len(mine))
        prompts = [recipe.template.format(label=method.names[c])]
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("class %d/%d %r: %d shots, LoRA into %s", i + 1, len(classes), c, len(mine), folder)
        steps, losses[c] = train_steps(recipe, pipe, method, shots, prompts, folder, on_step,
                                       lambda s, ls, _: record(c, s, ls, dict(done)), share, prior)
        if share.is_main:
            publish(method, folder)
        done[c] = folders[c]
        pipe = None  # the next class starts from the base model, not from this class's LoRA
    return recipe.steps, losses
