"""Train sip's embedded default: a small Stable Diffusion on Fashion-MNIST, in diffusers' own classes.

    python scripts/train_tiny_sd.py                      # full recipe (about an hour on 2 CPU cores)
    python scripts/train_tiny_sd.py --unet-steps 200 --vae-steps 100 --out /tmp/sd   # smoke run

Phases, each resumable from the work folder (rerun the same command after a kill):
  1. captions: the offline captioner (EfficientNet-Lite0 ImageNet top-k, real weights) describes
     every training image; cached as JSON lines.
  2. vae: AutoencoderKL 32×32×3 → 8×8×4 (L1 + MSE + a gradient-difference term for sharp edges + a
     small KL), checkpointed.
  3. latents: every training image encoded once (posterior mean and std, sampled per step).
  4. unet + text encoder: UNet2DConditionModel and a small CLIPTextModel trained jointly on SIP prompts
     (label + caption; 30% label-only prompts for data-free txt2img; 10% empty for classifier-free
     guidance), epsilon prediction on SD's scaled-linear schedule, EMA of the UNet weights, checkpointed.
  5. decoder: the VAE decoder fine-tuned with the encoder frozen (as Stable Diffusion's ft-MSE VAE):
     the latent space does not move, so the UNet stays valid, and reconstructions get sharper. With
     ``--decoder-from FOLDER`` this phase alone runs on an already saved pipeline:
         python scripts/train_tiny_sd.py --decoder-from sip/models/fmnist-tiny-sd --out sip/models/fmnist-tiny-sd
  6. export: StableDiffusionPipeline.save_pretrained (safetensors) with a DDIM scheduler.
  7. with ``--lcm-out DIR``: scripts/train_tiny_lcm.py distils the saved pipeline into a few-step LCM one.

Leakage guard: only training images 0..49999 are used; few-shot experiments draw from 50000..59999.
Leakage-controlled (DA-Fusion's setting): ``--exclude-classes Bag "Ankle boot" --out runs/tiny-sd-heldout --work
.cache/tiny-sd-heldout`` trains the same model without those classes' images; ``sip adapt --model runs/tiny-sd-heldout``
then has to teach it them from the shots.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.diffusion_training import load_ckpt, optimizer_step, save_ckpt, warmup_cosine  # noqa: E402
from sip.augment.caption import CaptionCache, CaptionConfig, ImageNetTopKCaptioner, caption_images  # noqa: E402
from sip.augment.prompts import PromptBuilder, PromptConfig  # noqa: E402
from sip.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_READABLE, FashionMNISTSource  # noqa: E402
from sip.ids import image_hash  # noqa: E402
from sip.models.diffusion import DEFAULT_SD_MODEL, offline_clip_tokenizer  # noqa: E402
from sip.runtime import resolve_precision  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_SD_MODEL, help="where the pipeline is saved")
    p.add_argument("--work", default=".cache/tiny-sd-work", help="checkpoints, captions, latents")
    p.add_argument("--train-stop", type=int, default=50000, help="use training images [0, this)")
    p.add_argument("--exclude-classes", nargs="+", default=[], metavar="CLASS",
                   help="leave these classes' images out (e.g. Bag 'Ankle boot'): a generator that never saw them, "
                        "for sip adapt's leakage-controlled experiment; use its own --work folder")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--decoder-steps", type=int, default=1500, help="decoder fine-tuning steps (0: none)")
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--decoder-from", default=None,
                   help="a saved pipeline folder: fine-tune its VAE decoder only, save the pipeline to --out")
    p.add_argument("--lcm-out", default=None, help="then distil the saved pipeline into a few-step (LCM) one here")
    p.add_argument("--lcm-steps", type=int, default=1500, help="scripts/train_tiny_lcm.py --steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--caption-size", type=int, default=96, help="captioner input size (224 native)")
    p.add_argument("--num-merges", type=int, default=6000, help="BPE merges kept in the tokenizer")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast for the VAE on AMX CPUs, fp32 for the small UNet (faster here); "
                        "bf16 forces both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args()


# --------------------------------------------------------------------------------------------------
# components (diffusers / transformers classes; sizes chosen for 2 CPU cores)
# --------------------------------------------------------------------------------------------------

def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, sample_size=32, norm_num_groups=16)


def build_text_encoder(vocab_size: int, max_len: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_len, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=64)
    return CLIPTextModel(cfg)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)


# --------------------------------------------------------------------------------------------------
# checkpoints: safetensors weights + optimizer state loaded with weights_only=True
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------------

def load_images(stop: int, exclude: list[str] | None = None) -> tuple[torch.Tensor, np.ndarray, FashionMNISTSource]:
    """Training images [0, stop) at 32 px in [-1, 1], their labels and the source; ``exclude``: class names whose
    images are left out (the leakage-controlled setting: a generator that never saw those classes)."""
    src = FashionMNISTSource("train", start=0, stop=stop, size=32)
    if exclude:
        unknown = sorted(set(exclude) - set(FASHION_MNIST_CLASSES))
        if unknown:
            raise SystemExit(f"--exclude-classes: {unknown} are not Fashion-MNIST classes; pick from "
                             f"{list(FASHION_MNIST_CLASSES)}")
        dropped = [FASHION_MNIST_CLASSES.index(c) for c in exclude]
        src.indices = src.indices[~np.isin(src.labels[src.indices], dropped)]
    arr = np.stack([np.asarray(src.sample(i).image) for i in range(len(src))])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, src.labels[src.indices], src


def phase_captions(src: FashionMNISTSource, work: Path, size: int) -> list[str]:
    cache = CaptionCache(work / "captions.jsonl")
    captioner = ImageNetTopKCaptioner.from_config(CaptionConfig(image_size=size, device="cpu"))
    captions = []
    chunk = 1024
    for start in tqdm(range(0, len(src), chunk), desc="captions", unit="chunk"):
        images = [src.sample(i).image for i in range(start, min(start + chunk, len(src)))]
        captions += caption_images(images, captioner, cache, batch_size=256, hashes=[image_hash(im) for im in images])
    print(f"captions: {cache.hits} cached, {cache.misses} new; e.g. {captions[:3]}")
    return captions


def grad_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def recon_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + MSE + a gradient-difference term (sharp edges): the VAE's and the decoder fine-tune's loss."""
    return (rec - x).abs().mean() + F.mse_loss(rec, x) + 0.5 * grad_loss(rec, x)


