#!/usr/bin/env python
"""Training-step speed in bf16 autocast against fp32, side by side in one run: the figures behind
``sip.runtime.AMX_MIN_IMG_SIZE`` (on an AMX CPU bf16 pays only when each matmul / convolution is large).

Each way is one full training step (forward, cross-entropy, backward, AdamW step) of a classifier sip trains, on
random images of its input size, batch ``--batch``: fp32, then the same under ``torch.autocast(bfloat16)`` (what
``run.precision: bf16`` runs), timed in alternation (best of ``--steps`` each, after one warm-up step), so a slow
spell of this shared machine hits both alike.

Models (``--models``): ``resnet10t@28`` (the strong teacher, ``sip_resnet10t_small``), ``vit4@28`` (the 4-block
SPT + LSA ViT student), ``resnet50@32`` (``sip_resnet50_small``), ``vit_tiny@224`` (timm ``vit_tiny_patch16_224``).

    python scripts/bench_train_precision.py                               # all four
    python scripts/bench_train_precision.py --models resnet10t@28 vit4@28  # the small-input ones

Prints a table and, last, one JSON line with every ratio and whether this CPU has AMX (without AMX or
AVX512-BF16, bf16 runs emulated and every ratio is far below 1: the figures then say nothing about AMX).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sip.models.classifiers import create_model, register_sip_models  # noqa: E402
from sip.runtime import AMX_MIN_IMG_SIZE, cpu_has_amx  # noqa: E402

MODELS = {  # name@size -> (timm name, kwargs, input size)
    "resnet10t@28": ("sip_resnet10t_small", {"in_chans": 1}, 28),
    "vit4@28": ("sip_vit_spt_lsa_tiny", {"img_size": 28, "patch_size": 4, "embed_dim": 128, "depth": 4,
                                         "num_heads": 4, "in_chans": 1}, 28),
    "resnet50@32": ("sip_resnet50_small", {"in_chans": 3}, 32),
    "vit_tiny@224": ("vit_tiny_patch16_224", {"in_chans": 3}, 224),
}


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def measure(key: str, batch: int, steps: int) -> dict:
    name, kwargs, size = MODELS[key]
    torch.manual_seed(0)
    model = create_model(name, {**kwargs, "num_classes": 10}).train()
    x = torch.randn(batch, kwargs["in_chans"], size, size)
    y = torch.randint(0, 10, (batch,))
    ways = {"fp32": step_fn(model, x, y, False), "bf16": step_fn(model, x, y, True)}
    for fn in ways.values():
        fn()  # warm-up: kernels, allocator
    best = {w: float("inf") for w in ways}
    for _ in range(steps):
        for w, fn in ways.items():
            best[w] = min(best[w], fn())
    return {"model": key, "timm_name": name, "img_size": size, "batch": batch, "fp32_s": round(best["fp32"], 4),
            "bf16_s": round(best["bf16"], 4), "bf16_vs_fp32": round(best["fp32"] / best["bf16"], 3),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per way (best counts)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_sip_models()
    amx = cpu_has_amx()
    print(f"# bench_train_precision: bf16 autocast vs fp32 training steps; {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, AMX: {amx}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'model':<14} {'px':>4} {'params M':>8} {'fp32 s/step':>11} {'bf16 s/step':>11} {'bf16 speed':>10}")
    rows = []
    for key in args.models:
        r = measure(key, args.batch, args.steps)
        rows.append(r)
        print(f"{key:<14} {r['img_size']:>4} {r['params_m']:>8.2f} {r['fp32_s']:>11.3f} {r['bf16_s']:>11.3f} "
              f"{r['bf16_vs_fp32']:>9.2f}x", flush=True)
    print(f"(bf16 speed = fp32 seconds / bf16 seconds per step: above 1 bf16 pays; sip's precision 'auto' picks bf16 "
          f"on an AMX CPU only for inputs >= AMX_MIN_IMG_SIZE = {AMX_MIN_IMG_SIZE} px)")
    print(json.dumps({"amx": amx, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
