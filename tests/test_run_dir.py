"""Run folders: resuming one written by an older sip, and what the resume check compares."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from sip.config import ConfigError, load_config
from sip.train.recipe import TrainRecipe
from sip.train.run import run_training
from sip.train.run_dir import prepare_run_dir

OLD_RUN = Path(__file__).parent / "fixtures" / "train_run_49734ae"  # see fixtures/make_old_train_run.py


def _copy_old_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir)
    return run_dir


def test_a_run_folder_of_the_previous_release_resumes(tmp_path):
    run_dir = _copy_old_run(tmp_path)
    first = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(first) == 1  # the old run was stopped after epoch 1 of 2
    recipe = load_config(TrainRecipe, run_dir / "config.yaml")
    metrics = run_training(recipe, run_dir)  # no "different recipe" refusal
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and lines[0] == first[0]  # epoch 1 kept as written, epoch 2 appended
    assert json.loads(lines[1])["epoch"] == 2
    assert (run_dir / "model.safetensors").is_file() and 0 <= metrics["top1"] <= 100


def test_keys_added_since_the_run_take_their_defaults(tmp_path):
    run_dir = _copy_old_run(tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    del saved["data"]["color_jitter"]  # as if written before the key existed (it changes outputs; default 0.0)
    saved["run"]["retired_key"] = 3  # a key this sip no longer has
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    recipe = load_config(TrainRecipe, OLD_RUN / "config.yaml")
    assert prepare_run_dir(recipe, run_dir) == (run_dir, True)


def test_a_key_that_changes_outputs_still_refuses_resume(tmp_path):
    run_dir = _copy_old_run(tmp_path)
    recipe = load_config(TrainRecipe, run_dir / "config.yaml", overrides=["optim.lr=0.123"])
    with pytest.raises(ConfigError, match="optim.lr"):
        prepare_run_dir(recipe, run_dir)