def phase_vae(x: torch.Tensor, work: Path, steps: int, batch: int, bf16: bool):
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    start = load_ckpt(work / "vae", {"vae": vae}, opt)
    for _ in range(start):
        sched.step()
    g = torch.Generator().manual_seed(1000 + start)
    bar = tqdm(range(start, steps), desc="vae", initial=start, total=steps)
    for step in bar:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            post = vae.encode(xb).latent_dist
            rec = vae.decode(post.sample(generator=g)).sample.float()
        kl = post.kl().mean() / (32 * 32 * 3)
        loss = recon_loss(rec, xb) + 1e-4 * kl
        optimizer_step(loss, opt, sched)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.3f}")
        if (step + 1) % 200 == 0 or step + 1 == steps:
            save_ckpt(work / "vae", {"vae": vae}, opt, step + 1)
    return vae.eval()


def phase_decoder(vae, x: torch.Tensor, work: Path, steps: int, batch: int, bf16: bool, lr: float, seed: int):
    """Fine-tune the decoder (and post_quant_conv) on reconstructions of posterior samples; encoder frozen."""
    if steps <= 0:
        return vae
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = load_ckpt(work / "decoder", {"vae": vae}, opt)
    sched = warmup_cosine(opt, steps, min(100, steps // 10 + 1), start)
    g = torch.Generator().manual_seed(seed * 31337 + 2000 + start)
    vae.encoder.eval()
    vae.decoder.train()
    bar = tqdm(range(start, steps), desc="decoder", initial=start, total=steps)
    for step in bar:
        xb = x[torch.randint(0, len(x), (batch,), generator=g)]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = vae.encode(xb).latent_dist.sample(generator=g).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            rec = vae.decode(z).sample.float()
        loss = recon_loss(rec, xb)
        optimizer_step(loss, opt, sched, params)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            save_ckpt(work / "decoder", {"vae": vae}, opt, step + 1)
    for p in vae.parameters():
        p.requires_grad_(True)
    return vae.eval()


def finetune_saved_decoder(args, bf16: bool) -> None:
    """``--decoder-from``: phase 5 alone on a saved pipeline; everything but the VAE decoder is copied."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.decoder_from)
    x, _, _ = load_images(args.train_stop, args.exclude_classes)
    work = Path(args.work)
    before = json.loads((Path(args.decoder_from) / "training_args.json").read_text()) \
        if (Path(args.decoder_from) / "training_args.json").is_file() else {}
    pipe.vae = phase_decoder(pipe.vae.float(), x, work, args.decoder_steps, args.batch, bf16, args.decoder_lr,
                             args.seed)
    pipe.save_pretrained(args.out, safe_serialization=True)
    merged = {**before, "decoder_steps": args.decoder_steps, "decoder_lr": args.decoder_lr,
              "decoder_from": args.decoder_from, "decoder_precision": "bf16" if bf16 else "fp32"}
    (Path(args.out) / "training_args.json").write_text(json.dumps(merged, indent=2))
    print(f"saved pipeline with the fine-tuned decoder to {args.out}")


@torch.no_grad()
def phase_latents(vae, x: torch.Tensor, work: Path):
    path = work / "latents.safetensors"
    from safetensors.torch import load_file, save_file

    if path.is_file():
        d = load_file(path)
        return d["mean"], d["std"]
    means, stds = [], []
    for start in tqdm(range(0, len(x), 512), desc="latents"):
        post = vae.encode(x[start : start + 512]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, path)
    return mean, std


def phase_unet(mean, std, prompts_fn, tokenizer, work: Path, steps: int, batch: int, bf16: bool, seed: int,
               scaling: float):
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.model_max_length)
    unet = build_unet()
    sched = build_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    start = load_ckpt(work / "unet", {"unet": unet, "text_encoder": text_encoder, "ema": ema}, opt)
    lr_sched = warmup_cosine(opt, steps, 200, start)
    rng = random.Random(seed * 7919 + start)
    g = torch.Generator().manual_seed(seed * 104729 + start)
    alphas = sched.alphas_cumprod
    bar = tqdm(range(start, steps), desc="unet", initial=start, total=steps)
    t0 = time.time()
    for step in bar:
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        prompts = [prompts_fn(int(i), rng) for i in idx]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = text_encoder(ids)[0]
            pred = unet(noisy, t, emb).sample.float()
        loss = F.mse_loss(pred, noise)
        optimizer_step(loss, opt, lr_sched, params)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_sched.get_last_lr()[0]:.2e}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            save_ckpt(work / "unet", {"unet": unet, "text_encoder": text_encoder, "ema": ema}, opt, step + 1,
                      {"seconds": time.time() - t0})
    unet.load_state_dict(ema)
    return unet.eval(), text_encoder.eval()


def check_work_folder(work: Path, args) -> None:
    """A work folder's cached captions, latents and checkpoints belong to one training set: refuse another."""
    data = {"train_stop": args.train_stop, "exclude_classes": sorted(args.exclude_classes)}
    path = work / "data.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != data:
            raise SystemExit(f"{work} holds the work of another training set ({before}, asked {data}): pass another "
                             "--work folder")
    else:
        path.write_text(json.dumps(data) + "\n")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # This script trains on the CPU. With `auto` on an AMX CPU, the VAE (32x32 convolutions) trains in bf16
    # (1.3x fp32 here) and the 8x8-latent UNet in fp32 (bf16 measured 2.3x slower: its operators are too small).
    bf16 = resolve_precision(args.precision, torch.device("cpu")) == "bf16"
    bf16_unet = resolve_precision(args.precision, torch.device("cpu"), large=False) == "bf16"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    name = lambda on: "bf16 autocast" if on else "fp32"  # noqa: E731
    print(f"precision: VAE {name(bf16)}, UNet {name(bf16_unet)}; work folder {work}")

    if args.decoder_from:
        finetune_saved_decoder(args, bf16)
        return
    check_work_folder(work, args)
    x, labels, src = load_images(args.train_stop, args.exclude_classes)
    captions = phase_captions(src, work, args.caption_size)

    tokenizer = offline_clip_tokenizer(work / "tokenizer", num_merges=args.num_merges, model_max_length=32)
    builder = PromptBuilder.for_tokenizer(PromptConfig(label_names=FASHION_MNIST_READABLE, max_tokens=32),
                                          tokenizer)
    prompt_cache: dict[int, str] = {}

    def prompts_fn(i: int, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.1:
            return ""  # unconditional, for classifier-free guidance
        label = FASHION_MNIST_CLASSES[int(labels[i])]
        if r < 0.4:
            return builder(label)  # label only: what data-free txt2img asks for
        if i not in prompt_cache:
            prompt_cache[i] = builder(label, captions[i])
        return prompt_cache[i]

    vae = phase_vae(x, work, args.vae_steps, args.batch, bf16)
    mean, std = phase_latents(vae, x, work)
    scaling = float(1.0 / mean.std())
    print(f"latent std {mean.std():.3f} → scaling_factor {scaling:.4f}")
    unet, text_encoder = phase_unet(mean, std, prompts_fn, tokenizer, work, args.unet_steps, args.batch, bf16_unet,
                                    args.seed, scaling)

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae = phase_decoder(vae, x, work, args.decoder_steps, args.batch, bf16, args.decoder_lr, args.seed)
    vae.register_to_config(scaling_factor=scaling)
    scheduler = DDIMScheduler.from_config(build_scheduler().config, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(args.out, safe_serialization=True)
    (Path(args.out) / "training_args.json").write_text(json.dumps(vars(args), indent=2))
    print(f"saved pipeline to {args.out}")
    if args.lcm_out:  # 7. few-step model: latent consistency distillation of the pipeline just saved
        from scripts.train_tiny_lcm import distill, parse_args as lcm_args

        distill(lcm_args(["--teacher", args.out, "--out", args.lcm_out, "--steps", str(args.lcm_steps),
                          "--work", str(work / "lcm"), "--threads", str(args.threads), "--seed", str(args.seed)]))


if __name__ == "__main__":
    main()
