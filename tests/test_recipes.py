"""Every recipe in pipelines/ loads into its recipe class (plain YAML, no unknown keys)."""

from pathlib import Path

import pytest

from sip.config import load_config

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def recipe_class(path: Path):
    stem = path.stem
    if stem.startswith("adapt_"):
        from sip.adapt.recipe import AdaptRecipe
        return AdaptRecipe
    if stem.endswith("_scenes"):
        from sip.detect.coco import SceneRecipe
        return SceneRecipe
    if "_detect_" in stem:  # sip train dispatches on the recipe's task key
        from sip.detect.train import DetectRecipe
        return DetectRecipe
    if "_rounds" in stem:
        from sip.distill.rounds import RoundsRecipe
        return RoundsRecipe
    if stem.endswith("_augment") or "_augment_" in stem:
        from sip.augment.run import AugmentRecipe
        return AugmentRecipe
    if stem.endswith("_synth") or "_synth_" in stem:
        from sip.augment.run import SynthRecipe
        return SynthRecipe
    if "logits" in stem:
        from sip.distill.run import LogitsRecipe
        return LogitsRecipe
    if any(k in stem for k in ("kd", "distill", "datafree", "ensemble", "student")):
        from sip.distill.run import DistillRecipe
        return DistillRecipe
    from sip.train.recipe import TrainRecipe
    return TrainRecipe


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_loads(path):
    load_config(recipe_class(path), path)


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*_detect_*.yaml")), ids=lambda p: p.name)
def test_detection_recipes_name_their_task(path):
    from sip.detect.train import task_of

    assert task_of(path, []) == "detection"
