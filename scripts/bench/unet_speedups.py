"""Feature caching (``generate.cache_interval``) and token merging (``generate.token_merge_ratio``) side by side
in one run, for scripts/bench_generate.py: images/s, UNet time, full UNet calls, and how far the images move
from the exact ones (in grey levels, beside what a different seed moves them)."""

from __future__ import annotations

import time

import numpy as np

from sip.augment.loop import Job, batch_grid

from .img2img_runs import contiguous, make_generator, sip_img2img
from .machine import StageTimer, networks

GRID = [(1, 0.0), (2, 0.0), (3, 0.0), (1, 0.5), (2, 0.5), (3, 0.5)]  # (cache_interval, token_merge_ratio)


def full_block(unet):
    """The module only a full UNet call reaches: a DeepCache call stops before the mid block's first resnet, so
    its StageTimer ``calls`` count the calls that ran every block."""
    return unet.mid_block.resnets[0]


def _run(generator, jobs: list[Job], batch_size: int) -> tuple[list, float, StageTimer]:
    timer = StageTimer({**networks(generator.pipe), "unet_full": full_block(generator.pipe.unet)})
    images, t0 = [], time.perf_counter()
    for batch in batch_grid(jobs, batch_size):
        images += sip_img2img(generator, batch, "")
    seconds = time.perf_counter() - t0
    timer.remove()
    return images, seconds, timer


def _diff(a: list, b: list) -> tuple[float, int]:
    """(mean, max) |a - b| in grey levels over aligned image lists."""
    d = [np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)) for x, y in zip(a, b)]
    return float(np.mean([x.mean() for x in d])), int(max(x.max() for x in d))


def bench_unet_speedups(pipe, jobs: list[Job], settings: dict, size: int, batch_size: int, rounds: int,
                        label: str = "tiny", baseline=None) -> dict:
    """Every (cache_interval, token_merge_ratio) of :data:`GRID` on the same jobs, ``rounds`` times in turn (the
    best round counts: other processes on the machine only ever slow a run down); prints a table.

    Args:
        baseline: a callable ``jobs -> images`` (diffusers' batched call at the same batch and precision), timed in
            the same rounds, so each way's ``x base`` compares best round with best round.

    Returns:
        dict: summary keys ``{label}_cache{i}_tome{r}_x`` (speed-up over both off), ``..._x_baseline``,
        ``..._images_per_s``, ``..._max_diff`` (grey levels from the exact images) and ``..._mean_diff``.
    """
    contiguous(pipe)
    batch_size = min(batch_size, len(jobs))
    print(f"\n## {label}: feature caching (DeepCache) and token merging (ToMe), {len(jobs)} images, batch "
          f"{batch_size}, fp32, {int(settings['steps'] * settings['strength'])} denoising steps, best of {rounds} "
          f"rounds", flush=True)
    gens = {(interval, ratio): make_generator(pipe, settings, size, batch_size, False, "fp32",
                                              cache_interval=interval, token_merge_ratio=ratio)
            for interval, ratio in GRID}
    _run(gens[GRID[0]], jobs[:batch_size], batch_size)  # warm-up: oneDNN's kernels for these shapes
    best: dict = {}
    base_seconds = float("inf")
    for _ in range(rounds):
        if baseline is not None:
            t0 = time.perf_counter()
            baseline(jobs)
            base_seconds = min(base_seconds, time.perf_counter() - t0)
        for opt, gen in gens.items():
            images, seconds, timer = _run(gen, jobs, batch_size)
            if opt not in best or seconds < best[opt][1]:
                best[opt] = (images, seconds, timer)
    exact = best[GRID[0]][0]
    reseeded = [Job(j.id, j.label, j.prompt, j.seed + 1, j.record, j.payload) for j in jobs]
    seed_diff = _diff(exact, _run(gens[GRID[0]], reseeded, batch_size)[0])[0]
    header = (f"{'cache':>5} {'ToMe':>5} {'img/s':>8} {'x off':>6} {'x base':>6} {'UNet ms/img':>11} "
              f"{'full UNet':>9} {'mean|d|':>7} {'max|d|':>6}")
    print(header)
    print("-" * len(header))
    base_rate = len(exact) / best[GRID[0]][1]
    out = {}
    for (interval, ratio), (images, seconds, timer) in best.items():
        rate, (mean, worst) = len(images) / seconds, _diff(images, exact)
        full = f"{timer.calls['unet_full']}/{timer.calls['unet']}"
        x_base = rate * base_seconds / len(jobs)
        print(f"{interval:>5} {ratio:>5.2f} {rate:>8.1f} {rate / base_rate:>6.2f} {x_base:>6.2f} "
              f"{1000 * timer.seconds['unet'] / len(images):>11.2f} {full:>9} {mean:>7.2f} {worst:>6}")
        key = f"{label}_cache{interval}_tome{ratio:g}"
        out.update({f"{key}_x": rate / base_rate, f"{key}_mean_diff": mean, f"{key}_max_diff": worst,
                    f"{key}_images_per_s": rate, f"{key}_x_baseline": x_base})
    print(f"(x off = images/s over cache 1 / ToMe 0, sip's exact images; x base = over diffusers' batched call at "
          f"the same batch, fp32, best of the same rounds ({len(jobs) / base_seconds:.1f} img/s); full UNet = UNet "
          f"calls that ran every block; mean|d| / max|d| = difference from the exact image with the same seed, in "
          f"grey levels; a different seed moves the exact images by {seed_diff:.2f} on average)")
    out[f"{label}_speedups_seed_mean_diff"] = seed_diff
    out[f"{label}_speedups_baseline_images_per_s"] = len(jobs) / base_seconds
    return out


