"""What each source is drawn as: several (strength, guidance) settings per source (DA-Fusion, Trabucco et al.,
2024; DM-KD, Li et al., 2023, found low guidance teaches better) and inter-class variants (Diff-Mix, Wang et al.,
CVPR 2024): img2img of an image of class A under the prompt of class B, labelled by a teacher, else by the soft
label ``(1 - s^gamma) A + s^gamma B`` of its strength ``s``.

A source has the same number of variants whatever its class (the batch grid of :mod:`sip.augment.jobs` counts
them without reading labels): ``per_image`` at each setting, then ``interclass_per_source`` targets at each
inter-class strength. Variant ``v`` of a source is fixed by the recipe alone, so its id, seed and bytes are too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sip.augment.guidance import ClassifierGuidance, GuideClassifier, GuideConfig
from sip.augment.loop import Job
from sip.ids import stable_seed


@dataclass(frozen=True)
class VariantsConfig:
    """The ``variants:`` section of ``sip augment`` recipes.

    Attributes:
        strengths: img2img strengths each source is drawn at (``per_image`` each); empty: ``generate.strength``.
            Low keeps the source, high varies it more.
        guidance_scales: classifier-free guidance scales, each at every strength; empty: ``generate.guidance_scale``.
        interclass: inter-class pairs ``[[A, B], ...]`` (a source of class A redrawn under B's prompt), or "all"
            (every other class); empty: none. Every class of the source needs a target.
        interclass_strengths: the strengths each inter-class target is drawn at (higher: more of B).
        interclass_per_source: inter-class targets per source, taken in turn from its class's targets.
        soft_gamma: without a teacher, an inter-class image at strength s is labelled ``{A: 1 - s^gamma, B: s^gamma}``
            (its folder: the larger; A on a tie).
    """

    strengths: list[float] = field(default_factory=list)
    guidance_scales: list[float] = field(default_factory=list)
    interclass: list[list[str]] | str = field(default_factory=list)
    interclass_strengths: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    interclass_per_source: int = 1
    soft_gamma: float = 1.0

    def __post_init__(self):
        for key in ("strengths", "interclass_strengths"):
            for s in getattr(self, key):
                if not math.isfinite(s) or not 0.0 < s <= 1.0:
                    raise ValueError(f"variants.{key}: every strength must be in (0, 1], got {s}")
        for g in self.guidance_scales:
            if not math.isfinite(g) or g < 0:
                raise ValueError(f"variants.guidance_scales: each must be a finite number >= 0, got {g}")
        if isinstance(self.interclass, str) and self.interclass != "all":
            raise ValueError(f"variants.interclass is a list of [A, B] pairs or 'all', got {self.interclass!r}")
        for pair in [] if isinstance(self.interclass, str) else self.interclass:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"variants.interclass: each pair is [A, B] with A != B, got {pair}")
        if self.interclass and not self.interclass_strengths:
            raise ValueError("variants.interclass needs at least one of variants.interclass_strengths")
        if self.interclass_per_source < 1:
            raise ValueError(f"variants.interclass_per_source must be >= 1, got {self.interclass_per_source}")
        if not math.isfinite(self.soft_gamma) or self.soft_gamma <= 0:
            raise ValueError(f"variants.soft_gamma must be a finite number > 0, got {self.soft_gamma}")


@dataclass(frozen=True)
class Variant:
    """How variant ``v`` of a source is drawn: under whose prompt, at which settings, index ``k`` among its kind."""

    prompt_label: str
    strength: float
    guidance_scale: float
    k: int
    interclass: bool = False


class VariantPlan:
    """Variant ``v`` of a source of class ``label`` → :class:`Variant` (the same for every run of a recipe).

    Args:
        config (VariantsConfig): the ``variants:`` section.
        classes (Sequence[str]): the source's class names (pairs must name them).
        strength (float): ``generate.strength`` (used when ``config.strengths`` is empty).
        guidance_scale (float): ``generate.guidance_scale`` (used when ``config.guidance_scales`` is empty).
        per_image (int): ``generate.per_image``: variants at each intra-class setting.

    Raises:
        ValueError: a pair names an unknown class, or a class of the source has no inter-class target.
    """

    def __init__(self, config: VariantsConfig, classes: Sequence[str], strength: float, guidance_scale: float,
                 per_image: int):
        self.config, self.classes = config, list(classes)
        self.settings = [(s, g) for s in (config.strengths or [strength])
                         for g in (config.guidance_scales or [guidance_scale])]
        self.per_image = per_image
        self.targets = interclass_targets(config.interclass, self.classes)
        self.count = self.count_for(config, per_image)

    @staticmethod
    def count_for(config: VariantsConfig, per_image: int) -> int:
        """Variants per source (the same for every class)."""
        settings = max(1, len(config.strengths)) * max(1, len(config.guidance_scales))
        inter = config.interclass_per_source * len(config.interclass_strengths) if config.interclass else 0
        return per_image * settings + inter

    def __call__(self, label: str, source_id: str, v: int) -> Variant:
        intra = self.per_image * len(self.settings)
        if not 0 <= v < self.count:
            raise ValueError(f"variant {v} out of range: sources have {self.count}")
        if v < intra:
            strength, scale = self.settings[v // self.per_image]
            return Variant(label, strength, scale, v % self.per_image)
        j = v - intra
        strengths = self.config.interclass_strengths
        targets = self.targets[label]
        turn = j // len(strengths) + stable_seed("interclass", source_id) % len(targets)
        return Variant(targets[turn % len(targets)], strengths[j % len(strengths)], self.settings[0][1],
                       j // len(strengths), interclass=True)

    def soft_label(self, source_label: str, variant: Variant) -> dict[str, float]:
        """``{A: 1 - s^gamma, B: s^gamma}`` of an inter-class variant (Diff-Mix's label without a teacher)."""
        lam = round(variant.strength ** self.config.soft_gamma, 4)
        return {source_label: round(1 - lam, 4), variant.prompt_label: lam}


def interclass_targets(pairs: list[list[str]] | str, classes: Sequence[str]) -> dict[str, list[str]]:
    """Each class's inter-class targets, in the pairs' order ("all": every other class in class order).

    Raises:
        ValueError: a pair names a class the source does not have, or a class is left without a target.
    """
    if not pairs:
        return {}
    if pairs == "all":
        if len(classes) < 2:
            raise ValueError(f"variants.interclass: all needs at least two classes, the source has {list(classes)}")
        return {a: [b for b in classes if b != a] for a in classes}
    targets: dict[str, list[str]] = {a: [] for a in classes}
    for a, b in pairs:
        unknown = [c for c in (a, b) if c not in targets]
        if unknown:
            raise ValueError(f"variants.interclass: pair [{a}, {b}] names unknown class {unknown[0]!r}; the source's "
                             f"classes are {list(classes)}")
        if b not in targets[a]:
            targets[a].append(b)
    missing = [a for a, t in targets.items() if not t]
    if missing:
        raise ValueError(f"variants.interclass: classes {missing} have no pair; every source draws the same number "
                         f"of variants, so give each class a target (e.g. [{missing[0]!r}, ...]) or use 'all'")
    return targets


class InterclassLabeller:
    """The label of each generated image: intra-class jobs keep theirs; inter-class ones (and latent mixes,
    :mod:`sip.augment.latent_mix`) take the teacher's prediction (its probabilities recorded as the soft label),
    else the larger share of their soft label.

    Args:
        teacher (GuideClassifier, optional): labels inter-class images; None uses the soft label.
    """

    def __init__(self, teacher: GuideClassifier | None = None):
        self.teacher = teacher

    def __call__(self, jobs: Sequence[Job], images: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
        inter = [i for i, j in enumerate(jobs) if j.record.get("interclass") or j.record.get("latent_mix")]
        out = [(j.label, {}) for j in jobs]
        if not inter:
            return out
        if self.teacher is None:
            for i in inter:
                soft = jobs[i].record["soft_label"]
                out[i] = (max(soft, key=lambda c: (soft[c], c == jobs[i].record["source_label"])), {})
            return out
        probs = self.teacher.predict([images[i] for i in inter])
        for i, p in zip(inter, probs):
            soft = {c: round(float(q), 4) for c, q in zip(self.teacher.classes, p) if float(q) >= 1e-4}
            out[i] = (self.teacher.classes[int(p.argmax())], {"soft_label": soft, "label_by": "teacher"})
        return out


def variants_generator(generator: Any, negative_prompt: str, guidance: ClassifierGuidance | None = None):
    """The img2img ``generate(batch) -> images`` call for jobs at several settings: one generator call per
    (strength, guidance scale) of the batch, images back in job order; guided toward each job's label."""
    def generate(batch: Sequence[Job]) -> list:
        groups: dict[tuple[float, float], list[int]] = {}
        for i, j in enumerate(batch):
            groups.setdefault((j.record["strength"], j.record["guidance_scale"]), []).append(i)
        images: list[Any] = [None] * len(batch)
        for (strength, scale), idx in groups.items():
            jobs = [batch[i] for i in idx]
            kw: dict[str, Any] = {}  # the config's setting unguided: the plain call
            if (strength, scale) != (generator.config.strength, generator.config.guidance_scale):
                kw.update(strength=strength, guidance_scale=scale)
            if guidance is not None:
                kw["guide"] = guidance.toward([j.label for j in jobs])
            out = generator.img2img([j.payload for j in jobs], [j.prompt for j in jobs], [j.seed for j in jobs],
                                    negative_prompt, **kw)
            for i, im in zip(idx, out):
                images[i] = im
        return images
    return generate


def variant_fields(plan: VariantPlan, label: str, source_id: str, v: int) -> tuple[Variant, dict[str, Any]]:
    """Variant ``v`` of a source and what its metadata line adds (strength and guidance of its setting; for an
    inter-class one: ``interclass``, ``source_label``, ``soft_label``)."""
    variant = plan(label, source_id, v)
    extra: dict[str, Any] = {"strength": variant.strength, "guidance_scale": variant.guidance_scale}
    if variant.interclass:
        extra.update(interclass=True, source_label=label, soft_label=plan.soft_label(label, variant))
    return variant, extra


@dataclass
class Teaching:
    """What a run draws with besides the generator: the guidance, the variant plan, the inter-class labeller."""

    guidance: ClassifierGuidance | None
    plan: VariantPlan | None = None
    labeller: InterclassLabeller | None = None

    def settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The generator's per-image settings plus the guidance's record."""
        return {**settings, **self.guidance.record()} if self.guidance is not None else settings


def build_teaching(guide: GuideConfig, variants: VariantsConfig | None, classes: Sequence[str], strength: float,
                   guidance_scale: float, per_image: int, device: Any = "cpu") -> Teaching:
    """Load the guide's classifiers (once) and plan the variants (``variants`` None: txt2img)."""
    guidance = ClassifierGuidance.from_config(guide, device)
    if variants is None:
        return Teaching(guidance)
    plan = VariantPlan(variants, classes, strength, guidance_scale, per_image)
    labeller = None
    if variants.interclass:
        teacher = guidance.teacher if guidance is not None else (
            GuideClassifier.from_checkpoint(guide.teacher, device) if guide.teacher else None)
        labeller = InterclassLabeller(teacher)
    return Teaching(guidance, plan, labeller)
