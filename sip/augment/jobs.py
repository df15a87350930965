"""The one public job API of ``sip augment`` / ``sip synth``, shared by every engine (this process, one process
per rank under torchrun / accelerate launch, or Ray Data in :mod:`sip.scale.ray_engine`).

An engine decides only where batches run. What a run *is* lives here, once:

- the recipes (:class:`AugmentRecipe`, :class:`SynthRecipe`) and what a run reports (:class:`RunSummary`);
- the checks before any model loads (:func:`prepare_augment`, :func:`prepare_synth`): the source, the output
  folder (writable, not inside its input: :func:`check_output`);
- the **one-process batch grid** (:func:`augment_grid`, :func:`synth_grid`): batches composed from the item order
  of an uninterrupted one-process run. A process of a launch (shard ``i/n``) takes *whole* grid batches (batch
  ``k`` belongs to shard ``k mod n + 1``), so every image is drawn in the same batch whatever the process count
  or engine, and batched float kernels round the same way: the bytes of one process;
- the skip of finished ids (:func:`open_batches`), the jobs of a batch (prompt, seed, record:
  :func:`augment_jobs`, :func:`synth_jobs`), the ``generate(batch)`` call (:func:`batch_generator`) and the writer
  (:func:`open_writer`, held exclusively through :func:`sip.data.run_lock.hold_output`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sip.adapt.use import adapter_tokens
from sip.augment.caption import CaptionConfig
from sip.augment.filter import FilterConfig
from sip.augment.generate import GenerateConfig
from sip.augment.guidance import GuideConfig, check_guide
from sip.augment.latent_mix import LatentMixConfig
from sip.augment.loop import Job, batch_grid, run_info, variant_record
from sip.augment.prompts import PromptBuilder, PromptConfig
from sip.augment.variants import VariantPlan, VariantsConfig, variant_fields, variants_generator
from sip.config import to_dict
from sip.data.bank import DatasetWriter
from sip.data.sources import FASHION_MNIST_CLASSES, ImageSource, Sample, SourceConfig, open_source
from sip.ids import image_seed, parse_shard, synthetic_id, variant_id
from sip.runtime import check_device
from sip.scale.ray_config import ENGINES, RayConfig

__all__ = ["AugmentRecipe", "RunSummary", "SynthRecipe", "augment_grid", "augment_jobs", "batch_generator",
           "check_output", "open_batches", "open_writer", "owns", "prepare_augment", "prepare_synth",
           "prompt_builder", "synth_classes", "synth_grid", "synth_jobs"]

Batch = list  # one grid batch: [(position, source id, variant)] for augment, [(label, k)] for synth


@dataclass(frozen=True)
class AugmentRecipe:
    """``sip augment``: SIP img2img augmentation of a labelled image set.

    Attributes:
        source: the real images.
        caption: the captioner.
        prompt: how label and caption become a prompt.
        generate: the diffusion model and its settings.
        filter: optional filter of the variants.
        output: output folder (the layout in writer.py); never inside the input folder, nor holding it.
        shard: "i/n" to do the i-th of n deterministic parts (null: all). Under a multi-process launch
            (torchrun, accelerate launch) each process takes its part by rank: leave this null.
        chunk: sources captioned and generated per streaming step (memory vs. batching).
        progress: show a progress bar.
        engine: "local" (this process, or one per rank under torchrun / accelerate launch) or "ray" (a Ray
            Data pipeline of reader / captioner and generator actor pools, :mod:`sip.scale.ray_engine`).
        ray: the Ray cluster and pool sizes (``engine: ray`` only).
        guide: teacher / student guidance of the sampler (:mod:`sip.augment.guidance`; ``--teacher``, ``--student``).
        variants: several (strength, guidance) settings per source and inter-class variants (:mod:`sip.augment.variants`).
    """

    source: SourceConfig = field(default_factory=SourceConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    output: str = "runs/augment"
    shard: str | None = None
    chunk: int = 256
    progress: bool = True
    engine: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    variants: VariantsConfig = field(default_factory=VariantsConfig)

    def __post_init__(self):
        parse_shard(self.shard)
        if self.chunk <= 0:
            raise ValueError(f"chunk must be positive, got {self.chunk}")
        _check_engine(self.engine, self.shard, self.ray, self.generate)
        _check_teaching(self, self.guide, self.variants != VariantsConfig(), bool(self.variants.interclass))


@dataclass(frozen=True)
class SynthRecipe:
    """``sip synth``: data-free txt2img synthesis from label prompts.

    Attributes:
        classes: label names to synthesise; empty uses ``source``'s classes.
        source: where class names come from when ``classes`` is empty (no image is read).
        prompt, generate, filter, output, shard, progress, engine, ray, guide: as in :class:`AugmentRecipe`.
        latent_mix: latent CutMix / mixup of two classes before decoding (:mod:`sip.augment.latent_mix`).
    """

    classes: list[str] = field(default_factory=list)
    source: SourceConfig = field(default_factory=SourceConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    output: str = "runs/synth"
    shard: str | None = None
    progress: bool = True
    engine: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    latent_mix: LatentMixConfig = field(default_factory=LatentMixConfig)

    def __post_init__(self):
        parse_shard(self.shard)
        _check_engine(self.engine, self.shard, self.ray, self.generate)
        _check_teaching(self, self.guide, self.latent_mix.active, self.latent_mix.active)


def _check_teaching(recipe: Any, guide: GuideConfig, variants: bool, interclass: bool) -> None:
    if recipe.engine == "ray" and (guide.teacher or variants):
        raise ValueError("guide / variants / latent_mix run on engine local (one process per rank under torchrun / "
                         "accelerate launch); engine ray does not draw them yet")
    if guide.teacher and not guide.active and not interclass:
        raise ValueError(f"guide.teacher is {guide.teacher} but guide.scale and guide.student_scale are 0 and no "
                         "variants.interclass pair (nor latent_mix) needs labels: set guide.scale > 0 or drop "
                         "guide.teacher")


def _check_engine(engine: str, shard: str | None, ray: RayConfig, generate: GenerateConfig) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    check_device(generate.device, "generate.device")  # here, not in generate.py (at its line budget)
    unread = [k for k, v in vars(ray).items() if engine != "ray" and v != getattr(RayConfig, k)]
    if unread:  # the local engine reads no ray key: refused, not ignored
        raise ValueError(f"ray.{unread[0]} is read only with engine: ray (--engine ray), not {engine!r}: set "
                         f"engine: ray or remove {', '.join('ray.' + k for k in unread)} (--address)")
    if engine == "ray" and shard is not None:
        raise ValueError(f"engine ray splits the work over its actors itself: drop shard {shard} (--shard), or "
                         "run engine local per shard")


@dataclass
class RunSummary:
    """What a run did: counts, failures with reasons, where it wrote."""

    output: str
    written: int = 0
    skipped: int = 0
    filtered: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    caption_hits: int = 0
    caption_misses: int = 0
    complete: bool = True
    warnings: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # every source skipped, "path: reason"

    def line(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        text = (f"written {self.written}, skipped {self.skipped} (already done), filtered {self.filtered}, "
                f"failed {self.failed} in {self.seconds:.1f}s ({rate:.1f} images/s) → {self.output}")
        if self.reasons:
            text += "; failures: " + "; ".join(f"{n}× {r}" for r, n in self.reasons.most_common(5))
        if self.unreadable:  # every one, so none is skipped without its name
            text += f"; {len(self.unreadable)} unreadable sources: " + "; ".join(self.unreadable)
        if not self.complete:
            text += "; other shards pending: metadata.jsonl is merged when the last shard finishes"
        return text

    def add_unreadable(self, lines: Sequence[str]) -> None:
        """Count each unreadable source once (a source may sit in several batches)."""
        for line in lines:
            if line not in self.unreadable:
                self.unreadable.append(line)
                self.failed += 1


# --------------------------------------------------------------------------------------------------
# checks before any model loads
# --------------------------------------------------------------------------------------------------

def check_output(path: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an output that cannot be written, or that would feed on its own input, before any model loads.

    An output folder inside an input folder (``-i in -o in/aug``), equal to it (``-o in``) or holding it
    (``-i out/train -o out``) is **refused** rather than excluded from the sources: its images would land
    where the next run reads its sources (a second run would add a class ``aug`` redrawn from the first run's
    outputs), and a folder source that silently skipped a sub-folder would hide a class a user meant to keep.

    Args:
        path (str | Path): the output folder.
        inputs (Sequence[str | Path], optional): the local folders the run reads images or class names from.

    Raises:
        NotADirectoryError: ``path`` (or a parent) is a file.
        PermissionError: the folder (or the nearest existing parent) is not writable.
        ValueError: the output is inside, equal to or around an input folder (the message names both).
    """
    out = Path(path).expanduser()
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(f"output {out} cannot be a folder: {probe} is a file. Pass another --output "
                                 f"folder, or move the file away.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {probe} is not writable; pass a writable --output folder "
                              f"(or `chmod u+w {probe}`).")
    real_out = out.resolve()
    for folder in inputs:
        real_in = Path(folder).expanduser().resolve()
        if real_out == real_in or real_in in real_out.parents or real_out in real_in.parents:
            where = ("is" if real_out == real_in else "is inside" if real_in in real_out.parents else "holds")
            raise ValueError(f"output folder {out} {where} the input folder {folder}: its images would become "
                             f"sources (or classes) of the next run on that input. Pass an --output folder outside "
                             f"{folder}, e.g. {real_in.parent / (real_in.name + '-aug')}.")
    return out


