"""data.soft_labels: a synthetic image's metadata soft_label is its cross-entropy target in sip train and in
sip distill's label term (one-hot elsewhere); it changes the loss, a one-hot soft label does not, and recipes that
could not use it are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sip.data.fashion_mnist import FASHION_MNIST_CLASSES
from sip.data.mixing import MixedImages, RealImages, SyntheticImages
from sip.data.sources import SourceConfig, open_source
from sip.train.soft_labels import SoftTargets

from conftest import tiny_train_recipe

CLASSES = list(FASHION_MNIST_CLASSES)


def write_dataset(root, soft: str) -> None:
    """20 synthetic images (2 per class); ``soft``: "mixed" (a 0.6 / 0.4 share with the next class), "one-hot"
    (the label itself as a distribution) or "none" (no soft_label)."""
    train = root / "train"
    rows = []
    rng = np.random.default_rng(0)
    for i in range(20):
        c = i % 10
        (train / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((28, 28)) * 255).astype("uint8"), mode="L").convert("RGB").save(
            train / f"c{c}" / f"{i}.png")
        row = {"file_name": f"c{c}/{i}.png", "label": CLASSES[c], "source": None}
        if soft == "mixed":
            row["soft_label"] = {CLASSES[c]: 0.6, CLASSES[(c + 1) % 10]: 0.4}
        elif soft == "one-hot":
            row["soft_label"] = {CLASSES[c]: 1.0}
        rows.append(row)
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_loss(tmp_path, name: str, soft: str, flag: bool) -> float:
    from sip.train.run import run_training

    data = tmp_path / f"data-{soft}"
    if not data.exists():
        write_dataset(data, soft)
    recipe = tiny_train_recipe(f"data.synthetic={data}", f"data.soft_labels={str(flag).lower()}", "optim.epochs=1",
                               "run.precision=fp32")
    run_training(recipe, tmp_path / name)
    return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["train_ce"]


def test_soft_labels_change_the_training_loss_and_one_hot_ones_do_not(tmp_path):
    hard = train_loss(tmp_path, "hard", "mixed", False)
    soft = train_loss(tmp_path, "soft", "mixed", True)
    assert soft != pytest.approx(hard, abs=1e-4)
    # a soft label that is the label itself trains exactly as the label does
    assert train_loss(tmp_path, "one-hot", "one-hot", True) == pytest.approx(hard, abs=1e-6)


def test_soft_targets_follow_the_epoch_plan(tmp_path):
    write_dataset(tmp_path / "d", "mixed")
    real = RealImages(open_source(SourceConfig(shots=1, start=50000)))
    images = MixedImages(real, SyntheticImages(tmp_path / "d", CLASSES), seed=0)
    soft = SoftTargets.build(images, CLASSES)
    for i in range(len(images)):
        target, code = soft(images, i), int(images.plan[i])
        assert target.sum().item() == pytest.approx(1.0)
        if code >= 0:
            assert target.argmax().item() == images.labels[i] and target.max().item() == 1.0
        else:
            c = images.labels[i]
            assert target[c].item() == pytest.approx(0.6) and target[(c + 1) % 10].item() == pytest.approx(0.4)


def test_distill_label_term_takes_the_soft_targets():
    from sip.distill.losses import build_kd_loss
    from sip.distill.step import DistillStep

    class Data:
        scale, ratio, hflip = (0.5, 1.0), (0.75, 1.33), 0.5
        color_jitter, auto_augment, re_prob = 0.0, None, 0.0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    step = DistillStep(build_kd_loss("ce"), input_config={"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3,
                                      "interpolation": "bilinear"},
                       student_tail=None,
                       data=Data(), num_classes=10, seed=0)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    hard = step(model, {"image": x, "label": y}, 0, 0)[0]["ce"]
    one_hot = torch.nn.functional.one_hot(y, 10).float()
    assert step(model, {"image": x, "label": y, "soft_target": one_hot}, 0, 0)[0]["ce"].item() == \
        pytest.approx(hard.item(), abs=1e-6)
    soft = one_hot * 0.5 + torch.roll(one_hot, 1, dims=1) * 0.5
    assert step(model, {"image": x, "label": y, "soft_target": soft}, 0, 0)[0]["ce"].item() != \
        pytest.approx(hard.item(), abs=1e-4)


def test_recipes_that_cannot_use_soft_labels_are_refused(tmp_path):
    from sip.config import ConfigError, load_config
    from sip.distill.run import DistillRecipe, LogitsRecipe
    from sip.train.run import run_training

    with pytest.raises(ConfigError, match="data.soft_labels is true but data.synthetic is null"):
        tiny_train_recipe("data.soft_labels=true")
    write_dataset(tmp_path / "none", "none")
    with pytest.raises(ValueError, match="no metadata line of .* carries a soft_label"):
        run_training(tiny_train_recipe(f"data.synthetic={tmp_path / 'none'}", "data.soft_labels=true"),
                     tmp_path / "run")
    bad = tmp_path / "bad"
    write_dataset(bad, "mixed")
    lines = (bad / "train" / "metadata.jsonl").read_text().replace('"Trouser": 0.4', '"Cat": 0.4')
    (bad / "train" / "metadata.jsonl").write_text(lines)
    with pytest.raises(ValueError, match=r"metadata.jsonl \(c0/0.png\): soft_label names classes \['Cat'\]"):
        run_training(tiny_train_recipe(f"data.synthetic={bad}", "data.soft_labels=true"), tmp_path / "run2")
    synthetic = [f"data.synthetic={tmp_path / 'none'}", "data.soft_labels=true"]
    with pytest.raises(ConfigError, match="loss.use_labels is false"):
        load_config(DistillRecipe, overrides=[*synthetic, "teachers=[{checkpoint: t}]", "loss.use_labels=false",
                                              "loss.alpha=1.0"])
    with pytest.raises(ConfigError, match="not by sip logits"):
        load_config(LogitsRecipe, overrides=[*synthetic, "teachers=[{checkpoint: t}]"])
