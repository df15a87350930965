#!/usr/bin/env python
"""Scale-out of sip's generation and DDP training: one process against two (torchrun, Ray actors), side by side.

CPU processes at one thread each stand in for GPUs (issue 13); efficiency = images/s with N / (N × with 1).

1. Generation (``scripts/bench/scale_generate.py``): ``sip augment`` (or ``synth``) on the shipped model with one
   process, under ``torchrun --nproc_per_node 2`` and with ``--engine ray`` (2 generator actors); images/s
   end-to-end and steady (PNG times after every lane's first batch); same files, bytes and metadata as the
   one-process output (without ``--batch-invariant`` torchrun may differ by a grey level: README, Determinism).
2. A DDP epoch (``scripts/bench/scale_ddp.py``): ``sip distill pipelines/fmnist_student_cnn_real.yaml`` (or
   ``sip train``) with one process, then under torchrun (the global batch doubles), against a random-weight
   teacher of ``fmnist_teacher_strong.yaml``'s architecture; epoch time from ``metrics.jsonl``.

Outputs and logs go under ``--out`` (rerunning replaces them). Run on idle cores (load printed at start and end).

Usage:
    .venv/bin/python scripts/bench_scale.py             # 100 images, 20 steps, a 4,096-image epoch (~5 min on 2 cores)
    .venv/bin/python scripts/bench_scale.py --quick     # smoke run: 20 images, 2 steps, a 256-image epoch
    .venv/bin/python scripts/bench_scale.py --generate synth --ddp train
    .venv/bin/python scripts/bench_scale.py --skip-ddp --batch-invariant   # generation only, bytes match

Prints tables, then as its last line one JSON object: {"gen_efficiency_torchrun": ..., "gen_efficiency_ray": ...,
"gen_identical_torchrun": ..., "ddp_efficiency": ..., "ddp_epoch_s": {...}, ...}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench.scale_ddp import report_ddp, run_ddp
from scripts.bench.scale_generate import report_generation, run_generation
from scripts.bench.scale_launch import REPO


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 images, 2 steps, batch 4; a 256-image epoch, 100 eval images")
    parser.add_argument("--out", default="runs/bench_scale", help="folder of every configuration's output and log")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes and Ray generator actors (2)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before a launch is stopped")
    g = parser.add_argument_group("generation")
    g.add_argument("--generate", choices=["augment", "synth"], default="augment", help="the sip command (augment)")
    g.add_argument("--shots", type=int, default=None, help="source images per class (augment; default 5, quick 1)")
    g.add_argument("--per-image", type=int, default=2,
                   help="variants per source (augment); synth draws shots × per-image per class")
    g.add_argument("--steps", type=int, default=None,
                   help="schedule steps; img2img runs steps × strength of them (default 20, quick 2)")
    g.add_argument("--batch-size", type=int, default=None, help="generate.batch_size (default 10, quick 4)")
    g.add_argument("--batch-invariant", action="store_true",
                   help="generate.batch_invariant: bytes independent of batching (slower)")
    g.add_argument("--skip-generate", action="store_true")
    g.add_argument("--skip-ray", action="store_true")
    d = parser.add_argument_group("DDP epoch")
    d.add_argument("--ddp", choices=["distill", "train"], default="distill", help="the sip command (distill)")
    d.add_argument("--ddp-recipe", default=None,
                   help="recipe (default pipelines/fmnist_student_cnn_real.yaml for distill, fmnist_teacher.yaml "
                        "for train)")
    d.add_argument("--epoch-images", type=int, default=None,
                   help="images per epoch: data.mix.epoch_size (distill) or data.real.stop (train); default 4096, "
                        "quick 256")
    d.add_argument("--eval-images", type=int, default=None, help="data.eval.stop (default 1000, quick 100)")
    d.add_argument("--epochs", type=int, default=1, help="epochs; with more than one the faster of epochs 2+ counts")
    d.add_argument("--ddp-batch", type=int, default=None, help="data.batch_size per process (default: the recipe's)")
    d.add_argument("--teacher", default=None, help="a trained teacher folder (default: random weights)")
    d.add_argument("--teacher-recipe", default="pipelines/fmnist_teacher_strong.yaml",
                   help="the architecture of the random-weight teacher")
    d.add_argument("--skip-ddp", action="store_true")
    args = parser.parse_args()
    q = args.quick
    args.shots = args.shots or (1 if q else 5)
    args.steps = args.steps or (2 if q else 20)
    args.batch_size = args.batch_size or (4 if q else 10)
    args.epoch_images = args.epoch_images or (256 if q else 4096)
    args.eval_images = args.eval_images or (100 if q else 1000)
    args.strength = 0.5  # fmnist_augment.yaml's generate.strength
    if args.processes < 2:
        parser.error("--processes must be at least 2 (it is compared with one process)")
    return args


def main() -> None:
    args = parse_args()
    root = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    # 1. the machine: versions and load (other processes on the cores make the efficiencies meaningless)
    versions = {name: importlib.metadata.version(name) for name in ("torch", "accelerate")}
    if importlib.util.find_spec("ray") is not None:
        versions["ray"] = importlib.metadata.version("ray")
    print(f"# bench_scale: 1 process vs {args.processes} (torchrun, Ray actors), 1 thread each")
    print(f"machine: {os.cpu_count()} CPUs, {', '.join(f'{k} {v}' for k, v in versions.items())}; load average at "
          f"start {load0[0]:.2f}; outputs and logs under {root}")
    if load0[0] > 0.5:
        print(f"warning: other processes are using the CPU (load {load0[0]:.2f}): times are inflated and the "
              f"efficiencies below are not this machine's (they need {args.processes} idle cores)")
    summary: dict = {}
    # 2. generation
    if not args.skip_generate:
        gen = report_generation(args, run_generation(args, root))
        summary.update({
            "gen_command": args.generate, "gen_images": gen["one"]["images"],
            "gen_images_per_s": {m: v["images_per_s_steady"] for m, v in gen.items()},
            "gen_images_per_s_end_to_end": {m: v["images_per_s_end_to_end"] for m, v in gen.items()},
            "gen_efficiency_torchrun": gen["torchrun"]["efficiency_steady"],
            "gen_efficiency_end_to_end_torchrun": gen["torchrun"]["efficiency_end_to_end"],
            "gen_identical_torchrun": gen["torchrun"]["equal"]["identical_all"],
            "gen_same_files_torchrun": gen["torchrun"]["equal"]["same_files"],
            "gen_processes_seen": {m: v["processes_seen"] for m, v in gen.items()}})
        if "ray" in gen:
            summary.update({"gen_efficiency_ray": gen["ray"]["efficiency_steady"],
                            "gen_efficiency_end_to_end_ray": gen["ray"]["efficiency_end_to_end"],
                            "gen_identical_ray": gen["ray"]["equal"]["identical_all"],
                            "gen_same_files_ray": gen["ray"]["equal"]["same_files"]})
    # 3. a DDP epoch
    if not args.skip_ddp:
        ddp = report_ddp(args, run_ddp(args, root))
        summary.update({"ddp_command": args.ddp, "ddp_efficiency": ddp["torchrun"]["efficiency"],
                        "ddp_epoch_s": {m: v["epoch_s"] for m, v in ddp.items()},
                        "ddp_images_per_s": {m: v["images_per_s"] for m, v in ddp.items()},
                        "ddp_processes": {m: v["processes"] for m, v in ddp.items()},
                        "ddp_outside_epoch_s": {m: v["outside_epoch_s"] for m, v in ddp.items()}})
    load1 = os.getloadavg()
    print(f"\nload average at end {load1[0]:.2f}; whole benchmark {time.monotonic() - t0:.0f} s")
    print(json.dumps({**summary, "processes": args.processes, "batch_invariant": args.batch_invariant,
                      "load_start": round(load0[0], 2), "load_end": round(load1[0], 2), "quick": args.quick}))


if __name__ == "__main__":
    main()
