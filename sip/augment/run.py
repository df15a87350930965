"""The SIP flow end to end: real images → captions → prompts → img2img → filter → writer
(``sip augment``), and labels → prompts → txt2img → filter → writer (``sip synth``, data-free).

Sources are streamed in chunks, so memory does not grow with the dataset; finished ids are skipped,
so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sip.augment.caption import CaptionCache, CaptionConfig, Captioner, build_captioner, caption_images
from sip.augment.filter import FilterConfig, ImageFilter, build_filter
from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.loop import Job, batch_grid, generate_and_write, run_info, variant_record
from sip.augment.prompts import PromptBuilder, PromptConfig
from sip.config import to_dict
from sip.data.bank import DatasetWriter
from sip.data.sources import FASHION_MNIST_CLASSES, ImageSource, Sample, SourceConfig, open_source
from sip.ids import image_hash, image_seed, in_shard, parse_shard, synthetic_id, variant_id
from sip.scale.launch import Launch, detect_launch, generation_shard, process_device, warn_if_alone
from sip.scale.ray_config import ENGINES, RayConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentRecipe:
    """``sip augment``: SIP img2img augmentation of a labelled image set.

    Attributes:
        source: the real images.
        caption: the captioner.
        prompt: how label and caption become a prompt.
        generate: the diffusion model and its settings.
        filter: optional filter of the variants.
        output: output folder (the layout in writer.py).
        shard: "i/n" to do the i-th of n deterministic parts (null: all). Under a multi-process launch
            (torchrun, accelerate launch) each process takes its part by rank: leave this null.
        chunk: sources captioned and generated per streaming step (memory vs. batching).
        progress: show a progress bar.
        engine: "local" (this process, or one per rank under torchrun / accelerate launch) or "ray" (a Ray
            Data pipeline of reader / captioner and generator actor pools, :mod:`sip.scale.ray_engine`).
        ray: the Ray cluster and pool sizes (``engine: ray`` only).
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

    def __post_init__(self):
        parse_shard(self.shard)
        if self.chunk <= 0:
            raise ValueError(f"chunk must be positive, got {self.chunk}")
        _check_engine(self.engine, self.shard)


@dataclass(frozen=True)
class SynthRecipe:
    """``sip synth``: data-free txt2img synthesis from label prompts.

    Attributes:
        classes: label names to synthesise; empty uses ``source``'s classes.
        source: where class names come from when ``classes`` is empty (no image is read).
        prompt, generate, filter, output, shard, progress, engine, ray: as in :class:`AugmentRecipe`.
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

    def __post_init__(self):
        parse_shard(self.shard)
        _check_engine(self.engine, self.shard)


def _check_engine(engine: str, shard: str | None) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
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


def _run_info(recipe: Any, generator: DiffusionGenerator, extra: dict[str, Any]) -> dict[str, Any]:
    return run_info(to_dict(recipe), generator, **extra)


def check_output(path: str | Path) -> Path:
    """Refuse an output that cannot be written, before any model loads.

    Raises:
        NotADirectoryError: ``path`` (or a parent) is a file.
        PermissionError: the folder (or the nearest existing parent) is not writable.
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
    return out


def domain_mismatch(generator: DiffusionGenerator, samples: list[Sample]) -> str | None:
    """Say how sources look unlike what the model was trained on (size, colour, the model card's domain).

    Returns:
        str | None: a warning naming what differs and how to pass a Stable Diffusion checkpoint, or None.
    """
    if not samples:
        return None
    native = int(generator.native)
    side = max(max(s.image.size) for s in samples)
    card = Path(str(generator.model_id)) / "README.md"
    fmnist = card.is_file() and "fashion-mnist" in card.read_text(errors="replace").lower()
    domain = "fashion-mnist" if fmnist else None
    colour = any(s.image.mode not in ("1", "L", "LA", "I", "I;16", "P")
                 and len({s.image.convert("RGB").resize((8, 8)).getchannel(c).tobytes() for c in "RGB"}) > 1
                 for s in samples)
    why = []
    if side >= 4 * native:
        why.append(f"sources are up to {side} px but the model draws {native}-px images")
    if domain and colour:
        why.append(f"sources are colour images but the model was trained on {domain} (grey)")
    if not why:
        return None
    return (f"the sources look unlike what {generator.model_id} was trained on: " + "; ".join(why) + ". Its images "
            "will not resemble the sources; for photos pass a Stable Diffusion checkpoint, e.g. "
            "`--model stable-diffusion-v1-5/stable-diffusion-v1-5` (generate.model in a recipe).")


