"""Latent CutMix / mixup of two classes before decoding (DiffDFKD, Qi et al., 2025): data-free txt2img images
that sit between two classes, labelled by the teacher (when ``guide.teacher`` is given) or by their mix weight.

Image ``k`` of class A past ``generate.per_class`` (``latent_mix.per_class`` of them) is drawn twice from the
prompt of A (its own seed) and from the prompt of a partner class B (another seed); the two denoised latents are
mixed and the result is decoded once:

- ``mixup``: ``z = (1 - lam) z_A + lam z_B``;
- ``cutmix``: ``z = z_A`` with a box of ``z_B`` pasted in, of area about ``lam`` of the latent (CutMix, Yun et al.,
  ICCV 2019); ``lam`` is then the box's exact area share.

``lam`` is drawn from ``Beta(alpha, alpha)`` (or fixed by ``latent_mix.lam``), B among the other classes, and the
box's place, all from ``(seed, A, k)``: an image's bytes do not depend on the batch, shard or resume. Without a
teacher the image is labelled ``{A: 1 - lam, B: lam}`` (``soft_label`` in its metadata line; its folder: the larger
share, A on a tie); with one, by the teacher's prediction (probabilities as ``soft_label``, ``label_by: teacher``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sip.augment.loop import Job, variant_record
from sip.ids import image_seed, stable_seed, synthetic_id

MODES = ("cutmix", "mixup")


@dataclass(frozen=True)
class LatentMixConfig:
    """The ``latent_mix:`` section of ``sip synth`` recipes.

    Attributes:
        mode: "cutmix" (a box of the partner's latent pasted in) or "mixup" (a convex blend); null: off.
        alpha: ``lam ~ Beta(alpha, alpha)``, the partner's share; 1 is uniform, lower pushes toward one class.
        per_class: mixed images per class, on top of ``generate.per_class`` plain ones.
        lam: a fixed partner share in [0, 1] instead of drawing it (0: the plain image of A; 1: of B);
            null draws from ``Beta(alpha, alpha)``.
    """

    mode: str | None = None
    alpha: float = 1.0
    per_class: int = 1
    lam: float | None = None

    def __post_init__(self):
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"latent_mix.mode must be one of {', '.join(MODES)} or null (off), got {self.mode!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"latent_mix.alpha must be a finite number > 0, got {self.alpha}")
        if self.per_class < 1:
            raise ValueError(f"latent_mix.per_class must be >= 1, got {self.per_class}")
        if self.lam is not None:
            if not math.isfinite(self.lam) or not 0.0 <= self.lam <= 1.0:
                raise ValueError(f"latent_mix.lam must be in [0, 1] or null (drawn from Beta(alpha, alpha)), got "
                                 f"{self.lam}")
            if self.alpha != 1.0:
                raise ValueError(f"latent_mix.lam ({self.lam}) fixes the mix, so latent_mix.alpha ({self.alpha}) "
                                 "would be ignored: set one of them")
        if self.mode is None and (self.lam is not None or self.alpha != 1.0 or self.per_class != 1):
            raise ValueError("latent_mix.alpha / per_class / lam are set but latent_mix.mode is null (off): set "
                             "latent_mix.mode: cutmix or mixup, or drop them")

    @property
    def active(self) -> bool:
        return self.mode is not None

    @property
    def count(self) -> int:
        """Mixed images per class (0 when off)."""
        return self.per_class if self.active else 0


@dataclass(frozen=True)
class MixDraw:
    """One mixed image's draw: its partner class, the partner's seed, its share and (cutmix) the latent box."""

    partner: str
    partner_seed: int
    lam: float
    box: tuple[int, int, int, int] | None  # (top, left, height, width) in latent cells


def draw_mix(config: LatentMixConfig, classes: Sequence[str], label: str, k: int, seed: int,
             latent_hw: tuple[int, int]) -> MixDraw:
    """The partner, share and box of mixed image ``k`` of ``label`` (a function of the arguments alone)."""
    others = [c for c in classes if c != label]
    if not others:
        raise ValueError(f"latent_mix needs at least two classes to mix, got {list(classes)}")
    rng = np.random.default_rng(stable_seed("latent_mix", seed, label, k))
    partner = others[int(rng.integers(len(others)))]
    lam = float(config.lam) if config.lam is not None else float(rng.beta(config.alpha, config.alpha))
    partner_seed = image_seed(seed, f"latent_mix:{label}", k)
    if config.mode == "mixup":
        return MixDraw(partner, partner_seed, round(lam, 4), None)
    h, w = latent_hw
    bh, bw = round(h * math.sqrt(lam)), round(w * math.sqrt(lam))
    top, left = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
    return MixDraw(partner, partner_seed, round(bh * bw / (h * w), 4), (top, left, bh, bw))


def mix_latents(a: torch.Tensor, b: torch.Tensor, draw: MixDraw) -> torch.Tensor:
    """``a`` mixed with ``b`` as ``draw`` says (share 0 returns ``a`` itself: the plain image's latent)."""
    if draw.lam == 0.0:
        return a
    if draw.box is None:
        return (1 - draw.lam) * a + draw.lam * b
    top, left, bh, bw = draw.box
    out = a.clone()
    out[..., top : top + bh, left : left + bw] = b[..., top : top + bh, left : left + bw]
    return out


class LatentMixPlan:
    """The mixed txt2img jobs of a ``sip synth`` run and its ``generate(batch)`` call.

    Args:
        config (LatentMixConfig): the ``latent_mix:`` section (active).
        classes (Sequence[str]): the classes synthesised (partners are drawn among them).
        per_class (int): ``generate.per_class``: image ``k >= per_class`` of a class is a mixed one.
        seed (int): ``generate.seed``.
        generator: the :class:`~sip.augment.generate.DiffusionGenerator` (its latent size).
    """

    def __init__(self, config: LatentMixConfig, classes: Sequence[str], per_class: int, seed: int, generator: Any):
        if len(classes) < 2:
            raise ValueError(f"latent_mix needs at least two classes to mix, got {list(classes)}")
        self.config, self.classes, self.per_class, self.seed = config, list(classes), per_class, seed
        side = int(generator.size) // int(generator.pipe.vae_scale_factor)
        self.latent_hw = (side, side)

    def is_mixed(self, k: int) -> bool:
        return k >= self.per_class

    def job(self, label: str, k: int, builder: Any, negative_prompt: str, settings: dict[str, Any]) -> Job:
        """Mixed image ``k`` of ``label``: its prompt and seed are A's, its payload the partner's prompt and seed."""
        d = draw_mix(self.config, self.classes, label, k, self.seed, self.latent_hw)
        prompt, partner_prompt = builder(label, None, k), builder(d.partner, None, k)
        seed = image_seed(self.seed, f"txt2img:{label}", k)
        record = variant_record(source=None, source_hash=None, variant=k, caption=None, prompt=prompt,
                                negative_prompt=negative_prompt, strength=None, seed=seed, settings=settings)
        record.update(latent_mix={"mode": self.config.mode, "partner": d.partner, "partner_prompt": partner_prompt,
                                  "partner_seed": d.partner_seed, "lam": d.lam, "box": list(d.box) if d.box else None},
                      source_label=label, soft_label={label: round(1 - d.lam, 4), d.partner: d.lam})
        return Job(synthetic_id(label, k), label, prompt, seed, record, payload=d)


def mixing_generator(generator: Any, negative_prompt: str, guidance: Any = None):
    """``generate(batch) -> images`` for synth batches holding mixed jobs: plain jobs as one txt2img call, mixed
    ones as two (A's latents and the partners', each guided toward its own class), mixed, decoded once."""
    def generate(batch: Sequence[Job]) -> list:
        images: list[Any] = [None] * len(batch)
        plain = [i for i, j in enumerate(batch) if not isinstance(j.payload, MixDraw)]
        mixed = [i for i, j in enumerate(batch) if isinstance(j.payload, MixDraw)]
        for idx, partner in ((plain, False), (mixed, True)):
            if not idx:
                continue
            jobs = [batch[i] for i in idx]
            out = txt2img(generator, [j.prompt for j in jobs], [j.seed for j in jobs], [j.label for j in jobs],
                          negative_prompt, guidance, "latent" if partner else "pil")
            if partner:
                other = txt2img(generator, [j.record["latent_mix"]["partner_prompt"] for j in jobs],
                                [j.payload.partner_seed for j in jobs], [j.payload.partner for j in jobs],
                                negative_prompt, guidance, "latent")
                out = decode_latents(generator, torch.stack([mix_latents(a, b, j.payload)
                                                             for a, b, j in zip(out, other, jobs)]))
            for i, im in zip(idx, out):
                images[i] = im
        return images
    return generate


def txt2img(generator: Any, prompts: list[str], seeds: list[int], labels: list[str], negative_prompt: str,
            guidance: Any, output_type: str) -> list:
    """One txt2img call, guided toward ``labels`` when ``guidance`` is given."""
    guide = guidance.toward(labels) if guidance is not None else None
    return generator.text2img(prompts, seeds, negative_prompt, guide=guide, output_type=output_type)


@torch.inference_mode()
def decode_latents(generator: Any, latents: torch.Tensor) -> list:
    """PIL images of denoised latents, decoded as the pipeline decodes them (same VAE call and post-processing)."""
    pipe = generator.pipe
    vae = pipe.vae
    if generator.config.batch_invariant and len(latents) > 1:  # one image per decoder call, as text2img runs
        return [im for i in range(len(latents)) for im in decode_latents(generator, latents[i : i + 1])]
    with generator._autocast():
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


def latent_mix_jobs(recipe: Any, classes: Sequence[str], generator: Any, teaching: Any, builder: Any,
                    settings: dict[str, Any], batches: Sequence[Sequence[tuple[str, int]]], plain_job: Any):
    """A ``sip synth`` run's jobs, ``generate(batch)`` call and labeller when ``recipe.latent_mix`` is on.

    Args:
        recipe: the :class:`~sip.augment.jobs.SynthRecipe`.
        classes, generator, builder, settings: the run's classes, generator, prompt builder and per-image settings.
        teaching: the run's :class:`~sip.augment.variants.Teaching`: its guidance, and its labeller if it has one
            (else the guide's teacher labels mixes, or their soft label without one).
        batches: the run's grid batches of ``(label, k)`` items.
        plain_job: ``(label, k, builder, generate config, negative prompt, settings) -> Job`` for plain images.
    """
    from sip.augment.guidance import GuideClassifier
    from sip.augment.variants import InterclassLabeller

    g, negative = recipe.generate, recipe.prompt.negative_prompt
    plan = LatentMixPlan(recipe.latent_mix, classes, g.per_class, g.seed, generator)
    jobs = ([plan.job(label, k, builder, negative, settings) if plan.is_mixed(k)
             else plain_job(label, k, builder, g, negative, settings) for label, k in b] for b in batches)
    guidance, labeller = teaching.guidance, teaching.labeller  # a labeller handed in wins (tests, callers)
    if labeller is None:
        teacher = guidance.teacher if guidance is not None else (
            GuideClassifier.from_checkpoint(recipe.guide.teacher, generator.device) if recipe.guide.teacher else None)
        labeller = InterclassLabeller(teacher)
    return jobs, mixing_generator(generator, negative, guidance), labeller
