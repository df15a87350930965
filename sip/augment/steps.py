"""The job API an engine drives (``sip.scale`` engines take it as an argument, so ``sip.scale`` never imports
``sip.augment``): set-up, the one-process grid, the skip of finished ids and the writer from
:mod:`sip.augment.jobs`, plus the work of a grid batch as steps a worker process runs on plain rows.

A row is a dict ``{"items": <grid batch>}``; :class:`ReadCaptionStep` adds the decoded samples and captions
(``sip augment``), :class:`GenerateStep` turns it into a result (outcomes plus caption bookkeeping) that the one
writer settles with :func:`settle`. Steps set the torch thread count they are given (the driver's), since CPU
sums depend on it: the bytes then equal the local engine's.
"""

from __future__ import annotations

from typing import Any

from sip.augment.caption import CaptionCache, build_captioner, caption_images
from sip.augment.filter import build_filter
from sip.augment.generate import DiffusionGenerator
from sip.augment.jobs import (
    AugmentRecipe,
    RunSummary,
    SynthRecipe,
    augment_grid,
    augment_jobs,
    batch_generator,
    open_batches,
    open_writer,
    prepare_augment,
    prepare_synth,
    prompt_builder,
    synth_grid,
    synth_jobs,
)
from sip.augment.loop import generator_info, make_batch, write_outcomes
from sip.config import from_dict
from sip.data.sources import open_source
from sip.ids import image_hash

__all__ = ["CaptionCache", "GenerateStep", "ReadCaptionStep", "RunSummary", "augment_grid", "describe",
           "open_batches", "open_writer", "prepare_augment", "prepare_synth", "recipe_type", "settle", "synth_grid"]


def recipe_type(kind: str) -> type:
    """The recipe class of ``"augment"`` or ``"synth"``."""
    return AugmentRecipe if kind == "augment" else SynthRecipe


def _threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


class ReadCaptionStep:
    """Reader + captioner: decodes the sources of a grid batch (from a source opened once) and captions them."""

    def __init__(self, recipe: dict[str, Any], cache_path: str | None, threads: int):
        _threads(threads)
        self.recipe = from_dict(AugmentRecipe, recipe)
        self.source = open_source(self.recipe.source)
        self.captioner = build_captioner(self.recipe.caption)
        self.cache = CaptionCache(cache_path)
        self.cache.path = None  # read only: the driver is the one writer of captions.jsonl

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        view = self.source.subset(sorted({pos for pos, _, _ in row["items"]}))
        samples = {s.source_id: s for s in view}
        hashes = {sid: image_hash(s.image) for sid, s in samples.items()}
        identity = self.captioner.identity
        missing = {sid for sid, h in hashes.items() if self.cache.get(h, identity) is None}  # before captioning
        captions = dict(zip(samples, caption_images([s.image for s in samples.values()], self.captioner, self.cache,
                                                    self.recipe.caption.batch_size, list(hashes.values()))))
        row["samples"], row["hashes"], row["captions"] = samples, hashes, captions
        row["new_captions"] = [(hashes[sid], identity, captions[sid]) for sid in missing]
        row["caption_hits"], row["caption_misses"] = len(samples) - len(missing), len(missing)
        row["unreadable"] = [f"{s.path}: {s.reason}" for s in view.skipped]
        return row


class GenerateStep:
    """Generator: builds the jobs of a grid batch, draws them whole, filters them."""

    def __init__(self, kind: str, recipe: dict[str, Any], threads: int):
        _threads(threads)
        self.kind = kind
        self.recipe = from_dict(recipe_type(kind), recipe)
        self.generator = DiffusionGenerator.from_config(self.recipe.generate)
        self.filter = build_filter(self.recipe.filter)
        self.builder = prompt_builder(self.recipe.prompt, self.generator)
        self.generate = batch_generator(self.generator, "img2img" if kind == "augment" else "txt2img",
                                        self.recipe.prompt.negative_prompt)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        settings = self.generator.settings()
        if self.kind == "augment":
            jobs = augment_jobs(row["items"], row["samples"], row["captions"], row["hashes"], self.builder,
                                self.recipe, settings)
        else:
            jobs = synth_jobs(row["items"], self.builder, self.recipe, settings)
        outcomes = make_batch(jobs, self.generate, self.filter) if jobs else []
        return {"size": len(row["items"]), "outcomes": outcomes, "new_captions": row.get("new_captions", []),
                "unreadable": row.get("unreadable", []), "caption_hits": row.get("caption_hits", 0),
                "caption_misses": row.get("caption_misses", 0)}


def describe(kind: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """Run where a generator step runs: what ``run.json`` says of the generator (and, for ``augment``, the
    captioner identity that keys the caption cache), as the steps will build them."""
    parsed = from_dict(recipe_type(kind), recipe)
    info = generator_info(DiffusionGenerator.from_config(parsed.generate))
    if kind == "augment":
        info["captioner"] = build_captioner(parsed.caption).identity
    return info


def settle(result: dict[str, Any], writer: Any, summary: RunSummary, cache: CaptionCache | None) -> None:
    """Write a generator step's result (the driver is the one writer) and count its captions and failures."""
    write_outcomes(result["outcomes"], writer, summary)
    if cache is not None:  # the steps looked captions up; the driver counts and stores them
        cache.hits += result["caption_hits"]
        cache.misses += result["caption_misses"]
        cache.put(item for item in result["new_captions"] if cache.get(item[0], item[1]) is None)
    summary.add_unreadable(result["unreadable"])