def _chunks(source: ImageSource, size: int, keep) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in source:
        if keep(sample):
            chunk.append(sample)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def run_augment(recipe: AugmentRecipe, generator: DiffusionGenerator | None = None,
                captioner: Captioner | None = None, image_filter: ImageFilter | None = None,
                launch: Launch | None = None) -> RunSummary:
    """Run SIP augmentation as ``recipe`` says; models are built from it unless passed in.

    Args:
        recipe (AugmentRecipe): the resolved recipe.
        generator (DiffusionGenerator, optional): built from ``recipe.generate`` when None.
        captioner (Captioner, optional): built from ``recipe.caption`` when None.
        image_filter (ImageFilter, optional): built from ``recipe.filter`` when None.
        launch (Launch, optional): this process's rank and world (:mod:`sip.scale.launch`); read from the
            launcher's environment when None. Each process of a launch does the shard of its rank.

    Returns:
        RunSummary: counts and failures; images are on disk under ``recipe.output``.
    """
    if recipe.engine == "ray":
        from sip.scale.ray_engine import run_augment_ray

        return run_augment_ray(recipe)
    t0 = time.perf_counter()
    # 1. check inputs before any model is loaded
    launch = launch or detect_launch()
    shard = generation_shard(recipe.shard, launch)
    source = open_source(recipe.source)
    if len(source) == 0:
        raise ValueError(f"the input has no images ({recipe.source.kind} {recipe.source.path or ''}); nothing to do")
    check_output(recipe.output)
    warn_if_alone(launch)
    # 2. models (built once, passed to the stages), on this process's GPU under a multi-process launch
    generator = generator or _generator(recipe.generate, launch)
    captioner = captioner or build_captioner(replace(recipe.caption,
                                                     device=process_device(recipe.caption.device, launch)))
    image_filter = image_filter if image_filter is not None else build_filter(
        replace(recipe.filter, device=process_device(recipe.filter.device, launch)))
    builder = prompt_builder(recipe.prompt, generator)
    # 3. output folder (refuses a folder written with another config)
    out = Path(recipe.output)
    writer = DatasetWriter(out, _run_info(recipe, generator, {"captioner": captioner.identity, "mode": "img2img",
                                                            **launch.record()}),
                           source.classes, shard, defaults=to_dict(AugmentRecipe()))
    cache = CaptionCache(recipe.caption.cache or out / "captions.jsonl")
    per_image, cfg = recipe.generate.per_image, recipe.generate
    summary = RunSummary(str(out))
    total = sum(1 for sid in source.source_ids() if in_shard(sid, shard)) * per_image
    bar = tqdm(total=total, desc="augment", unit="img", disable=not recipe.progress or launch.rank > 0,
               dynamic_ncols=True)

    def todo(sample: Sample) -> bool:
        return in_shard(sample.source_id, shard)

    # 4. stream: caption → prompt → img2img → filter → write, a chunk of sources at a time, on a fixed
    #    batch grid (item order of an uninterrupted run), so a resumed run writes the same bytes
    generate = batch_generator(generator, "img2img", recipe.prompt.negative_prompt)

    def progress(n: int) -> None:
        bar.update(n)
        bar.set_postfix(written=summary.written, filtered=summary.filtered, refresh=False)

    def job(s: Sample, v: int, caption: str, source_hash: str) -> Job:
        return augment_job(s, v, caption, source_hash, builder, cfg, recipe.prompt.negative_prompt,
                           generator.settings())

    for n_chunk, chunk in enumerate(_chunks(source, recipe.chunk, todo)):
        if n_chunk == 0 and (warning := domain_mismatch(generator, chunk[:16])):
            logger.warning(warning)  # once per run, on the first chunk
            summary.warnings.append(warning)
        grid = batch_grid([(s, v) for s in chunk for v in range(per_image)], cfg.batch_size)
        open_batches = [b for b in grid if not all(writer.is_done(variant_id(s.source_id, v)) for s, v in b)]
        done_here = sum(len(b) for b in grid) - sum(len(b) for b in open_batches)
        summary.skipped += done_here
        bar.update(done_here)
        if not open_batches:
            continue
        samples = {id(s): s for b in open_batches for s, _ in b}
        pending = list(samples)
        hashes = {k: image_hash(samples[k].image) for k in pending}
        captions = dict(zip(pending, caption_images([samples[k].image for k in pending], captioner, cache,
                                                    recipe.caption.batch_size, [hashes[k] for k in pending])))
        generate_and_write(([job(s, v, captions[id(s)], hashes[id(s)]) for s, v in b] for b in open_batches),
                           generate, writer, image_filter, summary, progress)
    bar.close()
    for skipped in source.skipped:
        summary.failed += 1
        summary.unreadable.append(f"{skipped.path}: {skipped.reason}")
    summary.complete = writer.finish()
    summary.caption_hits, summary.caption_misses = cache.hits, cache.misses
    summary.seconds = time.perf_counter() - t0
    return summary


