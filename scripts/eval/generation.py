"""Every image the evaluation generates, made by sip's own path: one :class:`DiffusionGenerator` (sampling
settings per call), prompts from :class:`PromptBuilder`, seeds from :func:`image_seed` keyed as ``sip augment``
/ ``sip synth`` key them, batches from :func:`batch_grid` run by :func:`generate_and_write` (sip's one
generate loop), into memory instead of a dataset folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.loop import Job, batch_grid, generate_and_write
from sip.augment.prompts import PromptBuilder, PromptConfig
from sip.augment.run import RunSummary
from sip.data.fashion_mnist import FASHION_MNIST_READABLE
from sip.ids import image_seed, synthetic_id, variant_id

from .config import CLASSES, EvalConfig
from .data import to_rgb_array


class ImagesInMemory:
    """The writer side of :func:`generate_and_write`, keeping each image by its job id (nothing to resume)."""

    def __init__(self):
        self.images: dict[str, Image.Image] = {}

    def is_done(self, job_id: str) -> bool:
        return job_id in self.images

    def write(self, job_id: str, image: Image.Image, label: str, record: dict[str, Any]) -> None:
        self.images[job_id] = image

    def reject(self, job_id: str, label: str, record: dict[str, Any]) -> None:
        raise AssertionError("the evaluation runs no filter")


class SipGeneration:
    """sip's generation path for this evaluation, counting images and seconds.

    Args:
        pipe: the diffusers img2img pipeline, loaded the way a user's checkpoint is.
        model_id (str): recorded as the generator's model.
        cfg (EvalConfig): steps, batch size, precision.
        progress (bool): show a progress bar per call.
        **generate: further ``GenerateConfig`` settings (e.g. ``cache_interval``).
    """

    def __init__(self, pipe: Any, model_id: str, cfg: EvalConfig, progress: bool, **generate: Any):
        config = GenerateConfig(model=model_id, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                precision=cfg.precision, **generate)  # type: ignore[arg-type]
        self.generator = DiffusionGenerator(pipe, config, model_id)
        prompt_config = PromptConfig(label_names=dict(FASHION_MNIST_READABLE),
                                     max_tokens=self.generator.max_prompt_tokens,
                                     parts="caption" if cfg.prompts == "caption_only" else "label+caption")
        self.builder = PromptBuilder.for_tokenizer(prompt_config, pipe.tokenizer)
        self.batch_size, self.progress = cfg.batch_size, progress
        self.images = 0
        self.seconds = 0.0

    def img2img(self, sources: Sequence[Image.Image], labels: Sequence[int], captions: Sequence[str] | None,
                source_ids: Sequence[str], variants: int, strength: float, guidance: float, seed: int,
                desc: str, steps: int | None = None) -> np.ndarray:
        """``variants`` redraws of each source under (label, caption) → RGB uint8 [N·variants, 32, 32, 3],
        source-major (the variants of source i are rows i·variants … i·variants + variants − 1); ``steps``: the
        generator's own when None."""

        def job(i: int, v: int) -> Job:
            label = CLASSES[labels[i]]
            prompt = self.builder(label, captions[i] if captions else None, v)
            return Job(variant_id(source_ids[i], v), label, prompt, image_seed(seed, source_ids[i], v), {},
                       payload=sources[i])

        def generate(batch: Sequence[Job]) -> list[Image.Image]:
            return self.generator.img2img([j.payload for j in batch], [j.prompt for j in batch],
                                          [j.seed for j in batch], strength=strength, guidance_scale=guidance,
                                          steps=steps)

        return self._run([job(i, v) for i in range(len(sources)) for v in range(variants)], generate, desc)

    def text2img(self, per_class: int, guidance: float, seed: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
        """``per_class`` images of every class from its label prompt → (RGB uint8 [N, 32, 32, 3], labels)."""

        def job(c: int, k: int) -> Job:
            label = CLASSES[c]
            return Job(synthetic_id(label, k), label, self.builder(label, None, k),
                       image_seed(seed, f"txt2img:{label}", k), {})

        def generate(batch: Sequence[Job]) -> list[Image.Image]:
            return self.generator.text2img([j.prompt for j in batch], [j.seed for j in batch],
                                           guidance_scale=guidance)

        jobs = [(c, k) for c in range(len(CLASSES)) for k in range(per_class)]
        rgb = self._run([job(c, k) for c, k in jobs], generate, desc)
        return rgb, np.array([c for c, _ in jobs], dtype=np.int64)

    def _run(self, jobs: list[Job], generate: Callable[[Sequence[Job]], list[Image.Image]], desc: str) -> np.ndarray:
        """The jobs on sip's batch grid through sip's loop; their images in job order as RGB uint8."""
        out, summary = ImagesInMemory(), RunSummary(output="memory")
        t0 = time.time()
        with tqdm(total=len(jobs), desc=desc, unit="img", disable=not self.progress, leave=False,
                  dynamic_ncols=True) as bar:
            generate_and_write(batch_grid(jobs, self.batch_size), generate, out, None, summary, bar.update)
        if summary.failed:  # the loop counts a failed batch and goes on; a measurement cannot
            raise RuntimeError(f"{desc}: {summary.failed} images failed: "
                               + "; ".join(f"{n}× {r}" for r, n in summary.reasons.most_common(3)))
        self.images += len(jobs)
        self.seconds += time.time() - t0
        return to_rgb_array([out.images[j.id] for j in jobs])


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
