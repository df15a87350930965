#!/usr/bin/env python
"""sip's img2img stage against the naive diffusers usage, side by side in one run, on this CPU.

Naive: one ``StableDiffusionImg2ImgPipeline`` call per image and variant, fp32, the pipeline's own
prompt and image handling (``pipe(prompt=..., image=..., negative_prompt=..., generator=...)``).
sip: ``DiffusionGenerator.img2img`` in batches (each distinct source VAE-encoded once for all its
variants, each distinct prompt encoded once, batched UNet/VAE), over a sweep of its options
(batch size, ``channels_last``, precision fp32 / bf16 autocast). On the shipped model it also runs
``generate.cache_interval`` 1/2/3 × ``generate.token_merge_ratio`` 0/0.5 side by side
(``scripts/bench/unet_speedups.py``: images/s and how far each moves the images); on the SD 1.5 model, sip's
fastest settings again with DeepCache / ToMe, with few-step sampling, and with bf16 *weights* (``generate.dtype:
bfloat16``) against bf16 autocast. Both paths use the same pipeline object, the same sources, prompts, per-image
seeds, steps, strength and guidance.

Two models:

- ``tiny``: the shipped model (``--model``; default ``sip.models.diffusion.DEFAULT_SD_MODEL``, falling back to
  ``.cache/fmnist-tiny-sd`` while the shipped folder is still empty) on Fashion-MNIST 32 px sources;
- ``sd15``: a Stable Diffusion 1.5-architecture UNet (860 M parameters) + VAE + CLIP ViT-L text encoder
  (123 M, full 49,408-token vocabulary from the offline tokenizer) built from config with random
  weights (their cost does not depend on their values), at ``--sd15-size`` px (256) on real photos
  from ``skimage.data`` / ``sklearn.datasets.load_sample_images``.

It also measures this CPU's fp32 and bf16 matmul peak (large square GEMMs), counts the UNet's FLOPs
per sample (``torch.utils.flop_counter.FlopCounterMode``), times every UNet / VAE / text-encoder
forward inside each run (forward pre/post hooks) to report the UNet's achieved FLOP/s as a fraction
of the same-dtype peak, profiles where sip's time goes on the SD1.5 model (``torch.profiler``), and
prints the bounds that explain the speed-up it finds.

Usage:
    python scripts/bench_generate.py            # full (~10-15 minutes on 2 cores)
    python scripts/bench_generate.py --quick    # under a minute (SD1.5 at 128 px, 2 denoising steps)

Prints tables, then as its last line one JSON object: {"speedup_vs_naive_sd15": ...,
"speedup_vs_naive_tiny": ..., "unet_peak_fraction": ..., "max_abs_diff": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")

import torch

from scripts.bench.img2img_inputs import build_sd15, fmnist_jobs, photo_jobs, random_taesd, resolve_tiny_model
from scripts.bench.img2img_report import breakdown, print_runs
from scripts.bench.img2img_runs import (
    RunResult,
    contiguous,
    make_generator,
    max_abs_diff,
    run_naive,
    run_sip,
    sip_img2img,
)
from scripts.bench.machine import Peaks, count_flops, cpu_flags
from scripts.bench.unet_speedups import (
    bench_bf16_weights,
    bench_few_step,
    bench_unet_speedups,
    bench_work_options,
)
from sip.augment.loop import Job
from sip.models.diffusion import SHIPPED_MODELS_DIR
from sip.runtime import cpu_has_amx


def run_tiny_vae(pipe, jobs: list[Job], settings: dict, size: int, negative_prompt: str, best: RunResult,
                 naive: RunResult) -> dict:
    """sip's best setting again with ``generate.tiny_vae``: an AutoencoderTiny of TAESD's architecture
    (``madebyollin/taesd``, random weights: the cost does not depend on them) decodes the latents. Other
    images than naive's by construction (another decoder), so it is reported beside the table, not in it."""
    taesd = random_taesd()
    r = run_sip(pipe, jobs, settings, size, negative_prompt, "sd15 tiny_vae", best.batch_size, best.channels_last,
                best.precision, warmup=False, tiny_vae=taesd)
    rate = r.rate
    params = sum(p.numel() for p in taesd.decoder.parameters()) / 1e6
    print(f"\nwith generate.tiny_vae (TAESD architecture, decoder {params:.1f} M params, random weights) at sip's best "
          f"setting: {rate:.3f} images/s = {rate / naive.rate:.2f}x naive, {rate / best.rate:.2f}x sip's best with the "
          f"checkpoint's VAE (other images by construction: another decoder)")
    return {"images_per_s": rate, "speedup_vs_naive": rate / naive.rate, "vs_full_vae": rate / best.rate,
            "cpu": r.cpu_seconds / r.seconds}


