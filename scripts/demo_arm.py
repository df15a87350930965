"""Another way of making the demo's txt2img set, as one more arm of finished demo seeds, paired by seed.

``scripts/demo_seeds.py`` runs whole demos (shots, teacher, sip data, two students) per seed. This adds an arm to
those finished seeds without redoing them: the seed's txt2img set is made again with ``--synth-set`` overrides
(e.g. guided by the seed's own teacher: ``--teacher``), and the seed's ``student-real+sip`` recipe is distilled
again with that set in place of the unguided one (its img2img variants, shots, teacher, epochs and seed unchanged).
An arm with no ``--teacher`` nor ``--synth-set`` changes the student only (``--student-set``, e.g.
``select.keep=0.3``) and reads the seed's own txt2img set.
The arm is compared with both demo students, paired by seed, on the validation split and on the test set (each
run reads it once, at its end). Each stage is sip's own resumable job: ``sip synth`` skips the images already
written and its writer refuses a folder made with other settings; a finished student is reused only when its saved
recipe equals the requested one (``sip.train.run_dir.recipe_changes``), else refused with the differing keys.

Usage::

    python scripts/demo_arm.py --demo runs/demo10 --seeds 0 1 2 3 4 --name guided --teacher \\
        --synth-set guide.scale=5 --synth-set "guide.steps=[0.0, 0.6]" --synth-set guide.every=2
    python scripts/demo_arm.py --demo runs/demo1 --name select --student-set select.keep=0.3
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.finished_runs import flat, reuse_or_refuse  # noqa: E402
from sip.report.stats import paired_comparison  # noqa: E402

SIP = str(Path(sys.executable).with_name("sip"))


def run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    if subprocess.run(cmd, check=False).returncode:
        raise SystemExit(f"failed (its message is above): {shlex.join(cmd)}")


def finished_student(out: Path, recipe: Path, sets: list[str]) -> bool:
    """True when ``out`` holds a finished student of exactly ``recipe`` with ``sets``; a finished one made with
    other settings is refused, naming the keys (its numbers are not this arm's)."""
    import yaml

    from sip.config import load_config, to_dict
    from sip.distill.run import DistillRecipe
    from sip.train.run_dir import recipe_changes

    if not (out / "final_metrics.json").is_file():
        return False
    requested = load_config(DistillRecipe, recipe, sets)
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
    return reuse_or_refuse(out, recipe_changes(requested, out / "config.yaml"), False, flat(saved),
                           flat(to_dict(requested)))


def run_arm(seed_dir: Path, args) -> dict:
    """The arm's txt2img set and student in ``seed_dir`` (a finished demo seed); its final metrics."""
    if not (seed_dir / "results.json").is_file():
        raise SystemExit(f"{seed_dir}: not a finished demo seed (no results.json); run scripts/demo_seeds.py first")
    student = seed_dir / "train" / f"student-{args.name}"
    if args.teacher or args.synth_set:
        synth = seed_dir / "arms" / args.name / "synthetic"
        cmd = [SIP, "synth", str(seed_dir / "synthetic" / "config.yaml"), "-o", str(synth), "--set", "progress=false"]
        if args.teacher:
            cmd += ["--teacher", str(seed_dir / "train" / "teacher")]
        run(cmd + [a for s in args.synth_set for a in ("--set", s)])
    else:  # the txt2img recipe is unchanged: the arm differs in its student only and reads the seed's own set
        synth = seed_dir / "synthetic"
    recipe = seed_dir / "train" / "student-real+sip" / "config.yaml"
    sets = [f"data.synthetic={json.dumps([str(seed_dir / 'augmented'), str(synth)])}", "run.progress=false",
            *args.student_set]
    if not finished_student(student, recipe, sets):
        run([SIP, "distill", str(recipe), "-o", str(student), *(a for s in sets for a in ("--set", s))])
    arms = {}
    for arm in ("student-real", "student-real+sip", f"student-{args.name}"):
        m = json.loads((seed_dir / "train" / arm / "final_metrics.json").read_text())
        arms[arm] = {k: m.get(k) for k in ("val_top1", "test_top1")}
    return arms


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="scripts/demo_seeds.py's --out (seed<k> folders)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--name", required=True, help="the arm's name: student-<name>, arms/<name>/synthetic")
    ap.add_argument("--teacher", action="store_true", help="guide sampling by the seed's own teacher")
    ap.add_argument("--synth-set", action="append", default=[], help="override of the txt2img recipe (repeatable)")
    ap.add_argument("--student-set", action="append", default=[], help="override of the student recipe")
    args = ap.parse_args(argv)
    if not args.name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--name {args.name!r}: letters, digits, - and _ only (it names folders)")

    rows = {s: run_arm(args.demo / f"seed{s}", args) for s in args.seeds}
    arm = f"student-{args.name}"
    names = ("student-real", "student-real+sip", arm)
    print(f"\n| seed | {' | '.join(f'{a} val / test' for a in names)} |\n|---|---|---|---|")
    for s, r in rows.items():
        print(f"| {s} | " + " | ".join(f"{r[a]['val_top1']:.2f} / {r[a]['test_top1']:.2f}" for a in names) + " |")
    summary: dict = {"demo": str(args.demo), "name": args.name, "teacher": args.teacher,
                     "synth_set": args.synth_set, "student_set": args.student_set, "rows": rows}
    if len(rows) > 1:
        for ref in ("student-real", "student-real+sip"):
            for split in ("val_top1", "test_top1"):
                gain = paired_comparison([r[arm][split] for r in rows.values()],
                                         [r[ref][split] for r in rows.values()])
                print(f"{split}: {arm} - {ref}, paired by seed: {gain.describe(' pt')}")
                summary[f"{arm} - {ref} {split}"] = gain.to_dict(2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
