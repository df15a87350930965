"""sip.distill.run: ``sip distill`` online and from a logits store, the checks run_distillation makes before
training (store mismatch, class counts, distillation tokens, data-free), and non-finite steps.

The ``teachers`` and ``store`` fixtures and the recipe helpers are in tests/conftest.py (built once per
session). The KD losses are tested in tests/test_distill_losses.py, the store in tests/test_distill_logits.py,
the views in tests/test_distill_views.py, teacher loading in tests/test_distill_teachers.py and the
distilled-token students in tests/test_civt.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sip.config import load_config
from sip.distill.logits import StoreMismatchError
from sip.distill.losses import register_kd_loss
from sip.distill.run import DistillRecipe, LogitsRecipe, run_distillation, run_logits
from sip.train.recipe import TrainRecipe
from sip.train.run import run_training

from conftest import (  # the shared distillation recipes, under the names these tests were written with
    DISTILL_DATA as DATA,
    DISTILL_STUDENT as STUDENT,
    distill_recipe,
    logits_recipe,
)

# ----------------------------------------------------------------------------------------------------
# runs: shared tiny teachers (trained once per session, in tests/conftest.py)
# ----------------------------------------------------------------------------------------------------

def test_store_with_other_data_or_teacher_is_refused(store, teachers, tmp_path):
    both = [teachers["test_resnet"], teachers["sip_rednet_tiny"]]
    with pytest.raises(StoreMismatchError, match="different dataset"):
        run_distillation(distill_recipe(both, f"logits={store}", "loss.name=multi_teacher", "data.real.seed=1"),
                         tmp_path / "a")
    # the same architecture with other weights is another teacher
    with pytest.raises(StoreMismatchError, match="other teachers"):
        run_distillation(distill_recipe([teachers["other_resnet"]], f"logits={store}"), tmp_path / "b")
    with pytest.raises(StoreMismatchError, match="other teachers"):
        run_distillation(distill_recipe([teachers["test_resnet"], teachers["other_resnet"]], f"logits={store}",
                                        "loss.name=multi_teacher"), tmp_path / "c")
    for d in ("a", "b", "c"):
        assert not (tmp_path / d / "checkpoint").exists()


def test_distill_online_and_from_store(store, teachers, tmp_path):
    online = run_distillation(distill_recipe([teachers["test_resnet"]], "loss.name=hinton"), tmp_path / "online")
    assert online["steps"] == 2 * 6 and online["logits"] is None and online["loss"] == "hinton"
    stored = run_distillation(distill_recipe([teachers["test_resnet"], teachers["sip_rednet_tiny"]], f"logits={store}",
                                             "loss.name=multi_teacher", "loss.alpha=0.7"), tmp_path / "stored")
    assert stored["logits"] == str(store) and stored["steps"] == 12
    assert (tmp_path / "stored" / "model.safetensors").is_file()
    # one teacher of the ensemble store, or the two in another order, pick their columns
    single = run_distillation(distill_recipe([teachers["sip_rednet_tiny"]], f"logits={store}", "optim.epochs=1"),
                              tmp_path / "single")
    assert single["steps"] == 6
    swapped = run_distillation(distill_recipe([teachers["sip_rednet_tiny"], teachers["test_resnet"]], f"logits={store}",
                                              "loss.name=multi_teacher", "optim.epochs=1"), tmp_path / "swapped")
    assert swapped["steps"] == 6
    # the store alone (no teachers named) is enough
    alone = run_distillation(load_config(DistillRecipe, overrides=[*DATA, *STUDENT, f"logits={store}",
                                                                   "loss.name=multi_teacher"]), tmp_path / "alone")
    assert alone["teachers"] == ["test_resnet", "sip_rednet_tiny"]


def test_ensemble_multi_token_student(store, teachers, tmp_path):
    metrics = run_distillation(
        distill_recipe([teachers["test_resnet"], teachers["sip_rednet_tiny"]], f"logits={store}",
                       "loss.name=multi_token", "student.name=sip_civt_tiny",
                       "student.kwargs={depth: 1, embed_dim: 32, num_heads: 2, num_distill_tokens: 2}"),
        tmp_path / "civt")
    assert metrics["steps"] == 12
    with pytest.raises(ValueError, match="3 distillation tokens but there are 2 teachers"):
        run_distillation(distill_recipe([teachers["test_resnet"], teachers["sip_rednet_tiny"]], f"logits={store}",
                                        "loss.name=multi_token", "student.name=sip_civt_tiny",
                                        "student.kwargs={depth: 1, embed_dim: 32, num_heads: 2, num_distill_tokens: 3}"),
                         tmp_path / "bad")


def test_deit_loss_needs_a_distillation_token(teachers, tmp_path):
    with pytest.raises(ValueError, match="distillation token"):
        run_distillation(distill_recipe([teachers["test_resnet"]], "loss.name=deit_soft"), tmp_path / "r")
    metrics = run_distillation(distill_recipe([teachers["test_resnet"]], "loss.name=deit_hard",
                                              "student.name=deit_tiny_distilled_patch16_224",
                                              "student.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
                                              "optim.epochs=1"), tmp_path / "deit")
    assert metrics["steps"] == 6


def test_class_count_mismatch_is_an_error_before_training(teachers, tmp_path):
    # a 5-class teacher: the same architecture trained on the first 5 classes of a folder set
    from PIL import Image

    folder = tmp_path / "five"
    for c in range(5):
        for i in range(2):
            (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (40 * c, 10 * i, 0)).save(folder / f"c{c}" / f"{i}.png")
    five = [f"data.real={{kind: folder, path: {folder}}}", f"data.eval={{kind: folder, path: {folder}}}",
            "data.val=null"]
    run_training(load_config(TrainRecipe, overrides=[*DATA, *five, "model.name=test_resnet", "optim.epochs=1",
                                                     "model.kwargs={output_stride: 16}"]),
                 tmp_path / "t5")
    with pytest.raises(ValueError, match="predicts 5 classes but the data has 10"):
        run_distillation(distill_recipe([tmp_path / "t5"]), tmp_path / "s")
    with pytest.raises(ValueError, match="predicts 5 classes"):
        run_logits(logits_recipe([tmp_path / "t5"]), tmp_path / "store")
    with pytest.raises(ValueError, match="model.num_classes is 7"):
        run_distillation(distill_recipe([teachers["test_resnet"]], "student.num_classes=7"), tmp_path / "s2")
    assert not (tmp_path / "s" / "checkpoint").exists() and not (tmp_path / "s2" / "checkpoint").exists()


def test_data_free_student_from_synthetic_images_only(teachers, tmp_path):
    """No real training image: the student learns from the teacher's soft outputs on synthetic images."""
    syn = write_txt2img_like(tmp_path / "syn", per_class=2)
    free = ["data.real=null", "data.val=null", f"data.synthetic={syn}", "loss.use_labels=false", "loss.alpha=1.0"]
    store_dir = tmp_path / "store"
    info = run_logits(load_config(LogitsRecipe, overrides=[*DATA, "data.real=null", "data.val=null",
                                                           f"data.synthetic={syn}", f"teachers=[{{checkpoint: {teachers['test_resnet']}}}]"]),
                      store_dir)
    assert info["samples"] == 20
    metrics = run_distillation(distill_recipe([teachers["test_resnet"]], *free, f"logits={store_dir}"), tmp_path / "s")
    assert metrics["steps"] == 2 * 4
    lines = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert "train_top1" not in lines[0]  # labels were never read
    with pytest.raises(ValueError, match="alpha"):
        run_distillation(distill_recipe([teachers["test_resnet"]], *free[:-1], "loss.alpha=0.5"), tmp_path / "s2")


