"""``sip adapt``: teach a Stable Diffusion model the user's labelled few shots, resumably.

1. check inputs (the recipe, the output folder, the shots: every class has one) before any model loads;
2. load the base pipeline and build the method (:mod:`sip.adapt.methods`);
3. encode the shots with the VAE once; train with the denoising loss (:mod:`sip.adapt.loop`), a checkpoint
   every ``checkpoint_every`` steps and a validation grid every ``validation.every`` steps;
4. write the final files (diffusers' layouts), the model card, and ``run.json`` (finished) last.

A killed run rerun with the same command resumes from its last checkpoint and continues the step count.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import sip
from sip.adapt import collective
from sip.adapt.loop import encode_shots
from sip.adapt.methods import Method, build_method, publish
from sip.adapt.per_class import class_folders, train_per_class
from sip.adapt.prior import make_prior
from sip.adapt.steps import train_steps
from sip.adapt.recipe import AdaptRecipe
from sip.adapt.use import ADAPT_KIND, ADAPT_RUN, base_identity, read_adapt_run
from sip.adapt.validate import write_model_card
from sip.config import to_dict
from sip.data.durable import atomic_write
from sip.data.run_lock import hold_output
from sip.data.sources import open_source
from sip.ids import stable_seed
from sip.models.diffusion import check_model_source, load_diffusion_pipeline
from sip.runtime import resolve_device
from sip.scale.launch import detect_launch, process_device, warn_if_alone

logger = logging.getLogger(__name__)
# recipe keys a resumed run may change: how long it runs and how it reports, not what it learns
RESUMABLE_KEYS = ("steps", "progress", "output", "checkpoint_every", "validation", "device")


def check_output_folder(out: Path, recipe: AdaptRecipe) -> dict[str, Any] | None:
    """The run.json of a run to resume in ``out`` (None for a new run); another method's or recipe's is refused."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise NotADirectoryError(f"output {out} is a file; pass a folder for `sip adapt -o`")
    info = read_adapt_run(out)
    if info is None:
        if any(out.iterdir()):
            raise FileExistsError(f"output {out} is not empty and holds no {ADAPT_RUN}: not a `sip adapt` run "
                                  "folder; pass a new or empty folder")
        return None
    if info.get("method") != recipe.method:
        raise ValueError(f"output {out} holds a {info.get('method')} run, not {recipe.method}; pass another folder "
                         f"(-o) or method: {info.get('method')}")
    old = {k: v for k, v in (info.get("config") or {}).items() if k not in RESUMABLE_KEYS}
    new = {k: v for k, v in to_dict(recipe).items() if k not in RESUMABLE_KEYS}
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"output {out} was adapted with another recipe (keys {', '.join(changed)} differ); only "
                         f"{', '.join(RESUMABLE_KEYS)} may change on resume: pass another folder (-o)")
    if info.get("finished") and info.get("step", 0) >= recipe.steps:
        logger.warning("%s is finished (step %s of %s): nothing to do", out, info.get("step"), recipe.steps)
    return info


def load_shots(recipe: AdaptRecipe, size: int) -> tuple[list[str], list[Any], list[int], list[dict[str, Any]]]:
    """The shots at the model's size: (classes, images, labels, their ids); a class with no image is refused."""
    source = open_source(recipe.source)
    samples = source.load()
    classes = list(source.classes)
    counts = {c: 0 for c in classes}
    for s in samples:
        counts[s.label_name] += 1
    if empty := [c for c, n in counts.items() if n == 0]:
        raise ValueError(f"source: class(es) {empty} have no readable image; sip adapt needs at least one per class: "
                         f"add images to root/<label>/ or remove the class (source.classes)")
    if big := [s for s in samples if max(s.image.size) > size]:
        logger.warning("%d of %d shots are larger than the model's %d px (e.g. %s, %s): resized to %d x %d",
                       len(big), len(samples), size, big[0].source_id, big[0].image.size, size, size)
    images = [s.image.convert("RGB").resize((size, size)) if s.image.size != (size, size) else s.image.convert("RGB")
              for s in samples]
    shots = [{"source_id": str(s.source_id), "label": s.label_name} for s in samples]
    return classes, images, [s.label for s in samples], shots


def _run_info(recipe: AdaptRecipe, base: dict, classes: list[str], method: Method | dict, shots: list, step: int,
              losses: list, finished: bool) -> dict[str, Any]:
    """run.json; ``method``: the method, or (per-class LoRAs) a dict of its ``names``, ``tokens`` and ``trained``."""
    about = method if isinstance(method, dict) else {"names": method.names, "trained": method.trained,
                                                     "tokens": getattr(method, "tokens", {})}
    return {"kind": ADAPT_KIND, "sip_version": getattr(sip, "__version__", None), "method": recipe.method,
            "base": base, "classes": classes, "tokens": about["tokens"], "names": about["names"],
            "trained": about["trained"],
            "template": recipe.template, "shots": shots, "steps": recipe.steps, "step": step, "finished": finished,
            "losses": losses, "config": to_dict(recipe)}