WORK_OPTIONS = [(2, 0.5), (3, 0.0), (3, 0.5), (5, 0.5)]  # (cache_interval, token_merge_ratio) tried on the SD1.5 model


def bench_work_options(pipe, jobs: list[Job], settings: dict, size: int, exact: list, baseline, label: str = "sd15"):
    """sip's best settings again with DeepCache and ToMe on, against baseline at the same precision.

    ``exact`` lists sip's runs without them (one per precision: the fastest of each); each is rerun with every
    pair of :data:`WORK_OPTIONS` on the same jobs. Prints a table; returns the fastest fp32 and overall rows.
    """
    from .img2img_runs import run_sip

    print(f"\n## {label}: sip's best settings with fewer UNet FLOPs per image (generate.cache_interval, "
          f"generate.token_merge_ratio), same steps, seeds and images; baseline = diffusers' batched call, fp32, same batch")
    header = (f"{'prec':>5} {'batch':>5} {'ch-last':>7} {'cache':>5} {'ToMe':>5} {'img/s':>8} {'x base':>7} "
              f"{'x off':>6} {'full UNet':>9} {'mean|d|':>7}")
    print(header)
    print("-" * len(header))
    rows = []
    for base in exact:
        print(f"{base.precision:>5} {base.batch_size:>5} {base.channels_last!s:>7} {1:>5} {0.0:>5.2f} "
              f"{base.rate:>8.3f} {base.rate / baseline.rate:>7.2f} {1.0:>6.2f} {'all':>9} {0.0:>7.2f}", flush=True)
        for interval, ratio in WORK_OPTIONS:
            full = StageTimer({"unet": full_block(pipe.unet)})
            r = run_sip(pipe, jobs[: len(base.images)], settings, size, "", label, base.batch_size,
                        base.channels_last, base.precision, warmup=False, cache_interval=interval,
                        token_merge_ratio=ratio)
            full.remove()
            mean, calls = _diff(r.images, base.images)[0], f"{full.calls['unet']}/{r.timer.calls['unet']}"
            print(f"{r.precision:>5} {r.batch_size:>5} {r.channels_last!s:>7} {interval:>5} {ratio:>5.2f} "
                  f"{r.rate:>8.3f} {r.rate / baseline.rate:>7.2f} {r.rate / base.rate:>6.2f} "
                  f"{calls:>9} {mean:>7.2f}",
                  flush=True)
            rows.append((r, mean))
    print("(x off = over the same setting with both off; full UNet = UNet calls that ran every block; mean|d| = "
          "mean difference from that setting's exact images, grey levels. Quality not judged in this run: this model "
          "has random weights; the shipped model's rows with --quality judge DeepCache there)")
    fp32 = [(r, d) for r, d in rows if r.precision == "fp32"]
    best32, best = max(fp32, key=lambda x: x[0].rate), max(rows, key=lambda x: x[0].rate)
    return {f"{label}_work_same_precision_x": best32[0].rate / baseline.rate,
            f"{label}_work_same_precision_way": f"cache {best32[0].extra['cache_interval']}, ToMe "
                                                 f"{best32[0].extra['token_merge_ratio']}",
            f"{label}_work_same_precision_mean_diff": best32[1],
            f"{label}_work_best_x": best[0].rate / baseline.rate,
            f"{label}_work_best_way": f"{best[0].precision}, cache {best[0].extra['cache_interval']}, ToMe "
                                      f"{best[0].extra['token_merge_ratio']}"}


