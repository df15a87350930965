#!/usr/bin/env python
"""What preparing one training item costs, per-item seeding two ways, side by side in one run.

Every training item is seeded by (run seed, epoch, position) so augmentation survives workers, process counts
and resumes (``sip.train.inputs.EpochView``). Seeding with ``torch.manual_seed`` also seeds every accelerator
generator; ``seed_item_rngs`` seeds Python, NumPy and torch's CPU generator only — the same streams. This runs a
recipe through ``sip distill`` / ``sip train`` up to its training loop, then times the recipe's own items
(decode, crop, resize, the teachers' inputs) with each way, interleaved rounds, best round each.

    python scripts/bench_items.py pipelines/fmnist_student_vit_sip.yaml \\
        --set "teachers=[{checkpoint: runs/fmnist_teacher_strong}]" \\
        --set "data.synthetic=[runs/fmnist-aug-0, runs/fmnist-synth-1k]"

Last line: one JSON object (ms per item each way, their ratio).
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

import sip.distill.run as distill_run  # noqa: E402
import sip.train.inputs as inputs  # noqa: E402
import sip.train.run as train_run  # noqa: E402
from sip.cli import app  # noqa: E402
from sip.config import read_yaml  # noqa: E402

_ITEM_RNGS = inputs.seed_item_rngs
# seed_everything's own body (it calls seed_item_rngs by its module name, which the timing swaps: taken as is, it
# would call itself)
WAYS = {"seed_everything": lambda s: (_ITEM_RNGS(s), torch.manual_seed(s)), "seed_item_rngs": _ITEM_RNGS}


def time_items(view, items: int, rounds: int) -> dict[str, float]:
    """Best ms per item over ``rounds`` interleaved rounds, per way (the view's items are read in order)."""
    best = {w: float("inf") for w in WAYS}
    try:
        for _ in range(rounds):
            for way, fn in WAYS.items():
                inputs.seed_item_rngs = fn  # EpochView.__getitem__ looks it up in the module at each call
                t = time.perf_counter()
                for k in range(items):
                    view[k]
                best[way] = min(best[way], (time.perf_counter() - t) / items * 1e3)
    finally:
        inputs.seed_item_rngs = _ITEM_RNGS
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", type=Path, help="a sip distill or sip train recipe")
    p.add_argument("--set", action="append", default=[], help="a recipe override, as on the sip CLI")
    p.add_argument("--items", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    recipe = read_yaml(args.recipe)
    command = "distill" if "teachers" in recipe or "logits" in recipe else "train"  # a distill recipe's own keys
    result = {}

    def measure(*, train_view, **_):  # stands in for the training loop: the items are what is measured
        train_view.set_epoch(0)
        n = min(args.items, len(train_view))
        best = time_items(train_view, n, args.rounds)
        ratio = best["seed_everything"] / best["seed_item_rngs"]
        for way, ms in best.items():
            print(f"{way:16s} {ms:7.3f} ms/item")
        print(f"seed_item_rngs: items prepared ×{ratio:.2f} faster ({n} items, best of {args.rounds} rounds)")
        result.update({"recipe": str(args.recipe), "items": n, "ms_per_item": {w: round(v, 4) for w, v in best.items()},
                       "speedup": round(ratio, 3)})
        raise SystemExit(0)

    distill_run.fit = train_run.fit = measure
    with tempfile.TemporaryDirectory() as tmp:
        argv = [command, str(args.recipe), "-o", str(Path(tmp) / "run"), "--set", f"run.threads={args.threads}",
                "--set", "run.progress=false"]
        for s in args.set:
            argv += ["--set", s]
        try:
            app(argv, standalone_mode=False)
        except SystemExit:
            pass
    if not result:
        raise SystemExit("the recipe did not reach its training loop (see the error above)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
