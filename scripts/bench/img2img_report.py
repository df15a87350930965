"""The tables scripts/bench_generate.py prints for one model: every sip run against diffusers' batched call at the
same batch size and precision, where the time goes, and the bounds that sets on the speed-up."""

from __future__ import annotations

from .img2img_runs import RunResult


def stage_row(r: RunResult, flops: dict, peaks: dict) -> dict:
    unet_s = r.timer.seconds["unet"]
    unet_flops = flops["unet"] * r.timer.samples["unet"]
    peak = peaks["bf16" if r.precision == "bf16" else "fp32"]
    achieved = unet_flops / unet_s / 1e9 if unet_s else 0.0
    return {"unet_share": unet_s / r.seconds, "unet_gflops": achieved, "unet_peak_fraction": achieved / peak}


def _baseline_of(r: RunResult, baselines: dict) -> RunResult:
    return baselines[(r.batch_size, r.precision)]


def print_runs(label: str, result: dict, flops: dict, peaks: dict) -> dict:
    """The baseline rows (diffusers' batched call per batch size and precision) and sip's rows, each sip row
    against the baseline of its own batch size and precision; returns the summary (best rows and ratios)."""
    baselines, runs = result["baselines"], result["runs"]
    header = (f"{'way':<17} {'batch':>5} {'ch-last':>7} {'prec':>5} {'images':>6} {'s':>8} {'img/s':>8} "
              f"{'x base':>6} {'cpu':>5} {'x cpu-s':>7} {'UNet %t':>7} {'UNet GF/s':>9} {'%peak':>6} "
              f"{'max|d|':>6} {'differ':>9}")
    print(header)
    print("-" * len(header))
    for r in [*baselines.values(), *runs]:
        s = stage_row(r, flops, peaks)
        base = _baseline_of(r, baselines)
        diff = r.extra.get("diff")
        print(f"{r.name:<17} {r.batch_size:>5} {r.channels_last!s:>7} {r.precision:>5} {len(r.images):>6} "
              f"{r.seconds:>8.2f} {r.rate:>8.3f} {r.rate / base.rate:>6.2f} {r.cpu_seconds / r.seconds:>5.2f} "
              f"{r.cpu_rate / base.cpu_rate:>7.2f} {100 * s['unet_share']:>6.1f}% {s['unet_gflops']:>9.1f} "
              f"{100 * s['unet_peak_fraction']:>5.1f}% {diff[0] if diff else '':>6} "
              f"{f'{diff[1]}/{diff[2]}' if diff else '':>9}")
    print("(x base = images/s over diffusers' own batched call (pipe(prompt=[...], image=[...])) at the same batch "
          "size and precision (bf16: bf16 weights, as torch_dtype=torch.bfloat16 loads them); cpu = process CPU "
          "seconds / wall seconds; x cpu-s = the same ratio in process CPU seconds; %peak = UNet FLOP/s over the "
          "same-dtype matmul peak; max|d| = largest per-pixel difference from that baseline's image with the same "
          "seed, grey levels)")
    fp32 = [r for r in runs if r.precision == "fp32"]
    best32 = max(fp32, key=lambda r: r.rate)
    base32 = max((b for b in baselines.values() if b.precision == "fp32"), key=lambda r: r.rate)
    best = max(runs, key=lambda r: r.rate)  # sip's fastest setting, bf16 included where it wins
    base_best = max(baselines.values(), key=lambda r: r.rate)
    out = {"best": best, "best_fp32": best32, "baseline": base32, "baseline_best": base_best,
           "speedup": best.rate / base_best.rate, "speedup_cpu_time": best.cpu_rate / base_best.cpu_rate,
           "speedup_same_precision": best32.rate / base32.rate,
           "speedup_same_precision_same_batch": max(r.rate / _baseline_of(r, baselines).rate for r in fp32),
           "max_abs_diff": max(r.extra["diff"][0] for r in fp32),
           "best_stage": stage_row(best, flops, peaks), "best_fp32_stage": stage_row(best32, flops, peaks),
           "baseline_stage": stage_row(base32, flops, peaks)}
    print(f"same precision (fp32): sip's best (batch {best32.batch_size}, channels_last={best32.channels_last}) "
          f"{best32.rate:.3f} images/s vs diffusers-batched's best (batch {base32.batch_size}) {base32.rate:.3f} = "
          f"{out['speedup_same_precision']:.2f}x (images within {out['max_abs_diff']} grey levels)")
    bf16 = [r for r in runs if r.precision == "bf16"]
    if bf16:
        b = max(bf16, key=lambda r: r.rate)
        twin = max((r for r in fp32 if r.batch_size == b.batch_size and r.channels_last == b.channels_last),
                   key=lambda r: r.rate, default=best32)
        out.update(bf16=b, bf16_vs_fp32=b.rate / twin.rate, max_abs_diff_bf16=max(r.extra["diff"][0] for r in bf16),
                   speedup_bf16_same_precision=b.rate / _baseline_of(b, baselines).rate)
        print(f"same precision (bf16): sip bf16 autocast at batch {b.batch_size} {b.rate:.3f} images/s = "
              f"{out['speedup_bf16_same_precision']:.2f}x diffusers-batched with bf16 weights; sip bf16 / sip fp32 at "
              f"the same batch {out['bf16_vs_fp32']:.2f}x (bf16 matmul peak here is "
              f"{peaks['bf16'] / peaks['fp32']:.2f}x fp32's)")
    print(f"fastest of each (any precision): sip {best.precision} batch {best.batch_size} {best.rate:.3f} vs "
          f"diffusers-batched {base_best.precision} batch {base_best.batch_size} {base_best.rate:.3f} = "
          f"{out['speedup']:.2f}x")
    return out


