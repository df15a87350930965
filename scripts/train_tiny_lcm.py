"""Latent consistency distillation (LCM, Luo et al. 2023) of a saved Stable Diffusion into a few-step model.

    python scripts/train_tiny_lcm.py                                  # shipped model → sip/models/fmnist-tiny-lcm
    python scripts/train_tiny_lcm.py --steps 20 --images 200 --out /tmp/lcm --prompts label   # smoke run

The student starts as a copy of the teacher's UNet and learns the consistency function of the teacher's
guided probability-flow ODE: for a latent noised to a timestep t_{n+k} of the 50-step DDIM grid
(19, 39, …, 999), the student's denoised guess f(x_{t_{n+k}}, t_{n+k}) must equal a slowly moving target
copy's guess f⁻(x̂_{t_n}, t_n) one grid step later, where x̂_{t_n} is one DDIM step of the *teacher* with
classifier-free guidance at ``--guidance`` (sip's default 4). f = c_skip(t)·x + c_out(t)·x̂₀(ε_θ(x, t)) with
LCMScheduler's boundary scalings (σ_data 0.5, timestep scaling 10), so f(x, 0) = x and the saved UNet runs
under diffusers' ``LCMScheduler`` unchanged: 1-8 steps, ``guidance_scale`` 1 (the guidance is baked in, as
in LCM-LoRA; the UNet keeps SD's config, so it stays a plain ``UNet2DConditionModel``). Huber loss
(c = 0.001), AdamW, EMA 0.95 target network, all as diffusers' ``train_lcm_distill_sd_wds.py``.

Data: Fashion-MNIST training images [0, --images) (the generator's own split, never the few-shot pool
50,000-59,999), encoded once by the teacher's VAE; prompts as the teacher was trained: label + caption of
the offline captioner (60%) or the label alone (40%); ``--prompts label`` skips the captioner.

Resumable: rerun the same command after a kill (checkpoint every 100 steps in ``--work``). The output folder
is a complete pipeline (the teacher's VAE, text encoder and tokenizer, the distilled UNet, an LCMScheduler)
written to a temporary folder and moved into place at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.diffusion_training import load_ckpt, save_ckpt, warmup_cosine  # noqa: E402
from sip.models.diffusion import DEFAULT_SD_MODEL, SHIPPED_MODELS_DIR  # noqa: E402

DEFAULT_LCM_MODEL = str(SHIPPED_MODELS_DIR / "fmnist-tiny-lcm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=DEFAULT_SD_MODEL, help="saved Stable Diffusion folder (the teacher)")
    p.add_argument("--out", default=DEFAULT_LCM_MODEL, help="where the few-step pipeline is saved")
    p.add_argument("--work", default=".cache/tiny-lcm-work", help="checkpoints, latents, captions")
    p.add_argument("--images", type=int, default=10000, help="training images [0, this) of Fashion-MNIST")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--guidance", type=float, default=4.0, help="teacher's classifier-free guidance, baked in")
    p.add_argument("--ddim-steps", type=int, default=50, help="the teacher's solver grid (LCM's N)")
    p.add_argument("--ema", type=float, default=0.95, help="target network EMA decay")
    p.add_argument("--huber-c", type=float, default=0.001)
    p.add_argument("--prompts", choices=["sip", "label"], default="sip",
                   help="sip: label + caption (60%%) or label; label: label only (no captioner)")
    p.add_argument("--caption-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.images > 50000:
        p.error("--images must be <= 50000: images 50,000-59,999 are sip's few-shot pool and must stay unseen")
    if args.guidance < 1:
        p.error("--guidance must be >= 1")
    return args


# --------------------------------------------------------------------------------------------------
# the consistency function and the teacher's solver
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _lcm_scheduler(timestep_scaling: float):
    from diffusers import LCMScheduler

    return LCMScheduler(timestep_scaling=timestep_scaling)


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0):
    """c_skip(t), c_out(t) of ``LCMScheduler.get_scalings_for_boundary_condition_discrete`` (the scheduler's own
    formula, per sample): c_skip(0) = 1 and c_out(0) = 0, so the consistency function is the identity at t = 0."""
    c_skip, c_out = _lcm_scheduler(timestep_scaling).get_scalings_for_boundary_condition_discrete(t.double())
    return c_skip.float().view(-1, 1, 1, 1), c_out.float().view(-1, 1, 1, 1)


class DDIMSolver:
    """The teacher's DDIM grid t_n = (n + 1)·k − 1 (k = T / N), the one ``LCMScheduler`` samples from."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_train: int = 1000, ddim_steps: int = 50):
        self.k = num_train // ddim_steps
        self.timesteps = torch.arange(1, ddim_steps + 1) * self.k - 1
        self.alphas = alphas_cumprod.float()
        prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])
        self.alphas_prev = prev.float()

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a_prev = self.alphas_prev[index].view(-1, 1, 1, 1)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def predict_x0(eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    a = alphas[t].view(-1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def consistency(unet, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """f(x, t) = c_skip(t)·x + c_out(t)·x̂₀: the denoised estimate ``LCMScheduler.step`` forms."""
    c_skip, c_out = boundary_scalings(t)
    return c_skip * x + c_out * predict_x0(unet(x, t, emb).sample, x, t, alphas)


def lcd_loss(student, target, teacher, latents, noise, index, emb, uncond, solver: DDIMSolver, guidance: float,
             huber_c: float) -> torch.Tensor:
    """One consistency-distillation loss: student at t_{n+k} against the target one guided DDIM step later."""
    t_start = solver.timesteps[index]
    t_end = (t_start - solver.k).clamp(min=0)
    a = solver.alphas[t_start].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = consistency(student, noisy, t_start, emb, solver.alphas)
    with torch.no_grad():
        eps = teacher(torch.cat([noisy, noisy]), torch.cat([t_start, t_start]),
                      torch.cat([uncond.expand_as(emb), emb])).sample
        eps_u, eps_c = eps.chunk(2)
        eps_g = eps_u + guidance * (eps_c - eps_u)
        x_prev = solver.step(predict_x0(eps_g, noisy, t_start, solver.alphas), eps_g, index)
        goal = consistency(target, x_prev, t_end, emb, solver.alphas)
    return (torch.sqrt((pred.float() - goal.float()) ** 2 + huber_c**2) - huber_c).mean()


# --------------------------------------------------------------------------------------------------
# data: latents and prompt embeddings, computed once
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def prepare_data(pipe, args, work: Path):
    """Posterior mean/std of every training image and the text embedding of each image's prompt(s)."""
    from safetensors.torch import load_file, save_file

    from sip.augment.prompts import PromptBuilder, PromptConfig
    from sip.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_READABLE, FashionMNISTSource

    src = FashionMNISTSource("train", start=0, stop=args.images, size=pipe.vae.config.sample_size or 32)
    labels = src.labels[src.indices]
    path = work / f"latents-{args.images}.safetensors"
    if path.is_file():
        d = load_file(path)
        mean, std = d["mean"], d["std"]
    else:
        means, stds = [], []
        for start in tqdm(range(0, len(src), 512), desc="latents"):
            images = [src.sample(i).image for i in range(start, min(start + 512, len(src)))]
            post = pipe.vae.encode(pipe.image_processor.preprocess(images)).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        mean, std = torch.cat(means), torch.cat(stds)
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, path)
    builder = PromptBuilder.for_tokenizer(
        PromptConfig(label_names=FASHION_MNIST_READABLE, max_tokens=pipe.tokenizer.model_max_length), pipe.tokenizer)
    label_prompts = [builder(FASHION_MNIST_CLASSES[int(y)]) for y in labels]
    caption_prompts = label_prompts
    if args.prompts == "sip":
        from sip.augment.caption import CaptionCache, CaptionConfig, ImageNetTopKCaptioner, caption_images
        from sip.ids import image_hash

        captioner = ImageNetTopKCaptioner.from_config(CaptionConfig(image_size=args.caption_size, device="cpu"))
        cache, captions = CaptionCache(work / "captions.jsonl"), []
        for start in tqdm(range(0, len(src), 1024), desc="captions", unit="chunk"):
            images = [src.sample(i).image for i in range(start, min(start + 1024, len(src)))]
            captions += caption_images(images, captioner, cache, batch_size=256,
                                       hashes=[image_hash(im) for im in images])
        caption_prompts = [builder(FASHION_MNIST_CLASSES[int(y)], c) for y, c in zip(labels, captions)]
    distinct = sorted(set(label_prompts) | set(caption_prompts) | {""})
    embeds = {}
    for start in range(0, len(distinct), 256):
        chunk = distinct[start : start + 256]
        ids = pipe.tokenizer(chunk, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        embeds.update(zip(chunk, pipe.text_encoder(ids)[0]))
    return mean, std, label_prompts, caption_prompts, embeds


# --------------------------------------------------------------------------------------------------
# training and export
# --------------------------------------------------------------------------------------------------

def distill(args) -> Path:
    from diffusers import StableDiffusionPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe.unet.eval().requires_grad_(False)
    mean, std, label_prompts, caption_prompts, embeds = prepare_data(pipe, args, work)
    scaling = pipe.vae.config.scaling_factor
    solver = DDIMSolver(pipe.scheduler.alphas_cumprod, pipe.scheduler.config.num_train_timesteps, args.ddim_steps)

    student = type(teacher).from_config(teacher.config)
    student.load_state_dict(teacher.state_dict())
    student.train()
    target = type(teacher).from_config(teacher.config)
    target.load_state_dict(teacher.state_dict())
    target.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    start = load_ckpt(work / "lcm", {"student": student, "target": target}, opt)
    sched = warmup_cosine(opt, args.steps, min(100, max(1, args.steps // 10)), start)
    g = torch.Generator().manual_seed(args.seed * 104729 + start)
    rng = random.Random(args.seed * 7919 + start)
    uncond = embeds[""].unsqueeze(0)
    bar = tqdm(range(start, args.steps), desc="lcm", initial=start, total=args.steps)
    t0, losses = time.time(), []
    for step in bar:
        idx = torch.randint(0, len(mean), (args.batch,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        prompts = [caption_prompts[i] if rng.random() < 0.6 else label_prompts[i] for i in idx.tolist()]
        emb = torch.stack([embeds[p] for p in prompts])
        noise = torch.randn(latents.shape, generator=g)
        index = torch.randint(0, args.ddim_steps, (args.batch,), generator=g)
        loss = lcd_loss(student, target, teacher, latents, noise, index, emb, uncond, solver, args.guidance,
                        args.huber_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_t, p_s in zip(target.parameters(), student.parameters()):
                p_t.mul_(args.ema).add_(p_s.detach(), alpha=1 - args.ema)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.5f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            save_ckpt(work / "lcm", {"student": student, "target": target}, opt, step + 1,
                      {"seconds": time.time() - t0, "loss": sum(losses[-50:]) / len(losses[-50:])})
    return export(pipe, target, args)


def export(pipe, unet, args) -> Path:
    """Save the teacher's pipeline with the distilled UNet (the EMA target, as LCM ships) and an LCMScheduler."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=args.ddim_steps,
                                         timestep_spacing="leading", set_alpha_to_one=True)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lcm = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    lcm.save_pretrained(tmp, safe_serialization=True)
    record = dict(vars(args), baked_guidance=args.guidance,
                  usage="LCMScheduler, 1-8 steps, guidance_scale 1 (guidance is baked into the UNet)")
    (tmp / "training_args.json").write_text(json.dumps(record, indent=2))
    if (out / "README.md").is_file():  # the model card (measured quality) is written by hand: keep it
        shutil.copy2(out / "README.md", tmp / "README.md")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():  # moved aside, not deleted, until the new one is in place
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"saved the few-step pipeline to {out}")
    return out


if __name__ == "__main__":
    distill(parse_args())
