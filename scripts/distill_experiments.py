#!/usr/bin/env python
"""The Fashion-MNIST training/distillation measurements of issue 5, run through the ``sip`` CLI with the
recipes in ``pipelines/``, one run at a time; prints a Markdown table of test accuracy (mean ± std).

Runs that already finished are not redone (a finished run folder returns its metrics at once), so the
script can be stopped and started again. Measurements that need a synthetic dataset the generator has
not written yet are skipped, and the table says so.

    python scripts/distill_experiments.py                      # 3 seeds, everything available
    python scripts/distill_experiments.py --seeds 0 --only scratch kd_online

Groups (``--only``):
    teachers      conv (ResNet-10-T) and involution (RedNet) teachers on the full 60k training set
    scratch       ViT from scratch on 10 shots/class (data seed = run seed)
    kd_online     + Hinton KD from the conv teacher, teacher online
    kd_stored     the same from precomputed logits (64 views/image)
    kd_involution KD from the involution teacher (stored logits)
    ensemble      conv + involution, averaged soft targets (stored logits)
    civt          conv + involution, one distillation token per teacher (stored logits)
    sip           10-shot set of data seed 0 + its sip variants (runs/fmnist-aug), KD, run seeds vary
    datafree      student on txt2img images only (runs/fmnist-synth), teacher soft labels only
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIP = [str(Path(sys.executable).with_name("sip"))] if Path(sys.executable).with_name("sip").exists() else \
    [sys.executable, "-m", "sip"]
GROUPS = ["teachers", "scratch", "kd_online", "kd_stored", "kd_involution", "ensemble", "civt", "sip", "datafree"]


NICE = 10  # set by --nice: runs yield to interactive work by default


def run(verb: str, recipe: str, out: Path, sets: list[str], threads: int, log: list[str]) -> dict | None:
    """Run one CLI command (niced), return its final metrics (or the store info for `logits`)."""
    cli = [verb, f"pipelines/{recipe}", "-o", str(out)]
    for s in sets:
        cli += ["--set", s]
    log.append("sip " + shlex.join(cli))
    cmd = ["nice", "-n", str(NICE), *SIP, *cli, "--set", f"run.threads={threads}", "--set", "run.progress=false"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {verb} {out.name}: {result.get('top1', result.get('identity_view_top1'))} "
          f"({time.time() - t0:.0f}s)", flush=True)
    return result


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=GROUPS, default=GROUPS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/exp"))
    p.add_argument("--augmented", default="runs/fmnist-aug", help="sip augment output for the seed-0 10-shot set")
    p.add_argument("--synthetic", default="runs/fmnist-synth", help="sip synth (txt2img) output")
    p.add_argument("--conv-teacher", default="runs/fmnist_teacher", help="run folder of fmnist_teacher.yaml")
    p.add_argument("--involution-teacher", default="runs/fmnist_teacher_involution",
                   help="run folder of fmnist_teacher_involution.yaml")
    p.add_argument("--nice", type=int, default=10, help="niceness of each run (0: as any other job)")
    args = p.parse_args()
    global NICE
    NICE = args.nice
    out = args.out
    log: list[str] = []
    rows: dict[str, list[float]] = {}
    notes: list[str] = []
    conv, inv = args.conv_teacher, args.involution_teacher
    t_conv = f"teachers=[{{checkpoint: {conv}}}]"
    t_inv = f"teachers=[{{checkpoint: {inv}}}]"
    t_both = f"teachers=[{{checkpoint: {conv}}}, {{checkpoint: {inv}}}]"

    def add(name: str, result: dict | None) -> None:
        if result is not None:
            rows.setdefault(name, []).append(result["top1"])

    if "teachers" in args.only:
        print("teachers", flush=True)
        add("teacher: ResNet-10-T (conv), full 60k", run("train", "fmnist_teacher.yaml", Path(conv), [], args.threads, log))
        add("teacher: RedNet-tiny (involution), full 60k",
            run("train", "fmnist_teacher_involution.yaml", Path(inv), [], args.threads, log))

    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        seeds = [f"data.real.seed={seed}", f"run.seed={seed}"]
        store_conv, store_both = out / f"logits_conv_s{seed}", out / f"logits_both_s{seed}"
        if "kd_stored" in args.only:
            run("logits", "fmnist_logits_10shot.yaml", store_conv, [f"data.real.seed={seed}", t_conv], args.threads, log)
        if {"kd_involution", "ensemble", "civt"} & set(args.only):
            run("logits", "fmnist_logits_10shot.yaml", store_both, [f"data.real.seed={seed}", t_both], args.threads, log)
        # group → (row, verb, recipe, run folder, overrides besides the seeds)
        arms = {
            "scratch": ("ViT from scratch, 10 shots", "train", "fmnist_vit_scratch_10shot.yaml", "scratch", []),
            "kd_online": ("ViT + KD (conv teacher, online)", "distill", "fmnist_kd_10shot.yaml", "kd_online", [t_conv]),
            "kd_stored": ("ViT + KD (conv teacher, stored logits)", "distill", "fmnist_kd_10shot.yaml", "kd_stored",
                          [t_conv, f"logits={store_conv}"]),
            "kd_involution": ("ViT + KD (involution teacher, stored logits)", "distill", "fmnist_kd_10shot.yaml",
                              "kd_inv", [t_inv, f"logits={store_both}"]),
            "ensemble": ("ViT + KD (conv + involution, averaged soft targets)", "distill", "fmnist_ensemble_kd.yaml",
                         "ensemble", [t_both, f"logits={store_both}"]),
            "civt": ("CivT-style ViT + KD (one token per teacher)", "distill", "fmnist_civt_kd.yaml", "civt",
                     [t_both, f"logits={store_both}"]),
        }
        for group, (row, verb, recipe, name, extra) in arms.items():
            if group in args.only:
                add(row, run(verb, recipe, out / f"{name}_s{seed}", [*seeds, *extra], args.threads, log))

    if "sip" in args.only:
        if (ROOT / args.augmented / "train" / "metadata.jsonl").exists():
            for seed in args.seeds:  # the augmented set is of the data-seed-0 shots: vary the run seed only
                sets = ["data.real.seed=0", f"run.seed={seed}"]
                add("[data seed 0] ViT from scratch", run("train", "fmnist_vit_scratch_10shot.yaml",
                                                          out / f"sip_scratch_r{seed}", sets, args.threads, log))
                add("[data seed 0] ViT + sip variants (swap p=0.5), no KD",
                    run("train", "fmnist_vit_scratch_10shot.yaml", out / f"sip_only_r{seed}",
                        [*sets, f"data.synthetic={args.augmented}", "data.mix.mode=swap", "data.mix.p=0.5"],
                        args.threads, log))
                add("[data seed 0] ViT + KD, real only", run("distill", "fmnist_kd_10shot.yaml",
                                                             out / f"sip_kd_real_r{seed}", [*sets, t_conv],
                                                             args.threads, log))
                add("[data seed 0] ViT + KD, real + sip variants",
                    run("distill", "fmnist_kd_10shot_sip.yaml", out / f"sip_kd_r{seed}",
                        [*sets, t_conv, f"data.synthetic={args.augmented}"], args.threads, log))
        else:
            notes.append(f"real + sip variants: skipped, {args.augmented}/train/metadata.jsonl does not exist yet")
    if "datafree" in args.only:
        if (ROOT / args.synthetic / "train" / "metadata.jsonl").exists():
            for seed in args.seeds:
                add("data-free ViT (txt2img only, teacher soft labels)",
                    run("distill", "fmnist_datafree.yaml", out / f"datafree_s{seed}",
                        [f"run.seed={seed}", t_conv, f"data.synthetic={args.synthetic}"], args.threads, log))
        else:
            notes.append(f"data-free: skipped, {args.synthetic}/train/metadata.jsonl does not exist yet")

    print("\n| run | test top-1 % (mean ± std) | runs |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {mean_std(values)} | {len(values)} |")
    for n in notes:
        print(f"\n{n}")
    print("\ncommands:\n" + "\n".join(dict.fromkeys(log)))
    print(json.dumps({name: values for name, values in rows.items()}))


if __name__ == "__main__":
    if shutil.which("nice") is None:
        raise SystemExit("needs `nice` (coreutils)")
    main()
