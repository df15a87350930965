"""The two ways to run img2img that scripts/bench_generate.py compares: the baseline, diffusers used well (one
batched pipeline call per batch, at the row's precision), and sip's (``DiffusionGenerator.img2img`` on the same
batch grid), each timed per network."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from sip.augment.loop import Job, batch_grid

from .machine import StageTimer, networks


@dataclass
class RunResult:
    """One timed run: its images, wall and process CPU seconds, per-network times and its settings."""

    name: str
    images: list
    seconds: float
    cpu_seconds: float
    timer: StageTimer
    batch_size: int = 1
    channels_last: bool = False
    precision: str = "fp32"
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.images) / self.seconds

    @property
    def cpu_rate(self) -> float:
        """Images per process CPU second: less sensitive than wall time to other processes taking turns on
        the cores (not immune: cache sharing, and threads spinning at barriers count as CPU time)."""
        return len(self.images) / self.cpu_seconds


BASELINE = "diffusers-batched"


def bf16_weights(pipe):
    """The pipeline as ``from_pretrained(..., torch_dtype=torch.bfloat16)`` loads it: a copy with bf16 weights."""
    import copy

    return copy.deepcopy(pipe).to(torch.bfloat16)


def run_baseline(pipe, jobs: list[Job], settings: dict, negative_prompt: str, label: str, batch_size: int,
                 precision: str, bf16_pipe=None) -> RunResult:
    """Diffusers used well: one batched pipeline call per batch of sip's batch grid
    (``pipe(prompt=[...], image=[...], generator=[...])``, one seeded generator per image, as sip seeds them), at
    ``precision``: fp32 weights, or bf16 weights (``bf16_pipe``, what ``torch_dtype=torch.bfloat16`` loads).

    Same pipeline, scheduler, steps, strength, guidance, prompts, sources and seeds as the sip row it is
    compared with; what sip adds beyond it (one VAE encode per source, one text encoding per distinct prompt,
    channels-last, compile, DeepCache / ToMe, a few-step model) is what the ratio measures.
    """
    runner = pipe if precision == "fp32" else bf16_pipe
    if runner is None:
        raise ValueError(f"a {precision} baseline needs the bf16-weight pipeline (bf16_weights(pipe))")
    timer = StageTimer(networks(runner))
    images = []
    c0, t0 = time.process_time(), time.perf_counter()
    with tqdm(total=len(jobs), desc=f"{label} {BASELINE} b{batch_size} {precision}", unit="img", file=sys.stderr,
              leave=False) as bar:
        for batch in batch_grid(jobs, batch_size):
            out = runner(prompt=[j.prompt for j in batch], image=[j.payload for j in batch],
                         negative_prompt=[negative_prompt] * len(batch), strength=settings["strength"],
                         num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                         generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch], output_type="pil")
            images += out.images
            bar.update(len(batch))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    timer.remove()
    return RunResult(BASELINE, images, seconds, cpu, timer, batch_size, False, precision)


def contiguous(pipe) -> None:
    """Put the UNet and VAE back in the default memory format (undo a channels_last run)."""
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)


def make_generator(pipe, settings: dict, size: int, batch_size: int, channels_last: bool, precision: str,
                   tiny_vae=None, **options):
    """A fresh :class:`DiffusionGenerator` (empty prompt cache) over ``pipe`` with these settings; ``options``
    are further :class:`GenerateConfig` fields (``cache_interval``, ``token_merge_ratio``)."""
    from sip.augment.generate import DiffusionGenerator, GenerateConfig, prepare_pipeline

    contiguous(pipe)
    config = GenerateConfig(model="bench", strength=settings["strength"],
                            guidance_scale=settings["guidance_scale"], steps=settings["steps"],
                            batch_size=batch_size, resolution=size, precision=precision,
                            channels_last=channels_last, device="cpu", **options)
    return DiffusionGenerator(prepare_pipeline(pipe, config), config, model_id="bench", tiny_vae=tiny_vae)


def sip_img2img(generator, batch: list[Job], negative_prompt: str) -> list:
    """One ``DiffusionGenerator.img2img`` call on a batch of jobs (the payload is the source image)."""
    return generator.img2img([j.payload for j in batch], [j.prompt for j in batch], [j.seed for j in batch],
                             negative_prompt)


def run_sip(pipe, jobs: list[Job], settings: dict, size: int, negative_prompt: str, label: str,
            batch_size: int, channels_last: bool, precision: str, warmup: bool, tiny_vae=None,
            **options) -> RunResult:
    """sip's img2img stage: ``DiffusionGenerator.img2img`` on sip's batch grid of the jobs (``options``: more
    :class:`GenerateConfig` fields, as in :func:`make_generator`)."""
    if warmup:  # oneDNN builds its kernels for each new shape once; keep that out of the timing
        warm = make_generator(pipe, {**settings, "steps": 2, "strength": 0.5}, size, batch_size,
                              channels_last, precision)
        sip_img2img(warm, jobs[:batch_size], negative_prompt)
    generator = make_generator(pipe, settings, size, batch_size, channels_last, precision, tiny_vae, **options)
    timer = StageTimer(networks(pipe))
    images = []
    c0, t0 = time.process_time(), time.perf_counter()
    tag = "".join(f" {k[:5]}={v}" for k, v in options.items())
    with tqdm(total=len(jobs), desc=f"{label} sip b{batch_size}{' cl' if channels_last else ''} {precision}{tag}",
              unit="img", file=sys.stderr, leave=False) as bar:
        for batch in batch_grid(jobs, batch_size):
            images += sip_img2img(generator, batch, negative_prompt)
            bar.update(len(batch))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    timer.remove()
    contiguous(pipe)
    return RunResult("sip", images, seconds, cpu, timer, batch_size, channels_last, precision, extra=dict(options))


def max_abs_diff(a: list, b: list) -> tuple[int, int, int]:
    """(max |a - b| in grey levels, values that differ, values compared) over aligned image lists."""
    worst, differ, total = 0, 0, 0
    for x, y in zip(a, b):
        d = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
        worst, differ, total = max(worst, int(d.max())), differ + int((d > 0).sum()), total + d.size
    return worst, differ, total
