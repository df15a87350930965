#!/usr/bin/env python
"""Issue 12's student table: 10-shot and data-free students distilled from the strong teacher, run through the
``sip`` CLI with the recipes in ``pipelines/``, several runs at once (one thread each), resumable; prints a
Markdown table of full-test-set top-1 (mean ± std over data draws) and, last, one JSON line.

    python scripts/student_experiments.py --jobs 2                        # every arm, draws 0 1 2
    python scripts/student_experiments.py --only cnn_sip cnn_real --draws 0 1
    python scripts/student_experiments.py --report --only vit_sip vit_real   # finished runs only, start none
    python scripts/student_experiments.py --only vit_sip --init-from runs/students_80 --out runs/students_80r \
        --set optim.epochs=30 --set optim.lr=0.0007                     # a warm restart of every finished run

Needs (made once; commands in each recipe's header):
    runs/fmnist_teacher_strong      sip train pipelines/fmnist_teacher_strong.yaml
    runs/fmnist-synth-1k            sip synth pipelines/fmnist_synth.yaml --per-class 1000 --guidance 3
    runs/fmnist-aug-<d>             sip augment pipelines/fmnist_augment.yaml --set source.seed=<d>

Arms (``--only``): ``<student>_<data>`` with student ``cnn`` (ResNet-10-T) or ``vit`` (4-block SPT + LSA ViT)
and data ``sip`` (10 real shots of draw d + their img2img variants + txt2img), ``real`` (the 10 shots alone,
same KD recipe and steps), ``datafree`` (txt2img only, no real image; run seed d); ``vit_sip_plain`` is
``vit_sip`` with SPT and LSA switched off (the ablation); ``vit_sip_lanczos5`` is ``vit_sip`` with its crops resized
by a Lanczos-5 kernel instead of the model's bicubic.

A finished run folder is reused only when its saved, resolved config equals the requested one (recipe + every
``--set``, keys that do not change results such as threads left out); a different finished run is refused with the
differing keys, or redone with ``--rerun``. Paired gains (``PAIRS``) are stated with :mod:`sip.report.stats`: mean,
standard error, t-based 95% interval and p-value over the draws.

``--init-from DIR`` is a warm restart (SGDR, Loshchilov & Hutter 2017), as the teachers' ``*_restart`` recipes: each
run starts from the finished weights of the same arm and draw under DIR and trains a second cosine cycle (set its
length and peak with ``--set optim.epochs=… --set optim.lr=…``) on new augmentation draws (run seed 100 + draw).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.finished_runs import finished_run, mean_std, run_sip  # noqa: E402
from sip.config import load_config  # noqa: E402
from sip.report.stats import paired_comparison  # noqa: E402
ARMS = {
    "cnn_sip": ("fmnist_student_cnn_sip.yaml", []),
    "cnn_real": ("fmnist_student_cnn_real.yaml", []),
    "vit_sip": ("fmnist_student_vit_sip.yaml", []),
    "vit_real": ("fmnist_student_vit_real.yaml", []),
    "cnn_datafree": ("fmnist_student_cnn_datafree.yaml", []),
    "vit_datafree": ("fmnist_student_vit_datafree.yaml", []),
    "vit_sip_plain": ("fmnist_student_vit_sip.yaml",
                      ["student.kwargs={embed_dim: 128, depth: 4, num_heads: 4, spt: false, lsa: false}"]),
    "vit_sip_lanczos5": ("fmnist_student_vit_sip.yaml", ["data.interpolation=lanczos5"]),
}


# (with, without): the differences the issue asks for, paired by data draw
PAIRS = [("cnn_sip", "cnn_real"), ("vit_sip", "vit_real"), ("vit_sip", "vit_sip_plain"),
         ("vit_sip_lanczos5", "vit_sip")]


def command(arm: str, draw: int, args) -> tuple[list[str], Path]:
    recipe, extra = ARMS[arm]
    out = args.out / f"{arm}_d{draw}"
    seed = draw
    if args.init_from is not None:  # run_one checks the start run is finished before launching
        extra = [*extra, f"student.checkpoint={args.init_from / f'{arm}_d{draw}'}"]
        seed = 100 + draw  # new augmentation draws for the second cycle
    sets = [f"teachers=[{{checkpoint: {args.teacher}}}]", f"run.seed={seed}", "run.threads=1", "run.progress=false",
            *extra]
    if arm.endswith("datafree"):
        sets.append(f"data.synthetic={args.synthetic}")
    else:
        sets.append(f"data.real.seed={draw}")
        if "_sip" in arm:
            sets.append(f"data.synthetic=[{args.augmented}-{draw}, {args.synthetic}]")
    sets += args.set
    cli = ["distill", f"pipelines/{recipe}", "-o", str(out)]
    for s in sets:
        cli += ["--set", s]
    return cli, out


def finished_is_requested(cli: list[str], out: Path, rerun: bool) -> bool:
    """True when ``out`` holds a finished run of exactly the recipe and overrides in ``cli``; False when it
    holds another one and ``rerun`` is set; raises :class:`scripts.finished_runs.StaleRunError` otherwise."""
    from sip.distill.run import DistillRecipe

    overrides = [value for flag, value in zip(cli, cli[1:]) if flag == "--set"]
    return finished_run(out, load_config(DistillRecipe, ROOT / cli[1], overrides), rerun)


def run_one(arm: str, draw: int, args) -> dict | None:
    cli, out = command(arm, draw, args)
    done = out / "final_metrics.json"
    if done.is_file():
        if finished_is_requested(cli, out, args.rerun):
            return json.loads(done.read_text())
        cli += ["--set", "run.resume=false"]  # --rerun: start this folder over
    if args.report:
        print(f"  {arm} draw {draw}: not finished ({out})", flush=True)
        return None
    start = args.init_from and args.init_from / f"{arm}_d{draw}"
    if start and not (start / "final_metrics.json").is_file():
        raise SystemExit(f"--init-from: {start} holds no finished run of {arm} draw {draw}; finish it first "
                         f"(the same command without --init-from, --out {args.init_from})")
    print("sip " + shlex.join(cli), flush=True)
    t0 = time.time()
    run_sip(cli, ROOT, 1)
    metrics = json.loads(done.read_text())
    print(f"  {arm} draw {draw}: top-1 {metrics['top1']:.2f}% ({time.time() - t0:.0f}s)", flush=True)
    return metrics




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--out", type=Path, default=Path("runs/students"))
    p.add_argument("--teacher", default="runs/fmnist_teacher_strong")
    p.add_argument("--synthetic", default="runs/fmnist-synth-1k")
    p.add_argument("--augmented", default="runs/fmnist-aug", help="prefix: <prefix>-<draw> per data draw")
    p.add_argument("--set", action="append", default=[], help="an override for every run")
    p.add_argument("--init-from", type=Path, default=None,
                   help="warm restart: start each run from DIR/<arm>_d<draw> (a finished run of the same arm)")
    p.add_argument("--report", action="store_true", help="tabulate the finished runs only; start none")
    p.add_argument("--rerun", action="store_true",
                   help="redo a finished run whose saved config differs from the requested one (default: refuse)")
    args = p.parse_args()

    work = [(arm, d) for d in args.draws for arm in args.only]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(work, pool.map(lambda w: run_one(*w, args), work)))
    rows, summary = [], {}
    for arm in args.only:
        draws = [d for d in args.draws if results[(arm, d)]]
        tops = [results[(arm, d)]["top1"] for d in draws]
        if not tops:
            continue
        summary[arm] = {"mean": round(statistics.mean(tops), 2), "runs": [round(t, 2) for t in tops], "draws": draws,
                        "std": round(statistics.stdev(tops), 2) if len(tops) > 1 else None}
        rows.append(f"| {arm} | {mean_std(tops)} | {', '.join(f'{t:.2f} (d{d})' for t, d in zip(tops, draws))} |")
    print("\n| arm | test top-1 % (mean ± std) | runs (data draw) |")
    print("|---|---|---|")
    print("\n".join(rows))
    paired = {}
    for a, b in (pair for pair in PAIRS if set(pair) <= set(args.only)):
        both = [d for d in args.draws if results[(a, d)] and results[(b, d)]]
        if len(both) > 1:
            gain = paired_comparison([results[(a, d)]["top1"] for d in both], [results[(b, d)]["top1"] for d in both])
            paired[f"{a} - {b}"] = {**gain.to_dict(2), "draws": both}
            print(f"{a} - {b}, paired by draw ({' '.join(map(str, both))}): "
                  f"{', '.join(f'{x:+.2f}' for x in gain.diffs)}; {gain.describe(' pt')}")
    print(json.dumps({**summary, "paired": paired}))


if __name__ == "__main__":
    main()
