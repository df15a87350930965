"""sip.train.run: the run folder, resume, determinism, and the errors raised before training starts.

The data pipeline is tested in tests/test_train_inputs.py, recipe validation in tests/test_train_recipe.py,
the precision policy in tests/test_train_loop.py and older run folders in tests/test_run_dir.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sip.train.evaluate as eval_mod
import sip.train.loop as train_mod
from sip.config import ConfigError, load_config
from sip.data.sources import FASHION_MNIST_CLASSES, FashionMNISTSource, load_fashion_mnist_arrays
from sip.models.checkpoints import load_checkpoint_file
from sip.train.recipe import TrainRecipe
from sip.train.run import run_training

from conftest import TRAIN_TINY as TINY, tiny_train_recipe as tiny  # the shared tiny recipe


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def write_fmnist_variants(root: Path, per_class: int = 2, shots: int = 3) -> Path:
    """A sip dataset with ``per_class`` variants (inverted copies) of the first real image of each class of
    the TINY few-shot set, labelled by name and pointing at its source id."""
    source = FashionMNISTSource("train", shots=shots, seed=0, start=50000)
    images, labels = load_fashion_mnist_arrays("train")
    train = root / "train"
    lines = []
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        idx = int(next(i for i in source.indices if labels[i] == c))
        for k in range(per_class):
            rel = f"{name.replace('/', '_')}/{c:02d}{k:03d}.png"
            (train / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(255 - images[idx]).convert("RGB").resize((32, 32)).save(train / rel)
            lines.append(json.dumps({"file_name": rel, "label": name, "source": f"fmnist/train/{idx}",
                                     "caption": "", "prompt": name, "seed": k, "strength": 0.5}))
    (train / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_run_folder_has_config_metrics_and_safetensors(tmp_path):
    metrics = run_training(tiny(), tmp_path / "run")
    run = tmp_path / "run"
    assert set(metrics) >= {"top1", "top5", "test_top1", "test_loss", "val_top1", "val_loss", "best_val_top1",
                            "best_epoch", "steps", "train_time_s", "num_params"}
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and metrics["top1"] == metrics["test_top1"]
    assert metrics["steps"] == 3 * (30 * 2 // 10)
    assert metrics["test_samples"] == 50 and metrics["val_samples"] == 20
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert all({"val_top1", "val_top5", "train_loss", "lr", "data_time_s", "val_time_s"} <= set(x) for x in lines)
    assert not any(k.startswith(("test_", "eval_")) for x in lines for k in x)  # the test set is not read per epoch
    assert metrics["val_top1"] == lines[-1]["val_top1"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["name"] == "test_vit" and saved["data"]["real"]["shots"] == 3
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["sip"])
    assert meta["timm_name"] == "test_vit" and meta["classes"] == list(FASHION_MNIST_CLASSES)
    assert meta["create_kwargs"]["img_size"] == 16 and meta["input_config"]["input_size"] == [3, 16, 16]
    assert json.loads((run / "final_metrics.json").read_text())["top1"] == metrics["top1"]


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    run_training(tiny(), tmp_path / "a")
    reference = weights(tmp_path / "a")

    # interrupt run b during the evaluation of epoch 2: epoch 1's checkpoint is all that survives
    real_evaluate, calls = eval_mod.evaluate, {"n": 0}

    def crashing_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(eval_mod, "evaluate", crashing_evaluate)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny(), tmp_path / "b")
    monkeypatch.setattr(eval_mod, "evaluate", real_evaluate)
    assert not (tmp_path / "b" / "model.safetensors").exists()
    state = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=True)
    assert int(state["counters"]["epoch"]) == 1

    metrics = run_training(tiny(), tmp_path / "b")
    resumed = weights(tmp_path / "b")
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]  # no duplicated or lost epoch lines
    assert metrics["steps"] == 18


def test_resume_inside_an_epoch(tmp_path, monkeypatch):
    """A crash right after a mid-epoch checkpoint resumes at that step and ends with the same weights."""
    recipe = tiny("run.checkpoint_every_steps=4")
    run_training(recipe, tmp_path / "a")
    real_save, calls = train_mod.save_checkpoint, {"n": 0}

    def crash_after_third_save(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # steps 4 (mid-epoch 1), 6 (end of epoch 1), 8 (mid-epoch 2)
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_third_save)
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe, tmp_path / "b")
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    counters = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=True)["counters"]
    assert (int(counters["epoch"]), int(counters["step_in_epoch"]), int(counters["global_step"])) == (1, 2, 8)
    run_training(recipe, tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_not_retrained(tmp_path):
    first = run_training(tiny(), tmp_path / "run")
    again = run_training(tiny(), tmp_path / "run")
    assert again["steps"] == first["steps"] and again["top1"] == first["top1"]


def test_resume_with_a_changed_recipe_is_an_error(tmp_path, monkeypatch):
    run_training(tiny("optim.epochs=1"), tmp_path / "run")
    with pytest.raises(ConfigError, match="optim.lr"):
        run_training(tiny("optim.epochs=1", "optim.lr=0.01"), tmp_path / "run")
    # run.resume=false starts over instead
    metrics = run_training(tiny("optim.epochs=1", "optim.lr=0.01", "run.resume=false"), tmp_path / "run")
    assert metrics["steps"] == 6


def test_unknown_model_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match="resnet50") as err:
        run_training(tiny("model.name=resnet_50"), tmp_path / "run")
    assert "unknown timm model 'resnet_50'" in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written before the check


def test_class_count_mismatch_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="num_classes"):
        load_config(TrainRecipe, overrides=[*TINY, "model.num_classes=0"])
    with pytest.raises(ValueError, match="7 but the data has 10 classes"):
        run_training(tiny("model.num_classes=7"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_pickled_checkpoint_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint_file(evil)
    with pytest.raises(ValueError, match="not a safetensors file"):
        run_training(tiny(f"model.checkpoint={evil}"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint_file(broken)


def test_weights_only_state_dict_and_run_folders_load(tmp_path):
    run_training(tiny("optim.epochs=1"), tmp_path / "run")
    state, meta = load_checkpoint_file(tmp_path / "run")  # a run folder → its model.safetensors
    assert meta["timm_name"] == "test_vit"
    plain = tmp_path / "plain.pt"
    torch.save({"model": state}, plain)
    loaded, meta2 = load_checkpoint_file(plain)
    assert meta2 == {} and all(torch.equal(loaded[k], state[k]) for k in state)
    # fine-tuning from it starts from those weights: one more epoch changes them but keeps the keys
    metrics = run_training(tiny("optim.epochs=1", f"model.checkpoint={plain}"), tmp_path / "ft")
    assert metrics["steps"] == 6


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    run_training(tiny("optim.epochs=1"), tmp_path / "run")
    with pytest.raises(ValueError, match="shape mismatch"):
        run_training(tiny("optim.epochs=1", f"model.checkpoint={tmp_path / 'run'}", "model.kwargs={depth: 2, embed_dim: 32}"),
                     tmp_path / "ft")


def test_train_on_real_plus_sip_variants(tmp_path):
    syn = write_fmnist_variants(tmp_path / "syn")
    metrics = run_training(tiny(f"data.synthetic={syn}", "data.mix.mode=swap", "data.mix.p=0.5", "optim.epochs=1"),
                           tmp_path / "run")
    assert metrics["steps"] == 6
    metrics = run_training(tiny(f"data.synthetic={syn}", "data.mix.mode=ratio", "data.mix.ratio=0.4",
                                "optim.epochs=1", "model.name=test_resnet", "model.patch_size=null",
                                "model.kwargs={output_stride: 16}"), tmp_path / "run2")  # 16 px: see conftest
    assert metrics["steps"] == (30 + 20) * 2 // 10


def test_synthetic_only_training(tmp_path):
    syn = write_fmnist_variants(tmp_path / "syn", per_class=1)
    metrics = run_training(tiny("data.real=null", f"data.synthetic={syn}", "optim.epochs=1", "data.repeat=1",
                                "data.val=null"), tmp_path / "run")
    assert metrics["steps"] == 1 and "val_top1" not in metrics and metrics["test_samples"] == 50


def test_bf16_run_on_cpu(tmp_path):
    metrics = run_training(tiny("run.precision=bf16", "optim.epochs=1"), tmp_path / "run")
    assert metrics["steps"] == 6 and np.isfinite(metrics["test_loss"])
    # a later fp32 run in the same process gets a fresh accelerate state
    assert run_training(tiny("optim.epochs=1"), tmp_path / "run2")["steps"] == 6