def bench_model(label: str, pipe, jobs: list[Job], size: int, settings: dict,
                sweep: list[tuple[int, bool, str]], bf16_images: int, warmup: bool,
                negative_prompt: str = "") -> dict:
    print(f"\n## {label}: {len(jobs)} images ({len(jobs) // settings['per_image']} sources × "
          f"{settings['per_image']} variants), {size}px, steps {settings['steps']} × strength "
          f"{settings['strength']} = {int(settings['steps'] * settings['strength'])} denoising steps, "
          f"guidance {settings['guidance_scale']}", flush=True)
    if warmup:
        run_naive(pipe, jobs[:1], {**settings, "steps": 2, "strength": 0.5}, negative_prompt,
                  f"{label} warm-up")
    naive = run_naive(pipe, jobs, settings, negative_prompt, label)
    runs = []
    for batch_size, channels_last, precision in sweep:
        subset = jobs if precision == "fp32" else jobs[: max(1, min(len(jobs), bf16_images))]
        r = run_sip(pipe, subset, settings, size, negative_prompt, label, min(batch_size, len(subset)),
                    channels_last, precision, warmup)
        r.extra["diff"] = max_abs_diff(naive.images, r.images)
        runs.append(r)
    return {"naive": naive, "runs": runs}


def profile_sip(pipe, jobs: list[Job], settings: dict, size: int, best: RunResult,
                top: int = 14) -> list[tuple]:
    """torch.profiler over one sip batch with the best setting; the ops with most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    generator = make_generator(pipe, settings, size, best.batch_size, best.channels_last, best.precision)
    batch = jobs[: min(best.batch_size, 2)]  # one source, two variants: the same shapes, half the time
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sip_img2img(generator, batch, "")
    contiguous(pipe)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of one sip call ({len(batch)} images, channels_last={best.channels_last}, "
          f"{best.precision}): top ops by self CPU time (torch.profiler)")
    print(f"{'op':<48} {'self s':>8} {'share':>6} {'calls':>7}")
    rows = []
    for e in events[:top]:
        rows.append((e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total, e.count))
        print(f"{e.key[:48]:<48} {e.self_cpu_time_total / 1e6:>8.2f} "
              f"{100 * e.self_cpu_time_total / total:>5.1f}% {e.count:>7}")
    conv_mm = sum(e.self_cpu_time_total for e in events
                  if any(k in e.key for k in ("conv", "addmm", "mm", "bmm", "linear", "attention")))
    print(f"matmul-like ops (conv, linear/addmm/mm/bmm, attention) take {100 * conv_mm / total:.1f}% of self "
          f"CPU time; the rest is element-wise and memory-bound work (norms, activations, copies, adds)")
    return rows


# --------------------------------------------------------------------------------------------------

def bench_tiny(args: argparse.Namespace, peaks: Peaks) -> dict:
    """The shipped model on Fashion-MNIST: naive, then sip's option sweep; the summary keys."""
    from sip.models.diffusion import load_diffusion_pipeline

    q = args.quick
    model = resolve_tiny_model(args.model)
    pipe = load_diffusion_pipeline(model, "img2img", device="cpu")
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    settings = {"strength": args.strength, "guidance_scale": args.guidance, "steps": args.tiny_steps,
                "per_image": args.per_image}
    jobs = fmnist_jobs(args.tiny_sources or (8 if q else 64), args.per_image, size, pipe)
    sweep = ([(32, False, "fp32"), (32, True, "fp32"), (32, False, "bf16")] if q else
             [(8, False, "fp32"), (32, False, "fp32"), (64, False, "fp32"), (128, False, "fp32"),
              (32, True, "fp32"), (128, True, "fp32"), (32, False, "bf16"), (128, False, "bf16")])
    flops = count_flops(pipe, size)
    unet_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"\nshipped model: {model}; UNet {unet_params:.1f} M params, {flops['unet'] / 1e6:.1f} MFLOP "
          f"per UNet sample at {size}px")
    result = bench_model("tiny", pipe, jobs, size, settings, sweep, len(jobs), warmup=True)
    peaks.refresh("tiny")
    tiny = print_runs("tiny", result, flops, peaks)
    result.update(tiny)
    bounds = breakdown("tiny", result, flops, peaks)
    speedups = bench_unet_speedups(pipe, jobs, settings, size, tiny["best_fp32"].batch_size, 3 if q else 5)
    return {**speedups, "speedup_vs_naive_tiny": tiny["speedup"],
            "speedup_vs_naive_tiny_cpu_time": tiny["speedup_cpu_time"],
            "tiny_images_per_s_sip": tiny["best"].rate,
            "tiny_images_per_s_naive": tiny["naive"].rate,
            "max_abs_diff_tiny": tiny["max_abs_diff"],
            "max_abs_diff_bf16_tiny": tiny.get("max_abs_diff_bf16"),
            "tiny_best_batch": tiny["best"].batch_size,
            "tiny_best_channels_last": tiny["best"].channels_last,
            "tiny_bf16_vs_fp32": tiny.get("bf16_vs_fp32"),
            "tiny_unet_peak_fraction": tiny["best_stage"]["unet_peak_fraction"],
            "tiny_unet_share_naive": bounds["unet_share_naive"]}


