"""The experiment drivers reuse a finished run only when it is the requested one: equal resolved settings ->
its metrics; other settings -> refused with the differing keys, unless --rerun (scripts/student_experiments.py,
scripts/sip_ablation.py). No run is started here: each case has a finished run on disk."""

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
