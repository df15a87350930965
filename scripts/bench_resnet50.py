#!/usr/bin/env python
"""ResNet-50 training throughput at 32 px on this CPU: fp32, bf16 autocast and bf16 weights, each in the default
(NCHW) and channels-last memory format, side by side in one run.

Each way trains its own copy of the same ``sip_resnet50_small`` (timm ResNet-50 without the stem max-pool, as
``sip train`` builds it) with AdamW and cross-entropy on the same random batch: forward, backward, optimiser
step. The timed calls are interleaved (round 1: every way, round 2: every way, ...) and the best round of each
way counts, so a busy spell of the shared machine slows every way alike and never one alone. Printed: images/s
per way and its ratio to fp32 NCHW (the default of ``sip train`` on a CPU without AMX), and the last loss of each
way (finite, and close to fp32's, or the way does not train).

    python scripts/bench_resnet50.py                       # batch 32, 3 rounds of 2 steps, BatchNorm
    python scripts/bench_resnet50.py --batch 2 --norm groupnorm --steps 4

Ways: ``fp32``; ``bf16 autocast`` (``torch.autocast("cpu", bfloat16)``: bf16 matmuls and convolutions, fp32
weights and optimiser; what ``run.precision: bf16`` does); ``bf16 weights`` (model, inputs and AdamW state in
bf16: half the memory traffic, no fp32 master weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench.machine import cpu_flags  # noqa: E402
from scripts.bench_attention import timed_together  # noqa: E402
from sip.models.classifiers import create_model  # noqa: E402

WAYS = [("fp32", "fp32", False), ("fp32 channels-last", "fp32", True),
        ("bf16 autocast", "autocast", False), ("bf16 autocast channels-last", "autocast", True),
        ("bf16 weights", "weights", False), ("bf16 weights channels-last", "weights", True)]


def make_way(base: nn.Module, precision: str, channels_last: bool, x: torch.Tensor, y: torch.Tensor, steps: int):
    """A callable that trains a copy of ``base`` for ``steps`` steps on ``(x, y)`` and returns the last loss."""
    model = copy.deepcopy(base).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    inputs = x.contiguous(memory_format=fmt)
    if precision == "weights":
        model = model.to(torch.bfloat16)
        inputs = inputs.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else nullcontext()

    def train_steps() -> float:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = model(inputs)
            loss = criterion(logits.float(), y)
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    return train_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="input side in px")
    p.add_argument("--steps", type=int, default=2, help="training steps per timed call")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each way counts")
    p.add_argument("--norm", choices=["batchnorm", "groupnorm"], default="batchnorm")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = create_model("sip_resnet50_small", {"num_classes": 10, "norm_layer": args.norm})
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    fns = [make_way(base, precision, cl, x, y, args.steps) for _, precision, cl in WAYS]
    best, losses = timed_together(fns, args.rounds)

    images = args.batch * args.steps
    rate = [images / t for t in best]
    print(f"sip_resnet50_small ({args.norm}) training at {args.size} px, batch {args.batch}, AdamW; "
          f"{torch.get_num_threads()} threads, CPU flags: {cpu_flags()}; best of {args.rounds} interleaved rounds "
          f"of {args.steps} steps")
    print("| way | images/s | × fp32 | last loss |")
    print("|---|---|---|---|")
    for (name, _, _), r, loss in zip(WAYS, rate, losses):
        print(f"| {name} | {r:.1f} | {r / rate[0]:.2f} | {loss:.3f} |")
    print(json.dumps({"batch": args.batch, "size": args.size, "norm": args.norm, "threads": torch.get_num_threads(),
                      "images_per_s": {name: round(r, 2) for (name, _, _), r in zip(WAYS, rate)},
                      "ratio_to_fp32": {name: round(r / rate[0], 3) for (name, _, _), r in zip(WAYS, rate)}}))


if __name__ == "__main__":
    main()
