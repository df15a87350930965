"""sip report on a detection run (issue 29): a grid of held-out scenes with the run's predicted boxes (score at
least --min-score, named by class) beside the scene boxes, as a PNG the page shows; a run whose scenes are not
on this machine is left out with a note."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from sip.detect.coco import SceneRecipe, run_scenes
from sip.detect.models import DetectorSection
from sip.detect.scenes import ObjectsSection, SceneSection
from sip.detect.train import DetectDataSection, DetectRecipe, run_detection
from sip.report.detections import detection_runs, read_detection_grid
from sip.report.page import write_report
from sip.train.recipe import OptimSection, RunSection


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    """RUN/detector: a tiny FCOS trained one epoch by sip train (task: detection) on 64 px scenes."""
    root = tmp_path_factory.mktemp("report-detect")
    sets = {}
    for name, count, seed, start, stop in (("train", 8, 0, 0, 400), ("val", 3, 1, 400, 600), ("test", 2, 2, 600, 800)):
        scenes = SceneSection(count=count, size=64, max_objects=3, object_size=(14, 30), seed=seed)
        run_scenes(SceneRecipe(output=str(root / name), objects=ObjectsSection(start=start, stop=stop), scenes=scenes,
                               progress=False))
        sets[name] = str(root / name)
    recipe = DetectRecipe(data=DetectDataSection(**sets, batch_size=4, eval_batch_size=4),
                          detector=DetectorSection(backbone="test_resnet", fpn_channels=32, head_convs=1,
                                                   score_thresh=0.0),
                          optim=OptimSection(epochs=1, lr=2e-3, warmup_epochs=0.0),
                          run=RunSection(progress=False, precision="fp32", threads=1))
    run_detection(recipe, root / "run" / "detector")
    return root / "run", sets


def test_the_report_draws_predicted_boxes_beside_the_scene_boxes(detection_run):
    run_dir, sets = detection_run
    page = write_report(run_dir, max_scenes=3, min_score=0.0)
    png = run_dir / "report" / "detections-detector.png"
    with Image.open(png) as im:
        im.verify()
    text = page.read_text()
    assert "Predicted boxes of the detection runs" in text and "src='detections-detector.png'" in text
    assert "data.val" in text and "score of at least 0" in text
    assert "src='evaluation.png'" in text  # the headline curve: validation mAP per epoch
    grid = read_detection_grid(run_dir / "detector", max_scenes=3, min_score=0.0)
    annotations = json.loads((Path(sets["val"]) / "annotations.json").read_text())
    first = min(im["id"] for im in annotations["images"])
    assert grid.split == "data.val" and len(grid.scenes) == 3
    assert len(grid.scenes[0].truth) == sum(a["image_id"] == first for a in annotations["annotations"])
    assert {name for s in grid.scenes for _, name, _ in s.truth} <= set(grid.classes)
    assert any(s.predicted for s in grid.scenes)  # score_thresh 0: the detector's top boxes
    assert all(score >= 0.0 and name in grid.classes for s in grid.scenes for _, name, score in s.predicted)
    none = read_detection_grid(run_dir / "detector", max_scenes=3, min_score=1.0)
    assert not any(s.predicted for s in none.scenes)


def test_cli_report_takes_the_score_threshold(detection_run):
    from typer.testing import CliRunner

    from sip.cli import app

    run_dir, _ = detection_run
    res = CliRunner().invoke(app, ["report", str(run_dir / "detector"), "--min-score", "0.5", "--max-scenes", "2"])
    assert res.exit_code == 0, res.output
    text = (run_dir / "detector" / "report" / "report.html").read_text()
    assert "The first 2 scenes" in text and "score of at least 0.5" in text
    assert (run_dir / "detector" / "report" / "detections-detector.png").is_file()


def test_scenes_not_on_this_machine_are_left_out_with_a_note(detection_run, tmp_path):
    run_dir, _ = detection_run
    moved = tmp_path / "run"
    shutil.copytree(run_dir / "detector", moved / "detector", ignore=shutil.ignore_patterns("report", "checkpoint"))
    config = (moved / "detector" / "config.yaml").read_text()
    (moved / "detector" / "config.yaml").write_text(config.replace(str(Path(run_dir).parent), "/nowhere"))
    text = write_report(moved).read_text()
    assert "No predicted boxes" in text and "are not on this machine" in text
    assert not list((moved / "report").glob("detections-*.png"))
    assert detection_runs([moved / "detector" / "metrics.jsonl"]) == [moved / "detector"]
