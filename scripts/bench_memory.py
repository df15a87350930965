#!/usr/bin/env python
"""Peak memory of a generation run of N images against one of 10·N images, with the shipped model.

Each run is ``sip.augment.run.run_augment`` on the recipe ``pipelines/fmnist_augment.yaml`` (Fashion-MNIST
sources from the pool 50,000+, EfficientNet-Lite0 captions, img2img with the shipped model, images and
metadata streamed to disk) in a fresh subprocess, so each peak is its own: the child reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` once after building its models and once at the end.
Streaming means the peak must not grow with the number of images (target: within 10%).

Usage:
    python scripts/bench_memory.py            # N = 320 and 3,200 images (~3 minutes on 2 cores)
    python scripts/bench_memory.py --quick    # N = 40 and 400 images (about a minute)

Prints a table, then one JSON line: {"peak_rss_ratio": peak(10·N) / peak(N), ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRAINING_OUTPUT = REPO / ".cache" / "fmnist-tiny-sd"
RECIPE = REPO / "pipelines" / "fmnist_augment.yaml"


def resolve_model(name: str | None) -> str:
    from sip.models.diffusion import DEFAULT_SD_MODEL

    if name:
        return name
    for folder in (Path(DEFAULT_SD_MODEL), TRAINING_OUTPUT):
        if (folder / "model_index.json").is_file():
            return str(folder)
    raise SystemExit(f"no shipped model yet in {DEFAULT_SD_MODEL} or {TRAINING_OUTPUT}; pass --model FOLDER")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args) -> None:
    """One run_augment of ``args.images`` images; prints one JSON line."""
    import torch

    from sip.augment.caption import build_captioner
    from sip.augment.generate import DiffusionGenerator
    from sip.augment.run import AugmentRecipe, run_augment
    from sip.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    per_image = args.per_image
    sources = -(-args.images // per_image)
    recipe = load_config(AugmentRecipe, RECIPE, [
        "source.shots=null", f"source.stop={50000 + sources}", f"generate.model={args.model}",
        f"generate.per_image={per_image}", f"generate.steps={args.steps}", "generate.device=cpu",
        f"output={args.output}", "progress=false"])
    rss_start = max_rss_mb()
    generator = DiffusionGenerator.from_config(recipe.generate)
    captioner = build_captioner(recipe.caption)
    rss_loaded = max_rss_mb()
    t0 = time.perf_counter()
    summary = run_augment(recipe, generator, captioner)
    seconds = time.perf_counter() - t0
    print(json.dumps({"images": sources * per_image, "sources": sources, "written": summary.written,
                      "failed": summary.failed, "seconds": seconds, "rss_start_mb": rss_start,
                      "rss_loaded_mb": rss_loaded, "peak_rss_mb": max_rss_mb(), "chunk": recipe.chunk,
                      "batch_size": recipe.generate.batch_size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 40 (under about a minute)")
    parser.add_argument("--images", type=int, default=None, help="N (default 320, quick 40)")
    parser.add_argument("--per-image", type=int, default=10, help="variants per source (the recipe's 10)")
    parser.add_argument("--steps", type=int, default=30, help="schedule steps (the recipe's 30)")
    parser.add_argument("--model", default=None,
                        help="the shipped model (default: sip's, else .cache/fmnist-tiny-sd)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    n = args.images or (40 if args.quick else 320)
    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="sip-bench-memory-"))
    print("# bench_memory: peak RSS of run_augment for N and 10·N images (one subprocess each)")
    print(f"recipe {RECIPE.relative_to(REPO)}, model {model}, {args.per_image} variants per source, "
          f"steps {args.steps}")
    results = []
    for images in (n, 10 * n):
        cmd = [sys.executable, __file__, "--child", "--images", str(images),
               "--per-image", str(args.per_image), "--steps", str(args.steps), "--model", model,
               "--output", str(work / f"run-{images}")]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"running {images} images …", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                           "TRANSFORMERS_OFFLINE": "1"})
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"child run of {images} images failed (exit {proc.returncode})")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"\n{'run':<5} {'sources':>7} {'images':>6} {'written':>7} {'s':>7} {'img/s':>6} "
          f"{'RSS loaded MB':>13} {'peak RSS MB':>11} {'growth MB':>9}")
    for name, r in zip(("N", "10·N"), results):
        print(f"{name:<5} {r['sources']:>7} {r['images']:>6} {r['written']:>7} {r['seconds']:>7.1f} "
              f"{r['written'] / r['seconds']:>6.1f} {r['rss_loaded_mb']:>13.0f} {r['peak_rss_mb']:>11.0f} "
              f"{r['peak_rss_mb'] - r['rss_loaded_mb']:>9.0f}")
    small, large = results
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"(growth = peak minus the RSS right after the models were built; chunk {small['chunk']} sources, "
          f"batch {small['batch_size']} images)")
    print(f"peak RSS 10·N / N = {ratio:.3f} (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"peak_rss_ratio": round(ratio, 4), "peak_rss_mb_n": round(small["peak_rss_mb"], 1),
                      "peak_rss_mb_10n": round(large["peak_rss_mb"], 1), "n_images": small["images"],
                      "images_per_s_10n": round(large["written"] / large["seconds"], 2),
                      "growth_mb_n": round(small["peak_rss_mb"] - small["rss_loaded_mb"], 1),
                      "growth_mb_10n": round(large["peak_rss_mb"] - large["rss_loaded_mb"], 1),
                      "quick": args.quick}))


if __name__ == "__main__":
    main()
