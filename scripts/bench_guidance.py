#!/usr/bin/env python
"""Teacher-guided generation against unguided generation, side by side in one run, on the shipped model.

Every row draws the same prompts with the same per-image seeds through ``DiffusionGenerator`` (batched, the fast
path, the model's own precision); the guided rows add ``sip.augment.guidance`` with a teacher of the real
teacher's size (timm ``resnet10t`` at 28 px, 10 Fashion-MNIST classes; random weights unless ``--teacher`` names a
sip run folder: its cost does not depend on its values). Rounds are interleaved (unguided, guided a, guided b, ...,
unguided, ...) so a slow spell of the shared machine hits every row alike; each row keeps its best round.

Usage:
    python scripts/bench_guidance.py                      # txt2img, 64 images per round, 3 rounds
    python scripts/bench_guidance.py --mode img2img --images 32 --rounds 2

Prints a table, then as its last line one JSON object: {"rows": [{"name", "images_per_s", "cost_ratio"}, ...]}
where ``cost_ratio`` is seconds per image over the unguided row's (the issue's target: <= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")

import torch

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.guidance import ClassifierGuidance, GuideClassifier, GuideConfig
from sip.data.sources import FASHION_MNIST_CLASSES
from sip.models.diffusion import DEFAULT_SD_MODEL

# (name, guide config) of each guided row: every step, every 2nd step, the second half of the steps
WAYS = [("guided, every step", {"steps": [0.0, 1.0], "every": 1}),
        ("guided, every 2nd step", {"steps": [0.0, 1.0], "every": 2}),
        ("guided, last half", {"steps": [0.5, 1.0], "every": 1}),
        # pipelines/fmnist_synth_guided.yaml's setting: the first 60% of the steps, every 2nd
        ("guided, recipe (first 60%, every 2nd)", {"steps": [0.0, 0.6], "every": 2})]


def teacher(path: str | None) -> GuideClassifier:
    if path:
        return GuideClassifier.from_checkpoint(path)
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=len(FASHION_MNIST_CLASSES))
    config = {"input_size": [3, 28, 28], "mean": [0.2860] * 3, "std": [0.3530] * 3}
    return GuideClassifier(model, FASHION_MNIST_CLASSES, config, "random resnet10t (28 px)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_SD_MODEL)
    ap.add_argument("--teacher", default=None, help="a sip run folder (default: a random resnet10t of its size)")
    ap.add_argument("--mode", choices=["txt2img", "img2img"], default="txt2img")
    ap.add_argument("--images", type=int, default=64, help="images per round and row")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scale", type=float, default=1.0, help="guide.scale (cost does not depend on it)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    gen = DiffusionGenerator.from_config(GenerateConfig(model=args.model, steps=args.steps, strength=0.5,
                                                        guidance_scale=4.0, batch_size=args.batch_size))
    t = teacher(args.teacher).to(gen.device)
    labels = [FASHION_MNIST_CLASSES[i % len(FASHION_MNIST_CLASSES)] for i in range(args.images)]
    prompts = [f"a photo of a {lab.lower()}" for lab in labels]
    sources = gen.text2img(prompts[: args.batch_size], list(range(args.batch_size)))  # img2img sources
    guides = [None] + [ClassifierGuidance(GuideConfig(teacher="bench", scale=args.scale, **kw), t) for _, kw in WAYS]
    names = ["unguided"] + [name for name, _ in WAYS]

    def draw(guidance) -> None:
        for s in range(0, args.images, args.batch_size):
            idx = range(s, min(s + args.batch_size, args.images))
            guide = guidance.toward([labels[i] for i in idx]) if guidance is not None else None
            if args.mode == "txt2img":
                gen.text2img([prompts[i] for i in idx], list(idx), guide=guide)
            else:
                gen.img2img([sources[i % len(sources)] for i in idx], [prompts[i] for i in idx], list(idx),
                            guide=guide)

    best = [float("inf")] * len(guides)
    draw(None)  # warm-up
    for _ in range(args.rounds):
        for i, g in enumerate(guides):
            t0 = time.perf_counter()
            draw(g)
            best[i] = min(best[i], time.perf_counter() - t0)
    print(f"{args.mode}, {args.model}, {args.steps} steps, batch {args.batch_size}, {args.images} images per round, "
          f"best of {args.rounds} interleaved rounds, {torch.get_num_threads()} threads, teacher: {t.source}")
    rows = []
    for name, seconds in zip(names, best):
        rows.append({"name": name, "images_per_s": round(args.images / seconds, 2),
                     "cost_ratio": round(seconds / best[0], 3)})
        print(f"  {name:<38} {args.images / seconds:8.2f} images/s   cost per image {seconds / best[0]:.2f}x unguided")
    print(json.dumps({"mode": args.mode, "steps": args.steps, "batch_size": args.batch_size, "rows": rows}))


if __name__ == "__main__":
    main()
