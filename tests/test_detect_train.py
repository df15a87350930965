"""Detectors through sip's loop (issue 29): a tiny FCOS on tiny scene sets trains with finite falling loss and
per-epoch COCO mAP; distillation adds named KD terms; bad input fails before training, naming the key."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from sip.detect.coco import SceneRecipe, run_scenes
from sip.detect.models import DetectorSection, build_detector, load_detector
from sip.detect.scenes import ObjectsSection, SceneSection
from sip.detect.step import KDSection
from sip.detect.train import DetectDataSection, DetectRecipe, run_detection
from sip.train.recipe import OptimSection, RunSection

SIZE = 64
TINY = DetectorSection(backbone="test_resnet", fpn_channels=32, head_convs=1)


def _scenes(out: Path, count: int, seed: int, start: int, stop: int, **kw) -> str:
    scenes = SceneSection(count=count, size=SIZE, max_objects=3, object_size=(14, 30), seed=seed, **kw)
    run_scenes(SceneRecipe(output=str(out), objects=ObjectsSection(start=start, stop=stop), scenes=scenes,
                           progress=False))
    return str(out)


@pytest.fixture(scope="module")
def scene_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return {"train": _scenes(root / "train", 16, 0, 0, 400), "val": _scenes(root / "val", 4, 1, 400, 600),
            "test": _scenes(root / "test", 4, 2, 600, 800)}


def _recipe(sets, **kw) -> DetectRecipe:
    base = DetectRecipe(data=DetectDataSection(train=sets["train"], val=sets["val"], test=sets["test"], batch_size=4,
                                               eval_batch_size=4),
                        detector=TINY, optim=OptimSection(epochs=3, lr=2e-3, warmup_epochs=0.0, weight_decay=1e-4),
                        run=RunSection(progress=False, precision="fp32", threads=1))
    return replace(base, **kw)


@pytest.fixture(scope="module")
def trained(scene_sets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("det") / "run"
    return run_dir, run_detection(_recipe(scene_sets), run_dir)


def test_tiny_detector_trains_with_falling_loss_and_coco_map(trained):
    run_dir, metrics = trained
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    losses = [line["train_loss"] for line in lines]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for key in ("train_classification", "train_bbox_regression", "train_bbox_ctrness", "val_map", "val_map50"):
        assert key in lines[0], key
    assert 0.0 <= metrics["test_map"] <= 100.0 and "best_val_map" in metrics and "top1" not in metrics
    model, meta = load_detector(str(run_dir))
    assert meta["classes"][0] == "T-shirt/top" and meta["img_size"] == SIZE
    assert sum(p.numel() for p in model.parameters()) == metrics["num_params"]


def test_distillation_adds_named_kd_terms(scene_sets, trained, tmp_path):
    teacher_dir, _ = trained
    kd = KDSection(teacher=str(teacher_dir), gt=1.0, cls=1.0, box=1.0, feat=1.0)
    recipe = _recipe(scene_sets, kd=kd, optim=OptimSection(epochs=1, lr=1e-3, warmup_epochs=0.0))
    run_detection(recipe, tmp_path / "student")
    line = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("train_kd_cls", "train_kd_box", "train_kd_feat", "train_classification"):
        assert math.isfinite(line[key]) and line[key] >= 0, key


def test_scenes_smaller_than_stride_are_refused():
    with pytest.raises(ValueError, match=r"scenes of 16 px are smaller than the detector's largest stride 32"):
        build_detector(TINY, 10, 16)


def test_bad_detection_recipes_fail_naming_the_key(scene_sets, tmp_path):
    other = _scenes(tmp_path / "bags", 2, 0, 0, 400, )
    coco = json.loads((Path(other) / "annotations.json").read_text())
    coco["categories"][0]["name"] = "Tee"
    (Path(other) / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"data.test: .*categories .* do not match the run's classes"):
        run_detection(_recipe(scene_sets, data=replace(_recipe(scene_sets).data, test=other)), tmp_path / "r")
    with pytest.raises(ValueError, match="optim.label_smoothing is a classification loss setting"):
        _recipe(scene_sets, optim=OptimSection(label_smoothing=0.1))
    with pytest.raises(ValueError, match="kd.teacher is set but kd.cls, kd.box and kd.feat are all 0"):
        KDSection(teacher="x", cls=0, box=0)
    with pytest.raises(ValueError, match="detector.head_convs is read by head fcos only"):
        DetectorSection(head="retinanet", head_convs=3)
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_cli_train_dispatches_task_detection(tmp_path):
    from typer.testing import CliRunner

    from sip.cli import app

    recipe = tmp_path / "det.yaml"
    recipe.write_text("task: detection\ndata: {train: null}\n")
    res = CliRunner().invoke(app, ["train", str(recipe), "-o", str(tmp_path / "run")])
    assert res.exit_code == 2 and "task: detection needs data.train and data.test" in res.output
    res = CliRunner().invoke(app, ["train", str(recipe), "--set", "task=detection", "--set", "detector.head=yolo"])
    assert res.exit_code == 2 and "detector.head" in res.output


def test_cli_distill_dispatches_task_detection_and_needs_a_teacher(scene_sets, trained, tmp_path):
    from typer.testing import CliRunner

    from sip.cli import app

    recipe = tmp_path / "det.yaml"
    recipe.write_text(f"task: detection\ndata: {{train: {scene_sets['train']}, test: {scene_sets['test']}}}\n"
                      "detector: {backbone: test_resnet, fpn_channels: 32, head_convs: 1}\n")
    res = CliRunner().invoke(app, ["distill", str(recipe), "-o", str(tmp_path / "boxes")])
    assert res.exit_code == 2 and "needs kd.teacher" in res.output and not (tmp_path / "boxes").exists()
    res = CliRunner().invoke(app, ["distill", str(recipe), "-o", str(tmp_path / "kd"), "--set", f"kd.teacher={trained[0]}",
                                   "--set", "optim.epochs=1", "--set", "run.progress=false", "--set", "run.threads=1",
                                   "--set", "data.batch_size=4", "--set", "run.eval_max_samples=4"])
    assert res.exit_code == 0, res.output
    logged = json.loads((tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_kd_cls", "train_kd_box"} <= set(logged)


@pytest.mark.slow
def test_tiny_detector_map_rises_above_chance(tmp_path):
    """A small FCOS on 300 scenes of 2 classes: test mAP@.5 well above what random boxes score (< 1)."""
    sets = {name: _scenes(tmp_path / name, n, seed, lo, hi, background="black")
            for name, n, seed, lo, hi in (("train", 300, 0, 0, 5000), ("val", 30, 1, 5000, 6000),
                                          ("test", 60, 2, 6000, 7000))}
    recipe = _recipe(sets, optim=OptimSection(epochs=8, lr=2e-3, warmup_epochs=0.5, weight_decay=1e-4),
                     detector=replace(TINY, fpn_channels=64, head_convs=2), data=DetectDataSection(
                         train=sets["train"], val=sets["val"], test=sets["test"], batch_size=8, eval_batch_size=16))
    metrics = run_detection(recipe, tmp_path / "run")
    assert metrics["test_map50"] > 5.0, metrics


def test_shipped_detection_recipes_load_and_dispatch():
    from sip.config import load_config
    from sip.detect.train import task_of

    for name in ("teacher", "kd", "datafree", "vit"):
        path = f"pipelines/fmnist_detect_{name}.yaml"
        assert task_of(path, []) == "detection"
        load_config(DetectRecipe, path)
    assert task_of("pipelines/fmnist_teacher.yaml", []) == "classification"


def test_classification_recipe_with_a_detection_key_is_refused(tmp_path):
    from typer.testing import CliRunner

    from sip.cli import app

    recipe = tmp_path / "cls.yaml"
    recipe.write_text("detector: {head: fcos}\n")  # no task: detection -> a classification recipe
    res = CliRunner().invoke(app, ["train", str(recipe), "-o", str(tmp_path / "run")])
    assert res.exit_code == 2 and "detector" in res.output


def test_finished_detection_run_resumes_without_retraining(scene_sets, trained):
    run_dir, metrics = trained
    again = run_detection(_recipe(scene_sets), run_dir)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert again["steps"] == metrics["steps"] and again["test_map"] == pytest.approx(metrics["test_map"])


def test_train_extra_scene_sets_are_trained_on_with_data_train(scene_sets, tmp_path):
    """data.train_extra (sip scenes beside the real ones): one training set of every scene, in order; a set of
    another scene size is refused naming its key."""
    from sip.detect.data import SceneImages
    from sip.detect.train import _scene_sets

    data = DetectDataSection(train=scene_sets["train"], train_extra=[scene_sets["val"]], test=scene_sets["test"])
    train, _, _ = _scene_sets(data)
    val = SceneImages(scene_sets["val"])
    assert len(train) == 16 + 4 and train.size == SIZE
    assert train.item(16)["boxes"].tolist() == val.item(0)["boxes"].tolist()
    assert train.item(15)["boxes"].tolist() == SceneImages(scene_sets["train"]).item(15)["boxes"].tolist()
    big = SceneSection(count=2, size=96, max_objects=2, object_size=(14, 30), seed=3)
    run_scenes(SceneRecipe(output=str(tmp_path / "big"), objects=ObjectsSection(start=0, stop=100), scenes=big,
                           progress=False))
    with pytest.raises(ValueError, match=r"data.train_extra\[1\]: .* at 96 px"):
        _scene_sets(replace(data, train_extra=[scene_sets["val"], str(tmp_path / "big")]))


def test_a_boxes_only_run_is_not_another_run_for_kd_weights_it_never_reads(scene_sets, trained):
    """Without kd.teacher no kd key is read (the step is the detector's own losses): a finished boxes-only run is
    the requested one whatever the kd weights say; with a teacher they decide the run."""
    from sip.train.run_dir import recipe_changes

    run_dir, _ = trained
    assert recipe_changes(_recipe(scene_sets, kd=KDSection(cls=10.0, box=0.1)), run_dir / "config.yaml") == []
    longer = _recipe(scene_sets, optim=replace(_recipe(scene_sets).optim, epochs=4))
    assert recipe_changes(longer, run_dir / "config.yaml") == ["optim.epochs"]
    with_teacher = _recipe(scene_sets, kd=KDSection(teacher=str(run_dir), cls=10.0))
    assert {"kd.teacher", "kd.cls"} <= set(recipe_changes(with_teacher, run_dir / "config.yaml"))
