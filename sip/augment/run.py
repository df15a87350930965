"""The SIP flow end to end on the local engine: real images → captions → prompts → img2img → filter → writer
(``sip augment``), and labels → prompts → txt2img → filter → writer (``sip synth``, data-free).

What a run is (recipes, checks, the one-process batch grid and a shard's whole batches of it, the skip of
finished ids, the jobs, the writer) is the public job API of :mod:`sip.augment.jobs`, shared with the Ray
engine (:mod:`sip.scale.ray_engine`); this module runs it in this process (one process per rank under
torchrun / accelerate launch). Sources are read a chunk at a time, so memory does not grow with the dataset;
finished ids are skipped, so a killed run resumes where it stopped. A run holds its output folder (or its
shard) exclusively while it writes (:mod:`sip.data.run_lock`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from sip.augment.caption import CaptionCache, Captioner, build_captioner, caption_images
from sip.augment.filter import ImageFilter, build_filter
from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.jobs import (
    AugmentRecipe,
    Batch,
    RunSummary,
    SynthRecipe,
    augment_grid,
    augment_job,
    augment_jobs,
    batch_generator,
    check_output,
    open_batches,
    open_writer,
    prepare_augment,
    prepare_synth,
    prompt_builder,
    synth_classes,
    synth_grid,
    synth_job,
    synth_jobs,
)
from sip.augment.latent_mix import latent_mix_jobs
from sip.augment.loop import generate_and_write
from sip.augment.variants import Teaching, build_teaching
from sip.data.run_lock import hold_output
from sip.data.sources import ImageSource, Sample
from sip.ids import image_hash
from sip.scale.launch import Launch, detect_launch, generation_shard, process_device, warn_if_alone

# the recipes and job builders are imported from here by older code: the job API re-exported
__all__ = ["AugmentRecipe", "RunSummary", "SynthRecipe", "augment_job", "batch_generator", "check_output",
           "domain_mismatch", "prompt_builder", "run_augment", "run_synth", "synth_classes", "synth_job"]

logger = logging.getLogger(__name__)


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


def run_augment(recipe: AugmentRecipe, generator: DiffusionGenerator | None = None,
                captioner: Captioner | None = None, image_filter: ImageFilter | None = None,
                launch: Launch | None = None, teaching: Teaching | None = None) -> RunSummary:
    """Run SIP augmentation as ``recipe`` says; models are built from it unless passed in.

    Args:
        recipe (AugmentRecipe): the resolved recipe.
        generator (DiffusionGenerator, optional): built from ``recipe.generate`` when None.
        captioner (Captioner, optional): built from ``recipe.caption`` when None.
        image_filter (ImageFilter, optional): built from ``recipe.filter`` when None.
        launch (Launch, optional): this process's rank and world (:mod:`sip.scale.launch`); read from the
            launcher's environment when None. Each process of a launch takes the whole grid batches of its rank.
        teaching (Teaching, optional): guidance, variant plan and labeller (:mod:`sip.augment.variants`); built
            from ``recipe.guide`` / ``recipe.variants`` when None.

    Returns:
        RunSummary: counts and failures; images are on disk under ``recipe.output``.

    Raises:
        OutputBusyError: another live run holds the output folder (or this shard of it).
        ValueError: no source image, or the output is inside the input folder.
    """
    if recipe.engine == "ray":
        from sip.augment import steps
        from sip.scale.ray_engine import run_augment_ray

        return run_augment_ray(recipe, steps)
    t0 = time.perf_counter()
    # 1. check inputs before any model is loaded, and hold the output (or this process's shard of it)
    launch = launch or detect_launch()
    shard = generation_shard(recipe.shard, launch)
    source, out = prepare_augment(recipe)
    warn_if_alone(launch)
    with hold_output(out, shard):
        # 2. models (built once, passed to the stages), on this process's GPU under a multi-process launch
        generator = generator or _generator(recipe.generate, launch)
        captioner = captioner or build_captioner(replace(recipe.caption,
                                                         device=process_device(recipe.caption.device, launch)))
        image_filter = image_filter if image_filter is not None else _filter(recipe, launch)
        g = recipe.generate
        teaching = teaching or build_teaching(recipe.guide, recipe.variants, source.classes, g.strength,
                                              g.guidance_scale, g.per_image, generator.device)
        # 3. output folder (refuses a folder written with another config)
        writer = open_writer(recipe, generator, source.classes, shard, captioner=captioner.identity, mode="img2img",
                             **launch.record())
        cache = CaptionCache(recipe.caption.cache or Path(out) / "captions.jsonl")
        summary = _augment_chunks(recipe, source, shard, launch, generator, captioner, image_filter, writer, cache,
                                  teaching)
        summary.complete = writer.finish()
    summary.caption_hits, summary.caption_misses = cache.hits, cache.misses
    summary.seconds = time.perf_counter() - t0
    return summary


def _augment_chunks(recipe: AugmentRecipe, source: ImageSource, shard: tuple[int, int] | None, launch: Launch,
                    generator: DiffusionGenerator, captioner: Captioner, image_filter: ImageFilter | None, writer,
                    cache: CaptionCache, teaching: Teaching) -> RunSummary:
    """Stream caption → prompt → img2img → filter → write over this shard's batches of the one-process grid,
    a chunk of sources at a time; a batch with an id left is drawn whole (the bytes of an uninterrupted run)."""
    chunks = list(augment_grid(list(source.source_ids()), recipe, shard))  # ids only: nothing is decoded yet
    summary = RunSummary(str(recipe.output))
    bar, progress = _bar("augment", sum(len(b) for c in chunks for b in c), recipe, launch, summary)
    builder, settings = prompt_builder(recipe.prompt, generator), teaching.settings(generator.settings())
    generate = batch_generator(generator, "img2img", recipe.prompt.negative_prompt, teaching.guidance)
    warned = False
    for batches in chunks:
        todo, done_here = open_batches(batches, writer)
        summary.skipped += done_here
        progress(done_here)
        if not todo:
            continue
        samples, hashes, captions = _read_and_caption(source, todo, captioner, cache, recipe, summary)
        if not warned and (warning := domain_mismatch(generator, list(samples.values())[:16])):
            logger.warning(warning)  # once per run, on the first chunk drawn
            summary.warnings.append(warning)
        warned = True
        jobs = (augment_jobs(b, samples, captions, hashes, builder, recipe, settings, teaching.plan) for b in todo)
        generate_and_write((j for j in jobs if j), generate, writer, image_filter, summary, progress,
                           teaching.labeller)
    bar.close()
    return summary


def _read_and_caption(source: ImageSource, batches: list[Batch], captioner: Captioner, cache: CaptionCache,
                      recipe: AugmentRecipe, summary: RunSummary):
    """Decode the sources of ``batches`` (unreadable ones are counted in ``summary``) and caption them."""
    view = source.subset(sorted({pos for b in batches for pos, _, _ in b}))
    samples: dict[str, Sample] = {s.source_id: s for s in view}
    summary.add_unreadable([f"{s.path}: {s.reason}" for s in view.skipped])
    hashes = {sid: image_hash(s.image) for sid, s in samples.items()}
    captions = dict(zip(samples, caption_images([s.image for s in samples.values()], captioner, cache,
                                                recipe.caption.batch_size, list(hashes.values()))))
    return samples, hashes, captions


def _bar(desc: str, total: int, recipe, launch: Launch, summary: RunSummary):
    """One progress bar in images (rank 0 only) and its ``progress(n)``, which also shows written / filtered."""
    bar = tqdm(total=total, desc=desc, unit="img", disable=not recipe.progress or launch.rank > 0, dynamic_ncols=True)

    def progress(n: int) -> None:
        bar.update(n)
        bar.set_postfix(written=summary.written, filtered=summary.filtered, refresh=False)

    return bar, progress


def _generator(config: GenerateConfig, launch: Launch) -> DiffusionGenerator:
    return DiffusionGenerator.from_config(replace(config, device=process_device(config.device, launch)))


def _filter(recipe: AugmentRecipe | SynthRecipe, launch: Launch) -> ImageFilter | None:
    return build_filter(replace(recipe.filter, device=process_device(recipe.filter.device, launch)))


def run_synth(recipe: SynthRecipe, generator: DiffusionGenerator | None = None,
              image_filter: ImageFilter | None = None, launch: Launch | None = None,
              teaching: Teaching | None = None) -> RunSummary:
    """Data-free txt2img: ``generate.per_class`` images of each class from its label prompt (the arguments and
    errors are those of :func:`run_augment`)."""
    if recipe.engine == "ray":
        from sip.augment import steps
        from sip.scale.ray_engine import run_synth_ray

        return run_synth_ray(recipe, steps)
    t0 = time.perf_counter()
    launch = launch or detect_launch()
    shard = generation_shard(recipe.shard, launch)
    classes, out = prepare_synth(recipe)
    warn_if_alone(launch)
    with hold_output(out, shard):
        generator = generator or _generator(recipe.generate, launch)
        image_filter = image_filter if image_filter is not None else _filter(recipe, launch)
        teaching = teaching or build_teaching(recipe.guide, None, classes, 1.0, 0.0, 1, generator.device)
        writer = open_writer(recipe, generator, classes, shard, mode="txt2img", **launch.record())
        batches = synth_grid(classes, recipe, shard)  # this shard's whole batches of the one-process grid
        summary = RunSummary(str(out))
        bar, progress = _bar("synth", sum(len(b) for b in batches), recipe, launch, summary)
        builder, settings = prompt_builder(recipe.prompt, generator), teaching.settings(generator.settings())
        generate = batch_generator(generator, "txt2img", recipe.prompt.negative_prompt, teaching.guidance)
        jobs, labeller = (synth_jobs(b, builder, recipe, settings) for b in batches), None
        if recipe.latent_mix.active:  # image k >= per_class of a class: two classes' latents mixed, then decoded
            if generator.class_adapters:
                raise ValueError(f"latent_mix mixes two classes' latents in one image, but generate.adapter "
                                 f"{recipe.generate.adapter} holds one LoRA per class: use a dataset-wide adapter "
                                 "(lora.per_class: false) or set latent_mix.mode: null")
            jobs, generate, labeller = latent_mix_jobs(recipe, classes, generator, teaching, builder, settings,
                                                       batches, synth_job)
        generate_and_write(jobs, generate, writer, image_filter, summary, progress, labeller)
        bar.close()
        summary.complete = writer.finish()
    summary.seconds = time.perf_counter() - t0
    return summary
