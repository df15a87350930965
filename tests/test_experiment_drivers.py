"""The experiment drivers reuse a finished run only when it is the requested one: equal resolved settings ->
its metrics; other settings -> refused with the differing keys, unless --rerun (scripts/student_experiments.py,
scripts/sip_ablation.py, scripts/detect_experiments.py). No run is started here: each case has a finished run on
disk."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _import(name: str):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(name)


def _student_args(tmp_path: Path, sets: list[str], rerun: bool = False) -> argparse.Namespace:
    return argparse.Namespace(out=tmp_path / "students", teacher="runs/teacher", synthetic="runs/synth",
                              augmented="runs/aug", set=sets, init_from=None, report=False, rerun=rerun)


def _finish_student_run(tmp_path: Path, sets: list[str]) -> Path:
    """A finished cnn_sip draw-0 run folder as `sip distill` leaves it: config.yaml + final_metrics.json."""
    from sip.config import load_config, save_config
    from sip.distill.run import DistillRecipe

    students = _import("scripts.student_experiments")
    cli, out = students.command("cnn_sip", 0, _student_args(tmp_path, sets))
    overrides = [v for flag, v in zip(cli, cli[1:]) if flag == "--set"]
    out.mkdir(parents=True)
    save_config(load_config(DistillRecipe, REPO / cli[1], overrides), out / "config.yaml")
    (out / "final_metrics.json").write_text(json.dumps({"top1": 71.5}))
    return out


def test_student_driver_reuses_only_the_requested_run(tmp_path):
    students = _import("scripts.student_experiments")
    finished = _import("scripts.finished_runs")
    _finish_student_run(tmp_path, ["optim.epochs=30"])
    # the same recipe and overrides (a thread count does not change results): reused, nothing started
    assert students.run_one("cnn_sip", 0, _student_args(tmp_path, ["optim.epochs=30", "run.threads=2"])) == \
        {"top1": 71.5}
    # unset epochs resolve to the recipe's 20, not the finished run's 30: refused, naming the key and values
    with pytest.raises(finished.StaleRunError, match=r"optim\.epochs: 30 -> 20") as e:
        students.run_one("cnn_sip", 0, _student_args(tmp_path, []))
    assert "--rerun" in str(e.value)
    with pytest.raises(finished.StaleRunError, match=r"optim\.lr"):
        students.run_one("cnn_sip", 0, _student_args(tmp_path, ["optim.epochs=30", "optim.lr=0.001"]))
    # --rerun: the finished run is not returned (the driver starts it over with run.resume=false)
    cli, out = students.command("cnn_sip", 0, _student_args(tmp_path, []))
    assert students.finished_is_requested(cli, out, rerun=True) is False


def test_ablation_driver_reuses_only_the_requested_configuration(tmp_path):
    ablation = _import("scripts.sip_ablation")
    finished = _import("scripts.finished_runs")
    args = argparse.Namespace(out=tmp_path, threads=1, set=["fewshot_steps=40"], rerun=False)
    out = tmp_path / "label_s0.5.json"
    eval_args = ["--sections", "img2img,fewshot", "--prompts", "label", "--set", "img2img_strengths=0.5",
                 "--set", "fewshot_strength=0.5", "--set", "fewshot_arms=cropflip,img2img",
                 "--set", "steer_strength=0.5", "--set", "fewshot_steps=40"]
    kept = {**ablation.requested_settings(eval_args), "fewshot": {"arms": {}}, "marker": 1}
    out.write_text(json.dumps(kept))
    assert ablation.run("label", 0.5, args)["marker"] == 1
    args.set = ["fewshot_steps=500"]
    with pytest.raises(finished.StaleRunError, match=r"config\.fewshot_steps: 40 -> 500"):
        ablation.run("label", 0.5, args)


def test_differing_keys_walks_nested_settings():
    finished = _import("scripts.finished_runs")
    assert finished.differing_keys({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": (1, 2)}}) == []
    assert finished.differing_keys({"a": {"b": 1}}, {"a": {"b": 2, "d": None}}) == ["a.b", "a.d"]
    assert finished.differing_keys({"a": 1, "t": 1}, {"a": 1, "t": 2}, ignore={"t"}) == []


def _detect_args(tmp_path: Path, tables: list[str], sets: list[str] | None = None, rerun: bool = False):
    return argparse.Namespace(table=tables, seeds=[0, 1], datafree_seeds=[0], batches=[2, 16], gnbn_lr=1e-3,
                              teacher_epochs=8, synth_per_class=100, synth_scenes=1000, draws=[0], shots=10, jobs=1,
                              threads=1, kd_set=[], kd_tag="",
                              out=tmp_path / "detect", set=sets or [], smoke=False, report=False, rerun=rerun)


def test_detection_driver_plans_what_each_arm_claims(tmp_path):
    detect = _import("scripts.detect_experiments")
    runs = {r.key: r for r in detect.plan(_detect_args(tmp_path, ["teacher", "kd", "datafree", "fewshot", "gnbn"]))}
    teacher = tmp_path / "detect" / "teacher"
    assert runs[("teacher",)].out == teacher  # the folder every student's kd.teacher names
    recipes = {k: r.requested() for k, r in runs.items()}  # every plan resolves (a bad key would raise here)
    for s in (0, 1):
        boxes, kd = recipes[("boxes", s)], recipes[("kd", s)]
        assert boxes.kd.teacher is None and kd.kd.teacher == str(teacher)
        # the KD claim compares the same student on the same scenes and seed: only the kd section differs
        assert (boxes.data, boxes.detector, boxes.optim, boxes.run.seed) == (kd.data, kd.detector, kd.optim, s)
    for arm in ("conv", "vit"):  # data-free: generated-object scenes, the teacher's outputs only, no real val scene
        free = recipes[(arm, 0)]
        assert free.data.train.endswith("scenes-synth") and free.data.val is None and free.kd.gt == 0.0
    assert recipes[("vit", 0)].detector.backbone.startswith("sip_vit")
    real, sip = recipes[("fewshot_real", 0)], recipes[("fewshot_sip", 0)]  # the same scenes per epoch, both + KD
    assert real.data.train == sip.data.train and real.data.repeat * 500 == 500 + 500 + 1000 and real.kd == sip.kd
    assert [Path(p).name for p in sip.data.train_extra] == ["scenes-aug-d0", "scenes-synth"] and not real.data.train_extra
    gn2, bn16 = recipes[("group", 2, 0)], recipes[("batch", 16, 0)]
    assert (gn2.detector.norm, gn2.data.batch_size, gn2.optim.lr) == ("group", 2, pytest.approx(1e-3 * 2 / 16))
    assert (bn16.detector.norm, bn16.optim.lr, bn16.kd.teacher) == ("batch", pytest.approx(1e-3), None)
    # --kd-set reaches the distilled runs only, whose folders carry --kd-tag; the boxes-only arm stays as it was
    args = _detect_args(tmp_path, ["kd", "datafree"])
    args.kd_set, args.kd_tag = ["kd.box=0.1"], "box0.1"
    tagged = {r.key: r for r in detect.plan(args)}
    assert tagged[("kd", 0)].requested().kd.box == 0.1 and tagged[("kd", 0)].out.name == "kd_box0.1_s0"
    assert tagged[("conv", 0)].requested().kd.box == 0.1 and tagged[("conv", 0)].out.name == "conv_box0.1_s0"
    assert tagged[("boxes", 0)].out == runs[("boxes", 0)].out and tagged[("boxes", 0)].sets == runs[("boxes", 0)].sets


def test_detection_driver_reuses_only_the_requested_run(tmp_path):
    from sip.config import save_config

    detect = _import("scripts.detect_experiments")
    finished = _import("scripts.finished_runs")
    run = next(r for r in detect.plan(_detect_args(tmp_path, ["kd"])) if r.key == ("kd", 0))
    run.out.mkdir(parents=True)
    save_config(run.requested(), run.out / "config.yaml")
    (run.out / "final_metrics.json").write_text(json.dumps({"test_map": 31.5}))
    assert finished.finished_run(run.out, run.requested(), rerun=False)
    other = next(r for r in detect.plan(_detect_args(tmp_path, ["kd"], ["optim.epochs=3"])) if r.key == ("kd", 0))
    with pytest.raises(finished.StaleRunError, match=r"optim\.epochs: 12 -> 3"):
        finished.finished_run(other.out, other.requested(), rerun=False)
    assert finished.finished_run(other.out, other.requested(), rerun=True) is False


def test_demo_seeds_sees_a_stage_changed_outside_demo_yaml(tmp_path):
    """A finished seed whose demo.yaml equals the request but whose img2img prompts were other (prompts are the
    demo's code, not its recipe) is not the requested run: scripts/demo_seeds.py names the stage keys."""
    import dataclasses

    from sip.config import load_config, save_config
    from sip.demo import DemoRecipe, demo_recipes

    seeds = _import("scripts.demo_seeds")
    overrides = ["shots=1", "seed=3"]
    recipes = demo_recipes(load_config(DemoRecipe, None, overrides), tmp_path)
    for name, rel in seeds.STAGE_CONFIGS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        save_config(recipes[name], tmp_path / rel)
    assert seeds.stage_changes(tmp_path, overrides) == []
    old = dataclasses.replace(recipes["augment"], prompt=dataclasses.replace(
        recipes["augment"].prompt, template="a photo of a {label}, {caption}"))
    save_config(old, tmp_path / seeds.STAGE_CONFIGS["augment"])
    assert seeds.stage_changes(tmp_path, overrides) == ["augment.prompt.template"]
    (tmp_path / seeds.STAGE_CONFIGS["teacher"]).unlink()
    assert "teacher: no train/teacher/config.yaml" in seeds.stage_changes(tmp_path, overrides)
