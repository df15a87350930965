#!/usr/bin/env python
"""sip's img2img stage against diffusers used well, side by side in one run, on this CPU.

Baseline (``"diffusers-batched"``): the pipeline's own batched call, ``pipe(prompt=[...], image=[...],
generator=[...])``, one call per batch, at the same precision as the row it is compared with (bf16: bf16 weights,
what ``torch_dtype=torch.bfloat16`` loads), the same scheduler, steps, strength, guidance, sources, prompts and
per-image seeds. Each of sip's own contributions is a row against it, measured in the same run:

- the fast path (``DiffusionGenerator.img2img``: each distinct source VAE-encoded once for all its variants, each
  distinct prompt encoded once), with ``channels_last``, with bf16 autocast (against the bf16 baseline);
- ``generate.cache_interval`` (DeepCache) / ``generate.token_merge_ratio`` (ToMe), timed in the same rounds as
  the baseline (``scripts/bench/unet_speedups.py``);
- the shipped few-step model (``sip/models/fmnist-tiny-lcm``, LCM 4 and 8) and, with ``--compile``,
  ``generate.compile``.

A row's quality is "exact" when its images are the baseline's within 2 grey levels, "judged in this run" when
``--quality`` judged its way in this run (scripts/bench/quality_curve.py), else "not judged in this run"; nothing
in a verdict is fixed text. On the SD 1.5-architecture model (random weights) the few-step LCMScheduler rows are
speed only: that UNet was never distilled, their images mean nothing.

Two models:

- ``tiny``: the shipped model (``--model``; default ``sip.models.diffusion.DEFAULT_SD_MODEL``) on Fashion-MNIST
  32 px sources;
- ``sd15``: a Stable Diffusion 1.5-architecture UNet (860 M parameters) + VAE + CLIP ViT-L text encoder built from
  config with random weights (their cost does not depend on their values), at ``--sd15-size`` px (256) on photos
  from ``skimage.data`` / ``sklearn.datasets.load_sample_images``.

It also measures this CPU's fp32 and bf16 matmul peak, counts the UNet's FLOPs per sample, times every network
inside each run (forward hooks) for the UNet's fraction of the same-dtype peak, and prints the bounds that explain
the ratios it finds.

Usage:
    python scripts/bench_generate.py --skip-sd15 --quality      # the shipped model, quality judged in this run
    python scripts/bench_generate.py --quick --skip-sd15        # about a minute

Prints tables, then as its last line one JSON object: {"baseline": "diffusers-batched",
"speedup_same_precision": ..., "speedup_equal_quality": ..., "tiny_rows": [...], ...}.
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

from scripts.bench.img2img_inputs import build_sd15, photo_jobs, random_taesd, resolve_tiny_model
from scripts.bench.img2img_report import breakdown, print_runs
from scripts.bench.img2img_runs import BASELINE, RunResult, contiguous, make_generator, run_sip, sip_img2img
from scripts.bench.machine import Peaks, count_flops, cpu_flags
from scripts.bench.tiny_rows import bench_tiny, measure_sweep, sweep_rows
from scripts.bench.unet_speedups import bench_bf16_weights, bench_few_step, bench_work_options
from scripts.bench.verdict import Row, judge_rows, print_verdict
from sip.augment.loop import Job
from sip.models.diffusion import SHIPPED_MODELS_DIR
from sip.runtime import cpu_has_amx


def run_tiny_vae(pipe, jobs: list[Job], settings: dict, size: int, negative_prompt: str, best: RunResult,
                 baseline: RunResult) -> dict:
    """sip's best setting again with ``generate.tiny_vae``: an AutoencoderTiny of TAESD's architecture
    (``madebyollin/taesd``, random weights: the cost does not depend on them) decodes the latents. Other
    images than the baseline's by construction (another decoder)."""
    taesd = random_taesd()
    r = run_sip(pipe, jobs, settings, size, negative_prompt, "sd15 tiny_vae", best.batch_size, best.channels_last,
                best.precision, warmup=False, tiny_vae=taesd)
    rate = r.rate
    params = sum(p.numel() for p in taesd.decoder.parameters()) / 1e6
    print(f"\nwith generate.tiny_vae (TAESD architecture, decoder {params:.1f} M params, random weights) at sip's best "
          f"setting: {rate:.3f} images/s = {rate / baseline.rate:.2f}x {BASELINE}, {rate / best.rate:.2f}x sip's best with the "
          f"checkpoint's VAE (other images by construction: another decoder)")
    return {"images_per_s": rate, "x_baseline": rate / baseline.rate, "vs_full_vae": rate / best.rate,
            "cpu": r.cpu_seconds / r.seconds}


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

