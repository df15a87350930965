"""The one generate-and-write loop and the one metadata record builder.

Work is cut into a fixed *batch grid*: batches are composed from the item order of an uninterrupted
run, never from what is left to do. On resume, a grid batch with some items already written is
regenerated whole (so every image sees the same batch as in a clean run, and batched float kernels
round the same way) and only its missing items are written: a resumed run is byte-identical to an
uninterrupted one at full speed, without ``batch_invariant``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from sip.augment.filter import ImageFilter, keep_all

# What a batch may fail with because of its inputs or the machine (out of memory, an image that does not
# decode): counted per image with the reason, and the run goes on. Anything else (a ValueError from a
# misaligned call, a TypeError …) is a programming error and propagates.
GENERATION_FAULTS: tuple[type[BaseException], ...] = (
    torch.OutOfMemoryError, UnidentifiedImageError, Image.DecompressionBombError, OSError)


@dataclass(frozen=True)
class Job:
    """One image to make: its id, label, prompt, seed and the metadata that goes with it (no scores yet)."""

    id: str
    label: str
    prompt: str
    seed: int
    record: dict[str, Any]
    payload: Any = None  # what the generate call needs besides prompt and seed (the source image for img2img)


def variant_record(*, source: str | None, source_hash: str | None, variant: int, caption: str | None,
                   prompt: str, negative_prompt: str, strength: float | None, seed: int,
                   settings: dict[str, Any]) -> dict[str, Any]:
    """The metadata line of one generated image (without ``file_name``, ``label``, ``scores``, ``created``,
    which the writer and the filter add).

    Args:
        source (str | None): source id (relative path), None for txt2img.
        source_hash (str | None): content hash of the source image, None for txt2img.
        variant (int): variant index of the source (img2img) or image index of the class (txt2img).
        caption (str | None): the source's caption, None for txt2img.
        prompt (str): the prompt the image was drawn under.
        negative_prompt (str): the negative prompt.
        strength (float | None): img2img strength, None for txt2img.
        seed (int): the image's own seed.
        settings (dict): the generator's per-call settings (:meth:`DiffusionGenerator.settings`).
    """
    return {"source": source, "source_hash": source_hash, "variant": variant, "caption": caption,
            "prompt": prompt, "negative_prompt": negative_prompt, "strength": strength, "seed": seed, **settings}


def generator_info(generator: Any) -> dict[str, Any]:
    """What ``run.json`` says of the generator: model, scheduler, device, bf16, generation size."""
    from sip.runtime import describe_device

    return {"model": generator.model_id, "scheduler": type(generator.pipe.scheduler).__name__,
            "device": describe_device(generator.device), "bf16_autocast": generator.bf16,
            "generation_size": generator.size}


def run_info(config: dict[str, Any], generator: Any, **extra: Any) -> dict[str, Any]:
    """The ``run.json`` contents of a generation run: sip version, resolved config, model, device, settings.

    Args:
        config (dict): the resolved config (``sip.config.to_dict(recipe)``).
        generator (DiffusionGenerator | dict): the generator the run uses, or its :func:`generator_info`
            (from a worker, when the generator lives in another process).
        **extra: more keys (``mode``, ``captioner`` …).
    """
    import sip

    info = generator if isinstance(generator, dict) else generator_info(generator)
    return {"sip_version": sip.__version__, "config": config, **info, **extra}


def batch_grid(items: Sequence[Any], batch_size: int) -> list[list[Any]]:
    """Cut ``items`` (in the order of an uninterrupted run) into consecutive batches of ``batch_size``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


@dataclass(frozen=True)
class Outcome:
    """What became of one job of a generated batch: an image kept or dropped by the filter, or a failure."""

    id: str
    label: str
    record: dict[str, Any]
    keep: bool = False
    image: Image.Image | None = None
    failure: str | None = None  # "<Error>: <message>" when the batch could not be generated


def make_batch(batch: Sequence[Job], generate: Callable[[Sequence[Job]], list[Image.Image]],
               image_filter: ImageFilter | None, labeller: Callable | None = None) -> list[Outcome]:
    """Generate one grid batch whole and filter it: one :class:`Outcome` per job, in order. A ``labeller``
    ``(jobs, images) -> [(label, record additions)]`` labels images after drawing (inter-class variants).

    Raises:
        Exception: anything not in :data:`GENERATION_FAULTS` (a programming error) propagates.
    """
    try:
        images = generate(batch)  # the whole grid batch, so its bytes match an uninterrupted run
    except GENERATION_FAULTS as e:  # out of memory, an undecodable image: every job fails with the reason
        reason = f"{type(e).__name__}: {str(e)[:120]}"
        return [Outcome(j.id, j.label, j.record, failure=reason) for j in batch]
    named = labeller(batch, images) if labeller is not None else [(j.label, {}) for j in batch]
    labels, prompts = [label for label, _ in named], [j.prompt for j in batch]
    verdicts = image_filter(images, labels, prompts) if image_filter is not None else keep_all(len(images))
    return [Outcome(job.id, label, {**job.record, **extra, "scores": scores}, keep, image)
            for job, image, (label, extra), (keep, scores) in zip(batch, images, named, verdicts)]


def write_outcomes(outcomes: Sequence[Outcome], writer: Any, summary: Any) -> None:
    """Write the kept images and the rejections of a batch; ids already done are counted as skipped."""
    for o in outcomes:
        if writer.is_done(o.id):
            summary.skipped += 1
        elif o.failure is not None:
            summary.failed += 1
            summary.reasons[o.failure] += 1
        elif o.keep:
            writer.write(o.id, o.image, o.label, o.record)
            summary.written += 1
        else:
            writer.reject(o.id, o.label, o.record)
            summary.filtered += 1


def generate_and_write(batches: Iterable[Sequence[Job]], generate: Callable[[Sequence[Job]], list[Image.Image]],
                       writer: Any, image_filter: ImageFilter | None, summary: Any,
                       progress: Callable[[int], None] = lambda n: None, labeller: Callable | None = None) -> None:
    """Generate each grid batch that has a missing item, filter it and write its missing items.

    Args:
        batches (Iterable[Sequence[Job]]): the fixed batch grid (see :func:`batch_grid`).
        generate (Callable): makes one image per job of a batch, in order.
        writer (DatasetWriter): the output (``is_done``, ``write``, ``reject``).
        image_filter (ImageFilter, optional): keeps or drops each image; None keeps all.
        summary: a RunSummary (``written``, ``skipped``, ``filtered``, ``failed``, ``reasons``) updated in place.
        progress (Callable[[int], None], optional): called with the number of items each batch settled.
        labeller (Callable, optional): labels images after drawing (see :func:`make_batch`); None keeps the jobs'.

    Raises:
        Exception: anything not in :data:`GENERATION_FAULTS` (a programming error) propagates.
    """
    for batch in batches:
        if all(writer.is_done(job.id) for job in batch):
            summary.skipped += len(batch)
        else:
            write_outcomes(make_batch(batch, generate, image_filter, labeller), writer, summary)
        progress(len(batch))
