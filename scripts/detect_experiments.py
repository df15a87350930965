#!/usr/bin/env python
"""Issue 29's detection tables, run through ``sip scenes`` / ``sip synth`` / ``sip train`` with the recipes in
``pipelines/``: the teacher, detection KD against the same student on the boxes alone (paired by seed), data-free
students (scenes of sip-generated objects only, the teacher's outputs as targets; no real image, no real box), and
GroupNorm against BatchNorm at batch 2 and 16. Every COCO mAP is pycocotools' mAP@[.5:.95] on the test scenes,
read once at the end of each run. Resumable: the scene sets and the generated objects are made once (their writers
skip what exists and refuse a folder made with other settings); a finished run is reused only when its saved
config equals the requested one (``recipe_changes``), a different one is refused with the keys (``--rerun``).

    python scripts/detect_experiments.py --table teacher                  # FCOS + resnet18 on 3,000 scenes
    python scripts/detect_experiments.py --table kd --seeds 0 1 2         # resnet10t student on 500 scenes
    python scripts/detect_experiments.py --table datafree                 # conv and ViT students, generated objects
    python scripts/detect_experiments.py --table fewshot --draws 0 1 2     # 10 real objects / class (+ sip scenes)
    python scripts/detect_experiments.py --table gnbn --seeds 0 1 2
    python scripts/detect_experiments.py --table teacher kd datafree gnbn --report    # finished runs only

Scene sets (``--out``/scenes-*): train 3,000 scenes of train 0-49,999 objects (the teacher's), small 500 scenes of
the same pool (the students': a detector's few labelled scenes), val 300 of 50,000-59,999, test 1,000 of the test
split; synth ``--synth-scenes`` scenes of ``--synth-per-class`` txt2img objects per class from the shipped model.
Data-free students have no validation set (``data.val: null``): no real scene chooses their epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.finished_runs import execute, mean_std, paired, run_sip  # noqa: E402
from sip.config import load_config  # noqa: E402
from sip.detect.train import DetectRecipe  # noqa: E402

TABLES = ("teacher", "kd", "datafree", "fewshot", "gnbn")
SCENES = "pipelines/fmnist_scenes.yaml"
SMOKE_ALL = ["optim.epochs=1", "run.eval_max_samples=20", "run.checkpoint_every_steps=0"]


@dataclass
class Run:
    """One ``sip train`` detection run: its recipe, overrides, folder and (after it ran) its final metrics."""

    table: str
    key: tuple  # (arm, seed) / (norm, batch, seed) / ("teacher",)
    recipe: str
    sets: list[str]
    out: Path
    metrics: dict | None = field(default=None)

    def cli(self) -> list[str]:
        return ["train", self.recipe, "-o", str(self.out), *[a for s in self.sets for a in ("--set", s)]]

    def requested(self) -> DetectRecipe:
        return load_config(DetectRecipe, ROOT / self.recipe, self.sets)


def scene_commands(args) -> list[tuple[Path, list[str]]]:
    """(folder, sip command) of each input the tables read, in the order they must be made."""
    d = args.out
    n = (lambda k: 20) if args.smoke else (lambda k: k)
    synth_per_class = 2 if args.smoke else args.synth_per_class
    return [
        (d / "scenes-train", ["scenes", SCENES, "-o", str(d / "scenes-train"), "--set", f"scenes.count={n(3000)}"]),
        (d / "scenes-small", ["scenes", SCENES, "-o", str(d / "scenes-small"), "--set", f"scenes.count={n(500)}",
                              "--set", "scenes.seed=3"]),
        (d / "scenes-val", ["scenes", SCENES, "-o", str(d / "scenes-val"), "--set", f"scenes.count={n(300)}",
                            "--set", "scenes.seed=1", "--set", "objects.start=50000", "--set", "objects.stop=60000"]),
        (d / "scenes-test", ["scenes", SCENES, "-o", str(d / "scenes-test"), "--set", f"scenes.count={n(1000)}",
                             "--set", "scenes.seed=2", "--set", "objects.split=test", "--set", "objects.stop=null"]),
        (d / "synth-objects", ["synth", "pipelines/fmnist_synth.yaml", "-o", str(d / "synth-objects"),
                               "--per-class", str(synth_per_class)] + (["--set", "generate.steps=2"] if args.smoke
                                                                       else [])),
        (d / "scenes-synth", ["scenes", SCENES, "--input", str(d / "synth-objects"), "-o", str(d / "scenes-synth"),
                              "--set", f"scenes.count={n(args.synth_scenes)}", "--set", "scenes.seed=4"]),
    ] + [c for s in args.draws for c in fewshot_commands(args, s, n)]


def fewshot_commands(args, draw: int, n) -> list[tuple[Path, list[str]]]:
    """Draw ``draw``'s few-shot inputs: scenes of its 10 real objects per class (pool 50,000-59,999, unseen by the
    generator and the teacher's scenes), sip's img2img variants of those same objects (``sip augment``: the same
    shots by the same pool and seed), and scenes of the variants."""
    d, aug = args.out, args.out / f"aug-d{draw}"
    fast = ["--set", "generate.steps=2", "--set", "generate.per_image=1"] if args.smoke else []
    return [
        (d / f"scenes-fewshot-d{draw}", ["scenes", SCENES, "-o", str(d / f"scenes-fewshot-d{draw}"), "--set",
                                         f"scenes.count={n(500)}", "--set", "scenes.seed=5", "--set",
                                         "objects.start=50000", "--set", "objects.stop=60000", "--set",
                                         f"objects.shots={args.shots}", "--set", f"objects.shots_seed={draw}"]),
        (aug, ["augment", "pipelines/fmnist_augment.yaml", "-o", str(aug), "--set", f"source.seed={draw}", "--set",
               f"source.shots={args.shots}", *fast]),
        (d / f"scenes-aug-d{draw}", ["scenes", SCENES, "--input", str(aug), "-o", str(d / f"scenes-aug-d{draw}"),
                                     "--set", f"scenes.count={n(500)}", "--set", "scenes.seed=6"]),
    ]


def plan(args) -> list[Run]:
    """Every run of the requested tables, with its overrides (``--set`` and ``--smoke`` last)."""
    d, runs = args.out, []
    common_data = [f"data.val={d / 'scenes-val'}", f"data.test={d / 'scenes-test'}"]
    teacher = d / "teacher"

    def add(table: str, key: tuple, recipe: str, sets: list[str], name: str) -> None:
        extra = SMOKE_ALL if args.smoke else []
        if table != "teacher" and f"kd.teacher={teacher}" in sets:  # a distilled run: --kd-set, its folder tagged
            sets, name = [*sets, *args.kd_set], name.replace("_", f"_{args.kd_tag}_", 1) if args.kd_tag else name
        runs.append(Run(table, key, recipe, [*sets, f"run.threads={args.threads}", "run.progress=false", *args.set,
                                             *extra], d / table / name))

    if "teacher" in args.table:  # name "": the teacher's folder is OUT/teacher, the kd.teacher of every student
        add("teacher", ("teacher",), "pipelines/fmnist_detect_teacher.yaml",
            [f"data.train={d / 'scenes-train'}", *common_data, f"optim.epochs={args.teacher_epochs}"], "")
    student = ["pipelines/fmnist_detect_kd.yaml", f"data.train={d / 'scenes-small'}", *common_data]
    for s in args.seeds if "kd" in args.table else []:
        add("kd", ("boxes", s), student[0], [*student[1:], "kd.teacher=null", f"run.seed={s}"], f"boxes_s{s}")
        add("kd", ("kd", s), student[0], [*student[1:], f"kd.teacher={teacher}", f"run.seed={s}"], f"kd_s{s}")
    free = [f"data.train={d / 'scenes-synth'}", "data.val=null", f"data.test={d / 'scenes-test'}",
            f"kd.teacher={teacher}", "kd.gt=0.0"]
    for s in args.datafree_seeds if "datafree" in args.table else []:
        add("datafree", ("conv", s), "pipelines/fmnist_detect_datafree.yaml", [*free, f"run.seed={s}"], f"conv_s{s}")
        add("datafree", ("vit", s), "pipelines/fmnist_detect_vit.yaml", [*free, f"run.seed={s}"], f"vit_s{s}")
    for draw in args.draws if "fewshot" in args.table else []:
        few = [student[0], f"data.train={d / f'scenes-fewshot-d{draw}'}", *common_data, f"kd.teacher={teacher}",
               f"run.seed={draw}"]
        # the same steps in both arms: the real arm's 500 scenes repeated to the sip arm's 500 + 500 + synth scenes,
        # 4 epochs (8,000 scenes at the default sizes, the KD table's students see 6,000)
        repeat = max(1, round((1000 + args.synth_scenes) / 500))
        few.append("optim.epochs=4")
        add("fewshot", ("fewshot_real", draw), few[0], [*few[1:], f"data.repeat={repeat}"], f"real_d{draw}")
        add("fewshot", ("fewshot_sip", draw), few[0], [*few[1:], "data.train_extra=[" + ", ".join(
            str(d / x) for x in (f"scenes-aug-d{draw}", "scenes-synth")) + "]"], f"sip_d{draw}")
    for norm in ("batch", "group") if "gnbn" in args.table else ():
        for b in args.batches:
            for s in args.seeds:
                sets = [*student[1:], "kd.teacher=null", f"detector.norm={norm}", f"data.batch_size={b}",
                        f"optim.lr={args.gnbn_lr * b / 16:.8g}", f"run.seed={s}"]
                add("gnbn", (norm, b, s), student[0], sets, f"{norm}_b{b}_s{s}")
    return runs


def prepare(runs: list[Run], args) -> None:
    """Make the scene sets and generated objects the runs read (each writer resumes / refuses by itself)."""
    needed = {Path(s.split("=", 1)[1]) for r in runs for s in r.sets if s.split("=", 1)[0] in ("data.train", "data.val",
                                                                                                "data.test")}
    extra = {Path(p.strip()) for r in runs for s in r.sets if s.startswith("data.train_extra=")
             for p in s.split("=", 1)[1].strip("[]").split(",")}
    needed |= extra
    if any(p.name == "scenes-synth" for p in needed):
        needed.add(args.out / "synth-objects")
    needed |= {args.out / f"aug-d{k}" for k in args.draws if args.out / f"scenes-aug-d{k}" in needed}
    for folder, cmd in scene_commands(args):
        if folder not in needed:  # a made folder's writer skips what it holds and refuses other settings
            continue
        print("sip " + shlex.join(cmd), flush=True)
        run_sip(cmd, ROOT, os.cpu_count() or 1)  # alone, before any run starts


def report(runs: list[Run]) -> dict:
    """The tables as Markdown (finished runs only) and a summary dict; mAP in COCO points (0-100)."""
    m = {r.key: r.metrics for r in runs if r.metrics}
    summary: dict = {"paired": {}}
    teacher = m.get(("teacher",), {}).get("test_map")
    if teacher is not None:
        t = m[("teacher",)]
        print(f"\n| teacher | test mAP | mAP@.5 |\n|---|---|---|\n| FCOS resnet18, 3,000 scenes | {teacher:.2f} | "
              f"{t['test_map50']:.2f} |")
        summary["teacher"] = teacher
    arms = {a: {k[1]: v["test_map"] for k, v in m.items() if len(k) == 2 and k[0] == a}
            for a in ("boxes", "kd", "conv", "vit", "fewshot_real", "fewshot_sip")}
    rows = [("boxes", "resnet10t student, 500 real scenes, boxes only"),
            ("kd", "same + KD (kd_cls, kd_box LD, kd_feat) from the teacher"),
            ("conv", "data-free: resnet10t, generated-object scenes, teacher's outputs only"),
            ("vit", "data-free: SPT + LSA ViT (ViTDet pyramid), same scenes"),
            ("fewshot_real", "resnet10t + KD, 500 scenes of 10 real objects per class, repeated"),
            ("fewshot_sip", "same + scenes of their sip img2img variants + scenes of txt2img objects")]
    if any(arms.values()):
        print("\n| arm | test mAP (mean ± std) | % of teacher | runs (seed) | validation mAP, last epoch (seed) |"
              "\n|---|---|---|---|---|")
        for a, label in rows:
            if arms[a]:
                pct = f"{100 * statistics.mean(arms[a].values()) / teacher:.1f}" if teacher else "—"
                val = {k[1]: v.get("val_map") for k, v in m.items() if len(k) == 2 and k[0] == a}
                print(f"| {label} | {mean_std(list(arms[a].values()))} | {pct} | "
                      f"{', '.join(f'{v:.2f} (s{s})' for s, v in sorted(arms[a].items()))} | "
                      f"{', '.join(f'{v:.2f} (s{s})' if v is not None else '—' for s, v in sorted(val.items()))} |")
        summary["arms"] = arms
        paired(arms["kd"], arms["boxes"], "KD - boxes only (target >= +2 mAP)", summary["paired"], " mAP")
        paired(arms["fewshot_sip"], arms["fewshot_real"], "10 objects/class: + sip scenes - real only",
               summary["paired"], " mAP")
    gnbn = {k: v["test_map"] for k, v in m.items() if len(k) == 3}
    if gnbn:
        print("\n| batch | BatchNorm test mAP | GroupNorm test mAP |\n|---|---|---|")
        for b in sorted({k[1] for k in gnbn}):
            cells = [mean_std([v for k, v in gnbn.items() if k[:2] == (n, b)]) for n in ("batch", "group")]
            print(f"| {b} | {cells[0]} | {cells[1]} |")
        for b in sorted({k[1] for k in gnbn}):
            by = {n: {k[2]: v for k, v in gnbn.items() if k[:2] == (n, b)} for n in ("batch", "group")}
            paired(by["group"], by["batch"], f"batch {b}: GN - BN", summary["paired"], " mAP")
        summary["gnbn"] = {f"{n}_b{b}_s{s}": v for (n, b, s), v in gnbn.items()}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", nargs="+", choices=TABLES, default=["teacher", "kd", "datafree"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (kd, gnbn)")
    p.add_argument("--datafree-seeds", type=int, nargs="+", default=[0], help="run seeds (datafree)")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 16], help="batch sizes (gnbn)")
    p.add_argument("--gnbn-lr", type=float, default=1e-3, help="gnbn lr at batch 16, scaled linearly with the batch")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--synth-per-class", type=int, default=100, help="txt2img objects per class (datafree)")
    p.add_argument("--synth-scenes", type=int, default=1000, help="scenes of generated objects (datafree)")
    p.add_argument("--draws", type=int, nargs="+", default=[0], help="few-shot object draws (fewshot)")
    p.add_argument("--shots", type=int, default=10, help="real objects per class (fewshot)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--out", type=Path, default=Path("runs/detect"))
    p.add_argument("--set", action="append", default=[], help="an override for every run")
    p.add_argument("--kd-set", action="append", default=[],
                   help="an override for the distilled runs only (kd, datafree, fewshot), e.g. kd.box=0.1")
    p.add_argument("--kd-tag", default="", help="a tag in the distilled runs' folder names (kd_<tag>_s0, ...)")
    p.add_argument("--smoke", action="store_true", help="tiny scene sets, 1 epoch: proves the commands")
    p.add_argument("--report", action="store_true", help="tabulate the finished runs only; start none")
    p.add_argument("--rerun", action="store_true",
                   help="redo a finished run whose saved config differs from the requested one (default: refuse)")
    args = p.parse_args()

    runs = plan(args)
    for run in runs:
        run.requested()  # a bad override fails here, naming the key, before anything runs
    if not args.report:
        prepare(runs, args)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda r: execute(r, args, lambda m: f"test mAP {m['test_map']:.2f}"), runs))
    print(json.dumps(report(runs)))


if __name__ == "__main__":
    main()
