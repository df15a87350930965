"""The tables scripts/bench_generate.py prints for one model: every run against naive, where the time goes,
and the bounds that sets on the speed-up."""

from __future__ import annotations

from .img2img_runs import RunResult


def stage_row(r: RunResult, flops: dict, peaks: dict) -> dict:
    unet_s = r.timer.seconds["unet"]
    unet_flops = flops["unet"] * r.timer.samples["unet"]
    peak = peaks["bf16" if r.precision == "bf16" else "fp32"]
    achieved = unet_flops / unet_s / 1e9 if unet_s else 0.0
    return {"unet_share": unet_s / r.seconds, "unet_gflops": achieved, "unet_peak_fraction": achieved / peak}


def print_runs(label: str, result: dict, flops: dict, peaks: dict) -> dict:
    naive, runs = result["naive"], result["runs"]
    header = (f"{'way':<6} {'batch':>5} {'ch-last':>7} {'prec':>5} {'images':>6} {'s':>8} {'img/s':>8} "
              f"{'x naive':>7} {'cpu':>5} {'x cpu-s':>7} {'UNet %t':>7} {'UNet GF/s':>9} {'%peak':>6} "
              f"{'max|d|':>6} {'differ':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for r in [naive, *runs]:
        s = stage_row(r, flops, peaks)
        diff = r.extra.get("diff", (0, 0, 1))
        speed = r.rate / naive.rate
        print(f"{r.name:<6} {r.batch_size:>5} {r.channels_last!s:>7} {r.precision:>5} {len(r.images):>6} "
              f"{r.seconds:>8.2f} {r.rate:>8.3f} {speed:>7.2f} {r.cpu_seconds / r.seconds:>5.2f} "
              f"{r.cpu_rate / naive.cpu_rate:>7.2f} "
              f"{100 * s['unet_share']:>6.1f}% {s['unet_gflops']:>9.1f} "
              f"{100 * s['unet_peak_fraction']:>5.1f}% "
              f"{diff[0] if r.name == 'sip' else '':>6} "
              f"{f'{diff[1]}/{diff[2]}' if r.name == 'sip' else '':>9}")
        rows.append((r, s))
    print("(cpu = process CPU seconds / wall seconds: about the thread count when nothing else competed for "
          "the cores; x cpu-s = the speed-up counted in process CPU seconds instead of wall seconds; "
          "%peak = UNet FLOP/s over the same-dtype matmul peak; max|d| = largest per-pixel difference from "
          "the naive image with the same seed, in grey levels)")
    fp32 = [r for r in runs if r.precision == "fp32"]
    best32 = max(fp32, key=lambda r: r.rate)
    best = max(runs, key=lambda r: r.rate)  # sip's fastest setting, bf16 included where it wins
    bf16 = [r for r in runs if r.precision == "bf16"]
    out = {"best": best, "best_fp32": best32, "naive": naive, "speedup": best.rate / naive.rate,
           "speedup_cpu_time": best.cpu_rate / naive.cpu_rate,
           "speedup_same_precision": best32.rate / naive.rate,
           "max_abs_diff": max(r.extra["diff"][0] for r in fp32),
           "best_stage": stage_row(best, flops, peaks), "best_fp32_stage": stage_row(best32, flops, peaks),
           "naive_stage": stage_row(naive, flops, peaks)}
    if bf16:
        b = max(bf16, key=lambda r: r.rate)
        twin = max((r for r in fp32 if r.batch_size == b.batch_size and r.channels_last == b.channels_last),
                   key=lambda r: r.rate, default=best32)
        out["bf16_vs_fp32"] = b.rate / twin.rate
        out["max_abs_diff_bf16"] = max(r.extra["diff"][0] for r in bf16)
        out["bf16"] = b
    print(f"best sip setting: batch {best.batch_size}, channels_last={best.channels_last}, {best.precision} → "
          f"{best.rate:.3f} images/s vs naive {naive.rate:.3f} images/s = {out['speedup']:.2f}x")
    if best is not best32:
        print(f"best fp32 sip setting (same precision as naive, images identical up to ±1): batch "
              f"{best32.batch_size}, channels_last={best32.channels_last} → {best32.rate:.3f} images/s = "
              f"{out['speedup_same_precision']:.2f}x")
    if bf16:
        same = b.batch_size == twin.batch_size and b.channels_last == twin.channels_last
        where = "at the same batch" if same else f"(bf16 at batch {b.batch_size} vs the best fp32 setting)"
        print(f"bf16 autocast: {out['bf16_vs_fp32']:.2f}x the speed of fp32 {where} "
              f"(bf16 matmul peak here is {peaks['bf16'] / peaks['fp32']:.2f}x fp32's)")
    return out


def breakdown(label: str, result: dict, flops: dict, peaks: dict) -> dict:
    """Where the time goes (naive vs sip's best) and the bounds it sets on the speed-up."""
    naive, best = result["naive"], result["best"]
    print(f"\n{label}: where the time goes (forward hooks), per image")
    print(f"{'stage':<13} {'naive GFLOP':>11} {'naive s':>8} {'share':>6} {'sip GFLOP':>10} {'sip s':>8} "
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
        print(f"{name:<13} {gflop(naive, name):>11} {per(naive, name):>8.3f} "
              f"{100 * per(naive, name) / per(naive, 'total'):>5.1f}% {gflop(best, name):>10} "
              f"{per(best, name):>8.3f} {100 * per(best, name) / per(best, 'total'):>5.1f}%")
    total_flops_naive = sum(flops[k] * naive.timer.samples[k] for k in names)
    total_flops_sip = sum(flops[k] * best.timer.samples[k] for k in names)
    unet_share = naive.timer.seconds["unet"] / naive.seconds
    unet_flops_sip = flops["unet"] * best.timer.samples["unet"]
    bound_amdahl = 1.0 / unet_share
    dtype = "bf16" if best.precision == "bf16" else "fp32"  # the peak of the precision sip's best run used
    bound_peak = naive.seconds / (unet_flops_sip / (peaks[dtype] * 1e9))
    bound_all = naive.seconds / (total_flops_sip / (peaks[dtype] * 1e9))
    print(f"(sip does {total_flops_sip / total_flops_naive:.3f}x naive's arithmetic: the same UNet work, "
          f"one VAE encode per source instead of per variant, one text encoding per distinct prompt)")
    print(f"bounds for {label} at these settings:")
    print(f"  the UNet is {100 * unet_share:.1f}% of naive's time; batching leaves its FLOPs unchanged, so "
          f"even if sip made everything else free, at naive's UNet speed the ratio could be at most "
          f"{bound_amdahl:.2f}x")
    print(f"  with the UNet at 100% of the {dtype} matmul peak ({peaks[dtype]:.0f} GFLOP/s) and nothing else "
          f"costing anything: at most {bound_peak:.2f}x; with every network at peak: at most "
          f"{bound_all:.2f}x")
    return {"unet_share_naive": unet_share, "bound_amdahl": bound_amdahl, "bound_unet_at_peak": bound_peak,
            "bound_all_at_peak": bound_all}