def bench_sd15(args: argparse.Namespace, peaks: Peaks, work: Path) -> dict:
    """The SD1.5-architecture model on photos: naive, sip's sweep, profile, tiny VAE, verdict; the summary keys."""
    q = args.quick
    t0 = time.time()
    pipe = build_sd15(work)
    size = args.sd15_size or (128 if q else 256)
    steps = args.sd15_steps or (4 if q else 20)
    settings = {"strength": args.strength, "guidance_scale": args.guidance, "steps": steps,
                "per_image": args.per_image}
    jobs = photo_jobs(args.sd15_sources or (1 if q else 2), args.per_image, size, pipe)
    flops = count_flops(pipe, size)
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
              (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoder))}
    print(f"\nSD1.5-architecture model (random weights, built in {time.time() - t0:.0f}s): UNet "
          f"{params['unet']:.0f} M, VAE {params['vae']:.0f} M, text encoder {params['text']:.0f} M "
          f"params; per sample at {size}px: UNet {flops['unet'] / 1e9:.1f} GFLOP, VAE decoder "
          f"{flops['vae_decoder'] / 1e9:.1f}, VAE encoder {flops['vae_encoder'] / 1e9:.1f}, text encoder "
          f"{flops['text_encoder'] / 1e9:.1f}", flush=True)
    n_jobs = len(jobs)
    # On a CPU without AMX bf16 is 2-4x slower than fp32: one image is enough to show it. With AMX (and on
    # a GPU) it is the fast path: the whole set, with and without channels-last. No warm-up runs: at these
    # sizes oneDNN's one-off kernel set-up is well under 1% of a run.
    amx = cpu_has_amx()
    bf16_sweep = ([(n_jobs, False, "bf16")] if q else [(n_jobs, False, "bf16"), (n_jobs, True, "bf16")]) \
        if amx else ([] if q else [(1, False, "bf16")])
    sweep = ([(n_jobs, False, "fp32")] if q else [(n_jobs, False, "fp32"), (n_jobs, True, "fp32")]) + bf16_sweep
    if args.sd15_lean:  # the same-precision question only: one fp32 setting, then the few-step rows
        sweep = [(n_jobs, False, "fp32")]  # the full run's fastest fp32 setting at 256 and 512 px
    result = bench_model("sd15", pipe, jobs, size, settings, sweep, bf16_images=n_jobs if amx else 1,
                         warmup=False)
    peaks.refresh("sd15")
    sd = print_runs("sd15", result, flops, peaks)
    result.update(sd)
    bounds = breakdown("sd15", result, flops, peaks)
    exact = [sd["best_fp32"], *([sd["bf16"]] if "bf16" in sd else [])]  # sip's fastest run of each precision
    if args.sd15_lean:
        work_runs = bench_few_step(pipe, jobs, settings, size, exact, sd["naive"])
        return {**work_runs, **lean_verdict(sd, work_runs), "sd15_size": size,
                "sd15_denoising_steps": int(steps * args.strength)}
    if not args.no_profile:
        profile_sip(pipe, jobs, settings, size, sd["best"])
    tiny_vae = run_tiny_vae(pipe, jobs, settings, size, "", sd["best"], sd["naive"])
    work_runs = bench_work_options(pipe, jobs, settings, size, exact, sd["naive"])
    work_runs.update(bench_few_step(pipe, jobs, settings, size, exact, sd["naive"]))
    if "bf16" in sd:  # the "bf16 weights vs autocast", at sip's fastest bf16 setting
        work_runs.update(bench_bf16_weights(pipe, jobs, settings, size, sd["bf16"], sd["naive"], flops, peaks))
    fraction = sd["best_stage"]["unet_peak_fraction"]
    met = "met" if sd["speedup"] >= 4 else "NOT met"
    print("\nverdict (sd15):")
    print(f"  speed-up over naive {sd['speedup']:.2f}x (target >= 4x): {met}; the UNet is "
          f"{100 * bounds['unet_share_naive']:.0f}% of naive's time and sip runs the same UNet FLOPs, so "
          f"the ceiling at naive's UNet speed is {bounds['bound_amdahl']:.2f}x and at 100% of peak "
          f"{bounds['bound_unet_at_peak']:.2f}x")
    work_runs.update(same_precision_line(sd, work_runs))
    fp32_fraction = sd["best_fp32_stage"]["unet_peak_fraction"]
    print(f"  UNet of sip's best fp32 run at {100 * fp32_fraction:.1f}% of the fp32 matmul peak (target >= 50%: "
          f"{'met' if fp32_fraction >= 0.5 else 'NOT met'})")
    print(f"  with generate.tiny_vae (a TAESD decoder; other images): {tiny_vae['speedup_vs_naive']:.2f}x naive "
          f"({'meets' if tiny_vae['speedup_vs_naive'] >= 4 else 'below'} the 4x target)")
    print(f"  UNet at {100 * fraction:.1f}% of the {sd['best'].precision} matmul peak (target >= 50%): "
          f"{'met' if fraction >= 0.5 else 'NOT met'}; naive's UNet runs at "
          f"{100 * sd['naive_stage']['unet_peak_fraction']:.1f}%")
    if "bf16_vs_fp32" in sd:
        flags = cpu_flags()
        units = [u for u, f in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if f in flags]
        has = f"has {' and '.join(units)}" if units else "has neither AMX nor AVX512-BF16"
        print(f"  bf16 autocast runs at {sd['bf16_vs_fp32']:.2f}x fp32's speed: this CPU {has}; its bf16 "
              f"GEMM peak is {peaks['bf16']:.0f} vs {peaks['fp32']:.0f} GFLOP/s fp32")
    print("  closing the rest needs fewer UNet FLOPs per image (fewer steps or a few-step scheduler such "
          "as LCM/Turbo, guidance <= 1 to halve the batch, lower resolution, a smaller UNet) or hardware "
          "with bf16/fp16 matrix units (AMX, GPU); a tiny VAE decoder only trims the non-UNet share")
    return {**work_runs, "speedup_vs_naive_sd15": sd["speedup"],
            "speedup_vs_naive_sd15_tiny_vae": tiny_vae["speedup_vs_naive"],
            "speedup_vs_naive_sd15_same_precision": sd["speedup_same_precision"],
            "sd15_best_precision": sd["best"].precision,
            "speedup_vs_naive_sd15_cpu_time": sd["speedup_cpu_time"],
            "sd15_images_per_s_sip": sd["best"].rate,
            "sd15_images_per_s_naive": sd["naive"].rate, "unet_peak_fraction": fraction,
            "unet_peak_fraction_naive": sd["naive_stage"]["unet_peak_fraction"],
            "unet_peak_fraction_fp32": sd["best_fp32_stage"]["unet_peak_fraction"],
            "max_abs_diff_sd15": sd["max_abs_diff"],
            "max_abs_diff_bf16_sd15": sd.get("max_abs_diff_bf16"),
            "sd15_bf16_vs_fp32": sd.get("bf16_vs_fp32"),
            "sd15_best_batch": sd["best"].batch_size,
            "sd15_best_channels_last": sd["best"].channels_last,
            "sd15_unet_share_naive": bounds["unet_share_naive"],
            "sd15_bound_unet_at_peak": bounds["bound_unet_at_peak"], "sd15_size": size,
            "sd15_denoising_steps": int(steps * args.strength)}