def bench_sd15(args: argparse.Namespace, peaks: Peaks, work: Path) -> dict:
    """The SD1.5-architecture model on photos: the baseline, sip's rows, profile, verdict; the summary keys."""
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
    # bf16 runs only where it is the fast path (AMX; a GPU): without AMX it is 2-4x slower than fp32 here. No
    # warm-up runs: at these sizes oneDNN's one-off kernel set-up is well under 1% of a run.
    amx = cpu_has_amx()
    sweep = [(n_jobs, False, "fp32")] + ([] if q or args.sd15_lean else [(n_jobs, True, "fp32")])
    if amx and not args.sd15_lean:
        sweep += [(n_jobs, False, "bf16")]
    result = measure_sweep("sd15", pipe, jobs, size, settings, sweep, warmup=False)
    peaks.refresh("sd15")
    sd = print_runs("sd15", result, flops, peaks)
    result.update(sd)
    bounds = breakdown("sd15", result, flops, peaks)
    base = sd["baseline"]
    exact = [sd["best_fp32"], *([sd["bf16"]] if "bf16" in sd else [])]  # sip's fastest run of each precision
    rows = sweep_rows(result)
    work_runs: dict = {}
    if not args.sd15_lean:
        if not args.no_profile:
            profile_sip(pipe, jobs, settings, size, sd["best"])
        tiny_vae = run_tiny_vae(pipe, jobs, settings, size, "", sd["best_fp32"], base)
        rows.append(Row("sip fast path + tiny VAE (TAESD, random)", "fp32", sd["best_fp32"].batch_size,
                        tiny_vae["images_per_s"], base.rate, note="another decoder: other images"))
        work_runs.update(bench_work_options(pipe, jobs, settings, size, exact, base))
        rows.append(Row(f"sip fast path + {work_runs['sd15_work_same_precision_way']}", "fp32",
                        sd["best_fp32"].batch_size, work_runs["sd15_work_same_precision_x"] * base.rate, base.rate,
                        note="random weights: quality not meaningful"))
        if "bf16" in sd:  # bf16 weights vs autocast, at sip's fastest bf16 setting
            work_runs.update(bench_bf16_weights(pipe, jobs, settings, size, sd["bf16"], base, flops, peaks))
    few = bench_few_step(pipe, jobs, settings, size, exact, base)
    work_runs.update(few)
    for key, x in few.items():
        way = key.replace("sd15_", "").replace("_fp32_x", "").replace("_bf16_x", "")
        way = way.replace("lcm", "LCM ").replace("_tome", " + ToMe 0.5").replace("_tinyvae", " + tiny VAE")
        rows.append(Row(f"sip fast path, {way} (random UNet)",
                        "bf16" if "_bf16_" in key else "fp32", sd["best_fp32"].batch_size, x * base.rate, base.rate,
                        note="SPEED ONLY: LCMScheduler on a random-weight UNet never "
                                                       "distilled, quality not meaningful"))
    print(f"\n(sd15) the UNet is {100 * bounds['unet_share_baseline']:.0f}% of the baseline's time; at the "
          f"baseline's UNet speed sip's ceiling is {bounds['bound_amdahl']:.2f}x, at 100% of peak "
          f"{bounds['bound_unet_at_peak']:.2f}x; sip's UNet at {100 * sd['best_stage']['unet_peak_fraction']:.1f}% "
          f"of the {sd['best'].precision} matmul peak, the baseline's at "
          f"{100 * sd['baseline_stage']['unet_peak_fraction']:.1f}%")
    verdict = print_verdict("sd15", judge_rows(rows, None))
    return {**work_runs, **{f"sd15_{k}" if not k.startswith("sd15") else k: v for k, v in verdict.items()},
            "sd15_images_per_s_sip": sd["best"].rate, "sd15_images_per_s_baseline": base.rate,
            "sd15_unet_peak_fraction": sd["best_stage"]["unet_peak_fraction"],
            "sd15_unet_peak_fraction_baseline": sd["baseline_stage"]["unet_peak_fraction"],
            "max_abs_diff_sd15": sd["max_abs_diff"], "sd15_bf16_vs_fp32": sd.get("bf16_vs_fp32"),
            "sd15_size": size, "sd15_denoising_steps": int(steps * args.strength)}


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
                        help="SD1.5 same-precision check only: baseline, one fp32 sip setting, the few-step rows")
    parser.add_argument("--per-image", type=int, default=2, help="variants per source")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--quality", action="store_true",
                        help="also judge quality against speed on the shipped model (scripts/bench/quality_curve.py)")
    parser.add_argument("--lcm-model", default=str(SHIPPED_MODELS_DIR / "fmnist-tiny-lcm"),
                        help="the shipped few-step model (scripts/train_tiny_lcm.py): rows, and --quality")
    parser.add_argument("--quality-sources", type=int, default=200, help="img2img sources (2 variants each)")
    parser.add_argument("--quality-per-class", type=int, default=40, help="txt2img images per class")
    parser.add_argument("--rounds", type=int, default=2,
                        help="shipped model: every way this many times in turn, the fastest round counts (default 2)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also a generate.compile row on the shipped model (needs a C++ compiler; minutes)")
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
    print(f"# bench_generate: sip img2img vs {BASELINE} (pipe(prompt=[...], image=[...]) at the same precision), "
          f"same model, images, seeds and settings")
    print(f"machine: {torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, flags: {cpu_flags()}; load average at start {load0[0]:.2f}")
    if load0[0] > 1.0:
        print(f"warning: other processes are using the CPU (load {load0[0]:.2f}); absolute numbers are low "
              f"and noisy, ratios less so; see the cpu column")
    print(f"matmul peak ({peaks.n}x{peaks.n} GEMM, best of runs): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 "
          f"{peaks['bf16']:.1f} GFLOP/s (bf16/fp32 = {peaks['bf16'] / peaks['fp32']:.2f}; "
          f"{'AMX' if cpu_has_amx() else 'no AMX'})", flush=True)
    summary: dict = {"baseline": BASELINE}
    # 2. the shipped model on Fashion-MNIST, 3. the SD1.5-architecture model on photos, 4. quality in this run
    tiny_rows = None
    if not args.skip_tiny:
        tiny_summary, tiny_rows = bench_tiny(args, peaks)
        summary.update(tiny_summary)
    if not args.skip_sd15:
        summary.update(bench_sd15(args, peaks, work))
    quality = None
    if args.quality:
        summary.update(bench_quality_section(args))
        same_settings = (args.tiny_steps, args.strength, args.guidance) == (30, 0.5, 4.0)
        quality = summary["quality_rows"] if same_settings else None
        if not same_settings:
            print("quality was judged at DDIM 30, strength 0.5, guidance 4: not the speed rows' settings, so no "
                  "speed row counts as judged")
    if tiny_rows is not None:  # the headline: the shipped model's rows, quality as shown in this run
        summary.update(print_verdict("tiny", judge_rows(tiny_rows, quality)))
    elif not args.skip_sd15:
        summary.update(speedup_same_precision=summary.get("sd15_speedup_same_precision"),
                       speedup_equal_quality=summary.get("sd15_speedup_equal_quality"))
    shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"\nload average at end {load1[0]:.2f}")
    print(json.dumps({**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()},
                      "matmul_peak_gflops_fp32": round(peaks["fp32"], 1),
                      "matmul_peak_gflops_bf16": round(peaks["bf16"], 1),
                      "load_start": round(load0[0], 2), "load_end": round(load1[0], 2), "quick": q}))

if __name__ == "__main__":
    main()
