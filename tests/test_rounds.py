"""sip rounds (sip.distill.rounds): distil, measure the student's disagreement with its teacher on a probe pool,
generate more of the classes it gets most wrong (guided by teacher and student), distil again; each round's images
an ordinary sip dataset; a run killed in a round resumes from the last finished round."""

from __future__ import annotations

import hashlib
import json

import pytest

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.guidance import GuideClassifier
from sip.config import ConfigError, load_config
from sip.data.bank import read_metadata
from sip.distill import rounds as rounds_module
from sip.distill.rounds import RoundsRecipe, class_disagreement, run_rounds

from conftest import DISTILL_DATA, DISTILL_STUDENT

GEN = {"steps": 3, "batch_size": 8, "device": "cpu"}


def recipe(teacher, sd_dir, *extra) -> RoundsRecipe:
    distill = [f"distill.{o}" for o in [*DISTILL_DATA, *DISTILL_STUDENT]] + ["distill.optim.epochs=1"]
    return load_config(RoundsRecipe, overrides=[
        *distill, f"distill.teachers=[{{checkpoint: {teacher}}}]", f"synth.generate.model={sd_dir}",
        "synth.generate.steps=3", "synth.generate.batch_size=8", "synth.generate.device=cpu", "synth.progress=false",
        "guide.scale=1.0", "guide.student_scale=1.0", "rounds.rounds=2", "rounds.top_classes=2",
        "rounds.per_class=2", "rounds.pool_per_class=1", *extra])


@pytest.fixture(scope="module")
def generator(tiny_sd_img2img):
    return DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**GEN), model_id="tiny")


def digests(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_rounds_generate_what_the_student_gets_wrong_and_resume_by_round(teachers, tiny_sd_dir, generator, tmp_path,
                                                                        monkeypatch):
    cfg = recipe(teachers["test_resnet"], tiny_sd_dir)
    out = tmp_path / "run"
    real = rounds_module.run_distillation
    calls: list[str] = []
    kill = {"round-2": True}

    def killed_in_round_2(c, run_dir):
        calls.append(str(run_dir))
        if "round-2" in str(run_dir) and kill.pop("round-2", False):
            raise KeyboardInterrupt
        return real(c, run_dir)
    monkeypatch.setattr(rounds_module, "run_distillation", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_rounds(cfg, out, generator)
    assert [p.split("/")[-2] for p in calls] == ["round-0", "round-1", "round-2"]
    assert (out / "round-1" / "done.json").is_file() and not (out / "round-2" / "done.json").exists()
    before = digests(out / "round-1")
    calls.clear()
    summary = run_rounds(cfg, out, generator)
    assert [p.split("/")[-2] for p in calls] == ["round-2"]  # finished rounds are read, not redone
    assert digests(out / "round-1") == before
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]

    # each round's classes are the previous student's highest-KL classes on the pool
    teacher = GuideClassifier.from_checkpoint(teachers["test_resnet"])
    for r in (1, 2):
        plan = json.loads((out / f"round-{r}" / "plan.json").read_text())
        kl = class_disagreement(teacher, GuideClassifier.from_checkpoint(out / f"round-{r - 1}" / "student"),
                                out / "pool")
        assert plan["classes"] == sorted(kl, key=lambda c: -kl[c])[:2]
        rows = read_metadata(out / f"round-{r}" / "synth")
        assert sorted({row["label"] for row in rows}) == sorted(plan["classes"]) and len(rows) == 2 * 2
        # guided by the teacher and by the previous round's student
        assert all(row["guide"]["student"] == str(out / f"round-{r - 1}" / "student") and
                   row["guide"]["student_scale"] == 1.0 for row in rows)
    # each round's student trains on every round's images so far, warm-started from the previous one
    saved = (out / "round-2" / "student" / "config.yaml").read_text()
    assert str(out / "round-1" / "synth") in saved and str(out / "round-2" / "synth") in saved
    assert f"checkpoint: {out / 'round-1' / 'student'}" in saved
    assert len(read_metadata(out / "pool")) == 10  # one probe per class, never trained on
    assert str(out / "pool") not in saved


@pytest.mark.parametrize("override, match", [
    ("synth.output=elsewhere", "synth.output .* set by sip rounds"),
    ("synth.generate.per_class=5", "synth.generate.per_class .* set by sip rounds"),
    ("rounds.rounds=0", "rounds.rounds must be >= 1"),
    ("distill.logits=store", "exactly one online teacher"),
    ("synth.guide.scale=1.0", "synth.guide"),
    ("guide.scale=-1", "guide.scale must be a finite number >= 0"),
    ("synth.latent_mix={mode: mixup}", "rounds.top_classes >= 2"),
])
def test_bad_rounds_recipes_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RoundsRecipe, overrides=["distill.teachers=[{checkpoint: t}]", "rounds.top_classes=1", override])


def test_too_many_top_classes_is_refused_before_anything_runs(teachers, tiny_sd_dir, tmp_path):
    with pytest.raises(ValueError, match="rounds.top_classes is 11 but there are only 10 classes"):
        run_rounds(recipe(teachers["test_resnet"], tiny_sd_dir, "rounds.top_classes=11"), tmp_path / "r")