def breakdown(label: str, result: dict, flops: dict, peaks: dict) -> dict:
    """Where the time goes (the fp32 baseline vs sip's best) and the bounds it sets on the speed-up."""
    base, best = result["baseline"], result["best"]
    print(f"\n{label}: where the time goes (forward hooks), per image")
    print(f"{'stage':<13} {'base GFLOP':>11} {'base s':>8} {'share':>6} {'sip GFLOP':>10} {'sip s':>8} "
          f"{'share':>6}")
    names = ["unet", "vae_decoder", "vae_encoder", "text_encoder"]

    def per(r: RunResult, name: str) -> float:
        if name == "total":
            return r.seconds / len(r.images)
        if name == "other":
            return (r.seconds - sum(r.timer.seconds[k] for k in names)) / len(r.images)
        return r.timer.seconds[name] / len(r.images)

    def gflop(r: RunResult, name: str) -> str:
        keys = names if name == "total" else [name] if name in names else []
        return f"{sum(flops[k] * r.timer.samples[k] for k in keys) / len(r.images) / 1e9:.2f}" if keys else ""

    for name in [*names, "other", "total"]:
        print(f"{name:<13} {gflop(base, name):>11} {per(base, name):>8.3f} "
              f"{100 * per(base, name) / per(base, 'total'):>5.1f}% {gflop(best, name):>10} "
              f"{per(best, name):>8.3f} {100 * per(best, name) / per(best, 'total'):>5.1f}%")
    total_flops_base = sum(flops[k] * base.timer.samples[k] for k in names)
    total_flops_sip = sum(flops[k] * best.timer.samples[k] for k in names)
    unet_share = base.timer.seconds["unet"] / base.seconds
    unet_flops_sip = flops["unet"] * best.timer.samples["unet"]
    bound_amdahl = 1.0 / unet_share
    dtype = "bf16" if best.precision == "bf16" else "fp32"  # the peak of the precision sip's best run used
    bound_peak = base.seconds / (unet_flops_sip / (peaks[dtype] * 1e9))
    bound_all = base.seconds / (total_flops_sip / (peaks[dtype] * 1e9))
    print(f"(sip does {total_flops_sip / total_flops_base:.3f}x the baseline's arithmetic: the same UNet "
          f"work, one VAE encode per source instead of per variant, one text encoding per distinct prompt)")
    print(f"bounds for {label} at these settings:")
    print(f"  the UNet is {100 * unet_share:.1f}% of the baseline's time; sip leaves its FLOPs unchanged, so "
          f"even if sip made everything else free, at the baseline's UNet speed the ratio could be at most "
          f"{bound_amdahl:.2f}x")
    print(f"  with the UNet at 100% of the {dtype} matmul peak ({peaks[dtype]:.0f} GFLOP/s) and nothing else "
          f"costing anything: at most {bound_peak:.2f}x; with every network at peak: at most "
          f"{bound_all:.2f}x")
    return {"unet_share_baseline": unet_share, "bound_amdahl": bound_amdahl, "bound_unet_at_peak": bound_peak,
            "bound_all_at_peak": bound_all}
