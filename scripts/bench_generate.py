#!/usr/bin/env python
"""sip's img2img stage against the naive diffusers usage, side by side in one run, on this CPU.

Naive: one ``StableDiffusionImg2ImgPipeline`` call per image and variant, fp32, the pipeline's own
prompt and image handling (``pipe(prompt=..., image=..., negative_prompt=..., generator=...)``).
sip: ``DiffusionGenerator.img2img`` in batches (each distinct source VAE-encoded once for all its
variants, each distinct prompt encoded once, batched UNet/VAE), over a sweep of its options
(batch size, ``channels_last``, precision fp32 / bf16 autocast). Both paths use the same pipeline
object, the same sources, prompts, per-image seeds, steps, strength and guidance.

Two models:

- ``tiny``: the shipped model (``--model``; default ``sip.models.diffusion.DEFAULT_SD_MODEL``, falling back to
  ``.cache/fmnist-tiny-sd`` while the shipped folder is still empty) on Fashion-MNIST 32 px sources;
- ``sd15``: a Stable Diffusion 1.5-architecture UNet (860 M parameters) + VAE + CLIP ViT-L text encoder
  (123 M, full 49,408-token vocabulary from the offline tokenizer) built from config with random
  weights (their cost does not depend on their values), at ``--sd15-size`` px (256) on real photos
  from ``skimage.data`` / ``sklearn.datasets.load_sample_images``.

It also measures this CPU's fp32 and bf16 matmul peak (large square GEMMs), counts the UNet's FLOPs
per sample (``torch.utils.flop_counter.FlopCounterMode``), times every UNet / VAE / text-encoder
forward inside each run (forward pre/post hooks) to report the UNet's achieved FLOP/s as a fraction
of the same-dtype peak, profiles where sip's time goes on the SD1.5 model (``torch.profiler``), and
prints the bounds that explain the speed-up it finds.

Usage:
    python scripts/bench_generate.py            # full (~10-15 minutes on 2 cores)
    python scripts/bench_generate.py --quick    # under a minute (SD1.5 at 128 px, 2 denoising steps)

Prints tables, then as its last line one JSON object: {"speedup_vs_naive_sd15": ...,
"speedup_vs_naive_tiny": ..., "unet_peak_fraction": ..., "max_abs_diff": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAINING_OUTPUT = REPO / ".cache" / "fmnist-tiny-sd"

# Real photos that ship with scikit-image / scikit-learn (no download), with a caption each.
PHOTOS = [
    ("cat", "skimage:chelsea", "a tabby cat looking to the side"),
    ("coffee", "skimage:coffee", "a cup of coffee on a saucer"),
    ("person", "skimage:astronaut", "an astronaut in a white suit next to a flag"),
    ("rocket", "skimage:rocket", "a rocket on a launch pad"),
    ("building", "sklearn:china.jpg", "a temple with a red roof among trees"),
    ("flower", "sklearn:flower.jpg", "a pink flower in close up"),
]
FMNIST_WORDS = ["plain", "striped", "dark", "light", "long", "short", "wide", "narrow", "soft", "worn"]


# --------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------

def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> float:
    """Best GFLOP/s of an n×n by n×n matmul in ``dtype`` over ``reps`` runs (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    keep = [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_vnni", "avx512f", "avx2"))]
    return " ".join(sorted(keep)) or "none of avx2/avx512/amx"


# --------------------------------------------------------------------------------------------------
# where the time goes: forward hooks on the networks, FLOPs per sample
# --------------------------------------------------------------------------------------------------

class StageTimer:
    """Wall time spent inside named modules, measured with forward pre/post hooks (CPU ops are
    synchronous, so wall time between the hooks is the module's time), plus samples per module."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.seconds: dict[str, float] = defaultdict(float)
        self.samples: Counter = Counter()
        self.calls: Counter = Counter()
        self._t0: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(partial(self._pre, name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(partial(self._post, name)))

    def _pre(self, name, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.samples[name] += int(x.shape[0])
        self._t0[name] = time.perf_counter()

    def _post(self, name, module, args, output):
        self.seconds[name] += time.perf_counter() - self._t0.pop(name)
        self.calls[name] += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def networks(pipe) -> dict[str, torch.nn.Module]:
    return {"unet": pipe.unet, "vae_decoder": pipe.vae.decoder, "vae_encoder": pipe.vae.encoder,
            "text_encoder": pipe.text_encoder}


def count_flops(pipe, size: int) -> dict[str, int]:
    """FLOPs per sample of each network at generation size ``size`` (FlopCounterMode).

    Attention is counted with diffusers' classic ``AttnProcessor`` (explicit bmm/baddbmm, which the
    counter knows); the CPU SDPA kernel the runs use does the same arithmetic but is not registered
    with the counter.
    """
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    f = int(pipe.vae_scale_factor)
    length = int(pipe.tokenizer.model_max_length)
    latent = torch.randn(1, unet.config.in_channels, size // f, size // f)
    context = torch.randn(1, length, unet.config.cross_attention_dim)
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    out = {}
    try:
        with torch.inference_mode():
            with FlopCounterMode(display=False) as fc:
                unet(latent, torch.tensor([500]), encoder_hidden_states=context)
            out["unet"] = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                vae.decoder(torch.randn(1, vae.config.latent_channels, size // f, size // f))
            out["vae_decoder"] = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                vae.encoder(torch.randn(1, 3, size, size))
            out["vae_encoder"] = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                text(torch.zeros(1, length, dtype=torch.long))
            out["text_encoder"] = fc.get_total_flops()
    finally:
        unet.set_attn_processor(saved)
    return out


# --------------------------------------------------------------------------------------------------
# the two ways to run img2img
# --------------------------------------------------------------------------------------------------

@dataclass
class Job:
    image: Image.Image  # the source (one object per source: variants share it, as in run_augment)
    prompt: str
    seed: int


@dataclass
class RunResult:
    name: str
    images: list
    seconds: float
    cpu_seconds: float
    timer: StageTimer
    batch_size: int = 1
    channels_last: bool = False
    precision: str = "fp32"
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.images) / self.seconds

    @property
    def cpu_rate(self) -> float:
        """Images per process CPU second: less sensitive than wall time to other processes taking turns on
        the cores (not immune: cache sharing, and threads spinning at barriers count as CPU time)."""
        return len(self.images) / self.cpu_seconds


def run_naive(pipe, jobs: list[Job], settings: dict, negative_prompt: str, label: str) -> RunResult:
    """One pipeline call per image and variant: what a user writes from the diffusers docs."""
    timer = StageTimer(networks(pipe))
    images = []
    c0, t0 = time.process_time(), time.perf_counter()
    for job in tqdm(jobs, desc=f"{label} naive", unit="img", file=sys.stderr, leave=False):
        out = pipe(prompt=job.prompt, image=job.image, negative_prompt=negative_prompt,
                   strength=settings["strength"], num_inference_steps=settings["steps"],
                   guidance_scale=settings["guidance_scale"],
                   generator=torch.Generator("cpu").manual_seed(job.seed), output_type="pil")
        images.append(out.images[0])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    timer.remove()
    return RunResult("naive", images, seconds, cpu, timer)


def make_generator(pipe, settings: dict, size: int, batch_size: int, channels_last: bool, precision: str,
                   tiny_vae=None):
    from sip.augment.generate import DiffusionGenerator, GenerateConfig, prepare_pipeline

    pipe.unet.to(memory_format=torch.contiguous_format)  # undo an earlier channels_last run
    pipe.vae.to(memory_format=torch.contiguous_format)
    config = GenerateConfig(model="bench", strength=settings["strength"],
                            guidance_scale=settings["guidance_scale"], steps=settings["steps"],
                            batch_size=batch_size, resolution=size, precision=precision,
                            channels_last=channels_last, device="cpu")
    return DiffusionGenerator(prepare_pipeline(pipe, config), config, model_id="bench", tiny_vae=tiny_vae)


def run_tiny_vae(pipe, jobs: list[Job], settings: dict, size: int, negative_prompt: str, best: RunResult,
                 naive: RunResult) -> dict:
    """sip's best setting again with ``generate.tiny_vae``: an AutoencoderTiny of TAESD's architecture
    (``madebyollin/taesd``, random weights: the cost does not depend on them) decodes the latents. Other
    images than naive's by construction (another decoder), so it is reported beside the table, not in it."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd = AutoencoderTiny().eval()
    r = run_sip(pipe, jobs, settings, size, negative_prompt, "sd15 tiny_vae", best.batch_size, best.channels_last,
                best.precision, warmup=False, tiny_vae=taesd)
    rate = r.rate
    params = sum(p.numel() for p in taesd.decoder.parameters()) / 1e6
    print(f"\nwith generate.tiny_vae (TAESD architecture, decoder {params:.1f} M params, random weights) at sip's best "
          f"setting: {rate:.3f} images/s = {rate / naive.rate:.2f}x naive, {rate / best.rate:.2f}x sip's best with the "
          f"checkpoint's VAE (other images by construction: another decoder)")
    return {"images_per_s": rate, "speedup_vs_naive": rate / naive.rate, "vs_full_vae": rate / best.rate,
            "cpu": r.cpu_seconds / r.seconds}


def run_sip(pipe, jobs: list[Job], settings: dict, size: int, negative_prompt: str, label: str,
            batch_size: int, channels_last: bool, precision: str, warmup: bool, tiny_vae=None) -> RunResult:
    """sip's img2img stage: ``DiffusionGenerator.img2img`` on consecutive batches of jobs."""
    if warmup:  # oneDNN builds its kernels for each new shape once; keep that out of the timing
        warm = make_generator(pipe, {**settings, "steps": 2, "strength": 0.5}, size, batch_size,
                              channels_last, precision)
        batch = jobs[:batch_size]
        warm.img2img([j.image for j in batch], [j.prompt for j in batch], [j.seed for j in batch],
                     negative_prompt)
    # a fresh generator: its prompt cache starts empty
    generator = make_generator(pipe, settings, size, batch_size, channels_last, precision, tiny_vae)
    timer = StageTimer(networks(pipe))
    images = []
    c0, t0 = time.process_time(), time.perf_counter()
    with tqdm(total=len(jobs), desc=f"{label} sip b{batch_size}{' cl' if channels_last else ''} {precision}",
              unit="img", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            images += generator.img2img([j.image for j in batch], [j.prompt for j in batch],
                                        [j.seed for j in batch], negative_prompt)
            bar.update(len(batch))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    timer.remove()
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)
    return RunResult("sip", images, seconds, cpu, timer, batch_size, channels_last, precision)


def max_abs_diff(a: list, b: list) -> tuple[int, int, int]:
    """(max |a - b| in grey levels, values that differ, values compared) over aligned image lists."""
    worst, differ, total = 0, 0, 0
    for x, y in zip(a, b):
        d = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
        worst, differ, total = max(worst, int(d.max())), differ + int((d > 0).sum()), total + d.size
    return worst, differ, total


# --------------------------------------------------------------------------------------------------
# models and sources
# --------------------------------------------------------------------------------------------------

def resolve_tiny_model(name: str | None) -> str:
    from sip.models.diffusion import DEFAULT_SD_MODEL

    if name:
        return name
    if (Path(DEFAULT_SD_MODEL) / "model_index.json").is_file():
        return DEFAULT_SD_MODEL
    if (TRAINING_OUTPUT / "model_index.json").is_file():
        return str(TRAINING_OUTPUT)
    raise SystemExit(f"no shipped model yet: neither {DEFAULT_SD_MODEL} nor {TRAINING_OUTPUT} has a "
                     f"model_index.json (train it with scripts/train_tiny_sd.py, or pass --model FOLDER, "
                     f"or --skip-tiny)")


def build_sd15(work: Path, seed: int = 0):
    """A Stable Diffusion 1.5-architecture img2img pipeline with random weights, built in memory."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sip.models.diffusion import offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer(work / "clip-tokenizer")  # full 49,408-token CLIP vocabulary
    torch.manual_seed(seed)
    # UNet2DConditionModel's defaults are SD1.5's blocks (320/640/1280/1280, 2 layers, 8 heads);
    # SD1.5 sets sample_size 64 (512 px) and cross-attention 768 (CLIP ViT-L/14's width).
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(),
                                          tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_photo(spec: str) -> Image.Image:
    kind, name = spec.split(":")
    if kind == "skimage":
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name)).convert("RGB")


def photo_jobs(n_sources: int, per_image: int, size: int, pipe) -> list[Job]:
    from sip.augment.generate import fit_image
    from sip.augment.prompts import PromptBuilder, PromptConfig
    from sip.ids import image_seed

    builder = PromptBuilder.for_tokenizer(PromptConfig(), pipe.tokenizer)
    jobs = []
    for label, spec, caption in (PHOTOS * (1 + n_sources // len(PHOTOS)))[:n_sources]:
        image = fit_image(load_photo(spec), size, "center-crop")  # both paths get the same size×size pixels
        jobs += [Job(image, builder(label, caption, v), image_seed(0, f"{spec}/{len(jobs)}", v))
                 for v in range(per_image)]
    return jobs


def fmnist_jobs(n_sources: int, per_image: int, size: int, pipe) -> list[Job]:
    from sip.augment.generate import fit_image
    from sip.augment.prompts import PromptBuilder, PromptConfig
    from sip.data.sources import FashionMNISTSource
    from sip.ids import image_seed

    builder = PromptBuilder.for_tokenizer(PromptConfig(), pipe.tokenizer)
    source = FashionMNISTSource("train", start=50000, size=size)
    jobs = []
    for i in range(n_sources):
        s = source.sample(i)
        w = len(FMNIST_WORDS)
        caption = f"a {FMNIST_WORDS[i % w]} {FMNIST_WORDS[(i // w) % w]} one"  # distinct per source
        image = fit_image(s.image, size, "resize")
        jobs += [Job(image, builder(s.label_name, caption, v), image_seed(0, s.source_id, v))
                 for v in range(per_image)]
    return jobs


# --------------------------------------------------------------------------------------------------
# one model: naive, then sip's option sweep
# --------------------------------------------------------------------------------------------------

def bench_model(label: str, pipe, jobs: list[Job], size: int, settings: dict,
                sweep: list[tuple[int, bool, str]], bf16_images: int, warmup: bool,
                negative_prompt: str = "") -> dict:
    print(f"\n## {label}: {len(jobs)} images ({len(jobs) // settings['per_image']} sources × "
          f"{settings['per_image']} variants), {size}px, steps {settings['steps']} × strength "
          f"{settings['strength']} = {int(settings['steps'] * settings['strength'])} denoising steps, "
          f"guidance {settings['guidance_scale']}", flush=True)
    if warmup:
        run_naive(pipe, jobs[:1], {**settings, "steps": 2, "strength": 0.5}, negative_prompt,
                  f"{label} warm-up")
    naive = run_naive(pipe, jobs, settings, negative_prompt, label)
    runs = []
    for batch_size, channels_last, precision in sweep:
        subset = jobs if precision == "fp32" else jobs[: max(1, min(len(jobs), bf16_images))]
        r = run_sip(pipe, subset, settings, size, negative_prompt, label, min(batch_size, len(subset)),
                    channels_last, precision, warmup)
        r.extra["diff"] = max_abs_diff(naive.images, r.images)
        runs.append(r)
    return {"naive": naive, "runs": runs}


def stage_row(r: RunResult, flops: dict, peaks: dict) -> dict:
    unet_s = r.timer.seconds["unet"]
    unet_flops = flops["unet"] * r.timer.samples["unet"]
    peak = peaks["bf16" if r.precision == "bf16" else "fp32"]
    achieved = unet_flops / unet_s / 1e9 if unet_s else 0.0
    return {"unet_share": unet_s / r.seconds, "unet_gflops": achieved, "unet_peak_fraction": achieved / peak}


def print_runs(label: str, result: dict, flops: dict, peaks: dict) -> dict:
    naive, runs = result["naive"], result["runs"]
    header = (f"{'way':<6} {'batch':>5} {'ch-last':>7} {'prec':>5} {'images':>6} {'s':>8} {'img/s':>8} "
              f"{'x naive':>7} {'cpu':>5} {'x cpu-s':>7} {'UNet %t':>7} {'UNet GF/s':>9} {'%peak':>6} "
              f"{'max|d|':>6} {'differ':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for r in [naive, *runs]:
        s = stage_row(r, flops, peaks)
        diff = r.extra.get("diff", (0, 0, 1))
        speed = r.rate / naive.rate
        print(f"{r.name:<6} {r.batch_size:>5} {str(r.channels_last):>7} {r.precision:>5} {len(r.images):>6} "
              f"{r.seconds:>8.2f} {r.rate:>8.3f} {speed:>7.2f} {r.cpu_seconds / r.seconds:>5.2f} "
              f"{r.cpu_rate / naive.cpu_rate:>7.2f} "
              f"{100 * s['unet_share']:>6.1f}% {s['unet_gflops']:>9.1f} "
              f"{100 * s['unet_peak_fraction']:>5.1f}% "
              f"{diff[0] if r.name == 'sip' else '':>6} "
              f"{f'{diff[1]}/{diff[2]}' if r.name == 'sip' else '':>9}")
        rows.append((r, s))
    print("(cpu = process CPU seconds / wall seconds: about the thread count when nothing else competed for "
          "the cores; x cpu-s = the speed-up counted in process CPU seconds instead of wall seconds; "
          "%peak = UNet FLOP/s over the same-dtype matmul peak; max|d| = largest per-pixel difference from "
          "the naive image with the same seed, in grey levels)")
    fp32 = [r for r in runs if r.precision == "fp32"]
    best32 = max(fp32, key=lambda r: r.rate)
    best = max(runs, key=lambda r: r.rate)  # sip's fastest setting, bf16 included where it wins
    bf16 = [r for r in runs if r.precision == "bf16"]
    out = {"best": best, "best_fp32": best32, "naive": naive, "speedup": best.rate / naive.rate,
           "speedup_cpu_time": best.cpu_rate / naive.cpu_rate,
           "speedup_same_precision": best32.rate / naive.rate,
           "max_abs_diff": max(r.extra["diff"][0] for r in fp32),
           "best_stage": stage_row(best, flops, peaks), "naive_stage": stage_row(naive, flops, peaks)}
    if bf16:
        b = max(bf16, key=lambda r: r.rate)
        twin = max((r for r in fp32 if r.batch_size == b.batch_size and r.channels_last == b.channels_last),
                   key=lambda r: r.rate, default=best32)
        out["bf16_vs_fp32"] = b.rate / twin.rate
        out["max_abs_diff_bf16"] = max(r.extra["diff"][0] for r in bf16)
        out["bf16"] = b
    print(f"best sip setting: batch {best.batch_size}, channels_last={best.channels_last}, {best.precision} → "
          f"{best.rate:.3f} images/s vs naive {naive.rate:.3f} images/s = {out['speedup']:.2f}x")
    if best is not best32:
        print(f"best fp32 sip setting (same precision as naive, images identical up to ±1): batch "
              f"{best32.batch_size}, channels_last={best32.channels_last} → {best32.rate:.3f} images/s = "
              f"{out['speedup_same_precision']:.2f}x")
    if bf16:
        same = b.batch_size == twin.batch_size and b.channels_last == twin.channels_last
        where = "at the same batch" if same else f"(bf16 at batch {b.batch_size} vs the best fp32 setting)"
        print(f"bf16 autocast: {out['bf16_vs_fp32']:.2f}x the speed of fp32 {where} "
              f"(bf16 matmul peak here is {peaks['bf16'] / peaks['fp32']:.2f}x fp32's)")
    return out


def breakdown(label: str, result: dict, flops: dict, peaks: dict) -> dict:
    """Where the time goes (naive vs sip's best) and the bounds it sets on the speed-up."""
    naive, best = result["naive"], result["best"]
    print(f"\n{label}: where the time goes (forward hooks), per image")
    print(f"{'stage':<13} {'naive GFLOP':>11} {'naive s':>8} {'share':>6} {'sip GFLOP':>10} {'sip s':>8} "
          f"{'share':>6}")
    names = ["unet", "vae_decoder", "vae_encoder", "text_encoder"]

    def per(r: RunResult, name: str) -> float:
        if name == "total":
            return r.seconds / len(r.images)
        if name == "other":
            return (r.seconds - sum(r.timer.seconds[k] for k in names)) / len(r.images)
        return r.timer.seconds[name] / len(r.images)

    def gflop(r: RunResult, name: str) -> str:
        keys = names if name == "total" else [name] if name in names else []
        return f"{sum(flops[k] * r.timer.samples[k] for k in keys) / len(r.images) / 1e9:.2f}" if keys else ""

    for name in [*names, "other", "total"]:
        print(f"{name:<13} {gflop(naive, name):>11} {per(naive, name):>8.3f} "
              f"{100 * per(naive, name) / per(naive, 'total'):>5.1f}% {gflop(best, name):>10} "
              f"{per(best, name):>8.3f} {100 * per(best, name) / per(best, 'total'):>5.1f}%")
    total_flops_naive = sum(flops[k] * naive.timer.samples[k] for k in names)
    total_flops_sip = sum(flops[k] * best.timer.samples[k] for k in names)
    unet_share = naive.timer.seconds["unet"] / naive.seconds
    unet_flops_sip = flops["unet"] * best.timer.samples["unet"]
    bound_amdahl = 1.0 / unet_share
    dtype = "bf16" if best.precision == "bf16" else "fp32"  # the peak of the precision sip's best run used
    bound_peak = naive.seconds / (unet_flops_sip / (peaks[dtype] * 1e9))
    bound_all = naive.seconds / (total_flops_sip / (peaks[dtype] * 1e9))
    print(f"(sip does {total_flops_sip / total_flops_naive:.3f}x naive's arithmetic: the same UNet work, "
          f"one VAE encode per source instead of per variant, one text encoding per distinct prompt)")
    print(f"bounds for {label} at these settings:")
    print(f"  the UNet is {100 * unet_share:.1f}% of naive's time; batching leaves its FLOPs unchanged, so "
          f"even if sip made everything else free, at naive's UNet speed the ratio could be at most "
          f"{bound_amdahl:.2f}x")
    print(f"  with the UNet at 100% of the {dtype} matmul peak ({peaks[dtype]:.0f} GFLOP/s) and nothing else "
          f"costing anything: at most {bound_peak:.2f}x; with every network at peak: at most "
          f"{bound_all:.2f}x")
    return {"unet_share_naive": unet_share, "bound_amdahl": bound_amdahl, "bound_unet_at_peak": bound_peak,
            "bound_all_at_peak": bound_all}


def profile_sip(pipe, jobs: list[Job], settings: dict, size: int, best: RunResult,
                top: int = 14) -> list[tuple]:
    """torch.profiler over one sip batch with the best setting; the ops with most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    generator = make_generator(pipe, settings, size, best.batch_size, best.channels_last, best.precision)
    batch = jobs[: min(best.batch_size, 2)]  # one source, two variants: the same shapes, half the time
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generator.img2img([j.image for j in batch], [j.prompt for j in batch], [j.seed for j in batch], "")
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of one sip call ({len(batch)} images, channels_last={best.channels_last}, "
          f"{best.precision}): top ops by self CPU time (torch.profiler)")
    print(f"{'op':<48} {'self s':>8} {'share':>6} {'calls':>7}")
    rows = []
    for e in events[:top]:
        rows.append((e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total, e.count))
        print(f"{e.key[:48]:<48} {e.self_cpu_time_total / 1e6:>8.2f} "
              f"{100 * e.self_cpu_time_total / total:>5.1f}% {e.count:>7}")
    conv_mm = sum(e.self_cpu_time_total for e in events
                  if any(k in e.key for k in ("conv", "addmm", "mm", "bmm", "linear", "attention")))
    print(f"matmul-like ops (conv, linear/addmm/mm/bmm, attention) take {100 * conv_mm / total:.1f}% of self "
          f"CPU time; the rest is element-wise and memory-bound work (norms, activations, copies, adds)")
    return rows


# --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--model", default=None,
                        help="the shipped model (default: sip's, else .cache/fmnist-tiny-sd)")
    parser.add_argument("--skip-tiny", action="store_true", help="skip the shipped-model section")
    parser.add_argument("--skip-sd15", action="store_true", help="skip the SD1.5-architecture section")
    parser.add_argument("--tiny-sources", type=int, default=None,
                        help="Fashion-MNIST sources (default 64, quick 8)")
    parser.add_argument("--tiny-steps", type=int, default=30)
    parser.add_argument("--sd15-sources", type=int, default=None, help="photos (default 2, quick 1)")
    parser.add_argument("--sd15-size", type=int, default=None, help="pixels (default 256, quick 128)")
    parser.add_argument("--sd15-steps", type=int, default=None,
                        help="schedule steps; img2img runs steps × strength of them (default 10, quick 4)")
    parser.add_argument("--per-image", type=int, default=2, help="variants per source")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    q = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sip-bench-generate-"))
    load0 = os.getloadavg()
    capability = torch.backends.cpu.get_cpu_capability()
    from sip.runtime import cpu_has_amx

    # 1. this CPU's matmul peak, fp32 and bf16 (measured again at the end; the higher one counts)
    n = 1024 if q else 2048

    def measure_peaks() -> dict[str, float]:
        return {"fp32": matmul_peak(torch.float32, n, 3 if q else 5),
                "bf16": matmul_peak(torch.bfloat16, n, 2 if q else 3)}

    def refresh_peaks(label: str) -> None:
        """Measure the peak again right after a section's runs; keep the higher (less disturbed) one."""
        again = measure_peaks()
        print(f"matmul peak re-measured after the {label} runs: fp32 {again['fp32']:.1f}, bf16 "
              f"{again['bf16']:.1f} GFLOP/s; the fractions below use the higher of all measurements")
        for k in peaks:
            peaks[k] = max(peaks[k], again[k])

    peaks = measure_peaks()
    print("# bench_generate: sip img2img vs naive diffusers, same model, images, seeds and settings")
    print(f"machine: {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, torch CPU capability "
          f"{capability}, flags: {cpu_flags()}; load average at start {load0[0]:.2f}")
    if load0[0] > 1.0:
        print(f"warning: other processes are using the CPU (load {load0[0]:.2f}); absolute numbers are low "
              f"and noisy, ratios less so; see the cpu column")
    print(f"matmul peak ({n}x{n} GEMM, best of runs): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 "
          f"{peaks['bf16']:.1f} GFLOP/s (bf16/fp32 = {peaks['bf16'] / peaks['fp32']:.2f}; "
          f"{'AMX' if cpu_has_amx() else 'no AMX'})", flush=True)

    summary: dict = {}
    # 2. the shipped model on Fashion-MNIST
    if not args.skip_tiny:
        from sip.models.diffusion import load_diffusion_pipeline

        model = resolve_tiny_model(args.model)
        pipe = load_diffusion_pipeline(model, "img2img", device="cpu")
        size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        settings = {"strength": args.strength, "guidance_scale": args.guidance, "steps": args.tiny_steps,
                    "per_image": args.per_image}
        jobs = fmnist_jobs(args.tiny_sources or (8 if q else 64), args.per_image, size, pipe)
        sweep = ([(32, False, "fp32"), (32, True, "fp32"), (32, False, "bf16")] if q else
                 [(8, False, "fp32"), (32, False, "fp32"), (64, False, "fp32"), (128, False, "fp32"),
                  (32, True, "fp32"), (128, True, "fp32"), (32, False, "bf16"), (128, False, "bf16")])
        flops = count_flops(pipe, size)
        unet_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
        print(f"\nshipped model: {model}; UNet {unet_params:.1f} M params, {flops['unet'] / 1e6:.1f} MFLOP "
              f"per UNet sample at {size}px")
        result = bench_model("tiny", pipe, jobs, size, settings, sweep, len(jobs), warmup=True)
        refresh_peaks("tiny")
        tiny = print_runs("tiny", result, flops, peaks)
        result.update(tiny)
        bounds = breakdown("tiny", result, flops, peaks)
        summary.update({"speedup_vs_naive_tiny": tiny["speedup"],
                        "speedup_vs_naive_tiny_cpu_time": tiny["speedup_cpu_time"],
                        "tiny_images_per_s_sip": tiny["best"].rate,
                        "tiny_images_per_s_naive": tiny["naive"].rate,
                        "max_abs_diff_tiny": tiny["max_abs_diff"],
                        "max_abs_diff_bf16_tiny": tiny.get("max_abs_diff_bf16"),
                        "tiny_best_batch": tiny["best"].batch_size,
                        "tiny_best_channels_last": tiny["best"].channels_last,
                        "tiny_bf16_vs_fp32": tiny.get("bf16_vs_fp32"),
                        "tiny_unet_peak_fraction": tiny["best_stage"]["unet_peak_fraction"],
                        "tiny_unet_share_naive": bounds["unet_share_naive"]})
        del pipe

    # 3. the SD1.5-architecture model on photos
    if not args.skip_sd15:
        t0 = time.time()
        pipe = build_sd15(work)
        size = args.sd15_size or (128 if q else 256)
        steps = args.sd15_steps or (4 if q else 10)
        settings = {"strength": args.strength, "guidance_scale": args.guidance, "steps": steps,
                    "per_image": args.per_image}
        jobs = photo_jobs(args.sd15_sources or (1 if q else 2), args.per_image, size, pipe)
        flops = count_flops(pipe, size)
        params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
                  (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoder))}
        print(f"\nSD1.5-architecture model (random weights, built in {time.time() - t0:.0f}s): UNet "
              f"{params['unet']:.0f} M, VAE {params['vae']:.0f} M, text encoder {params['text']:.0f} M "
              f"params; per sample at {size}px: UNet {flops['unet'] / 1e9:.1f} GFLOP, VAE decoder "
              f"{flops['vae_decoder'] / 1e9:.1f}, VAE encoder {flops['vae_encoder'] / 1e9:.1f}, text encoder "
              f"{flops['text_encoder'] / 1e9:.1f}", flush=True)
        n_jobs = len(jobs)
        # On a CPU without AMX bf16 is 2-4x slower than fp32: one image is enough to show it. With AMX (and on
        # a GPU) it is the fast path: the whole set, with and without channels-last. No warm-up runs: at these
        # sizes oneDNN's one-off kernel set-up is well under 1% of a run.
        amx = cpu_has_amx()
        bf16_sweep = ([(n_jobs, False, "bf16")] if q else [(n_jobs, False, "bf16"), (n_jobs, True, "bf16")]) \
            if amx else ([] if q else [(1, False, "bf16")])
        sweep = ([(n_jobs, False, "fp32")] if q else [(n_jobs, False, "fp32"), (n_jobs, True, "fp32")]) + bf16_sweep
        result = bench_model("sd15", pipe, jobs, size, settings, sweep, bf16_images=n_jobs if amx else 1,
                             warmup=False)
        refresh_peaks("sd15")
        sd = print_runs("sd15", result, flops, peaks)
        result.update(sd)
        bounds = breakdown("sd15", result, flops, peaks)
        if not args.no_profile:
            profile_sip(pipe, jobs, settings, size, sd["best"])
        tiny_vae = run_tiny_vae(pipe, jobs, settings, size, "", sd["best"], sd["naive"])
        fraction = sd["best_stage"]["unet_peak_fraction"]
        met = "met" if sd["speedup"] >= 4 else "NOT met"
        print("\nverdict (sd15):")
        print(f"  speed-up over naive {sd['speedup']:.2f}x (target >= 4x): {met}; the UNet is "
              f"{100 * bounds['unet_share_naive']:.0f}% of naive's time and sip runs the same UNet FLOPs, so "
              f"the ceiling at naive's UNet speed is {bounds['bound_amdahl']:.2f}x and at 100% of peak "
              f"{bounds['bound_unet_at_peak']:.2f}x")
        print(f"  with generate.tiny_vae (a TAESD decoder; other images): {tiny_vae['speedup_vs_naive']:.2f}x naive "
              f"({'meets' if tiny_vae['speedup_vs_naive'] >= 4 else 'below'} the 4x target)")
        print(f"  UNet at {100 * fraction:.1f}% of the {sd['best'].precision} matmul peak (target >= 50%): "
              f"{'met' if fraction >= 0.5 else 'NOT met'}; naive's UNet runs at "
              f"{100 * sd['naive_stage']['unet_peak_fraction']:.1f}%")
        if "bf16_vs_fp32" in sd:
            flags = cpu_flags()
            units = [u for u, f in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if f in flags]
            has = f"has {' and '.join(units)}" if units else "has neither AMX nor AVX512-BF16"
            print(f"  bf16 autocast runs at {sd['bf16_vs_fp32']:.2f}x fp32's speed: this CPU {has}; its bf16 "
                  f"GEMM peak is {peaks['bf16']:.0f} vs {peaks['fp32']:.0f} GFLOP/s fp32")
        print("  closing the rest needs fewer UNet FLOPs per image (fewer steps or a few-step scheduler such "
              "as LCM/Turbo, guidance <= 1 to halve the batch, lower resolution, a smaller UNet) or hardware "
              "with bf16/fp16 matrix units (AMX, GPU); a tiny VAE decoder only trims the non-UNet share")
        summary.update({"speedup_vs_naive_sd15": sd["speedup"],
                        "speedup_vs_naive_sd15_tiny_vae": tiny_vae["speedup_vs_naive"],
                        "speedup_vs_naive_sd15_same_precision": sd["speedup_same_precision"],
                        "sd15_best_precision": sd["best"].precision,
                        "speedup_vs_naive_sd15_cpu_time": sd["speedup_cpu_time"],
                        "sd15_images_per_s_sip": sd["best"].rate,
                        "sd15_images_per_s_naive": sd["naive"].rate, "unet_peak_fraction": fraction,
                        "unet_peak_fraction_naive": sd["naive_stage"]["unet_peak_fraction"],
                        "max_abs_diff_sd15": sd["max_abs_diff"],
                        "max_abs_diff_bf16_sd15": sd.get("max_abs_diff_bf16"),
                        "sd15_bf16_vs_fp32": sd.get("bf16_vs_fp32"),
                        "sd15_best_batch": sd["best"].batch_size,
                        "sd15_best_channels_last": sd["best"].channels_last,
                        "sd15_unet_share_naive": bounds["unet_share_naive"],
                        "sd15_bound_unet_at_peak": bounds["bound_unet_at_peak"], "sd15_size": size,
                        "sd15_denoising_steps": int(steps * args.strength)})
        del pipe
    shutil.rmtree(work, ignore_errors=True)
    diffs = [v for k, v in summary.items() if k in ("max_abs_diff_tiny", "max_abs_diff_sd15")]
    load1 = os.getloadavg()
    print(f"\nload average at end {load1[0]:.2f}")
    print(json.dumps({**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()},
                      "max_abs_diff": max(diffs) if diffs else None,
                      "matmul_peak_gflops_fp32": round(peaks["fp32"], 1),
                      "matmul_peak_gflops_bf16": round(peaks["bf16"], 1),
                      "load_start": round(load0[0], 2), "load_end": round(load1[0], 2), "quick": q}))


if __name__ == "__main__":
    main()
