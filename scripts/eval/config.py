"""What the evaluation measures and how much of it: :class:`EvalConfig`, the ``--quick`` counts, the
fixed splits, and ``--set field=value`` overrides (parsed and type-checked by :mod:`sip.config`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sip.config import from_dict, parse_override
from sip.data.fashion_mnist import FASHION_MNIST_CLASSES

CLASSES = list(FASHION_MNIST_CLASSES)
GENERATOR_SPLIT = (0, 50000)   # train images the shipped generator learnt from; the judge learns from them too
FEWSHOT_POOL = (50000, 60000)  # disjoint pool the 10-shot sets and the extra real images come from
SIZE = 32                      # the shipped model's resolution
SECTIONS = ("vae", "txt2img", "img2img", "fewshot")
ARMS = ("none", "cropflip", "randaug", "img2img", "txt2img", "both", "real")


PROMPTS = ("caption", "label", "caption_only")  # img2img prompts: label + caption (SIP), label, caption


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
        prompts: "caption" (SIP: label + imagenet-topk caption), "label" (label only) or "caption_only"
            (the caption without the label: the SIP ablation) for img2img.
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
        fewshot_arms: which arms to run (see the package docstring).
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
        if self.prompts not in PROMPTS:
            raise ValueError(f"prompts must be one of {', '.join(PROMPTS)}, got {self.prompts!r}")
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
QUICK: dict[str, Any] = {
    "judge_width": 16, "judge_epochs": 0.25, "judge_test_images": 1000, "vae_images": 500, "steps": 10,
    "batch_size": 64, "txt2img_per_class": 3, "img2img_sources": 10, "img2img_variants": 2, "fewshot_seeds": 1,
    "fewshot_variants": 1, "fewshot_txt2img_per_class": 3, "fewshot_steps": 50, "fewshot_batch": 32,
    "fewshot_test_images": 1000}


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``field=value`` strings → EvalConfig overrides: values parsed as YAML scalars by
    :func:`sip.config.parse_override`, tuples given as comma lists; an unknown field lists the valid ones."""
    fields = [f.name for f in dataclasses.fields(EvalConfig)]
    defaults = EvalConfig()
    out: dict[str, Any] = {}
    for pair in pairs:
        if pair.partition("=")[0].strip() not in fields or "=" not in pair:
            raise SystemExit(f"--set expects field=value with a field of: {', '.join(fields)}; got {pair!r}")
        (name,), value = parse_override(pair)  # a value YAML cannot read raises ConfigError
        if isinstance(getattr(defaults, name), tuple) and not isinstance(value, list):
            value = [parse_override(f"v={v}")[1] for v in str(value).split(",") if v]
        out[name] = value
    return out


def build_config(values: dict[str, Any], overrides: Sequence[str]) -> EvalConfig:
    """EvalConfig from ``values`` (quick counts, flags) and ``--set`` overrides, type-checked by
    :func:`sip.config.from_dict` (a bad value raises :class:`sip.config.ConfigError`, a ValueError)."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return from_dict(EvalConfig, {**values, **parse_overrides(overrides)}, source="scripts.eval")