FEW_STEP_EXTRAS = [(8, 0.5, False), (8, 0.5, True), (4, 0.5, False)]  # (LCM steps, ToMe ratio, tiny VAE), fp32


def _stages(r) -> str:
    n, names = len(r.images), ("unet", "vae_decoder", "vae_encoder")
    rest = r.seconds - sum(r.timer.seconds[k] for k in names)  # a tiny VAE's decoder is not hooked: it is here
    return ", ".join([*(f"{k} {r.timer.seconds[k] / n:.1f} s" for k in names), f"rest {rest / n:.1f} s"])


def bench_few_step(pipe, jobs: list[Job], settings: dict, size: int, exact: list, baseline, steps: int = 8,
                   label: str = "sd15") -> dict:
    """What an LCM-LoRA or LCM-checkpoint user runs (``generate.scheduler: LCMScheduler``, ``steps`` schedule steps
    × the same strength, guidance 1: one UNet branch) at each of sip's best settings in ``exact``: images/s only.
    At the fp32 setting also each of :data:`FEW_STEP_EXTRAS`: with ``generate.token_merge_ratio`` (ToMe pays on
    SD-size latents; DeepCache does not mix with few-step sampling, see README), with ``generate.tiny_vae`` (a
    TAESD-architecture decoder: other images by construction) and at 4 steps; each row's seconds per image in the
    UNet and the two VAE halves show what is left.

    Speed only: this UNet has random weights and was never distilled for few-step sampling, so LCMScheduler's images
    here mean nothing and no quality is claimed for these rows; the shipped few-step model's rows (tiny section,
    ``--quality``) are where few-step quality is judged."""
    from diffusers import LCMScheduler

    from .img2img_inputs import random_taesd
    from .img2img_runs import run_sip

    def few(n: int) -> dict:
        return {**settings, "steps": n, "guidance_scale": 1.0}

    evals = int(steps * settings["strength"])
    baseline_evals = int(settings["steps"] * settings["strength"]) * (2 if settings["guidance_scale"] > 1 else 1)
    print(f"\n## {label}: few-step sampling, LCMScheduler {steps} steps × strength {settings['strength']}, "
          f"guidance 1 = {evals} UNet evaluations per image (baseline: {baseline_evals}); SPEED ONLY: a random-weight "
          f"UNet never distilled, quality not meaningful")
    n = len(baseline.images)
    print(f"baseline per image: {_stages(baseline)} of {baseline.seconds / n:.1f} s")
    out = {}
    original = pipe.scheduler
    pipe.scheduler = LCMScheduler.from_config(original.config)
    try:
        for base in exact:
            r = run_sip(pipe, jobs[: len(base.images)], few(steps), size, "", f"{label} lcm", base.batch_size,
                        base.channels_last, base.precision, warmup=False)
            print(f"{base.precision:>5} batch {base.batch_size}: {r.rate:.3f} img/s = "
                  f"{r.rate / baseline.rate:.2f}x baseline (fp32, {settings['steps']} steps), "
                  f"{r.rate / base.rate:.2f}x sip's {base.precision} at {settings['steps']} steps; {_stages(r)}",
                  flush=True)
            out[f"{label}_lcm{steps}_{base.precision}_x"] = r.rate / baseline.rate
            if base.precision != "fp32":
                continue
            for n_steps, ratio, tiny in FEW_STEP_EXTRAS:
                t = run_sip(pipe, jobs[: len(base.images)], few(n_steps), size, "", f"{label} lcm{n_steps}",
                            base.batch_size, base.channels_last, "fp32", warmup=False,
                            tiny_vae=random_taesd() if tiny else None,
                            token_merge_ratio=ratio)
                name = f"LCM {n_steps}{f' + ToMe {ratio:g}' if ratio else ''}{' + tiny VAE' if tiny else ''}"
                print(f" fp32 {name}: {t.rate:.3f} img/s = {t.rate / baseline.rate:.2f}x baseline; {_stages(t)}"
                      + ("" if tiny or n_steps != steps else
                         f"; mean |d| from LCM {steps} alone {_diff(t.images, r.images)[0]:.2f} grey levels"),
                      flush=True)
                out[f"{label}_lcm{n_steps}{'_tome' if ratio else ''}{'_tinyvae' if tiny else ''}_fp32_x"] = \
                    t.rate / baseline.rate
    finally:
        pipe.scheduler = original
    return out