def write_txt2img_like(root: Path, per_class: int) -> Path:
    """A sip dataset standing in for txt2img output: Fashion-MNIST pool images, no source, label by name."""
    import numpy as np
    from PIL import Image

    from sip.data.sources import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays

    images, labels = load_fashion_mnist_arrays("train")
    train, lines = root / "train", []
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        for k, idx in enumerate(np.flatnonzero(labels[55000:] == c)[:per_class] + 55000):
            rel = f"{name.replace('/', '_')}/{c:02d}{k:03d}.png"
            (train / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[idx]).convert("RGB").resize((32, 32)).save(train / rel)
            lines.append(json.dumps({"file_name": rel, "label": name, "source": None, "prompt": name, "seed": k}))
    (train / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_a_step_with_non_finite_gradients_is_skipped_and_an_all_nan_epoch_stops(teachers, tmp_path):
    calls = {"n": 0}

    @register_kd_loss("test_nan_on_calls", overwrite=True)
    class NaNOnCalls(torch.nn.Module):
        """Cross-entropy, times NaN on the calls listed in ``calls["bad"]`` (a poisoned step)."""

        def forward(self, student_out, teacher_out, targets):
            calls["n"] += 1
            loss = torch.nn.functional.cross_entropy(student_out, targets)
            return loss * float("nan") if calls["n"] in calls["bad"] else loss

    calls["bad"] = {2}
    recipe = distill_recipe([teachers["test_resnet"]], "loss.name=test_nan_on_calls", "optim.epochs=1")
    run_distillation(recipe, tmp_path / "one")
    line = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["nonfinite_steps"] == 1 and math.isfinite(line["train_loss"])
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "one" / "model.safetensors").values())

    calls["n"], calls["bad"] = 0, set(range(1, 1000))
    with pytest.raises(FloatingPointError, match="every step of epoch 1 had non-finite gradients"):
        run_distillation(recipe, tmp_path / "all")