def _input_folders(source: SourceConfig) -> list[str]:
    return [source.path] if source.kind in ("folder", "hf") and source.path else []


def prepare_augment(recipe: AugmentRecipe) -> tuple[ImageSource, Path]:
    """Open the source and check the output (no model is loaded).

    Raises:
        ValueError: the source holds no image, or the output is inside the input (see :func:`check_output`).
    """
    source = open_source(recipe.source)
    if len(source) == 0:
        raise ValueError(f"the input has no images ({recipe.source.kind} {recipe.source.path or ''}); nothing to do")
    check_guide(recipe.guide, source.classes)
    g = recipe.generate
    VariantPlan(recipe.variants, source.classes, g.strength, g.guidance_scale, g.per_image)  # pairs name classes
    return source, check_output(recipe.output, _input_folders(recipe.source))


def synth_classes(recipe: SynthRecipe) -> list[str]:
    """The class names to synthesise: explicit, else the source's (no image is decoded)."""
    if recipe.classes:
        return list(recipe.classes)
    if recipe.source.kind == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    return list(open_source(recipe.source).classes)


def prepare_synth(recipe: SynthRecipe) -> tuple[list[str], Path]:
    """The classes to synthesise and the checked output (a folder the classes are read from counts as input).

    Raises:
        ValueError: no class, or the output is inside the folder the classes come from.
    """
    classes = synth_classes(recipe)
    if not classes:
        raise ValueError("no classes to synthesise: set classes: [...] or a source with labels")
    check_guide(recipe.guide, classes)
    return classes, check_output(recipe.output, [] if recipe.classes else _input_folders(recipe.source))