def same_precision_line(sd: dict, work_runs: dict) -> dict:
    """Prints the same-precision verdict over every fp32 way with fewer UNet FLOPs; returns its summary keys."""
    ways = {"LCM 8 steps, guidance 1": work_runs["sd15_lcm8_fp32_x"],
            "LCM 8 + ToMe 0.5": work_runs.get("sd15_lcm8_tome_fp32_x", 0.0)}
    if "sd15_work_same_precision_x" in work_runs:
        ways[work_runs["sd15_work_same_precision_way"]] = work_runs["sd15_work_same_precision_x"]
    way, same = max(ways.items(), key=lambda kv: kv[1])
    print(f"  same precision (fp32 both): {sd['speedup_same_precision']:.2f}x with the exact images; fastest with "
          f"fewer UNet FLOPs and the checkpoint's VAE (on the shipped model LCM 8 is within 1 point of DDIM 30, "
          f"DeepCache 3 within 1.2; other intervals not judged): "
          f"{way} {same:.2f}x (target >= 4x: {'met' if same >= 4 else 'NOT met'}); all: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ways.items()))
    others = {"LCM 8 + ToMe 0.5 + tiny VAE (another decoder)": work_runs.get("sd15_lcm8_tome_tinyvae_fp32_x"),
              "LCM 4 + ToMe 0.5 (2.2 points less preservation on the shipped model)":
                  work_runs.get("sd15_lcm4_tome_fp32_x")}
    print("  at another quality: " + ", ".join(f"{k} {v:.2f}x" for k, v in others.items() if v))
    return {"sd15_same_precision_best_way": way, "sd15_same_precision_best_x": same}


def lean_verdict(sd: dict, work_runs: dict) -> dict:
    print("\nverdict (sd15, --sd15-lean):")
    out = same_precision_line(sd, work_runs)
    return {**out, "speedup_vs_naive_sd15_same_precision": sd["speedup_same_precision"],
            "sd15_images_per_s_naive": sd["naive"].rate, "sd15_images_per_s_sip_fp32": sd["best_fp32"].rate}


def bench_quality_section(args: argparse.Namespace) -> dict:
    from scripts.bench.quality_curve import HEADER, bench_quality, equal_quality

    lcm = args.lcm_model if Path(args.lcm_model, "model_index.json").is_file() else None
    print(f"\n## quality against speed on the shipped model (judged as python -m scripts.eval; few-step model: "
          f"{lcm or 'none: run scripts/train_tiny_lcm.py'})\n{HEADER}", flush=True)
    q = args.quick
    rows = bench_quality(resolve_tiny_model(args.model), lcm, 20 if q else args.quality_sources,
                         4 if q else args.quality_per_class)
    best = equal_quality(rows)
    print(f"fastest within 1 point of {best['reference']} on both measures: {best['best_at_equal_quality']}, "
          f"{best['speedup_at_equal_quality']:.2f}x its images/s (img2img {best['speedup_img2img']:.2f}x, "
          f"txt2img {best['speedup_txt2img']:.2f}x)")
    return {"quality_rows": rows, **best}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--model", default=None,
                        help="the shipped model (default: sip's, else .cache/fmnist-tiny-sd)")
    parser.add_argument("--skip-tiny", action="store_true", help="skip the shipped-model section")
    parser.add_argument("--skip-sd15", action="store_true", help="skip the SD1.5-architecture section")
    parser.add_argument("--tiny-sources", type=int, default=None,
                        help="Fashion-MNIST sources (default 64, quick 8)")
    parser.add_argument("--tiny-steps", type=int, default=30)
    parser.add_argument("--sd15-sources", type=int, default=None, help="photos (default 2, quick 1)")
    parser.add_argument("--sd15-size", type=int, default=None, help="pixels (default 256, quick 128)")
    parser.add_argument("--sd15-steps", type=int, default=None,
                        help="schedule steps; img2img runs steps × strength of them (default 20: 10 denoising "
                             "steps, where feature caching has neighbours to reuse; quick 4)")
    parser.add_argument("--sd15-lean", action="store_true",
                        help="SD1.5 same-precision check only: naive, one fp32 sip setting, the few-step rows")
    parser.add_argument("--per-image", type=int, default=2, help="variants per source")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--quality", action="store_true",
                        help="also judge quality against speed on the shipped model (scripts/bench/quality_curve.py)")
    parser.add_argument("--lcm-model", default=str(SHIPPED_MODELS_DIR / "fmnist-tiny-lcm"),
                        help="the few-step model of scripts/train_tiny_lcm.py for --quality")
    parser.add_argument("--quality-sources", type=int, default=200, help="img2img sources (2 variants each)")
    parser.add_argument("--quality-per-class", type=int, default=40, help="txt2img images per class")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    q = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sip-bench-generate-"))
    load0 = os.getloadavg()
    # 1. this CPU's matmul peak, fp32 and bf16 (measured again after each section; the higher one counts)
    peaks = Peaks(1024 if q else 2048, q)
    print("# bench_generate: sip img2img vs naive diffusers, same model, images, seeds and settings")
    print(f"machine: {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, flags: {cpu_flags()}; load average at start {load0[0]:.2f}")
    if load0[0] > 1.0:
        print(f"warning: other processes are using the CPU (load {load0[0]:.2f}); absolute numbers are low "
              f"and noisy, ratios less so; see the cpu column")
    print(f"matmul peak ({peaks.n}x{peaks.n} GEMM, best of runs): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 "
          f"{peaks['bf16']:.1f} GFLOP/s (bf16/fp32 = {peaks['bf16'] / peaks['fp32']:.2f}; "
          f"{'AMX' if cpu_has_amx() else 'no AMX'})", flush=True)
    summary: dict = {}
    # 2. the shipped model on Fashion-MNIST, 3. the SD1.5-architecture model on photos
    if not args.skip_tiny:
        summary.update(bench_tiny(args, peaks))
    if not args.skip_sd15:
        summary.update(bench_sd15(args, peaks, work))
    if args.quality:
        summary.update(bench_quality_section(args))
    shutil.rmtree(work, ignore_errors=True)
    diffs = [v for k, v in summary.items() if k in ("max_abs_diff_tiny", "max_abs_diff_sd15")]
    load1 = os.getloadavg()
    print(f"\nload average at end {load1[0]:.2f}")
    print(json.dumps({**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()},
                      "max_abs_diff": max(diffs) if diffs else None,
                      "matmul_peak_gflops_fp32": round(peaks["fp32"], 1),
                      "matmul_peak_gflops_bf16": round(peaks["bf16"], 1),
                      "load_start": round(load0[0], 2), "load_end": round(load1[0], 2), "quick": q}))


if __name__ == "__main__":
    main()