def bench_bf16_weights(pipe, jobs: list[Job], settings: dict, size: int, autocast_run, baseline, flops: dict,
                       peaks: dict, label: str = "sd15") -> dict:
    """bf16 weights (``generate.dtype: bfloat16``: every network stored in bf16, no autocast, so no per-call casts
    of fp32 weights) against sip's bf16-autocast run ``autocast_run`` at the same batch and memory format, on the
    same jobs: images/s and the UNet's FLOP/s as a fraction of the bf16 matmul peak."""
    import copy

    import torch

    from .img2img_report import stage_row
    from .img2img_runs import run_sip

    twin = copy.deepcopy(pipe).to(torch.bfloat16)
    r = run_sip(twin, jobs[: len(autocast_run.images)], settings, size, "", f"{label} bf16 weights",
                autocast_run.batch_size, autocast_run.channels_last, "fp32", warmup=True)
    r.precision = "bf16"  # measured against the bf16 peak
    a, w = stage_row(autocast_run, flops, peaks), stage_row(r, flops, peaks)
    mean = _diff(r.images, autocast_run.images)[0]
    print(f"\n## {label}: bf16 weights vs bf16 autocast (batch {r.batch_size}, channels_last={r.channels_last})")
    for name, run, s in (("autocast", autocast_run, a), ("weights", r, w)):
        print(f"  bf16 {name:<8} {run.rate:.3f} img/s = {run.rate / baseline.rate:.2f}x baseline; UNet "
              f"{s['unet_gflops']:.1f} GFLOP/s = {100 * s['unet_peak_fraction']:.1f}% of the bf16 peak", flush=True)
    print(f"  (bf16 weights / autocast: {r.rate / autocast_run.rate:.2f}x the images/s; the images differ by "
          f"{mean:.2f} grey levels on average: the weights themselves are rounded to bf16)")
    return {f"{label}_bf16_weights_x": r.rate / baseline.rate, f"{label}_bf16_weights_vs_autocast": r.rate /
            autocast_run.rate, f"{label}_bf16_weights_unet_peak_fraction": w["unet_peak_fraction"]}
