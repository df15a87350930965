#!/usr/bin/env python
"""``sip adapt`` speed and memory per method on the shipped model with 100 Fashion-MNIST shots (10 per class).

Each method runs in a process of its own (so each peak memory is its own) through ``sip.adapt.run.run_adapt``
exactly as ``sip adapt pipelines/adapt_<method>.yaml`` does, with the recipe's batch size and learning rate, for
``--steps`` steps without validation grids. Steps/s is measured over the steps after the first two (warm-up);
the time the recipe's full run would take is projected from it (plus the measured setup: model load, shot
encoding). Peak memory is the process's maximum resident set (and CUDA's peak allocation on a GPU).

Usage:
    python scripts/bench_adapt.py --smoke          # 4 steps per method: checks the script runs
    python scripts/bench_adapt.py --steps 60       # the measurement (a few minutes on 2 cores)

Prints a table, then one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("textual_inversion", "lora", "finetune")


def run_one(method: str, steps: int, out: Path) -> dict:
    """Adapt with the shipped recipe for ``steps`` steps; time each step; report speed and peak memory."""
    import torch

    from sip.adapt.recipe import AdaptRecipe
    from sip.adapt.run import run_adapt
    from sip.config import load_config

    recipe = load_config(AdaptRecipe, ROOT / "pipelines" / f"adapt_{method}.yaml",
                         [f"steps={steps}", "warmup_steps=0", "validation.every=0", f"checkpoint_every={steps}",
                          f"output={out}", "progress=false"])
    stamps: list[float] = []
    t0 = time.perf_counter()
    result = run_adapt(recipe, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    timed = stamps[2:] if len(stamps) > 3 else stamps
    rate = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    setup = stamps[0] - t0  # model load, shots read and encoded, first step
    full = load_config(AdaptRecipe, ROOT / "pipelines" / f"adapt_{method}.yaml")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"method": method, "images": len(json.loads((out / "run.json").read_text())["shots"]),
            "batch_size": recipe.batch_size, "steps_timed": len(timed) - 1, "steps_per_s": round(rate, 3),
            "setup_s": round(setup, 1), "recipe_steps": full.steps,
            "projected_recipe_minutes": round((setup + full.steps / rate) / 60, 2),
            "peak_rss_mib": round(peak, 1), "cuda_peak_mib": cuda, "last_loss": result["last_loss"],
            "threads": __import__("torch").get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per method (default 60)")
    parser.add_argument("--smoke", action="store_true", help="4 steps per method: check that the script runs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # the child process of one method
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 4 if args.smoke else args.steps
    if args.one:
        print(json.dumps(run_one(args.one, steps, args.out)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-adapt-") as tmp:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", method, "--steps", str(steps), "--out", str(Path(tmp) / method)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'method':<18} {'images':>6} {'batch':>5} {'steps/s':>8} {'setup s':>8} {'recipe min':>10} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r['method']:<18} {r['images']:>6} {r['batch_size']:>5} {r['steps_per_s']:>8} {r['setup_s']:>8} "
              f"{r['projected_recipe_minutes']:>10} {r['peak_rss_mib']:>12}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
