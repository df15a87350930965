"""The ``sip adapt`` training loop: the shots as VAE latents, the denoising loss, resumable checkpoints.

Loss: the standard noise-prediction objective of Stable Diffusion (Ho et al., NeurIPS 2020; Rombach et al., CVPR
2022): ``E ||eps_theta(z_t, t, c) - target||^2`` with ``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps`` under the
pipeline's own noise schedule (``DDPMScheduler.from_config(pipe.scheduler.config)``), target ``eps`` (or the
velocity for a ``v_prediction`` model). Every step draws its batch, timesteps and noise from a generator seeded by
(seed, step), so a resumed run continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sip.data.durable import atomic_write
from sip.ids import stable_seed

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass
class Shots:
    """The training set: each shot's latent distribution (mean, std) and class index."""

    mean: torch.Tensor
    std: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def encode_shots(pipe: Any, images: Sequence[Any], labels: Sequence[int], batch: int = 32) -> Shots:
    """Encode each shot (already at the model's size) with the VAE, once."""
    vae = pipe.vae
    means, stds = [], []
    for i in range(0, len(images), batch):
        pixels = pipe.image_processor.preprocess(list(images[i:i + batch])).to(vae.device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return Shots(torch.cat(means), torch.cat(stds), torch.tensor(list(labels), dtype=torch.long))


def denoising_loss(pipe: Any, noise_scheduler: Any, encode: Callable[[torch.Tensor], torch.Tensor],
                   shots: Shots, prompt_ids: torch.Tensor, batch_size: int, seed: int, step: int,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """The noise-prediction MSE of one step's batch (drawn with a generator seeded by ``seed`` and ``step``);
    with ``rows``, this process's part of it (:mod:`sip.adapt.collective`): the squared errors of those rows over
    the whole batch's element count, so the parts of all processes add up to the whole batch's MSE.

    Args:
        pipe: the pipeline whose UNet predicts (``pipe.vae.config.scaling_factor`` scales the latents).
        noise_scheduler: a ``DDPMScheduler`` built from the pipeline's scheduler config.
        encode: ``input_ids -> hidden states`` through the trainable text parameters.
        shots (Shots): the encoded shots.
        prompt_ids (torch.Tensor): each class's tokenised training prompt, (classes, length).
        batch_size (int): images per step (with replacement when the set is smaller).
        seed (int), step (int): fix the batch, timesteps and noise.
        rows (torch.Tensor, optional): the batch rows this process computes. Defaults to all.
    """
    g = torch.Generator().manual_seed(stable_seed("adapt", seed, step))
    n = len(shots.labels)
    idx = torch.randperm(n, generator=g)[:batch_size] if n >= batch_size else torch.randint(n, (batch_size,), generator=g)
    eps = torch.randn(shots.mean[idx].shape, generator=g)
    latents = (shots.mean[idx] + shots.std[idx] * eps) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"the model's scheduler predicts {kind!r}; sip adapt trains epsilon or v_prediction models")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    whole = target.numel()
    if rows is not None:
        idx, noisy, t, target = idx[rows], noisy[rows], t[rows], target[rows]
    hidden = encode(prompt_ids[shots.labels[idx]].to(device))
    pred = pipe.unet(noisy.to(device, dtype), t.to(device), hidden.to(dtype)).sample
    if rows is None:
        return F.mse_loss(pred.float(), target.to(device).float())
    return F.mse_loss(pred.float(), target.to(device).float(), reduction="sum") / whole


# --------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file (trainable state + optimiser state + step), written atomically
# --------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int,
                    info: dict[str, Any]) -> None:
    """Write the trainable state, the optimiser's state and the step to ``path`` (temp file + rename)."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for i, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(i), {})[k] = v
    meta = {"step": str(step), "param_groups": json.dumps(opt["param_groups"]), "scalars": json.dumps(scalars),
            "info": json.dumps(info)}
    atomic_write(path, save(tensors, metadata=meta))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int, dict[str, Any]]:
    """Read what :func:`save_checkpoint` wrote: (trainable state, optimiser state dict, step, info)."""
    from safetensors import safe_open
    from safetensors.torch import load

    data = path.read_bytes()
    tensors = load(data)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for i, extra in json.loads(meta.get("scalars", "{}")).items():
        state.setdefault(int(i), {}).update(extra)
    optim = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    return model, optim, int(meta["step"]), json.loads(meta.get("info", "{}"))


def save_bytes(path: Path, write: Callable[[io.BytesIO], None]) -> None:
    """Write what ``write`` puts in a buffer to ``path`` atomically."""
    buf = io.BytesIO()
    write(buf)
    atomic_write(path, buf.getvalue())
