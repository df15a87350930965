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
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import sip
from sip.adapt import collective
from sip.adapt.loop import CHECKPOINT_FILE, Shots, denoising_loss, encode_shots, load_checkpoint, save_checkpoint
from sip.adapt.methods import Method, build_method
from sip.adapt.prior import make_prior
from sip.adapt.recipe import AdaptRecipe
from sip.adapt.use import ADAPT_KIND, ADAPT_RUN, base_identity, read_adapt_run
from sip.adapt.validate import save_grid, write_model_card
from sip.config import to_dict
from sip.data.durable import atomic_write
from sip.data.run_lock import hold_output
from sip.data.sources import open_source
from sip.ids import stable_seed
from sip.models.diffusion import check_model_source, load_diffusion_pipeline
from sip.runtime import resolve_device
from sip.scale.launch import detect_launch, process_device, warn_if_alone
from sip.train.schedule import warmup_cosine

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


def _run_info(recipe: AdaptRecipe, base: dict, classes: list[str], method: Method, shots: list, step: int,
              losses: list, finished: bool) -> dict[str, Any]:
    return {"kind": ADAPT_KIND, "sip_version": getattr(sip, "__version__", None), "method": recipe.method,
            "base": base, "classes": classes, "tokens": getattr(method, "tokens", {}), "names": method.names,
            "trained": method.trained,
            "template": recipe.template, "shots": shots, "steps": recipe.steps, "step": step, "finished": finished,
            "losses": losses, "config": to_dict(recipe)}


def _write_run(out: Path, info: dict[str, Any]) -> None:
    atomic_write(out / ADAPT_RUN, (json.dumps(info, indent=1) + "\n").encode("utf-8"))


def _publish(method: Method, out: Path) -> None:
    """Write the final files into a temp folder, then move each into ``out`` (never half a file in ``out``)."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    method.save(tmp)
    for entry in tmp.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    tmp.rmdir()


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
        step, losses = _train(recipe, pipe, method, shots, prompts, out, on_step,
                              lambda s, ls, done: _write_run(out, info(s, ls, done)), share, prior)
        # 4. final files, model card, run.json (finished) last: process 0; the others wait for it
        if share.is_main:
            _publish(method, out)
            write_model_card(out, info(step, losses, True))
            _write_run(out, info(step, losses, True))
        collective.barrier(share)
    return {"output": str(out), "method": recipe.method, "steps": step, **launch.record(),
            "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def _tokenize(pipe: Any, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def _train(recipe: AdaptRecipe, pipe: Any, method: Method, shots: Shots, prompts: list[str], out: Path,
           on_step: Callable[[int, float], None] | None, record: Callable[[int, list, bool], None],
           share: collective.Share = collective.Share(), prior: Shots | None = None):
    """The loop from the last checkpoint (or step 0) to ``recipe.steps``; returns (steps done, [(step, loss)]).
    Under a multi-process launch each process computes its ``share`` of every batch, the gradients are summed,
    and process 0 alone writes checkpoints, ``run.json`` and grids. With ``prior`` (:mod:`sip.adapt.prior`) each
    step adds ``prior.weight`` times the loss of a batch of the base model's own images."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = method.params()
    optimizer = torch.optim.AdamW(method.param_groups(recipe.lr), lr=recipe.lr, weight_decay=recipe.weight_decay)
    peaks = [group["lr"] for group in optimizer.param_groups]  # each group's own peak (finetune.text_encoder_lr)
    prompt_ids, step, losses = _tokenize(pipe, prompts), 0, []
    prior_ids = _tokenize(pipe, list(recipe.prior.prompts)) if prior is not None else None
    prior_seed = stable_seed("adapt-prior-batch", recipe.seed)
    if (ckpt := out / CHECKPOINT_FILE).is_file():
        state, optim_state, step, info = load_checkpoint(ckpt)
        method.load_state(state)
        optimizer.load_state_dict(optim_state)
        losses = [tuple(x) for x in info.get("losses", [])]
        logger.info("resuming %s from step %d", out, step)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.eval()  # no dropout: a step's result depends only on (seed, step) and the weights
    bar = tqdm(total=recipe.steps, initial=step, desc=f"adapt {recipe.method}", unit="step",
               disable=not recipe.progress or not share.is_main, dynamic_ncols=True)
    while step < recipe.steps:
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * warmup_cosine(step, recipe.warmup_steps, recipe.steps)
        rows = share.rows(recipe.batch_size) if share.world > 1 else None
        loss = denoising_loss(pipe, noise_scheduler, method.encode, shots, prompt_ids, recipe.batch_size,
                              recipe.seed, step, rows)
        if prior is not None:
            loss = loss + recipe.prior.weight * denoising_loss(pipe, noise_scheduler, method.encode, prior, prior_ids,
                                                               recipe.batch_size, prior_seed, step, rows)
        value = collective.sum_value(loss.item(), share, pipe.unet.device)  # the whole batch's
        if not math.isfinite(value):
            raise FloatingPointError(f"adapt loss is {value} at step {step}: lower lr (now {recipe.lr})")
        loss.backward()
        collective.sum_gradients(params, share)
        if recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append((step, round(value, 6)))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1][1]:.4f}", refresh=False)
        if share.is_main and (step % recipe.checkpoint_every == 0 or step == recipe.steps):
            save_checkpoint(ckpt, method.state(), optimizer, step, {"losses": losses})
            record(step, losses, False)
        if share.is_main and recipe.validation.every and (step % recipe.validation.every == 0 or step == recipe.steps):
            save_grid(pipe, method, prompts, recipe.validation, out / "validation" / f"step-{step:06d}.png")
        if on_step is not None:
            on_step(step, losses[-1][1])
    bar.close()
    return step, losses
