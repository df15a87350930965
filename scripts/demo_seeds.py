"""The demo over several seeds: each arm per seed, and the paired gain of sip's data with its t-interval.

README shows the demo's arms over 3 seeds so the sign is not noise (issue "Data that teaches"). Each seed is a
whole ``sip demo`` (its own shots, teacher, sip data and students) in ``OUT/seed<k>``; a finished seed is reused
only when its ``demo.yaml`` and every stage's saved config equal what the demo would run now (``--rerun`` redoes a
different one; its generation stages refuse a folder made with other settings, so choose another ``--out``). The
gain is judged on the validation split (1,000 images of the training pool, not the shots) and reported on the test
set, which each run reads once, at its end.

Usage::

    python scripts/demo_seeds.py --seeds 0 1 2 --out runs/demo_seeds [--set shots=1 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.finished_runs import differing_keys, flat, reuse_or_refuse  # noqa: E402
from sip.report.stats import paired_comparison  # noqa: E402

ARMS = ("teacher", "student-real", "student-real+sip")


def requested(overrides: list[str]) -> dict:
    """The resolved demo recipe ``sip demo --set ...`` would save as demo.yaml."""
    from sip.config import load_config
    from sip.demo import DemoRecipe

    return json.loads(json.dumps(dataclasses.asdict(load_config(DemoRecipe, None, overrides))))


STAGE_CONFIGS = {"augment": "augmented/config.yaml", "synth": "synthetic/config.yaml",
                 "teacher": "train/teacher/config.yaml", "student-real": "train/student-real/config.yaml",
                 "student-real+sip": "train/student-real+sip/config.yaml"}


def stage_changes(out: Path, overrides: list[str]) -> list[str]:
    """Keys of the stage recipes the demo would run now that differ from those saved in ``out``: what demo.yaml
    does not hold (the prompts are the demo's code, not its recipe) still makes a finished seed another run.
    Progress switches are left out; a stage with no saved config counts as changed."""
    from sip.config import load_config, to_dict
    from sip.demo import DemoRecipe, demo_recipes

    now = demo_recipes(load_config(DemoRecipe, None, overrides), out, progress=False)
    changed = []
    for name, rel in STAGE_CONFIGS.items():
        if not (out / rel).is_file():
            changed.append(f"{name}: no {rel}")
            continue
        try:  # read back through the recipe type: keys added since resolve to their defaults
            saved = to_dict(load_config(type(now[name]), out / rel, []))
        except (ValueError, TypeError) as e:
            changed.append(f"{name}: {rel} does not resolve ({e})")
            continue
        keys = differing_keys(saved, to_dict(now[name]))
        changed += [f"{name}.{k}" for k in keys if not k.endswith("progress")]
    return changed


def run_seed(seed: int, args) -> dict:
    """One demo seed's arms (reused when finished with equal settings) and its wall time."""
    import yaml

    from sip.demo import run_demo

    out = args.out / f"seed{seed}"
    overrides = [*args.set, f"seed={seed}"]
    want = requested(overrides)
    results = out / "results.json"
    if results.is_file():
        saved = yaml.safe_load((out / "demo.yaml").read_text())
        changed = differing_keys(saved, want) or stage_changes(out, overrides)
        if not reuse_or_refuse(out, changed, args.rerun, flat(saved), flat(want)):
            results.unlink()
    if not results.is_file():
        t0 = time.perf_counter()
        print(run_demo(out, overrides=overrides, progress=not args.no_progress), flush=True)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    arms = {}
    for arm in ARMS:
        m = json.loads((out / "train" / arm / "final_metrics.json").read_text())
        arms[arm] = {k: m.get(k) for k in ("val_top1", "test_top1", "epochs")}
    return {"seed": seed, "arms": arms, "seconds": json.loads(results.read_text()).get("timings_s")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    ap.add_argument("--set", action="append", default=[], help="a demo recipe override, e.g. shots=1 (repeatable)")
    ap.add_argument("--rerun", action="store_true", help="redo a finished seed made with other settings")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    rows = [run_seed(s, args) for s in args.seeds]
    print(f"\n{'seed':>4} " + " ".join(f"{a + ' val/test':>28}" for a in ARMS) + "  seconds (generate/teacher/students)")
    for r in rows:
        cells = " ".join(f"{r['arms'][a]['val_top1']:>13.2f} /{r['arms'][a]['test_top1']:>6.2f}      " for a in ARMS)
        print(f"{r['seed']:>4} {cells}  {r['seconds']}")
    summary = {"settings": args.set, "seeds": args.seeds, "rows": rows}
    if len(rows) > 1:
        for split in ("val_top1", "test_top1"):
            gain = paired_comparison([r["arms"]["student-real+sip"][split] for r in rows],
                                     [r["arms"]["student-real"][split] for r in rows])
            print(f"{split}: student-real+sip - student-real, paired by seed: {gain.describe(' pt')}")
            summary[f"gain_{split}"] = gain.to_dict(2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
