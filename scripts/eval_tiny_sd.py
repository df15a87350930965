"""Measure a small Stable Diffusion (default: sip's shipped Fashion-MNIST model) with a judge classifier.

    python scripts/eval_tiny_sd.py                      # full mode (tens of minutes on 2 CPU cores)
    python scripts/eval_tiny_sd.py --quick              # about a minute: tiny counts, one seed
    python scripts/eval_tiny_sd.py --model /tmp/sd --out-json /tmp/eval.json --threads 1
    python scripts/eval_tiny_sd.py --sections txt2img,img2img --set txt2img_per_class=20

Every generated image goes through sip's own code path: ``sip.augment.prompts.PromptBuilder`` (Fashion-MNIST
readable names, the tokenizer's budget) → ``sip.augment.generate.DiffusionGenerator`` (img2img / txt2img, batched,
one seed per image from ``sip.ids.image_seed`` exactly as ``sip augment`` / ``sip synth`` derive it).

Sections:
  judge     a small CNN trained on real Fashion-MNIST train images 0-49,999 (the generator's own split)
            at 32×32 (bicubic 28 → 32, as ``FashionMNISTSource(size=32)``), grey; its accuracy on the
            official 10k test set. Cached under ``--judge-cache`` keyed by its settings.
  vae       judge accuracy on VAE reconstructions (encode → posterior mean → decode) of test images,
            against the same test images unchanged.
  txt2img   class fidelity: images per class from label-only prompts ("a photo of a coat") at guidance
            3 and 5; share the judge assigns to the prompted class, per class and mean.
  img2img   label preservation on test images at strength 0.3/0.5/0.7/0.9 with the true label (prompt:
            label + caption of the offline ``imagenet-topk`` captioner at 96 px, or ``--prompts label``);
            diversity of the variants (pixel L1 to the source; judge-feature cosine distance between
            variants of one source and to the source); steering: a wrong label at strength 0.9, share
            judged as that wrong (target) label. Steering reuses the seeds of the 0.9 preservation run,
            so the two differ only in the label.
  fewshot   the data-scarce experiment: a small CNN trained on 10 real images per class drawn from train
            images 50,000-59,999 (disjoint from the generator's), tested on the 10k test set, per arm:
            none | cropflip | randaug (real images only, no / standard / RandAugment augmentation) |
            img2img (+ sip variants of the real images) | txt2img (+ data-free synthetic) | both |
            real (+ as many extra real images as img2img adds, from the same pool, disjoint from the
            shots: the upper bound). Extra-data arms train with the crop+flip augmentation on the union
            of real and extra images, for the same number of steps as every other arm.

Output: a table, a JSON file (``--out-json``) and, as the last line of stdout, that JSON on one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sip.augment.generate import DiffusionGenerator, GenerateConfig, describe_device
from sip.augment.prompts import PromptBuilder, PromptConfig
from sip.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_READABLE,
    load_fashion_mnist_arrays,
    select_shots,
)
from sip.ids import image_seed
from sip.models.diffusion import DEFAULT_SD_MODEL, load_diffusion_pipeline, looks_like_path

CLASSES = list(FASHION_MNIST_CLASSES)
GENERATOR_SPLIT = (0, 50000)   # train images the shipped generator learnt from; the judge learns from them too
FEWSHOT_POOL = (50000, 60000)  # disjoint pool the 10-shot sets and the extra real images come from
MEAN, STD = 0.2860, 0.3530     # Fashion-MNIST grey pixel statistics in [0, 1]
SIZE = 32                      # the shipped model's resolution
SECTIONS = ("vae", "txt2img", "img2img", "fewshot")
ARMS = ("none", "cropflip", "randaug", "img2img", "txt2img", "both", "real")
JUDGE_ARCH = "SmallCNN-v1"     # bump when SmallCNN changes: it is part of the judge cache key


@dataclass(frozen=True)
class EvalConfig:
    """What is measured and how much of it (full-mode defaults; ``QUICK`` shrinks the counts).

    Attributes:
        judge_width: judge channels at 32 px (×2 at 16 px, ×4 at 8 and 4 px); 24 reaches ~93% in 5
            epochs at ~300 img/s training on one CPU core.
        judge_epochs: passes over the 50k judge images (sampled with replacement); more is slower.
        judge_batch, judge_lr: judge optimisation (AdamW, one-cycle).
        judge_test_images: test images the judge is scored on (10k = the official test set).
        vae_images: test images reconstructed by the VAE.
        steps: denoising steps of the full schedule (the Fashion-MNIST recipes use 30; img2img runs
            ``steps × strength`` of them).
        batch_size: images per pipeline call (outputs do not depend on it).
        precision: "auto" (sip's rule: bf16 autocast on CUDA and AMX CPUs, else fp32), "fp32", "bf16".
        prompts: "caption" (SIP: label + imagenet-topk caption) or "label" (label only) for img2img.
        caption_size: input size of the offline captioner (96 like the training script).
        txt2img_per_class, txt2img_guidance: class-fidelity images per class, at each guidance scale.
        img2img_sources: test images redrawn (balanced over classes, a multiple of 10).
        img2img_variants: variants per source and strength (≥ 2 for the between-variant distance).
        img2img_strengths, img2img_guidance: preservation settings.
        steer_strength: strength of the wrong-label run.
        fewshot_seeds: 10-shot draws (seed, seed+1, …); mean ± std over them.
        shots: real images per class.
        fewshot_variants, fewshot_strength, fewshot_guidance: sip img2img variants per real image
            (the recipe pipelines/fmnist_augment.yaml: 10 at 0.5, guidance 4).
        fewshot_txt2img_per_class: data-free images per class.
        fewshot_width, fewshot_steps, fewshot_batch, fewshot_lr: the few-shot classifier and its
            training (the same number of steps in every arm).
        fewshot_test_images: test images each few-shot classifier is scored on.
        fewshot_arms: which arms to run (see the module docstring).
        seed: run seed (judge, sources, generation seeds, few-shot draws).
    """

    judge_width: int = 24
    judge_epochs: float = 5.0
    judge_batch: int = 128
    judge_lr: float = 3e-3
    judge_test_images: int = 10000
    vae_images: int = 10000
    steps: int = 30
    batch_size: int = 128
    precision: str = "auto"
    prompts: str = "caption"
    caption_size: int = 96
    txt2img_per_class: int = 50
    txt2img_guidance: tuple[float, ...] = (3.0, 5.0)
    img2img_sources: int = 200
    img2img_variants: int = 2
    img2img_strengths: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    img2img_guidance: float = 4.0
    steer_strength: float = 0.9
    fewshot_seeds: int = 3
    shots: int = 10
    fewshot_variants: int = 10
    fewshot_strength: float = 0.5
    fewshot_guidance: float = 4.0
    fewshot_txt2img_per_class: int = 100
    fewshot_width: int = 16
    fewshot_steps: int = 500
    fewshot_batch: int = 64
    fewshot_lr: float = 3e-3
    fewshot_test_images: int = 10000
    fewshot_arms: tuple[str, ...] = ARMS
    seed: int = 0

    def __post_init__(self):
        if self.prompts not in ("caption", "label"):
            raise ValueError(f"prompts must be 'caption' or 'label', got {self.prompts!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        for s in (*self.img2img_strengths, self.steer_strength, self.fewshot_strength):
            if not 0.0 < s <= 1.0:
                raise ValueError(f"strengths must be in (0, 1], got {s}")
        if self.img2img_sources % len(CLASSES):
            raise ValueError(f"img2img_sources must be a multiple of {len(CLASSES)}, got {self.img2img_sources}")
        unknown = set(self.fewshot_arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown few-shot arms {sorted(unknown)}; valid: {', '.join(ARMS)}")
        for name in ("judge_width", "judge_batch", "judge_test_images", "vae_images", "steps", "batch_size",
                     "txt2img_per_class", "img2img_sources", "img2img_variants", "fewshot_seeds", "shots",
                     "fewshot_variants", "fewshot_txt2img_per_class", "fewshot_width", "fewshot_steps",
                     "fewshot_batch", "fewshot_test_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.judge_epochs <= 0:
            raise ValueError(f"judge_epochs must be positive, got {self.judge_epochs}")


# --quick: about a minute. The judge trains briefly (or the full judge is loaded when it is cached).
QUICK = dict(judge_width=16, judge_epochs=0.25, judge_test_images=1000, vae_images=500, steps=10, batch_size=64,
             txt2img_per_class=3, img2img_sources=10, img2img_variants=2, fewshot_seeds=1, fewshot_variants=1,
             fewshot_txt2img_per_class=3, fewshot_steps=50, fewshot_batch=32, fewshot_test_images=1000)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def fashion_mnist_32(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as grey uint8 [N, 32, 32] and labels, resized exactly as ``FashionMNISTSource(size=32)``
    does (bicubic 28 → 32; its RGB channels are this grey image three times)."""
    images, labels = load_fashion_mnist_arrays(split)  # type: ignore[arg-type]
    out = np.stack([np.asarray(Image.fromarray(im, mode="L").resize((SIZE, SIZE), Image.BICUBIC)) for im in images])
    return out, labels


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [..., 3] → grey uint8 with PIL's ``convert("L")`` arithmetic (ITU-R 601-2 luma)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def to_pil(grey: np.ndarray) -> Image.Image:
    """A grey 32×32 array as the RGB PIL image ``FashionMNISTSource(size=32)`` yields."""
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb_array(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


# --------------------------------------------------------------------------------------------------
# judge and few-shot classifier
# --------------------------------------------------------------------------------------------------

def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Grey 32×32 → class logits: conv-BN-ReLU at 32/16/8/4 px, global average pool, linear head.

    Args:
        width (int): channels at 32 px (×2 at 16 px, ×4 at 8 and 4 px).
        num_classes (int, optional): Defaults to 10.

    ``features(x)`` is the penultimate 4·width vector (used for feature-space distances).
    """

    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_conv(1, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), nn.MaxPool2d(2),
            *_conv(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def prepare(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1, 32, 32] → normalised float, channels-last (faster convolutions on CPU)."""
    return ((x.float() / 255.0 - MEAN) / STD).contiguous(memory_format=torch.channels_last)


Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per image: random crop after zero padding by ``pad`` pixels, and a random horizontal flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
    flip = (torch.rand(b, generator=g) < 0.5).tolist()
    out = torch.empty_like(x)
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def crop_flip_randaugment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """crop + flip, then torchvision's RandAugment (2 ops, magnitude 9) per image (PIL path: 3× faster
    than the tensor path on 32 px images). RandAugment draws from torch's global RNG, which
    :func:`train_classifier` seeds."""
    from torchvision import transforms

    randaugment = transforms.RandAugment(num_ops=2, magnitude=9)
    x = crop_flip(x, g)
    images = [randaugment(Image.fromarray(im[0].numpy(), mode="L")) for im in x]
    return torch.from_numpy(np.stack([np.asarray(im) for im in images]))[:, None]


def train_classifier(x: torch.Tensor, y: torch.Tensor, width: int, steps: int, batch: int, lr: float,
                     augment: Augment | None, seed: int, desc: str, progress: bool) -> SmallCNN:
    """Train a :class:`SmallCNN` for ``steps`` AdamW steps (one-cycle schedule, label smoothing 0.1) on
    batches drawn with replacement from (x uint8 [N, 1, 32, 32], y). Seeded: same inputs, same weights."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN(width).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx] if augment is None else augment(x[idx], g)
        loss = F.cross_entropy(model(prepare(xb)), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.inference_mode()
def classify(model: SmallCNN, grey: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and penultimate features of grey uint8 images [N, 32, 32]."""
    preds, feats = [], []
    for start in range(0, len(grey), batch):
        x = prepare(torch.from_numpy(np.ascontiguousarray(grey[start : start + batch]))[:, None])
        f = model.features(x)
        preds.append(model.head(f).argmax(-1).numpy())
        feats.append(f.numpy())
    return np.concatenate(preds), np.concatenate(feats)


def judge_settings(cfg: EvalConfig) -> dict[str, Any]:
    """Everything the judge's weights depend on: its cache key."""
    return {"arch": JUDGE_ARCH, "width": cfg.judge_width, "epochs": cfg.judge_epochs, "batch": cfg.judge_batch,
            "lr": cfg.judge_lr, "seed": cfg.seed, "train": list(GENERATOR_SPLIT), "size": SIZE,
            "input": "grey", "augment": "crop(pad 2)+flip"}


def judge_paths(cache: Path, settings: dict[str, Any]) -> tuple[Path, Path]:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"judge-{key}.safetensors", cache / f"judge-{key}.json"


def load_or_train_judge(cfg: EvalConfig, candidates: Sequence[EvalConfig], cache: Path, train_grey: np.ndarray,
                        train_labels: np.ndarray, progress: bool) -> tuple[SmallCNN, dict[str, Any]]:
    """Load the first cached judge among ``candidates`` (e.g. the full judge in quick mode); else train
    the judge ``cfg`` describes on train images 0-49,999 and cache it (safetensors + settings JSON)."""
    from safetensors.torch import load_file, save_file

    for candidate in candidates:
        settings = judge_settings(candidate)
        weights, meta = judge_paths(cache, settings)
        if weights.is_file():
            model = SmallCNN(candidate.judge_width)
            model.load_state_dict(load_file(weights))
            info = json.loads(meta.read_text()) if meta.is_file() else {}
            return model.to(memory_format=torch.channels_last).eval(), {
                **settings, "cache": str(weights), "trained_now": False, "train_seconds": info.get("train_seconds")}
    settings = judge_settings(cfg)
    weights, meta = judge_paths(cache, settings)
    lo, hi = GENERATOR_SPLIT
    x = torch.from_numpy(train_grey[lo:hi])[:, None]
    y = torch.from_numpy(train_labels[lo:hi])
    steps = math.ceil(cfg.judge_epochs * len(x) / cfg.judge_batch)
    t0 = time.time()
    model = train_classifier(x, y, cfg.judge_width, steps, cfg.judge_batch, cfg.judge_lr,
                             lambda b, g: crop_flip(b, g, pad=2), cfg.seed, "judge", progress)
    seconds = time.time() - t0
    cache.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    meta.write_text(json.dumps({**settings, "steps": steps, "train_seconds": round(seconds, 1)}, indent=2))
    return model, {**settings, "cache": str(weights), "trained_now": True, "train_seconds": round(seconds, 1)}


# --------------------------------------------------------------------------------------------------
# generation through sip's own path
# --------------------------------------------------------------------------------------------------

class SipGeneration:
    """sip's generation path for this evaluation: one pipeline, a :class:`PromptBuilder` with the
    Fashion-MNIST readable names within the tokenizer's budget, a :class:`DiffusionGenerator` per setting,
    image seeds from :func:`image_seed` keyed like ``sip augment`` / ``sip synth`` key them."""

    def __init__(self, pipe: Any, model_id: str, cfg: EvalConfig, progress: bool):
        self.pipe, self.model_id, self.cfg, self.progress = pipe, model_id, cfg, progress
        prompt_config = PromptConfig(label_names=dict(FASHION_MNIST_READABLE),
                                     max_tokens=int(pipe.tokenizer.model_max_length))
        self.builder = PromptBuilder.for_tokenizer(prompt_config, pipe.tokenizer)
        self.images = 0
        self.seconds = 0.0

    def generator(self, strength: float, guidance: float, seed: int) -> DiffusionGenerator:
        config = GenerateConfig(model=self.model_id, strength=strength, guidance_scale=guidance,
                                steps=self.cfg.steps, batch_size=self.cfg.batch_size, seed=seed,
                                precision=self.cfg.precision)  # type: ignore[arg-type]
        return DiffusionGenerator(self.pipe, config, self.model_id)

    def img2img(self, sources: Sequence[Image.Image], labels: Sequence[int], captions: Sequence[str] | None,
                source_ids: Sequence[str], variants: int, strength: float, guidance: float, seed: int,
                desc: str) -> np.ndarray:
        """``variants`` redraws of each source under (label, caption) → RGB uint8 [N·variants, 32, 32, 3],
        source-major (the variants of source i are rows i·variants … i·variants + variants − 1)."""
        gen = self.generator(strength, guidance, seed)
        jobs = [(i, v) for i in range(len(sources)) for v in range(variants)]
        out: list[Image.Image] = []
        t0 = time.time()
        with tqdm(total=len(jobs), desc=desc, unit="img", disable=not self.progress, leave=False,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(jobs), self.cfg.batch_size):
                batch = jobs[start : start + self.cfg.batch_size]
                prompts = [self.builder(CLASSES[labels[i]], captions[i] if captions else None, v) for i, v in batch]
                seeds = [image_seed(seed, source_ids[i], v) for i, v in batch]
                out += gen.img2img([sources[i] for i, _ in batch], prompts, seeds)
                bar.update(len(batch))
        self.images += len(out)
        self.seconds += time.time() - t0
        return to_rgb_array(out)

    def text2img(self, per_class: int, guidance: float, seed: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
        """``per_class`` images of every class from its label prompt → (RGB uint8 [N, 32, 32, 3], labels)."""
        gen = self.generator(1.0, guidance, seed)
        jobs = [(c, k) for c in range(len(CLASSES)) for k in range(per_class)]
        out: list[Image.Image] = []
        t0 = time.time()
        with tqdm(total=len(jobs), desc=desc, unit="img", disable=not self.progress, leave=False,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(jobs), self.cfg.batch_size):
                batch = jobs[start : start + self.cfg.batch_size]
                prompts = [self.builder(CLASSES[c], None, k) for c, k in batch]
                seeds = [image_seed(seed, f"txt2img:{CLASSES[c]}", k) for c, k in batch]
                out += gen.text2img(prompts, seeds)
                bar.update(len(batch))
        self.images += len(out)
        self.seconds += time.time() - t0
        return to_rgb_array(out), np.array([c for c, _ in jobs], dtype=np.int64)


class Captions:
    """The offline captioner (EfficientNet-Lite0 ImageNet top-k, the one the shipped model's prompts were
    built with), built on first use, with a caption cache file."""

    def __init__(self, image_size: int, cache_path: Path | None):
        self.image_size, self.cache_path = image_size, cache_path
        self._captioner = self._cache = None
        self.seconds = 0.0

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        from sip.augment.caption import CaptionCache, CaptionConfig, ImageNetTopKCaptioner, caption_images

        t0 = time.time()
        if self._captioner is None:
            self._captioner = ImageNetTopKCaptioner.from_config(CaptionConfig(image_size=self.image_size, device="cpu"))
            self._cache = CaptionCache(self.cache_path)
        captions = caption_images(images, self._captioner, self._cache, batch_size=64)
        self.seconds += time.time() - t0
        return captions


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def vae_reconstruct(pipe: Any, grey: np.ndarray, batch: int = 256, progress: bool = True) -> np.ndarray:
    """Encode (posterior mean) → decode each image with the pipeline's VAE; RGB uint8 like the pipeline's
    own post-processing ((x / 2 + 0.5).clamp(0, 1) · 255, rounded)."""
    vae = pipe.vae
    out = []
    for start in tqdm(range(0, len(grey), batch), desc="vae", disable=not progress, leave=False, dynamic_ncols=True):
        rgb = np.repeat(grey[start : start + batch, None], 3, axis=1)
        x = torch.from_numpy(rgb).float().div(127.5).sub(1.0).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
        out.append((rec / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def share(pred: np.ndarray, target: np.ndarray) -> float:
    return float((pred == target).mean()) if len(pred) else float("nan")


def per_class_share(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {CLASSES[c]: share(pred[target == c], target[target == c]) for c in range(len(CLASSES))}


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return 1.0 - (a * b).sum(-1)


def variant_diversity(source_rgb: np.ndarray, source_feats: np.ndarray, variants_rgb: np.ndarray,
                      variant_feats: np.ndarray, per_source: int) -> dict[str, float]:
    """Pixel L1 (RGB in [0, 1]) of each variant to its source; judge-feature cosine distance of each
    variant to its source and between the variants of one source (every pair)."""
    n = len(source_rgb)
    src = np.repeat(source_rgb, per_source, axis=0).astype(np.float32) / 255.0
    l1 = np.abs(variants_rgb.astype(np.float32) / 255.0 - src).mean(axis=(1, 2, 3))
    to_source = cosine_distance(variant_feats, np.repeat(source_feats, per_source, axis=0))
    f = variant_feats.reshape(n, per_source, -1)
    pairs = [cosine_distance(f[:, i], f[:, j]) for i in range(per_source) for j in range(i + 1, per_source)]
    between = float(np.mean(pairs)) if pairs else float("nan")
    return {"pixel_l1": float(l1.mean()), "feature_to_source": float(to_source.mean()),
            "feature_between_variants": between}


def reference_distances(grey: np.ndarray, labels: np.ndarray, feats: np.ndarray, seed: int,
                        pairs: int = 2000) -> dict[str, float]:
    """The scale of the distances: random pairs of distinct real test images of one class / of two classes."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(grey), pairs * 4)
    b = rng.integers(0, len(grey), pairs * 4)
    keep = a != b
    a, b = a[keep], b[keep]
    same = labels[a] == labels[b]
    l1 = np.abs(grey[a].astype(np.float32) - grey[b].astype(np.float32)).mean(axis=(1, 2)) / 255.0
    d = cosine_distance(feats[a], feats[b])
    return {"pixel_l1_same_class": float(l1[same][:pairs].mean()),
            "feature_same_class": float(d[same][:pairs].mean()),
            "feature_other_class": float(d[~same][:pairs].mean())}


def balanced_sources(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` test indices, the same number per class, chosen by ``seed``."""
    return select_shots(labels, count // len(CLASSES), seed)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def run_fewshot(cfg: EvalConfig, gen: SipGeneration, captions: Captions, train_grey: np.ndarray,
                train_labels: np.ndarray, test_grey: np.ndarray, test_labels: np.ndarray,
                progress: bool) -> dict[str, Any]:
    """The data-scarce experiment (see the module docstring), ``cfg.fewshot_seeds`` 10-shot draws."""
    arms = list(cfg.fewshot_arms)
    pool = np.arange(*FEWSHOT_POOL)
    test_idx = (np.arange(len(test_labels)) if cfg.fewshot_test_images >= len(test_labels)
                else balanced_sources(test_labels, cfg.fewshot_test_images, cfg.seed + 7))
    extra_real_per_class = cfg.shots * cfg.fewshot_variants  # as many extra real images as img2img adds
    accuracies: dict[str, list[float]] = {a: [] for a in arms}
    sizes: dict[str, int] = {}
    t_train = 0.0
    for s in range(cfg.fewshot_seeds):
        seed = cfg.seed + s
        # the same draw as FashionMNISTSource("train", shots=10, seed=seed, start=50000)
        shots = select_shots(train_labels, cfg.shots, seed, pool)
        real_x, real_y = train_grey[shots], train_labels[shots]
        extra: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if {"img2img", "both"} & set(arms):
            sources = [to_pil(im) for im in real_x]
            caps = captions(sources) if cfg.prompts == "caption" else None
            rgb = gen.img2img(sources, real_y.tolist(), caps, [f"fmnist/train/{int(i)}" for i in shots],
                              cfg.fewshot_variants, cfg.fewshot_strength, cfg.fewshot_guidance, seed,
                              f"fewshot {s}: img2img")
            extra["img2img"] = to_grey(rgb), np.repeat(real_y, cfg.fewshot_variants)
        if {"txt2img", "both"} & set(arms):
            rgb, labels = gen.text2img(cfg.fewshot_txt2img_per_class, cfg.fewshot_guidance, seed,
                                       f"fewshot {s}: txt2img")
            extra["txt2img"] = to_grey(rgb), labels
        if "real" in arms:
            rest = np.setdiff1d(pool, shots)
            idx = select_shots(train_labels, extra_real_per_class, seed + 10_000, rest)
            extra["real"] = train_grey[idx], train_labels[idx]
        for arm in arms:
            parts = {"none": [], "cropflip": [], "randaug": [], "img2img": ["img2img"], "txt2img": ["txt2img"],
                     "both": ["img2img", "txt2img"], "real": ["real"]}[arm]
            x = np.concatenate([real_x] + [extra[p][0] for p in parts])
            y = np.concatenate([real_y] + [extra[p][1] for p in parts])
            augment = {"none": None, "randaug": crop_flip_randaugment}.get(arm, crop_flip)
            t0 = time.time()
            model = train_classifier(torch.from_numpy(x)[:, None], torch.from_numpy(y), cfg.fewshot_width,
                                     cfg.fewshot_steps, cfg.fewshot_batch, cfg.fewshot_lr, augment, seed,
                                     f"fewshot {s}: {arm}", progress)
            pred, _ = classify(model, test_grey[test_idx])
            t_train += time.time() - t0
            accuracies[arm].append(share(pred, test_labels[test_idx]))
            sizes[arm] = len(x)
            print(f"  few-shot seed {seed} {arm:9s} train images {len(x):5d}  test accuracy "
                  f"{accuracies[arm][-1]:.2%}", file=sys.stderr)
    augment_names = {"none": "none", "randaug": "crop+flip+RandAugment(2, 9)"}
    return {
        "arms": {a: {"mean": mean_std(accuracies[a])[0], "std": mean_std(accuracies[a])[1],
                     "accuracies": accuracies[a], "train_images": sizes[a],
                     "augment": augment_names.get(a, "crop(pad 4)+flip")} for a in arms},
        "seeds": [cfg.seed + s for s in range(cfg.fewshot_seeds)],
        "shots": cfg.shots, "pool": list(FEWSHOT_POOL), "test_images": len(test_idx),
        "img2img": {"variants": cfg.fewshot_variants, "strength": cfg.fewshot_strength,
                    "guidance": cfg.fewshot_guidance, "prompts": cfg.prompts},
        "txt2img": {"per_class": cfg.fewshot_txt2img_per_class, "guidance": cfg.fewshot_guidance},
        "real_extra_per_class": extra_real_per_class,
        "classifier": {"arch": JUDGE_ARCH, "width": cfg.fewshot_width, "steps": cfg.fewshot_steps,
                       "batch": cfg.fewshot_batch, "lr": cfg.fewshot_lr},
        "train_seconds": round(t_train, 1),
    }


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

def no_nan(value: Any) -> Any:
    """NaN → None everywhere (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [no_nan(v) for v in value]
    return value


def folder_mb(path: Path) -> float | None:
    if not path.is_dir():
        return None
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 2)


def pct(x: float | None) -> str:
    return "    - " if x is None else f"{100 * x:5.1f}%"


def num(x: float | None) -> str:
    return "     - " if x is None else f"{x:.4f}"


def format_table(r: dict[str, Any]) -> str:
    lines = [f"model {r['model']} ({r['model_mb']} MB), {r['mode']} mode, device {r['device']}, "
             f"precision {r['precision']}, {r['config']['steps']} steps"]
    j = r["judge"]
    lines.append(f"judge: SmallCNN width {j['width']}, {j['epochs']} epochs on train[0:50000] "
                 f"({'trained now' if j['trained_now'] else 'loaded from ' + j['cache']}): "
                 f"test accuracy {pct(r['judge_accuracy'])} on {j['test_images']} test images")
    if r["vae"]:
        v = r["vae"]
        lines.append(f"VAE reconstruction ({v['images']} test images): judge {pct(v['recon_accuracy'])} on "
                     f"reconstructions vs {pct(v['original_accuracy'])} on originals; PSNR {v['psnr_db']:.1f} dB, "
                     f"pixel L1 {v['pixel_l1']:.4f}")
    if r["txt2img_fidelity"]:
        t = r["txt2img"]
        gs = list(r["txt2img_fidelity"])
        lines.append(f"txt2img class fidelity ({t['per_class']} per class, label prompts):")
        lines.append("  class         " + "".join(f"  g={g:<5s}" for g in gs) + "  (judge on real test images)")
        for c in CLASSES:
            lines.append(f"  {c:12s}  " + "".join(f"  {pct(r['txt2img_per_class'][g][c])}" for g in gs)
                         + f"  ({pct(j['per_class'][c])})")
        lines.append("  mean          " + "".join(f"  {pct(r['txt2img_fidelity'][g])}" for g in gs)
                     + f"  ({pct(r['judge_accuracy'])})")
    if r["img2img_preservation"]:
        i = r["img2img"]
        lines.append(f"img2img label preservation ({i['sources']} test sources × {i['variants']} variants, "
                     f"guidance {i['guidance']}, prompts: {r['prompts']}):")
        lines.append(f"  the judge is right on {pct(i['source_accuracy']).strip()} of the sources themselves; "
                     f"'if right': preservation among those sources")
        lines.append("  strength  preserved  if right  pixel L1   feat→source  feat between variants")
        for s, p in r["img2img_preservation"].items():
            d = r["diversity"][s]
            right = i["preservation_where_source_judged_right"][s]
            lines.append(f"  {s:8s}  {pct(p):>9s}  {pct(right):>8s}  {num(d['pixel_l1'])}     "
                         f"{num(d['feature_to_source'])}       {num(d['feature_between_variants'])}")
        ref = r["diversity"]["reference"]
        lines.append(f"  reference: two real test images of one class: pixel L1 {ref['pixel_l1_same_class']:.4f}, "
                     f"feature {ref['feature_same_class']:.4f}; of two classes: feature {ref['feature_other_class']:.4f}")
        st = r["steering"]
        lines.append(f"steering (wrong label at strength {st['strength']}): judged as the target label "
                     f"{pct(st['to_target'])}, still as the source label {pct(st['kept_source'])}")
    if r["fewshot"]:
        f = r["fewshot"]
        lines.append(f"few-shot: {f['shots']} real/class from train[{f['pool'][0]}:{f['pool'][1]}], seeds {f['seeds']}, "
                     f"test on {f['test_images']} test images; SmallCNN width {f['classifier']['width']}, "
                     f"{f['classifier']['steps']} steps")
        lines.append("  arm        train imgs  augment                       accuracy (mean ± std)  runs")
        for a, v in f["arms"].items():
            runs = " ".join(f"{100 * x:.1f}" for x in v["accuracies"])
            lines.append(f"  {a:9s}  {v['train_images']:10d}  {v['augment']:28s}  "
                         f"{100 * v['mean']:5.1f} ± {100 * v['std']:4.1f}%          {runs}")
    sec = dict(r["seconds"])
    inside = (f"generation {sec.pop('generation', 0):.0f} and captioning {sec.pop('captions', 0):.0f} "
              f"of them in the sections")
    rate = f", {r['images_per_second']:.1f} generated images/s" if r.get("images_per_second") else ""
    lines.append("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()) + f" ({inside}{rate})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``field=value`` strings → typed EvalConfig overrides (tuples as comma lists); unknown fields list
    the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    defaults = EvalConfig()
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set expects field=value with a field of: {', '.join(fields)}; got {pair!r}")
        default = getattr(defaults, name)
        if isinstance(default, tuple):
            kind = type(default[0])
            out[name] = tuple(kind(v) for v in value.split(",") if v)
        else:
            out[name] = type(default)(value)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_SD_MODEL, help="Stable Diffusion folder (save_pretrained layout)")
    p.add_argument("--quick", action="store_true", help="tiny counts, one seed: about a minute")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma list of {', '.join(SECTIONS)} (the judge always runs)")
    p.add_argument("--out-json", default=".cache/eval_tiny_sd.json")
    p.add_argument("--judge-cache", default=".cache/judge", help="folder of cached judge weights")
    p.add_argument("--caption-cache", default=".cache/eval_tiny_sd_captions.jsonl",
                   help="caption cache file ('' disables)")
    p.add_argument("--prompts", choices=["caption", "label"], default=None,
                   help="img2img prompts: label + caption (SIP, default) or label only")
    p.add_argument("--guidance", default=None, help="txt2img guidance scales, comma list (default 3,5)")
    p.add_argument("--seeds", type=int, default=None, help="few-shot draws (default 3, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30, quick 10)")
    p.add_argument("--batch-size", type=int, default=None, help="images per pipeline call")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto …")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any EvalConfig field (e.g. --set fewshot_steps=300)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> EvalConfig:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    flags = {"prompts": args.prompts, "fewshot_seeds": args.seeds, "steps": args.steps,
             "batch_size": args.batch_size, "seed": args.seed, "precision": args.precision}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.guidance:
        values["txt2img_guidance"] = tuple(float(g) for g in args.guidance.split(",") if g)
    values.update(parse_overrides(args.set))
    return EvalConfig(**values)


def check_model(model: str) -> Path | None:
    """The model folder, or None for a hub id; a missing folder says which and how to make it."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                             f"scripts/train_tiny_sd.py --out {path} writes one")
        return path
    if path.exists() or looks_like_path(model):
        raise SystemExit(f"Stable Diffusion folder {path} does not exist. Train it with "
                         f"`python scripts/train_tiny_sd.py --out {path}` (sip's shipped model: "
                         f"`python scripts/train_tiny_sd.py`, which writes {DEFAULT_SD_MODEL}), or pass "
                         f"--model with another folder or a hub id.")
    return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # 1. check inputs before anything heavy
    cfg = build_config(args)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    folder = check_model(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    seconds: dict[str, float] = {}
    t_start = time.time()

    # 2. data: Fashion-MNIST at 32×32, grey
    t0 = time.time()
    train_grey, train_labels = fashion_mnist_32("train")
    test_grey, test_labels = fashion_mnist_32("test")
    seconds["data"] = time.time() - t0

    # 3. judge: cached by settings; quick mode takes the full judge when it is cached
    t0 = time.time()
    candidates = [EvalConfig(seed=cfg.seed), cfg] if args.quick else [cfg]
    judge, judge_info = load_or_train_judge(cfg, candidates, Path(args.judge_cache), train_grey, train_labels,
                                            progress)
    judge_test = (np.arange(len(test_labels)) if cfg.judge_test_images >= len(test_labels)
                  else balanced_sources(test_labels, cfg.judge_test_images, cfg.seed + 3))
    test_pred, test_feats = classify(judge, test_grey[judge_test])
    judge_accuracy = share(test_pred, test_labels[judge_test])
    judge_info["test_images"] = len(judge_test)
    judge_info["per_class"] = per_class_share(test_pred, test_labels[judge_test])  # how far to trust it, per class
    seconds["judge"] = time.time() - t0
    print(f"judge test accuracy {judge_accuracy:.2%} ({len(judge_test)} images)", file=sys.stderr)

    # 4. the pipeline, loaded the way a user's checkpoint is
    t0 = time.time()
    pipe = load_diffusion_pipeline(str(folder) if folder else args.model, "img2img", "float32", args.device)
    gen = SipGeneration(pipe, args.model, cfg, progress)
    captions = Captions(cfg.caption_size, Path(args.caption_cache) if args.caption_cache else None)
    probe = gen.generator(0.5, 4.0, cfg.seed)
    precision = "bf16 autocast" if probe.bf16 else "fp32"
    seconds["load"] = time.time() - t0

    result: dict[str, Any] = {
        "model": args.model, "model_mb": folder_mb(folder) if folder else None,
        "mode": "quick" if args.quick else "full", "device": describe_device(pipe.device), "precision": precision,
        "judge_accuracy": judge_accuracy, "judge": judge_info,
        "vae_recon_accuracy": None, "vae": None,
        "txt2img_fidelity": None, "txt2img_per_class": None, "txt2img": None,
        "img2img_preservation": None, "img2img": None, "steering": None, "diversity": None,
        "fewshot": None,
        "prompts": ("label + caption (imagenet-topk, efficientnet-lite0, 96 px)" if cfg.prompts == "caption"
                    else "label only"),
        "config": dataclasses.asdict(cfg),
    }

    # 5. VAE reconstruction
    if "vae" in sections:
        t0 = time.time()
        idx = (np.arange(len(test_labels)) if cfg.vae_images >= len(test_labels)
               else balanced_sources(test_labels, cfg.vae_images, cfg.seed + 5))
        rec = vae_reconstruct(pipe, test_grey[idx], progress=progress)
        rec_pred, _ = classify(judge, to_grey(rec))
        orig_pred, _ = classify(judge, test_grey[idx])
        diff = rec.astype(np.float32) / 255.0 - np.repeat(test_grey[idx, ..., None], 3, axis=-1) / 255.0
        mse = float((diff ** 2).mean())
        result["vae_recon_accuracy"] = share(rec_pred, test_labels[idx])
        result["vae"] = {"images": len(idx), "recon_accuracy": result["vae_recon_accuracy"],
                         "original_accuracy": share(orig_pred, test_labels[idx]),
                         "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)), "pixel_l1": float(np.abs(diff).mean()),
                         "latent": "posterior mean"}
        seconds["vae"] = time.time() - t0

    # 6. txt2img class fidelity
    if "txt2img" in sections:
        t0 = time.time()
        fidelity, per_class = {}, {}
        for g in cfg.txt2img_guidance:
            rgb, labels = gen.text2img(cfg.txt2img_per_class, g, cfg.seed, f"txt2img g={g:g}")
            pred, _ = classify(judge, to_grey(rgb))
            fidelity[f"{g:g}"] = share(pred, labels)
            per_class[f"{g:g}"] = per_class_share(pred, labels)
        result["txt2img_fidelity"], result["txt2img_per_class"] = fidelity, per_class
        result["txt2img"] = {"per_class": cfg.txt2img_per_class, "guidance": list(cfg.txt2img_guidance),
                             "prompt_example": gen.builder(CLASSES[4])}
        seconds["txt2img"] = time.time() - t0

    # 7. img2img label preservation, diversity, steering (test images as sources)
    if "img2img" in sections:
        t0 = time.time()
        idx = balanced_sources(test_labels, cfg.img2img_sources, cfg.seed + 11)
        sources = [to_pil(im) for im in test_grey[idx]]
        src_labels = test_labels[idx]
        source_ids = [f"fmnist/test/{int(i)}" for i in idx]
        caps = captions(sources) if cfg.prompts == "caption" else None
        src_rgb = to_rgb_array(sources)
        src_pred, src_feats = classify(judge, test_grey[idx])
        # the judge errs on some real sources too: preservation among the sources it gets right separates
        # the generator's label loss from the judge's own errors
        src_right = np.repeat(src_pred == src_labels, cfg.img2img_variants)
        v = cfg.img2img_variants
        preservation, preserved_right, per_class, diversity = {}, {}, {}, {}
        for s in cfg.img2img_strengths:
            rgb = gen.img2img(sources, src_labels.tolist(), caps, source_ids, v, s, cfg.img2img_guidance, cfg.seed,
                              f"img2img s={s:g}")
            pred, feats = classify(judge, to_grey(rgb))
            target = np.repeat(src_labels, v)
            preservation[f"{s:g}"] = share(pred, target)
            preserved_right[f"{s:g}"] = share(pred[src_right], target[src_right])
            per_class[f"{s:g}"] = per_class_share(pred, target)
            diversity[f"{s:g}"] = variant_diversity(src_rgb, src_feats, rgb, feats, v)
        diversity["reference"] = reference_distances(test_grey[judge_test], test_labels[judge_test], test_feats,
                                                     cfg.seed)
        # steering: every source gets a wrong label (seeded), one variant, the 0.9 run's seeds
        rng = np.random.default_rng(cfg.seed + 13)
        wrong = (src_labels + rng.integers(1, len(CLASSES), len(src_labels))) % len(CLASSES)
        rgb = gen.img2img(sources, wrong.tolist(), caps, source_ids, 1, cfg.steer_strength, cfg.img2img_guidance,
                          cfg.seed, f"steer s={cfg.steer_strength:g}")
        pred, _ = classify(judge, to_grey(rgb))
        result["img2img_preservation"], result["diversity"] = preservation, diversity
        result["img2img"] = {"sources": len(idx), "variants": v, "guidance": cfg.img2img_guidance,
                             "prompts": cfg.prompts, "source_accuracy": share(src_pred, src_labels),
                             "preservation_where_source_judged_right": preserved_right, "per_class": per_class,
                             "prompt_example": gen.builder(CLASSES[int(src_labels[0])], caps[0] if caps else None)}
        result["steering"] = {"strength": cfg.steer_strength, "to_target": share(pred, wrong),
                              "kept_source": share(pred, src_labels), "images": len(idx)}
        seconds["img2img"] = time.time() - t0

    # 8. the data-scarce experiment
    if "fewshot" in sections:
        t0 = time.time()
        result["fewshot"] = run_fewshot(cfg, gen, captions, train_grey, train_labels, test_grey, test_labels,
                                        progress)
        seconds["fewshot"] = time.time() - t0

    # 9. report: table, JSON file, JSON as the last line
    seconds["captions"] = captions.seconds
    seconds["generation"] = gen.seconds
    seconds["total"] = time.time() - t_start
    result["generated_images"] = gen.images
    result["images_per_second"] = gen.images / gen.seconds if gen.seconds else None
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result = no_nan(result)
    print(format_table(result))
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(result, separators=(",", ":")))
    return result


if __name__ == "__main__":
    main()