def augment_job(s: Sample, v: int, caption: str, source_hash: str, builder: PromptBuilder, cfg: GenerateConfig,
                negative_prompt: str, settings: dict[str, Any]) -> Job:
    """The img2img job of variant ``v`` of source ``s``: prompt, per-image seed and metadata record."""
    prompt = builder(s.label_name, caption, v)
    seed = image_seed(cfg.seed, s.source_id, v)
    record = variant_record(source=s.source_id, source_hash=source_hash, variant=v, caption=caption, prompt=prompt,
                            negative_prompt=negative_prompt, strength=cfg.strength, seed=seed, settings=settings)
    return Job(variant_id(s.source_id, v), s.label_name, prompt, seed, record, payload=s.image)


def synth_job(label: str, k: int, builder: PromptBuilder, cfg: GenerateConfig, negative_prompt: str,
              settings: dict[str, Any]) -> Job:
    """The txt2img job of image ``k`` of class ``label``."""
    prompt = builder(label, None, k)
    seed = image_seed(cfg.seed, f"txt2img:{label}", k)
    record = variant_record(source=None, source_hash=None, variant=k, caption=None, prompt=prompt,
                            negative_prompt=negative_prompt, strength=None, seed=seed, settings=settings)
    return Job(synthetic_id(label, k), label, prompt, seed, record)


def batch_generator(generator: DiffusionGenerator, mode: str, negative_prompt: str):
    """The ``generate(batch) -> images`` call of a mode ("img2img": job payloads are the sources)."""
    if mode == "img2img":
        return lambda batch: generator.img2img([j.payload for j in batch], [j.prompt for j in batch],
                                               [j.seed for j in batch], negative_prompt)
    return lambda batch: generator.text2img([j.prompt for j in batch], [j.seed for j in batch], negative_prompt)


def _generator(config: GenerateConfig, launch: Launch) -> DiffusionGenerator:
    return DiffusionGenerator.from_config(replace(config, device=process_device(config.device, launch)))


def prompt_builder(prompt: PromptConfig, generator: DiffusionGenerator) -> PromptBuilder:
    """The recipe's prompt builder, within the generator's text-encoder budget and counting its tokens."""
    budget = min(prompt.max_tokens, generator.max_prompt_tokens)
    return PromptBuilder.for_tokenizer(PromptConfig(**{**to_dict(prompt), "max_tokens": budget}), generator.pipe.tokenizer)


def synth_classes(recipe: SynthRecipe) -> list[str]:
    """The class names to synthesise: explicit, else the source's (no image is decoded)."""
    if recipe.classes:
        return list(recipe.classes)
    if recipe.source.kind == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    return list(open_source(recipe.source).classes)


def run_synth(recipe: SynthRecipe, generator: DiffusionGenerator | None = None,
              image_filter: ImageFilter | None = None, launch: Launch | None = None) -> RunSummary:
    """Data-free txt2img: ``generate.per_class`` images of each class from its label prompt (the arguments are
    those of :func:`run_augment`)."""
    if recipe.engine == "ray":
        from sip.scale.ray_engine import run_synth_ray

        return run_synth_ray(recipe)
    t0 = time.perf_counter()
    launch = launch or detect_launch()
    shard = generation_shard(recipe.shard, launch)
    classes = synth_classes(recipe)
    if not classes:
        raise ValueError("no classes to synthesise: set classes: [...] or a source with labels")
    check_output(recipe.output)
    warn_if_alone(launch)
    generator = generator or _generator(recipe.generate, launch)
    image_filter = image_filter if image_filter is not None else build_filter(
        replace(recipe.filter, device=process_device(recipe.filter.device, launch)))
    builder = prompt_builder(recipe.prompt, generator)
    out = Path(recipe.output)
    writer = DatasetWriter(out, _run_info(recipe, generator, {"mode": "txt2img", **launch.record()}), classes, shard,
                           defaults=to_dict(SynthRecipe()))
    cfg = recipe.generate
    jobs = [(label, k) for label in classes for k in range(cfg.per_class) if in_shard(f"{label}\x00{k}", shard)]
    summary = RunSummary(str(out))
    bar = tqdm(total=len(jobs), desc="synth", unit="img", disable=not recipe.progress or launch.rank > 0,
               dynamic_ncols=True)

    def job(label: str, k: int) -> Job:
        return synth_job(label, k, builder, cfg, recipe.prompt.negative_prompt, generator.settings())

    generate = batch_generator(generator, "txt2img", recipe.prompt.negative_prompt)

    def progress(n: int) -> None:
        bar.update(n)
        bar.set_postfix(written=summary.written, filtered=summary.filtered, refresh=False)

    # a fixed batch grid over every job of this shard (see sip.augment.loop)
    generate_and_write(([job(label, k) for label, k in b] for b in batch_grid(jobs, cfg.batch_size)), generate,
                       writer, image_filter, summary, progress)
    bar.close()
    summary.complete = writer.finish()
    summary.seconds = time.perf_counter() - t0
    return summary