def _per_class_run(recipe: AdaptRecipe, pipe: Any, device: str, classes: list[str], images: list, labels: list[int],
                   shots_used: list, base: dict, out: Path, launch: Any, share: collective.Share,
                   on_step: Callable[[int, float], None] | None) -> tuple[int, list]:
    """``lora.per_class``: every class's LoRA (:mod:`sip.adapt.per_class`), run.json naming each class's folder."""
    about = {"names": {c: recipe.label_names.get(c, c) for c in classes}, "tokens": {},
             "trained": ["unet: one LoRA per class"]}

    def info(step: int, losses: list, finished: bool, **extra) -> dict[str, Any]:
        return {**_run_info(recipe, base, classes, about, shots_used, step, losses, finished), **launch.record(),
                **extra}

    if share.is_main and read_adapt_run(out) is None:
        _write_run(out, info(0, [], False, per_class={}))
    prior = make_prior(pipe, recipe.prior, out, share, recipe.progress) if recipe.prior.active else None
    step, by_class = train_per_class(
        recipe, pipe, device, classes, images, labels, out, share, prior, on_step,
        lambda c, s, ls, done: _write_run(out, info(s, ls, False, per_class=done, class_in_progress=c)))
    if share.is_main:
        final = info(step, [], True, per_class=class_folders(classes), losses_by_class=by_class)
        write_model_card(out, final)
        _write_run(out, final)
    return step, []


def _write_run(out: Path, info: dict[str, Any]) -> None:
    atomic_write(out / ADAPT_RUN, (json.dumps(info, indent=1) + "\n").encode("utf-8"))


def run_adapt(recipe: AdaptRecipe, on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Adapt ``recipe.model`` to ``recipe.source``'s shots by ``recipe.method``; resumes a run in ``recipe.output``.

    Args:
        recipe (AdaptRecipe): the resolved recipe.
        on_step (Callable[[int, float], None], optional): called after each step with (steps done, loss).

    Returns:
        dict: output folder, method, steps done, first and last loss, seconds.
    """
    t0 = time.perf_counter()
    # 1. check inputs before the model loads
    out = Path(recipe.output)
    previous = check_output_folder(out, recipe)
    base = base_identity(check_model_source(recipe.model, "Stable Diffusion model (model)"))
    if previous and previous.get("base") != base:
        raise ValueError(f"output {out} was adapted from {previous['base'].get('model')}, not {base['model']} (its "
                         "weights differ); pass another folder (-o)")
    launch = detect_launch()  # under torchrun / accelerate launch: data parallel (sip.adapt.collective)
    warn_if_alone(launch)
    device = process_device(recipe.device, launch)
    share, _ = collective.start(launch, cpu=resolve_device(device).type == "cpu")
    with hold_output(out, shard=launch.shard):
        # 2. the base model and the method's trainable parts
        pipe = load_diffusion_pipeline(recipe.model, "txt2img", device=device)
        size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        classes, images, labels, shots_used = load_shots(recipe, size)
        if recipe.method == "lora" and recipe.lora.per_class:
            step, losses = _per_class_run(recipe, pipe, device, classes, images, labels, shots_used, base, out,
                                          launch, share, on_step)
            collective.barrier(share)
            return {"output": str(out), "method": recipe.method, "steps": step, **launch.record(),
                    "per_class": True, "seconds": round(time.perf_counter() - t0, 2)}
        with torch.random.fork_rng(devices=[]):  # LoRA's random init: from the recipe's seed, not the process's
            torch.manual_seed(stable_seed("adapt-init", recipe.seed))
            method = build_method(recipe, pipe, classes)
        # 3. the shots, the prompts, the optimiser; the checkpoint when resuming
        shots = encode_shots(pipe, images, labels)
        prompts = [recipe.template.format(label=method.names[c]) for c in classes]
        info = lambda s, ls, done: {**_run_info(recipe, base, classes, method, shots_used, s, ls, done),
                                    **launch.record()}
        if previous is None and share.is_main:  # a sip adapt run from here on (resumable, refused for another method)
            _write_run(out, info(0, [], False))
        # the base model's own images to keep (a new LoRA is still the identity; fine-tuning has not started)
        prior = make_prior(pipe, recipe.prior, out, share, recipe.progress) if recipe.prior.active else None
        step, losses = train_steps(recipe, pipe, method, shots, prompts, out, on_step,
                                   lambda s, ls, done: _write_run(out, info(s, ls, done)), share, prior)
        # 4. final files, model card, run.json (finished) last: process 0; the others wait for it
        if share.is_main:
            publish(method, out)
            write_model_card(out, info(step, losses, True))
            _write_run(out, info(step, losses, True))
        collective.barrier(share)
    return {"output": str(out), "method": recipe.method, "steps": step, **launch.record(),
            "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
            "seconds": round(time.perf_counter() - t0, 2)}
