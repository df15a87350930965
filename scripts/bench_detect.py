#!/usr/bin/env python
"""Detection throughput: the scene writer's images/s (compose + write through sip's DatasetWriter + the COCO
file) and a detector's training and inference images/s, on scenes that writer just made.

    python scripts/bench_detect.py                       # FCOS + resnet18, 128 px scenes, batch 16
    python scripts/bench_detect.py --norm group --batch 2
    python scripts/bench_detect.py --smoke               # seconds: tiny everything, checks the script runs

Training: optimiser steps of the detector's own losses (forward, backward, AdamW) after one warm-up step;
inference: eval-mode forward with post-processing (NMS), after one warm-up batch. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sip.detect.coco import SceneRecipe, run_scenes  # noqa: E402
from sip.detect.data import SceneImages, collate_scenes  # noqa: E402
from sip.detect.models import DetectorSection, build_detector  # noqa: E402
from sip.detect.scenes import ObjectsSection, SceneSection  # noqa: E402


def bench_writer(out: Path, scenes: SceneSection) -> float:
    """Scenes per second of ``sip scenes`` into a fresh folder (objects loaded before the clock starts)."""
    from sip.detect.scenes import load_object_pool

    objects = ObjectsSection(start=0, stop=5000)
    load_object_pool(objects)  # Fashion-MNIST's idx files read and cached outside the timing
    t = time.perf_counter()
    run_scenes(SceneRecipe(output=str(out), objects=objects, scenes=scenes, progress=False))
    return scenes.count / (time.perf_counter() - t)


def batches(data: SceneImages, batch: int, n: int) -> list[dict]:
    return [collate_scenes([data.item((k * batch + j) % len(data)) for j in range(batch)]) for k in range(n)]


def bench_train(model: torch.nn.Module, data: list[dict]) -> float:
    """Training images/s over ``data[1:]`` (``data[0]`` warms up)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    t = None
    for k, b in enumerate(data):
        if k == 1:
            t = time.perf_counter()
        losses = model(list(b["image"]), [{"boxes": x, "labels": y} for x, y in zip(b["boxes"], b["labels"])])
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sum(len(b["boxes"]) for b in data[1:]) / (time.perf_counter() - t)


@torch.no_grad()
def bench_infer(model: torch.nn.Module, data: list[dict]) -> float:
    model.eval()
    t = None
    for k, b in enumerate(data):
        if k == 1:
            t = time.perf_counter()
        model(list(b["image"]))
    return sum(len(b["boxes"]) for b in data[1:]) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, measures nothing")
    ap.add_argument("--scenes", type=int, default=200, help="scenes the writer makes")
    ap.add_argument("--size", type=int, default=128, help="scene side (px)")
    ap.add_argument("--head", default="fcos", choices=["fcos", "retinanet"])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--norm", default="batch", choices=["batch", "group"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (and inference batches)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.scenes, args.size, args.backbone, args.batch, args.steps = 6, 64, "test_resnet", 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    scenes = SceneSection(count=args.scenes, size=args.size, object_size=(args.size // 8, args.size * 7 // 16))
    with tempfile.TemporaryDirectory() as tmp:
        writer = bench_writer(Path(tmp) / "scenes", scenes)
        data = SceneImages(Path(tmp) / "scenes")
        torch.manual_seed(0)
        section = DetectorSection(head=args.head, backbone=args.backbone, norm=args.norm,
                                  fpn_channels=32 if args.smoke else 64)
        model = build_detector(section, len(data.classes), data.size)
        work = batches(data, args.batch, args.steps + 1)
        train = bench_train(model, work)
        infer = bench_infer(model, work)
    result = {"scene_writer_images_per_s": round(writer, 1), "train_images_per_s": round(train, 2),
              "inference_images_per_s": round(infer, 2), "head": args.head, "backbone": args.backbone,
              "norm": args.norm, "size": args.size, "batch": args.batch, "steps": args.steps,
              "threads": torch.get_num_threads(), "smoke": args.smoke}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