# --------------------------------------------------------------------------------------------------
# the one-process batch grid, the share of a shard, the skip of finished ids
# --------------------------------------------------------------------------------------------------

def owns(index: int, shard: tuple[int, int] | None) -> bool:
    """Whether grid batch ``index`` (0-based, over the whole run) belongs to shard ``(i, n)`` (None: all)."""
    return shard is None or index % shard[1] == shard[0] - 1


def augment_grid(source_ids: Sequence[str], recipe: AugmentRecipe,
                 shard: tuple[int, int] | None = None) -> Iterator[list[Batch]]:
    """The one-process grid of ``sip augment``, one list of batches per chunk of ``recipe.chunk`` sources,
    holding only the batches of ``shard``. A batch item is ``(position, source id, variant)``; positions count
    unreadable sources too (a batch holding one draws the others, as the one-process run does)."""
    index = 0
    per_image, size = VariantPlan.count_for(recipe.variants, recipe.generate.per_image), recipe.generate.batch_size
    for start in range(0, len(source_ids), recipe.chunk):
        pairs = [(pos, source_ids[pos], v) for pos in range(start, min(start + recipe.chunk, len(source_ids)))
                 for v in range(per_image)]
        batches = batch_grid(pairs, size)
        yield [b for k, b in enumerate(batches, index) if owns(k, shard)]
        index += len(batches)


def synth_grid(classes: Sequence[str], recipe: SynthRecipe, shard: tuple[int, int] | None = None) -> list[Batch]:
    """The one-process grid of ``sip synth`` over ``(label, k)`` items, only the batches of ``shard``."""
    per_class = recipe.generate.per_class + recipe.latent_mix.count  # mixed images after the plain ones
    jobs = [(label, k) for label in classes for k in range(per_class)]
    return [b for k, b in enumerate(batch_grid(jobs, recipe.generate.batch_size)) if owns(k, shard)]


def item_id(item: tuple) -> str:
    """The image id of a grid item (augment ``(position, source id, variant)`` or synth ``(label, k)``)."""
    return variant_id(item[1], item[2]) if len(item) == 3 else synthetic_id(item[0], item[1])


def open_batches(batches: Sequence[Batch], writer: DatasetWriter) -> tuple[list[Batch], int]:
    """The batches with an id still to do, and the number of items of the finished ones (skipped)."""
    todo = [b for b in batches if not all(writer.is_done(item_id(it)) for it in b)]
    return todo, sum(len(b) for b in batches) - sum(len(b) for b in todo)


def open_writer(recipe: AugmentRecipe | SynthRecipe, generator: Any, labels: Sequence[str],
                shard: tuple[int, int] | None, **extra: Any) -> DatasetWriter:
    """The run's writer: ``run.json`` from the recipe and the generator (or its info dict from a worker); a
    folder holding another config is refused (:class:`DatasetWriter`)."""
    defaults = to_dict(type(recipe)())
    return DatasetWriter(recipe.output, run_info(to_dict(recipe), generator, **extra), labels, shard,
                         defaults=defaults)


