#!/usr/bin/env python
"""One epoch of knowledge distillation three ways, side by side in one run:

1. online KD: a ResNet-50 teacher runs on every student batch (Hinton KD);
2. precomputed KD: the same epoch from a TeacherLogitsStore written once by ``sip logits`` (views replayed);
3. the floor: the student's epoch alone (cross-entropy, no teacher, the same data pipeline).

Student: ViT-Tiny (``vit_tiny_patch16_224``). All three run through ``sip.distill.run.run_distillation`` exactly
as ``sip distill`` does; the teacher has random weights (its cost does not depend on their values). Each
mode trains three epochs; the faster of epochs 2 and 3 is reported (epoch 1 warms up allocators and caches;
the minimum resists interference from other processes). The store's one-off build time is reported
separately.

Usage:
    python scripts/bench_distill.py            # 224 px, 96 images per epoch (~4 minutes on 2 cores)
    python scripts/bench_distill.py --quick    # 224 px, 16 images per epoch (under a minute)

Prints a table, then one JSON line: {"precomputed_speedup": online / precomputed epoch time,
"vs_floor": precomputed / student-alone epoch time, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 images per epoch (under a minute)")
    parser.add_argument("--images", type=int, default=None, help="training images per epoch (default 96, quick 16)")
    parser.add_argument("--img-size", type=int, default=224, help="input size of teacher and student (default 224)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="vit_tiny_patch16_224")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on an AMX CPU at 224 px (what sip distill picks), else fp32")
    args = parser.parse_args()
    n_images = args.images or (16 if args.quick else 96)
    shots = max(1, -(-n_images // 10))  # Fashion-MNIST: 10 classes

    import torch

    from sip.config import load_config
    from sip.data.sources import FASHION_MNIST_CLASSES
    from sip.distill.run import DistillRecipe, LogitsRecipe, run_distillation, run_logits
    from sip.models.checkpoints import model_metadata, save_model_file
    from sip.models.classifiers import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sip-bench-distill-"))
    size = args.img_size
    from sip.runtime import large_input, resolve_precision

    precision = resolve_precision(args.precision, torch.device("cpu"), large_input(size))

    # a sip checkpoint of the teacher (random weights, real architecture and preprocessing)
    teacher = create_model(args.teacher, {"num_classes": 10})
    input_config = {"input_size": [3, size, size], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225], "crop_pct": 1.0, "crop_mode": "center"}
    save_model_file(teacher, work / "teacher" / "model.safetensors",
                    model_metadata(args.teacher, {"num_classes": 10}, FASHION_MNIST_CLASSES, input_config))
    teacher_params = sum(p.numel() for p in teacher.parameters())
    del teacher

    common = [f"data.real.shots={shots}", "data.real.start=50000", "data.eval.shots=1", f"data.img_size={size}",
              f"data.batch_size={args.batch_size}", "data.scale=[0.35, 1.0]", "run.progress=false",
              "run.device=cpu", f"run.precision={args.precision}", "run.eval_every=100"]
    if args.threads:
        common.append(f"run.threads={args.threads}")
    student = [f"student.name={args.student}", "student.patch_size=null", "student.kwargs={}", "optim.epochs=3"]
    teachers = f"teachers=[{{checkpoint: {work / 'teacher'}}}]"

    def epoch_time(run_dir: Path) -> float:
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return min(float(x["epoch_time_s"]) for x in lines[1:])  # epoch 1 warms up; min resists interference

    rows = {}
    # 3. the floor: student alone (same views, same pipeline, no teacher)
    run_distillation(load_config(DistillRecipe, overrides=[*common, *student, teachers, "loss.name=ce"]), work / "floor")
    rows["student alone (floor)"] = epoch_time(work / "floor")
    # 1. online KD
    run_distillation(load_config(DistillRecipe, overrides=[*common, *student, teachers, "loss.name=hinton"]),
                     work / "online")
    rows["online KD (teacher every batch)"] = epoch_time(work / "online")
    # 2. precomputed: build the store once (2 views per image), then the epoch from it
    t0 = time.perf_counter()
    run_logits(load_config(LogitsRecipe, overrides=[*common, teachers, "store.views=2"]), work / "store")
    build = time.perf_counter() - t0
    run_distillation(load_config(DistillRecipe, overrides=[*common, *student, teachers, "loss.name=hinton",
                                                           f"logits={work / 'store'}"]), work / "stored")
    rows["precomputed KD (logits store)"] = epoch_time(work / "stored")

    n = shots * 10
    n_epoch = (n // args.batch_size) * args.batch_size
    floor = rows["student alone (floor)"]
    online = rows["online KD (teacher every batch)"]
    stored = rows["precomputed KD (logits store)"]
    print(f"\nKD epoch on {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"teacher {args.teacher} ({teacher_params / 1e6:.1f} M params), student {args.student}, {size} px, "
          f"{n_epoch} images/epoch, batch {args.batch_size}, precision {precision}")
    print(f"{'mode':34s} {'epoch s':>9s} {'images/s':>9s} {'× floor':>8s}")
    for name, seconds in rows.items():
        print(f"{name:34s} {seconds:9.2f} {n_epoch / seconds:9.2f} {seconds / floor:8.2f}")
    print(f"{'store build (once, 2 views/image)':34s} {build:9.2f}")
    print(json.dumps({"precomputed_speedup": round(online / stored, 3), "vs_floor": round(stored / floor, 3),
                      "online_vs_floor": round(online / floor, 3), "store_build_s": round(build, 2),
                      "epoch_s": {"floor": floor, "online": online, "precomputed": stored},
                      "teacher": args.teacher, "student": args.student, "img_size": size, "images": n_epoch,
                      "threads": torch.get_num_threads(), "precision": precision}))


if __name__ == "__main__":
    main()
