"""The validation split (``data.val``): drawn from the training pool, disjoint from the shots and the test set,
read every epoch and for the best epoch; the test set read once, at the end of a finished run."""

from __future__ import annotations

import json

import pytest

import sip.train.evaluate as eval_mod
from sip.config import ConfigError, load_config
from sip.data.sources import SourceConfig
from sip.train.inputs import build_train_images, build_val_images, class_names, open_splits
from sip.train.recipe import DataSection, TrainRecipe, ValSection
from sip.train.run import run_training

from conftest import TRAIN_TINY, tiny_train_recipe as tiny


def _ids(source) -> set[str]:
    return set(source.source_ids())


def test_a_few_shot_pool_gives_a_validation_split_disjoint_from_the_shots_and_the_test_set():
    data = tiny().data
    real, val = open_splits(data)
    assert len(real) == 30 and len(val) == 20  # the shots train unchanged
    assert not _ids(real) & _ids(val)
    assert all(sid.startswith("fmnist/train/") and 50000 <= int(sid.rsplit("/", 1)[1]) for sid in _ids(val))
    again = open_splits(data)[1]
    assert _ids(again) == _ids(val)  # deterministic
    other = open_splits(DataSection(**{**data.__dict__, "val": ValSection(size=20, seed=1)}))[1]
    assert _ids(other) != _ids(val)


def test_without_shots_the_validation_images_leave_the_training_pool():
    pool = SourceConfig(start=50000, stop=50200, size=16)
    data = DataSection(real=pool, val=ValSection(size=50), img_size=16)
    real, val = open_splits(data)
    assert len(real) == 150 and len(val) == 50 and not _ids(real) & _ids(val)
    assert len(build_train_images(data, class_names(data), 0)) == 150
    assert len(build_val_images(data, class_names(data))) == 50


def test_a_folder_pool_is_carved_and_a_separate_validation_folder_is_read_as_given(image_folder, tmp_path):
    folder = SourceConfig(kind="folder", path=str(image_folder))
    real, val = open_splits(DataSection(real=SourceConfig(kind="folder", path=str(image_folder), shots=1),
                                        val=ValSection(size=2)))
    assert len(val) == 2 and not _ids(real) & _ids(val)
    everything = _ids(open_splits(DataSection(real=folder, val=None))[0])
    assert _ids(real) | _ids(val) <= everything
    real, val = open_splits(DataSection(real=folder, val=ValSection(size=None, source=folder)))
    assert _ids(val) == everything and _ids(real) == everything  # a separate set is read as given


def test_overlapping_validation_and_test_images_and_impossible_sizes_are_refused():
    test_is_val_pool = DataSection(real=SourceConfig(shots=3), eval=SourceConfig(split="train", start=50000),
                                   val=ValSection(size=20))
    with pytest.raises(ValueError, match="share .* images"):
        open_splits(test_is_val_pool)
    too_many = DataSection(real=SourceConfig(start=50000, stop=50100), val=ValSection(size=101))
    with pytest.raises(ValueError, match="data.val.size is 101 but data.real's pool has only 100"):
        open_splits(too_many)
    with pytest.raises(ConfigError, match="data.val.source"):
        load_config(TrainRecipe, overrides=[*TRAIN_TINY, "data.real=null", "data.synthetic=somewhere"])


def test_epochs_read_the_validation_split_and_the_test_set_is_read_once(tmp_path, monkeypatch):
    """Each epoch evaluates the validation split (the best epoch is chosen on it); the test set is read by
    exactly one evaluation, after the last epoch, and its numbers appear only in final_metrics.json."""
    reads: list[tuple[str, int]] = []
    real_evaluate = eval_mod.evaluate

    def counting(model, loader, accelerator, progress=False, desc="eval"):
        reads.append((desc, len(loader.dataset)))
        return real_evaluate(model, loader, accelerator, progress, desc)

    monkeypatch.setattr(eval_mod, "evaluate", counting)
    metrics = run_training(tiny("run.eval_max_samples=10"), tmp_path / "run")
    assert reads == [("val", 10), ("val", 10), ("val", 20), ("test", 50)]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(lines, key=lambda x: x["val_top1"])
    assert metrics["best_epoch"] == best["epoch"] or metrics["best_val_top1"] == best["val_top1"]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["test_top1"] == metrics["top1"] and final["test_samples"] == 50 and final["val_samples"] == 20

    reads.clear()  # no validation split: no per-epoch evaluation, the test set once
    metrics = run_training(tiny("data.val=null", "optim.epochs=2"), tmp_path / "noval")
    assert reads == [("test", 50)] and "best_epoch" not in metrics
