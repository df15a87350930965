"""Prior preservation for ``sip adapt`` (DreamBooth, Ruiz et al., CVPR 2023): the base model's own images of the
prompts it must keep drawing, made once before training and replayed at every step beside the user's shots.

``make_prior`` draws ``prior.per_prompt`` txt2img latents per prompt with the base pipeline (before any LoRA or
fine-tuning touches it), seeded per prompt, and keeps them in ``OUT/prior.safetensors`` (written atomically by
process 0; a resumed run reads it back). They come back as :class:`~sip.adapt.loop.Shots` with no spread, so the
training loop's own :func:`~sip.adapt.loop.denoising_loss` scores them: the prior term is the same objective on
the model's own images, with their prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sip.adapt.collective import Share, barrier
from sip.adapt.loop import Shots
from sip.adapt.recipe import PriorConfig
from sip.data.durable import atomic_write
from sip.ids import stable_seed

PRIOR_FILE = "prior.safetensors"


@torch.no_grad()
def _draw(pipe: Any, config: PriorConfig, progress: bool) -> torch.Tensor:
    """``per_prompt`` latents of each prompt, in the VAE's unscaled space (as encoded shots' means are)."""
    pipe.set_progress_bar_config(disable=not progress)
    out = []
    for i, prompt in enumerate(config.prompts):
        g = torch.Generator().manual_seed(stable_seed("adapt-prior", config.seed, i))
        latents = pipe(prompt=prompt, num_images_per_prompt=config.per_prompt, num_inference_steps=config.steps,
                       guidance_scale=config.guidance_scale, generator=g, output_type="latent").images
        out.append(latents.float().cpu() / pipe.vae.config.scaling_factor)
    return torch.cat(out)


def make_prior(pipe: Any, config: PriorConfig, out: Path, share: Share = Share(),
               progress: bool = True) -> Shots:
    """The prior images as shots (label = prompt index): drawn now, or read from ``out/prior.safetensors``."""
    from safetensors.torch import load_file, save

    path = Path(out) / PRIOR_FILE
    if share.is_main and not path.is_file():
        latents = _draw(pipe, config, progress)
        meta = {"prompts": json.dumps(config.prompts), "per_prompt": str(config.per_prompt)}
        atomic_write(path, save({"latents": latents.contiguous()}, metadata=meta))
    barrier(share)
    latents = load_file(str(path))["latents"]
    expected = len(config.prompts) * config.per_prompt
    if latents.shape[0] != expected:
        raise ValueError(f"{path} holds {latents.shape[0]} prior images, not {expected} (prior.prompts × "
                         "prior.per_prompt): it was made for another recipe; use a new output folder")
    labels = torch.arange(len(config.prompts)).repeat_interleave(config.per_prompt)
    return Shots(latents, torch.zeros_like(latents), labels)
