"""Feature caching (``generate.cache_interval``) and token merging (``generate.token_merge_ratio``) side by side
in one run, for scripts/bench_generate.py: images/s, UNet time, full UNet calls, and how far the images move
from the exact ones (in grey levels, beside what a different seed moves them)."""

from __future__ import annotations

import time

import numpy as np

from sip.augment.loop import Job, batch_grid

from .img2img_runs import contiguous, sip_img2img
from .machine import StageTimer, networks

GRID = [(1, 0.0), (2, 0.0), (3, 0.0), (1, 0.5), (2, 0.5), (3, 0.5)]  # (cache_interval, token_merge_ratio)


def _generator(pipe, settings: dict, size: int, batch_size: int, interval: int, ratio: float):
    from sip.augment.generate import DiffusionGenerator, GenerateConfig

    config = GenerateConfig(model="bench", strength=settings["strength"],
                            guidance_scale=settings["guidance_scale"], steps=settings["steps"], batch_size=batch_size, resolution=size, precision="fp32",
                            device="cpu", cache_interval=interval, token_merge_ratio=ratio)
    return DiffusionGenerator(pipe, config, model_id="bench")


def _run(generator, jobs: list[Job], batch_size: int) -> tuple[list, float, StageTimer]:
    timer = StageTimer(networks(generator.pipe))
    full = [0]  # full UNet calls: a cache call does not reach the mid block's resnet
    deep = generator.pipe.unet.mid_block.resnets[0].register_forward_hook(
        lambda *a: full.__setitem__(0, full[0] + 1))
    images, t0 = [], time.perf_counter()
    for batch in batch_grid(jobs, batch_size):
        images += sip_img2img(generator, batch, "")
    seconds = time.perf_counter() - t0
    deep.remove()
    timer.remove()
    timer.calls["unet_full"] = full[0]
    return images, seconds, timer


def _diff(a: list, b: list) -> tuple[float, int]:
    """(mean, max) |a - b| in grey levels over aligned image lists."""
    d = [np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)) for x, y in zip(a, b)]
    return float(np.mean([x.mean() for x in d])), int(max(x.max() for x in d))


def bench_unet_speedups(pipe, jobs: list[Job], settings: dict, size: int, batch_size: int, rounds: int,
                        label: str = "tiny") -> dict:
    """Every (cache_interval, token_merge_ratio) of :data:`GRID` on the same jobs, ``rounds`` times in turn (the
    best round counts: other processes on the machine only ever slow a run down); prints a table.

    Returns:
        dict: summary keys ``{label}_cache{i}_tome{r}_x`` (speed-up over both off) and ``..._mean_diff``.
    """
    contiguous(pipe)
    batch_size = min(batch_size, len(jobs))
    print(f"\n## {label}: feature caching (DeepCache) and token merging (ToMe), {len(jobs)} images, batch "
          f"{batch_size}, fp32, {int(settings['steps'] * settings['strength'])} denoising steps, best of {rounds} "
          f"rounds", flush=True)
    gens = {opt: _generator(pipe, settings, size, batch_size, *opt) for opt in GRID}
    _run(gens[GRID[0]], jobs[:batch_size], batch_size)  # warm-up: oneDNN's kernels for these shapes
    best: dict = {}
    for _ in range(rounds):
        for opt, gen in gens.items():
            images, seconds, timer = _run(gen, jobs, batch_size)
            if opt not in best or seconds < best[opt][1]:
                best[opt] = (images, seconds, timer)
    exact = best[GRID[0]][0]
    reseeded = [Job(j.id, j.label, j.prompt, j.seed + 1, j.record, j.payload) for j in jobs]
    seed_diff = _diff(exact, _run(gens[GRID[0]], reseeded, batch_size)[0])[0]
    header = (f"{'cache':>5} {'ToMe':>5} {'img/s':>8} {'x off':>6} {'UNet ms/img':>11} {'full UNet':>9} "
              f"{'mean|d|':>7} {'max|d|':>6}")
    print(header)
    print("-" * len(header))
    base_rate = len(exact) / best[GRID[0]][1]
    out = {}
    for (interval, ratio), (images, seconds, timer) in best.items():
        rate, (mean, worst) = len(images) / seconds, _diff(images, exact)
        full = f"{timer.calls['unet_full']}/{timer.calls['unet']}"
        print(f"{interval:>5} {ratio:>5.2f} {rate:>8.1f} {rate / base_rate:>6.2f} "
              f"{1000 * timer.seconds['unet'] / len(images):>11.2f} {full:>9} {mean:>7.2f} {worst:>6}")
        key = f"{label}_cache{interval}_tome{ratio:g}"
        out[f"{key}_x"], out[f"{key}_mean_diff"] = rate / base_rate, mean
    print(f"(x off = images/s over cache 1 / ToMe 0, the exact images; full UNet = UNet calls that ran every "
          f"block; mean|d| / max|d| = difference from the exact image with the same seed, in grey levels; a "
          f"different seed moves the exact images by {seed_diff:.2f} on average)")
    out[f"{label}_speedups_seed_mean_diff"] = seed_diff
    return out
