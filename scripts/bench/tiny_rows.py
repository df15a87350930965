"""The shipped model's section of scripts/bench_generate.py: the baseline (diffusers' batched call at each batch size
and precision) and each of sip's own contributions as a row against it, in one run: the fast path, channels-last,
bf16 autocast, DeepCache / ToMe, the shipped few-step model and (``--compile``) torch.compile."""

from __future__ import annotations

import argparse
from pathlib import Path

from sip.runtime import cpu_has_amx

from .img2img_inputs import fmnist_jobs, resolve_tiny_model
from .img2img_report import breakdown, print_runs
from .img2img_runs import BASELINE, RunResult, bf16_weights, max_abs_diff, run_baseline, run_sip
from .machine import Peaks, count_flops
from .unet_speedups import GRID, bench_unet_speedups
from .verdict import Row

QUALITY_WAYS = {(3, 0.0): "DDIM 30 + DeepCache 3"}  # GRID entries that scripts/bench/quality_curve.py also judges
FEW_STEPS = (4, 8)  # the shipped few-step model's schedule steps (× strength 0.5), as quality_curve's "LCM n" ways


def measure_sweep(label: str, pipe, jobs, size: int, settings: dict, sweep, warmup: bool,
                  negative_prompt: str = "", rounds: int = 1) -> dict:
    """The baseline at every (batch, precision) of ``sweep`` and sip at every sweep entry, ``rounds`` times in turn
    (each way's fastest round counts: other processes on a shared machine only ever slow a run down); each sip run
    carries its max |d| from the baseline of its batch and precision."""
    print(f"\n## {label}: {len(jobs)} images ({len(jobs) // settings['per_image']} sources × "
          f"{settings['per_image']} variants), {size}px, steps {settings['steps']} × strength "
          f"{settings['strength']} = {int(settings['steps'] * settings['strength'])} denoising steps, "
          f"guidance {settings['guidance_scale']}; baseline: {BASELINE}; best of {rounds} round(s)", flush=True)
    twin = bf16_weights(pipe) if any(p == "bf16" for _, _, p in sweep) else None
    keys = list(dict.fromkeys((min(b, len(jobs)), p) for b, _, p in sweep))
    if warmup:  # oneDNN builds its kernels for each new shape once; keep that out of the timing
        for batch_size, precision in keys:
            run_baseline(pipe, jobs[:batch_size], {**settings, "steps": 2}, negative_prompt, "warm-up", batch_size,
                         precision, twin)
    baselines: dict[tuple[int, str], RunResult] = {}
    runs: dict[tuple, RunResult] = {}
    for _ in range(rounds):
        for key in keys:
            r = run_baseline(pipe, jobs, settings, negative_prompt, label, key[0], key[1], twin)
            if key not in baselines or r.seconds < baselines[key].seconds:
                baselines[key] = r
        for entry in sweep:
            batch_size, channels_last, precision = entry
            r = run_sip(pipe, jobs, settings, size, negative_prompt, label, min(batch_size, len(jobs)),
                        channels_last, precision, warmup and entry not in runs)
            if entry not in runs or r.seconds < runs[entry].seconds:
                runs[entry] = r
    for r in runs.values():
        r.extra["diff"] = max_abs_diff(baselines[(r.batch_size, r.precision)].images, r.images)
    return {"baselines": baselines, "runs": list(runs.values())}


def few_step_rows(lcm_model: str, jobs, settings: dict, size: int, batch_size: int, baseline: RunResult) -> list[Row]:
    """The shipped few-step model (scripts/train_tiny_lcm.py: LCMScheduler, guidance baked in) at :data:`FEW_STEPS`
    on the same jobs and batch, against the baseline (the shipped model, DDIM, ``settings['steps']``)."""
    from sip.models.diffusion import load_diffusion_pipeline

    lcm = load_diffusion_pipeline(lcm_model, "img2img", device="cpu")
    rows = []
    for steps in FEW_STEPS:
        few = {**settings, "steps": steps, "guidance_scale": 1.0}
        run_sip(lcm, jobs[:batch_size], few, size, "", "warm-up", batch_size, False, "fp32", warmup=False)
        r = run_sip(lcm, jobs, few, size, "", f"tiny lcm{steps}", batch_size, False, "fp32", warmup=False)
        rows.append(Row(f"shipped few-step model, LCM {steps}", "fp32", batch_size, r.rate, baseline.rate,
                        quality_way=f"LCM {steps}",
                        note=f"other images: another model, {steps} steps; judge with --quality"))
        print(f"shipped few-step model, LCM {steps} × strength {settings['strength']}, guidance 1: {r.rate:.1f} img/s "
              f"= {r.rate / baseline.rate:.2f}x {BASELINE} (DDIM {settings['steps']}, batch {batch_size})", flush=True)
    return rows


