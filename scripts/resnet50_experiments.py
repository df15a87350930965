#!/usr/bin/env python
"""Issue 30's ResNet-50 tables, run through ``sip train`` with the recipes in ``pipelines/``: the teacher, the
10-shot SIP setting (RandAugment against RandAugment + sip's img2img variants, paired by data draw) and GroupNorm
against BatchNorm at batch 2 / 8 / 32 (paired by seed). Several runs at once (one thread each), resumable: a
finished run is reused only when its saved config equals the requested one (``sip.train.run_dir.recipe_changes``),
a different one is refused listing the keys (``--rerun`` redoes it); an unfinished one resumes from its checkpoint.
Prints Markdown tables with paired gains and their 95 % t-intervals (``sip.report.stats``) and, last, one JSON line.

    python scripts/resnet50_experiments.py --table teacher
    python scripts/resnet50_experiments.py --table tenshot --draws 0 1 2 3 4 --jobs 2
    python scripts/resnet50_experiments.py --table gnbn --seeds 0 1 2 --batches 2 8 32
    python scripts/resnet50_experiments.py --table tenshot gnbn --report        # finished runs only, start none
    python scripts/resnet50_experiments.py --table teacher tenshot gnbn --smoke --out /tmp/r50_smoke \\
        --augmented /tmp/aug      # every run for 1 epoch on ~64 images: proves the commands, prints CPU-hour estimates

Needs (made once): the img2img variants of each 10-shot draw d for the ``tenshot`` table,
    sip augment pipelines/fmnist_augment.yaml -o runs/fmnist-aug-<d> --set source.seed=<d>

The GN-vs-BN learning rate is scaled linearly with the batch as the GN paper does: ``optim.lr = LR32 · B / 32``
with ``LR32`` the recipe's batch-32 value (``--gnbn-lr`` overrides it).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.finished_runs import execute, mean_std, paired  # noqa: E402
from sip.config import load_config  # noqa: E402
from sip.train.recipe import TrainRecipe  # noqa: E402

TABLES = ("teacher", "tenshot", "gnbn")
NORMS = ("batchnorm", "groupnorm")
# --smoke: every run made tiny (1 epoch, ~64 training and 100 test images), to prove the commands and time a step
SMOKE = {"teacher": ["data.real.shots=26"], "tenshot": ["data.mix.epoch_size=64"], "gnbn": ["data.real.shots=7"]}
SMOKE_ALL = ["optim.epochs=1", "data.eval.shots=10", "run.eval_every=1", "run.eval_max_samples=100",
             "run.checkpoint_every_steps=0"]


@dataclass
class Run:
    """One ``sip train`` run of a table: its recipe, overrides, folder and (after it ran) its metrics."""

    table: str
    key: tuple  # (arm, draw) for tenshot, (norm, batch, seed) for gnbn, ("teacher",) for the teacher
    recipe: str
    sets: list[str]
    out: Path
    metrics: dict | None = field(default=None)

    def cli(self) -> list[str]:
        cmd = ["train", f"pipelines/{self.recipe}", "-o", str(self.out)]
        for s in self.sets:
            cmd += ["--set", s]
        return cmd

    def requested(self) -> TrainRecipe:
        return load_config(TrainRecipe, ROOT / "pipelines" / self.recipe, self.sets)


def plan(args) -> list[Run]:
    """Every run of the requested tables, with its overrides (``--set`` and ``--smoke`` last)."""
    runs: list[Run] = []

    def add(table: str, key: tuple, recipe: str, sets: list[str], name: str) -> None:
        extra = [*SMOKE_ALL, *SMOKE[table]] if args.smoke else []
        common = ["run.threads=1", "run.progress=false"]
        runs.append(Run(table, key, recipe, [*sets, *common, *args.set, *extra], args.out / table / name))

    if "teacher" in args.table:
        add("teacher", ("teacher",), "fmnist_resnet50_teacher.yaml", [], "teacher")
    if "tenshot" in args.table:
        for d in args.draws:
            base = [f"data.real.seed={d}", f"run.seed={d}"]
            add("tenshot", ("randaug", d), "fmnist_resnet50_10shot_randaug.yaml", base, f"randaug_d{d}")
            add("tenshot", ("sip", d), "fmnist_resnet50_10shot_sip.yaml",
                [*base, f"data.synthetic={args.augmented}-{d}"], f"sip_d{d}")
    if "gnbn" in args.table:
        lr32 = args.gnbn_lr or load_config(TrainRecipe, ROOT / "pipelines" / "fmnist_resnet50_gn_bn.yaml").optim.lr
        for norm in NORMS:
            kwargs = "{norm_layer: groupnorm, gn_groups: 32}" if norm == "groupnorm" else "{norm_layer: batchnorm}"
            for b in args.batches:
                for s in args.seeds:
                    sets = [f"model.kwargs={kwargs}", f"data.batch_size={b}", f"optim.lr={lr32 * b / 32:.8g}",
                            f"run.seed={s}"]
                    add("gnbn", (norm, b, s), "fmnist_resnet50_gn_bn.yaml", sets, f"{norm}_b{b}_s{s}")
    return runs


def check_inputs(runs: list[Run], args) -> None:
    """Before any run starts: every recipe resolves, and the variants the sip arm reads exist."""
    for run in runs:
        run.requested()  # a bad override or recipe fails here, naming the key
    if args.report:
        return
    missing = sorted({s.split("=", 1)[1] for r in runs for s in r.sets if s.startswith("data.synthetic=")
                      and not (ROOT / s.split("=", 1)[1] / "train" / "metadata.jsonl").is_file()})
    if missing:
        seeds = [m.rsplit("-", 1)[-1] for m in missing]
        raise SystemExit("the sip arm needs the img2img variants of each draw; missing: " + ", ".join(missing)
                         + "\nmake them with: " + "; ".join(f"sip augment pipelines/fmnist_augment.yaml -o {m} "
                                                            f"--set source.seed={d}" for m, d in zip(missing, seeds)))


def report(runs: list[Run]) -> dict:
    """The three tables as Markdown (finished runs only) and a summary dict."""
    top = {r.key: r.metrics["top1"] for r in runs if r.metrics}
    summary: dict = {"paired": {}}
    if ("teacher",) in top:
        print(f"\n| ResNet-50 teacher | test top-1 % |\n|---|---|\n| sip_resnet50_small, full split | "
              f"{top[('teacher',)]:.2f} (target >= 94) |")
        summary["teacher"] = top[("teacher",)]
    arms = {a: {k[1]: v for k, v in top.items() if k[0] == a and len(k) == 2} for a in ("randaug", "sip")}
    if any(arms.values()):
        print("\n| 10 shots, ResNet-50, no KD | test top-1 % (mean ± std) | runs (draw) |\n|---|---|---|")
        for a, vals in arms.items():
            print(f"| {a} | {mean_std(list(vals.values()))} | "
                  f"{', '.join(f'{v:.2f} (d{d})' for d, v in sorted(vals.items()))} |")
        summary["tenshot"] = arms
        paired(arms["sip"], arms["randaug"], "sip - randaug (target >= +2, interval above 0)", summary["paired"])
    gnbn = {k: v for k, v in top.items() if len(k) == 3}
    if gnbn:
        print("\n| batch | lr | BatchNorm top-1 % | GroupNorm top-1 % |\n|---|---|---|---|")
        for b in sorted({k[1] for k in gnbn}):
            cells = [mean_std([v for k, v in gnbn.items() if k[:2] == (n, b)]) for n in NORMS]
            lr = next((r.sets for r in runs if r.key[1:2] == (b,) and len(r.key) == 3), [])
            lr = next((s.split("=", 1)[1] for s in lr if s.startswith("optim.lr=")), "?")
            print(f"| {b} | {lr} | {cells[0]} | {cells[1]} |")
        for b in sorted({k[1] for k in gnbn}):
            by_norm = {n: {k[2]: v for k, v in gnbn.items() if k[:2] == (n, b)} for n in NORMS}
            paired(by_norm["groupnorm"], by_norm["batchnorm"], f"batch {b}: GN - BN", summary["paired"])
        summary["gnbn"] = {f"{n}_b{b}_s{s}": v for (n, b, s), v in gnbn.items()}
    return summary


def full_images(run: Run) -> tuple[int, int]:
    """Training images and evaluation images of ``run`` without the ``--smoke`` overrides."""
    recipe = load_config(TrainRecipe, ROOT / "pipelines" / run.recipe,
                         [s for s in run.sets if s not in SMOKE_ALL and s not in SMOKE[run.table]])
    d, o = recipe.data, recipe.optim
    if d.mix.epoch_size:
        per_epoch = d.mix.epoch_size
    else:  # real images only: F-MNIST train pool sizes (shots per class x 10, or the 60k split)
        per_epoch = (d.real.shots * 10 if d.real.shots else 60_000) * d.repeat
    train = o.epochs * (per_epoch // d.batch_size) * d.batch_size
    evals = len(range(recipe.run.eval_every, o.epochs + 1, recipe.run.eval_every)) * (recipe.run.eval_max_samples or 0)
    return train, evals + 10_000  # the per-epoch checks plus the full test set once


FULL = {"teacher": 1, "tenshot": 10, "gnbn": 18}  # runs per table at the size (5 draws x 2; 2 x 3 x 3)


def estimate(runs: list[Run]) -> dict:
    """CPU hours of each table at full size, from the smoke runs' measured training images/s (one thread);
    evaluation counted at 3× that rate (a forward pass is about a third of a training step). A table smoked
    with fewer draws / seeds than :data:`FULL` is scaled up by the run count (its runs cost alike)."""
    hours: dict[str, float] = {}
    for run in runs:
        if not run.metrics:
            continue
        rate = run.metrics["train_images_per_s"]
        train, evals = full_images(run)
        hours[run.table] = hours.get(run.table, 0.0) + (train / rate + evals / (3 * rate)) / 3600
    print("\n| table | runs smoked | runs in full | CPU hours in full (1 thread per run, measured rate) |")
    print("|---|---|---|---|")
    for table, h in hours.items():
        n = sum(r.table == table and r.metrics is not None for r in runs)
        hours[table] = h * FULL[table] / n
        print(f"| {table} | {n} | {FULL[table]} | {hours[table]:.1f} |")
    return {t: round(h, 2) for t, h in hours.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", nargs="+", choices=TABLES, default=list(TABLES))
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="10-shot data draws (tenshot)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (gnbn)")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32], help="batch sizes (gnbn)")
    p.add_argument("--gnbn-lr", type=float, default=None, help="gnbn lr at batch 32 (default: the recipe's)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--out", type=Path, default=Path("runs/resnet50"))
    p.add_argument("--augmented", default="runs/fmnist-aug", help="prefix: <prefix>-<draw> per data draw")
    p.add_argument("--set", action="append", default=[], help="an override for every run")
    p.add_argument("--smoke", action="store_true", help="every run 1 epoch on ~64 images; prints CPU-hour estimates")
    p.add_argument("--report", action="store_true", help="tabulate the finished runs only; start none")
    p.add_argument("--rerun", action="store_true",
                   help="redo a finished run whose saved config differs from the requested one (default: refuse)")
    args = p.parse_args()

    runs = plan(args)
    check_inputs(runs, args)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda r: execute(r, args, lambda m: f"top-1 {m['top1']:.2f}%"), runs))
    summary = report(runs)
    if args.smoke:
        summary["cpu_hours_full"] = estimate(runs)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