# --------------------------------------------------------------------------------------------------
# the jobs of a batch and the generate call
# --------------------------------------------------------------------------------------------------

def augment_job(s: Sample, v: int, caption: str, source_hash: str, builder: PromptBuilder, cfg: GenerateConfig,
                negative_prompt: str, settings: dict[str, Any], plan: VariantPlan | None = None) -> Job:
    """The img2img job of variant ``v`` of source ``s``: prompt, per-image seed and metadata record (``plan``:
    the variant's setting, or an inter-class prompt under its target's label, drawn toward it)."""
    label, extra = s.label_name, {}
    if plan is not None:
        variant, extra = variant_fields(plan, s.label_name, s.source_id, v)
        label = variant.prompt_label
    prompt = builder(label, None if extra.get("interclass") else caption, v)
    seed = image_seed(cfg.seed, s.source_id, v)
    record = variant_record(source=s.source_id, source_hash=source_hash, variant=v, caption=caption, prompt=prompt,
                            negative_prompt=negative_prompt, strength=cfg.strength, seed=seed, settings=settings)
    return Job(variant_id(s.source_id, v), label, prompt, seed, {**record, **extra}, payload=s.image)


def augment_jobs(batch: Batch, samples: dict[str, Sample], captions: dict[str, str], hashes: dict[str, str],
                 builder: PromptBuilder, recipe: AugmentRecipe, settings: dict[str, Any],
                 plan: VariantPlan | None = None) -> list[Job]:
    """The jobs of an augment grid batch (``samples`` by source id; unreadable sources have none)."""
    return [augment_job(samples[sid], v, captions[sid], hashes[sid], builder, recipe.generate,
                        recipe.prompt.negative_prompt, settings, plan) for _, sid, v in batch if sid in samples]


def synth_job(label: str, k: int, builder: PromptBuilder, cfg: GenerateConfig, negative_prompt: str,
              settings: dict[str, Any]) -> Job:
    """The txt2img job of image ``k`` of class ``label``."""
    prompt = builder(label, None, k)
    seed = image_seed(cfg.seed, f"txt2img:{label}", k)
    record = variant_record(source=None, source_hash=None, variant=k, caption=None, prompt=prompt,
                            negative_prompt=negative_prompt, strength=None, seed=seed, settings=settings)
    return Job(synthetic_id(label, k), label, prompt, seed, record)


def synth_jobs(batch: Batch, builder: PromptBuilder, recipe: SynthRecipe, settings: dict[str, Any]) -> list[Job]:
    """The jobs of a synth grid batch."""
    return [synth_job(label, k, builder, recipe.generate, recipe.prompt.negative_prompt, settings)
            for label, k in batch]


def batch_generator(generator: Any, mode: str, negative_prompt: str,
                    guidance: Any = None) -> Callable[[Sequence[Job]], list]:
    """The ``generate(batch) -> images`` call of a mode ("img2img": job payloads are the sources, one call per
    setting of the batch), guided toward each job's label by ``guidance`` (a ``ClassifierGuidance``) if given."""
    if mode == "img2img":
        return per_class_adapters(generator, variants_generator(generator, negative_prompt, guidance))
    return per_class_adapters(generator, lambda batch: generator.text2img(
        [j.prompt for j in batch], [j.seed for j in batch], negative_prompt,
        guide=guidance.toward([j.label for j in batch]) if guidance else None))


def per_class_adapters(generator: Any, generate: Callable[[Sequence[Job]], list]) -> Callable[[Sequence[Job]], list]:
    """``generate`` as is, or, with a per-class LoRA adapter (``generator.class_adapters``), one call per label of
    the batch under that label's LoRA, images back in job order (each image's own seed: the same bytes whatever
    batch it is drawn in)."""
    if not getattr(generator, "class_adapters", None):
        return generate

    def by_class(batch: Sequence[Job]) -> list:
        images: list[Any] = [None] * len(batch)
        groups: dict[str, list[int]] = {}
        for i, j in enumerate(batch):
            groups.setdefault(j.label, []).append(i)
        for label, idx in groups.items():
            generator.use_class(label)
            for i, image in zip(idx, generate([batch[i] for i in idx])):
                images[i] = image
        return images
    return by_class


def prompt_builder(prompt: PromptConfig, generator: Any) -> PromptBuilder:
    """The recipe's prompt builder, within the generator's text-encoder budget and counting its tokens."""
    budget = min(prompt.max_tokens, generator.max_prompt_tokens)
    return PromptBuilder.for_tokenizer(PromptConfig(**{**to_dict(prompt), "max_tokens": budget}),
                                       generator.pipe.tokenizer, adapter_tokens(generator.config.adapter))