def compile_row(pipe, jobs, settings: dict, size: int, exact: RunResult, baseline: RunResult) -> Row:
    """sip's best fp32 setting again with ``generate.compile`` (inductor, freezing): one warm-up batch compiles."""
    r0 = run_sip(pipe, jobs[: exact.batch_size], settings, size, "", "compile warm-up", exact.batch_size,
                 exact.channels_last, "fp32", warmup=False, compile=True)
    r = run_sip(pipe, jobs, settings, size, "", "tiny compile", exact.batch_size, exact.channels_last, "fp32",
                warmup=False, compile=True)
    print(f"generate.compile: {r.rate:.1f} img/s = {r.rate / baseline.rate:.2f}x {BASELINE} (compile + first batch "
          f"{r0.seconds:.0f} s)", flush=True)
    return Row("sip fast path + compile", "fp32", exact.batch_size, r.rate, baseline.rate,
               max_abs_diff(baseline.images, r.images)[0])


def sweep_rows(result: dict) -> list[Row]:
    rows = []
    for r in result["runs"]:
        base = result["baselines"][(r.batch_size, r.precision)]
        way = ("sip fast path" + (" + channels-last" if r.channels_last else "")
               + (" + bf16 autocast" if r.precision == "bf16" else ""))
        rows.append(Row(way, r.precision, r.batch_size, r.rate, base.rate, r.extra["diff"][0],
                        note="bf16 rounding: other images" if r.precision == "bf16" else ""))
    return rows


def bench_tiny(args: argparse.Namespace, peaks: Peaks) -> tuple[dict, list[Row]]:
    """The shipped model on Fashion-MNIST: the baseline, sip's rows against it; the summary keys and the rows."""
    from sip.models.diffusion import load_diffusion_pipeline

    q = args.quick
    model = resolve_tiny_model(args.model)
    pipe = load_diffusion_pipeline(model, "img2img", device="cpu")
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    settings = {"strength": args.strength, "guidance_scale": args.guidance, "steps": args.tiny_steps,
                "per_image": args.per_image}
    jobs = fmnist_jobs(args.tiny_sources or (8 if q else 64), args.per_image, size, pipe)
    sweep = ([(16, False, "fp32"), (16, True, "fp32")] if q else
             [(32, False, "fp32"), (128, False, "fp32"), (128, True, "fp32")])
    if cpu_has_amx():  # without AMX bf16 runs emulated here (tens of times slower): no row worth its minutes
        sweep.append((sweep[-1][0], False, "bf16"))
    else:
        print("no AMX on this CPU: the bf16 rows are left out (emulated bf16 is far slower than fp32 here)")
    flops = count_flops(pipe, size)
    print(f"\nshipped model: {model}; UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f} M params, "
          f"{flops['unet'] / 1e6:.1f} MFLOP per UNet sample at {size}px")
    result = measure_sweep("tiny", pipe, jobs, size, settings, sweep, warmup=True, rounds=args.rounds)
    peaks.refresh("tiny")
    tiny = print_runs("tiny", result, flops, peaks)
    result.update(tiny)
    bounds = breakdown("tiny", result, flops, peaks)
    rows = sweep_rows(result)
    best32 = tiny["best_fp32"]
    base = result["baselines"][(best32.batch_size, "fp32")]

    def baseline(batch_jobs):
        return run_baseline(pipe, batch_jobs, settings, "", "tiny rounds", best32.batch_size, "fp32").images

    speedups = bench_unet_speedups(pipe, jobs, settings, size, best32.batch_size, 2 if q else 3, baseline=baseline)
    base_rate = speedups["tiny_speedups_baseline_images_per_s"]
    for interval, ratio in GRID[1:]:
        key = f"tiny_cache{interval}_tome{ratio:g}"
        way = " + ".join(w for w in (f"DeepCache {interval}" if interval > 1 else "",
                                     f"ToMe {ratio:g}" if ratio else "") if w)
        rows.append(Row(f"sip fast path + {way}", "fp32", best32.batch_size, speedups[f"{key}_images_per_s"],
                        base_rate, speedups[f"{key}_max_diff"], QUALITY_WAYS.get((interval, ratio))))
    if Path(args.lcm_model, "model_index.json").is_file():
        rows += few_step_rows(args.lcm_model, jobs, settings, size, best32.batch_size, base)
    if args.compile:
        rows.append(compile_row(pipe, jobs, settings, size, best32, base))
    summary = {**speedups, "tiny_images_per_s_sip": tiny["best"].rate, "tiny_images_per_s_baseline": base.rate,
               "speedup_tiny_same_precision": tiny["speedup_same_precision"],
               "speedup_tiny_bf16_same_precision": tiny.get("speedup_bf16_same_precision"),
               "max_abs_diff_tiny": tiny["max_abs_diff"], "max_abs_diff_bf16_tiny": tiny.get("max_abs_diff_bf16"),
               "tiny_best_batch": tiny["best"].batch_size, "tiny_bf16_vs_fp32": tiny.get("bf16_vs_fp32"),
               "tiny_unet_peak_fraction": tiny["best_stage"]["unet_peak_fraction"],
               "tiny_unet_share_baseline": bounds["unet_share_baseline"],
               "tiny_settings": {k: settings[k] for k in ("steps", "strength", "guidance_scale")}}
    return summary, rows
