#!/usr/bin/env python
"""The SD 1.5-architecture UNet alone, nearer the hardware's peak: its FLOP/s as a fraction of the same-run matmul
peak, for each way to run it, side by side in one run.

Ways (each on the same inputs: one denoising call of a classifier-free-guided batch, ``--batch`` latents × 2):

- ``fp32``: eager, fp32 (what naive diffusers runs on a CPU);
- ``bf16 autocast``: eager under ``torch.autocast("cpu", bfloat16)``, channels-last (sip's ``precision: bf16``);
- ``bf16 weights``: eager, the UNet stored in bf16, channels-last (``generate.dtype: bfloat16``): no per-call casts;
- with ``--compile``, each of the three again under ``torch.compile`` (inductor) with ``freezing`` (weights folded
  as constants, casts included, and prepacked for oneDNN; element-wise work fused): what ``generate.compile`` runs.

The timed calls of the ways are interleaved (``--rounds``, best of each counts: other processes only ever slow a
call down); the matmul peak is measured before and after, the higher counts. Compile time is printed, not
counted. Last line: one JSON object.

Usage:
    python scripts/bench_unet_peak.py                 # 512 px, batch 1 (× 2 for guidance), eager ways
    python scripts/bench_unet_peak.py --compile       # also inductor + freezing (minutes of compile on 2 cores)
    python scripts/bench_unet_peak.py --size 256 --batch 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")

import torch

from scripts.bench.img2img_inputs import sd15_unet
from scripts.bench.machine import Peaks, unet_flops


def top_attention(unet, x, rounds: int) -> dict:
    """The UNet's highest-resolution self-attentions (``attn1`` at the first block width): how many, their FLOPs
    and the best time of one bf16 SDPA call of their shape (what every bf16 way runs for them)."""
    import torch.nn.functional as F

    width = unet.config.block_out_channels[0]
    layers = [m for name, m in unet.named_modules() if name.endswith("attn1") and m.to_q.in_features == width]
    heads, tokens = layers[0].heads, x.shape[-1] * x.shape[-2]
    dim = layers[0].to_q.out_features // heads
    q, k, v = (torch.randn(x.shape[0], heads, tokens, dim, dtype=torch.bfloat16) for _ in range(3))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            best = min(best, time.perf_counter() - t0)
    return {"layers": len(layers), "tokens": tokens, "heads": heads, "dim": dim, "seconds": best,
            "flops": 4.0 * x.shape[0] * heads * tokens * tokens * dim}


def make_ways(unet, compile_: bool, autotune: bool = False) -> dict:
    """name -> (module, autocast?, dtype of the inputs); the fp32 ways keep the default memory format (what naive
    runs), the bf16 ones are channels-last (sip's fastest bf16 setting)."""
    ways = {"fp32": (unet, False, torch.float32)}
    cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    ways["bf16 autocast"] = (cl, True, torch.float32)
    weights = copy.deepcopy(unet).to(torch.bfloat16).to(memory_format=torch.channels_last)
    ways["bf16 weights"] = (weights, False, torch.bfloat16)
    # torch.compile wraps a module without changing it, so the compiled ways share the eager ways' modules (the
    # frozen graphs hold their own folded copies of the weights)
    if compile_:  # what generate.compile runs: constant weights folded (casts too) and prepacked for oneDNN
        frozen = {"freezing": True}
        for name in ("fp32", "bf16 autocast", "bf16 weights"):
            module, autocast, dtype = ways[name]
            ways[f"{name}, compiled"] = (torch.compile(module, options=frozen), autocast, dtype)
    if autotune:  # inductor's own GEMM templates (AMX micro-kernels on a CPU), each shape benchmarked at compile
        options = {"freezing": True, "max_autotune": True}
        ways["bf16 weights, max-autotune"] = (torch.compile(weights, options=options), False, torch.bfloat16)
    return ways


def call(way, x, t, ctx) -> None:
    module, autocast, dtype = way
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    fmt = torch.contiguous_format if dtype == torch.float32 and not autocast else torch.channels_last
    with torch.inference_mode(), amp:
        module(x.to(dtype).contiguous(memory_format=fmt), t, encoder_hidden_states=ctx.to(dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image pixels (latents are size / 8)")
    parser.add_argument("--batch", type=int, default=1, help="latents per call before guidance doubles them")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also each way compiled (inductor, freezing)")
    parser.add_argument("--autotune", action="store_true",
                        help="also bf16 weights compiled with max_autotune (long compile)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = Peaks(2048, quick=False)
    torch.manual_seed(0)
    unet = sd15_unet()
    side, n = args.size // 8, 2 * args.batch
    x, t, ctx = torch.randn(n, 4, side, side), torch.tensor(500), torch.randn(n, 77, 768)
    flops = float(n * unet_flops(unet, side))
    print(f"# bench_unet_peak: SD1.5-architecture UNet, {args.size} px, {n} latents per call "
          f"({flops / 1e9:.0f} GFLOP), {torch.get_num_threads()} threads, best of {args.rounds} interleaved rounds")
    ways = make_ways(unet, args.compile, args.autotune)
    for name, way in ways.items():  # warm-up: oneDNN kernels, and the compile (timed, not counted)
        t0 = time.perf_counter()
        call(way, x, t, ctx)
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    best = {name: float("inf") for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            t0 = time.perf_counter()
            call(way, x, t, ctx)
            best[name] = min(best[name], time.perf_counter() - t0)
    peak.refresh("timed")
    print(f"matmul peak (2048² GEMM, best before/after): fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s")
    print(f"{'way':<24} {'s/call':>8} {'GFLOP/s':>8} {'%peak':>6} {'x fp32':>7}")
    out = {}
    for name, seconds in best.items():
        rate = flops / seconds / 1e9
        frac = rate / peak["fp32" if name.startswith("fp32") else "bf16"]
        print(f"{name:<24} {seconds:>8.2f} {rate:>8.1f} {100 * frac:>5.1f}% {best['fp32'] / seconds:>7.2f}")
        key = name.replace(" ", "_").replace(",", "")
        out[f"{key}_peak_fraction"], out[f"{key}_s"] = round(frac, 4), round(seconds, 3)
    print("(%peak: of the same-dtype GEMM peak; target >= 50%)")
    att = top_attention(unet, x, args.rounds)
    name = min((k for k in best if k != "fp32" and not k.startswith("fp32")), key=best.get)
    total, spent = att["layers"] * att["flops"], att["layers"] * att["seconds"]
    rest = (flops - total) / (best[name] - spent) / 1e9
    print(f"the {att['layers']} self-attentions at {att['tokens']} tokens ({att['heads']} heads of {att['dim']}): "
          f"{1000 * att['seconds']:.0f} ms each as one bf16 SDPA call = {att['flops'] / att['seconds'] / 1e9:.0f} "
          f"GFLOP/s ({100 * att['flops'] / att['seconds'] / 1e9 / peak['bf16']:.0f}% of peak: {att['tokens']}² "
          f"exponentials per head for {4 * att['dim']} FLOPs each); {100 * total / flops:.0f}% of the UNet's FLOPs, "
          f"{100 * spent / best[name]:.0f}% of the '{name}' call; the rest of that call at {rest:.0f} GFLOP/s = "
          f"{100 * rest / peak['bf16']:.1f}% of the bf16 peak")
    out.update(top_attention_share=round(spent / best[name], 4), rest_peak_fraction=round(rest / peak["bf16"], 4))
    print(json.dumps({**out, "peak_fp32": round(peak["fp32"], 1), "peak_bf16": round(peak["bf16"], 1),
                      "size": args.size, "latents": n}))


if __name__ == "__main__":
    main()
