"""The ``sip adapt`` optimisation loop: from the last checkpoint (or step 0) to ``recipe.steps``, each step the
denoising loss of the shots (and of the prior images), gradients summed over processes, clipped, AdamW, the
warm-up / cosine schedule; checkpoints, ``run.json`` records and validation grids by process 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sip.adapt import collective
from sip.adapt.loop import CHECKPOINT_FILE, Shots, denoising_loss, load_checkpoint, save_checkpoint
from sip.adapt.methods import Method
from sip.adapt.recipe import AdaptRecipe
from sip.adapt.validate import save_grid
from sip.ids import stable_seed
from sip.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)


def tokenize(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """Each prompt's token ids, padded to the tokenizer's length."""
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def train_steps(recipe: AdaptRecipe, pipe: Any, method: Method, shots: Shots, prompts: list[str], out: Path,
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
    prompt_ids, step, losses = tokenize(pipe, prompts), 0, []
    prior_ids = tokenize(pipe, list(recipe.prior.prompts)) if prior is not None else None
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
