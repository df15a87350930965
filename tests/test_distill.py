"""Distillation: each KD loss against values computed by hand, distilled-token students, the logits store
(replay, mismatch detection, resume), and the checks run_distillation makes before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

from sip.config import load_config
from sip.distill.logits import (
    StoreMismatchError,
    TeacherLogitsStore,
    input_transform,
    sample_view,
    view_input,
)
from sip.distill.losses import KD_LOSSES, build_kd_loss, register_kd_loss
from sip.distill.run import DistillRecipe, LogitsRecipe, run_distillation, run_logits
from sip.distill.teachers import TeacherSection, build_teacher
from sip.models.classifiers import create_model
from sip.train.recipe import TrainRecipe
from sip.train.run import run_training

# ----------------------------------------------------------------------------------------------------
# losses against hand computation (plain Python math, no torch)
# ----------------------------------------------------------------------------------------------------

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]  # student logits, B=2, C=3
T1 = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.5]]  # teacher 1
T2 = [[0.0, 3.0, 1.0], [1.0, 0.0, 0.0]]  # teacher 2
Y = [1, 2]


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def ce(z, y):
    return -math.log(softmax(z)[y])


def kl(p, q):  # KL(p ‖ q)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def mean(xs):
    return sum(xs) / len(xs)


def tt(x):
    return torch.tensor(x, dtype=torch.float32)


def close(value: torch.Tensor, expected: float):
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_known_constants():
    """KL of equal distributions is 0; CE of uniform logits is ln C."""
    z = tt([[0.0, 0.0, 0.0]])
    close(build_kd_loss("hinton", temperature=3.0, alpha=1.0)(z, z, None), 0.0)
    close(build_kd_loss("ce")(z, None, torch.tensor([2])), math.log(3))


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0)])
def test_hinton(temperature, alpha):
    expected = mean([(1 - alpha) * ce(S[b], Y[b])
                     + alpha * temperature**2 * kl(softmax(T1[b], temperature), softmax(S[b], temperature))
                     for b in range(2)])
    loss = build_kd_loss("hinton", temperature=temperature, alpha=alpha)
    close(loss(tt(S), tt(T1), torch.tensor(Y)), expected)


def test_hinton_without_labels_needs_alpha_one():
    loss = build_kd_loss("hinton", temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha=1"):
        loss(tt(S), tt(T1), None)


def test_deit_soft():
    t, a = 3.0, 0.1
    cls_logits, dist_logits = S, T2  # any two heads
    expected = mean([(1 - a) * ce(cls_logits[b], Y[b])
                     + a * t**2 * kl(softmax(T1[b], t), softmax(dist_logits[b], t)) for b in range(2)])
    close(build_kd_loss("deit_soft", temperature=t, alpha=a)((tt(cls_logits), tt(dist_logits)), tt(T1), torch.tensor(Y)),
          expected)


def test_deit_hard():
    teacher_labels = [max(range(3), key=lambda c: T1[b][c]) for b in range(2)]  # [0, 2]
    expected = mean([0.5 * ce(S[b], Y[b]) + 0.5 * ce(T2[b], teacher_labels[b]) for b in range(2)])
    loss = build_kd_loss("deit_hard")
    close(loss((tt(S), tt(T2)), tt(T1), torch.tensor(Y)), expected)
    close(loss((tt(S), tt(T2)), tt(T1), None), mean([ce(T2[b], teacher_labels[b]) for b in range(2)]))
    with pytest.raises(ValueError, match="distillation token"):
        loss(tt(S), tt(T1), torch.tensor(Y))


def test_multi_teacher_weighted_soft_targets():
    t, a, w = 2.0, 0.7, [1.0, 3.0]
    expected = []
    for b in range(2):
        p1, p2 = softmax(T1[b], t), softmax(T2[b], t)
        p = [(w[0] * x + w[1] * y) / sum(w) for x, y in zip(p1, p2)]
        expected.append((1 - a) * ce(S[b], Y[b]) + a * t**2 * kl(p, softmax(S[b], t)))
    loss = build_kd_loss("multi_teacher", temperature=t, alpha=a, weights=w)
    close(loss(tt(S), torch.stack([tt(T1), tt(T2)]), torch.tensor(Y)), mean(expected))
    close(loss(tt(S), [tt(T1), tt(T2)], torch.tensor(Y)), mean(expected))  # a list of teachers works too


def test_multi_token_hard_and_soft():
    a, w, t = 0.5, [2.0, 1.0], 3.0
    d1, d2 = T2, S  # the two distillation heads
    hard1 = mean([ce(d1[b], max(range(3), key=lambda c: T1[b][c])) for b in range(2)])
    hard2 = mean([ce(d2[b], max(range(3), key=lambda c: T2[b][c])) for b in range(2)])
    cls_term = mean([ce(S[b], Y[b]) for b in range(2)])
    expected = (1 - a) * cls_term + a * (2 / 3 * hard1 + 1 / 3 * hard2)
    out = (tt(S), tt(d1), tt(d2))
    teachers = torch.stack([tt(T1), tt(T2)])
    close(build_kd_loss("multi_token", mode="hard", alpha=a, weights=w)(out, teachers, torch.tensor(Y)), expected)
    soft1 = mean([t**2 * kl(softmax(T1[b], t), softmax(d1[b], t)) for b in range(2)])
    soft2 = mean([t**2 * kl(softmax(T2[b], t), softmax(d2[b], t)) for b in range(2)])
    expected = (1 - a) * cls_term + a * (2 / 3 * soft1 + 1 / 3 * soft2)
    close(build_kd_loss("multi_token", mode="soft", temperature=t, alpha=a, weights=w)(out, teachers, torch.tensor(Y)),
          expected)
    with pytest.raises(ValueError, match="2 distillation tokens but there are 1 teachers"):
        build_kd_loss("multi_token")(out, tt(T1), torch.tensor(Y))


def test_loss_errors_and_registry():
    with pytest.raises(ValueError, match="Did you mean 'hinton'"):
        build_kd_loss("hintn")
    with pytest.raises(ValueError, match="temperature must be positive"):
        build_kd_loss("hinton", temperature=0)
    with pytest.raises(ValueError, match="takes"):
        build_kd_loss("deit_hard", temperature=2.0)
    with pytest.raises(ValueError, match="student predicts 3 classes but the teacher 4"):
        build_kd_loss("hinton")(tt(S), torch.zeros(2, 4), torch.tensor(Y))

    @register_kd_loss("test_l1_logits", overwrite=True)
    class L1Logits(torch.nn.Module):
        def forward(self, student_out, teacher_out, targets):
            return (student_out - teacher_out).abs().mean()

    close(build_kd_loss("test_l1_logits")(tt(S), tt(T1), None),
          mean([abs(s - t) for rs, rt in zip(S, T1) for s, t in zip(rs, rt)]))
    assert "test_l1_logits" in KD_LOSSES.names()


# ----------------------------------------------------------------------------------------------------
# students with distillation tokens
# ----------------------------------------------------------------------------------------------------

def test_timm_distilled_deit_returns_two_heads_in_distilled_training():
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, img_size=16, patch_size=4, depth=1,
                              embed_dim=32, num_heads=2)
    x = torch.randn(2, 3, 16, 16)
    model.set_distilled_training(True)
    out = model.train()(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert model.eval()(x).shape == (2, 4)


def test_civt_has_one_token_and_head_per_teacher():
    model = create_model("sip_civt_tiny", dict(num_classes=5, img_size=16, patch_size=4, depth=1, embed_dim=32,
                                               num_heads=2, num_distill_tokens=3))
    x = torch.randn(2, 3, 16, 16)
    model.set_distilled_training(True)
    outs = model.train()(x)
    assert len(outs) == 4 and all(o.shape == (2, 5) for o in outs)
    model.eval()
    with torch.no_grad():
        merged = model(x)
        tokens = model.forward_features(x)
        heads = [model.head(tokens[:, 0])] + [h(tokens[:, i + 1]) for i, h in enumerate(model.heads_dist)]
        expected = torch.stack(heads).mean(0)
    torch.testing.assert_close(merged, expected)
    assert model.pos_embed.shape[1] == 16 + 4
    assert {"dist_tokens", "cls_token", "pos_embed"} <= model.no_weight_decay()


# ----------------------------------------------------------------------------------------------------
# runs: shared tiny teachers (trained once per module)
# ----------------------------------------------------------------------------------------------------

# fp32: at 16 px the ResNets' last stride-2 conv sees a 1x1 map, where torch 2.14's bf16 (AMX) weight gradient
# is intermittently NaN (see sip.train.loop.fit); these tests are about distillation, not about that upstream bug.
DATA = ["data.real.shots=3", "data.real.start=50000", "data.eval.shots=5", "data.img_size=16", "data.batch_size=10",
        "data.repeat=2", "run.progress=false", "run.threads=1", "run.device=cpu", "run.precision=fp32"]
STUDENT = ["student.name=test_vit", "student.patch_size=4", "student.kwargs={depth: 2}", "optim.epochs=2"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for key, name, seed in (("test_resnet", "test_resnet", 0), ("sip_rednet_tiny", "sip_rednet_tiny", 0),
                            ("other_resnet", "test_resnet", 1)):
        recipe = load_config(TrainRecipe, overrides=[*DATA, f"model.name={name}", "optim.epochs=1", f"run.seed={seed}"])
        run_training(recipe, root / key)
        out[key] = root / key
    return out


def logits_recipe(teacher_dirs, *extra) -> LogitsRecipe:
    ts = ", ".join(f"{{checkpoint: {d}}}" for d in teacher_dirs)
    return load_config(LogitsRecipe, overrides=[*DATA, f"teachers=[{ts}]", "store.views=3", *extra])


def distill_recipe(teacher_dirs, *extra) -> DistillRecipe:
    ts = ", ".join(f"{{checkpoint: {d}}}" for d in teacher_dirs)
    return load_config(DistillRecipe, overrides=[*DATA, *STUDENT, f"teachers=[{ts}]", *extra])


@pytest.fixture(scope="module")
def store(teachers, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store")
    run_logits(logits_recipe([teachers["test_resnet"], teachers["sip_rednet_tiny"]], "store.dtype=float32",
                             "store.shard_size=12"), out)
    return out


def test_store_layout_and_replay_gives_the_same_logits(store, teachers):
    s = TeacherLogitsStore(store)
    assert len(s) == 30 and s.logits.shape == (30, 3, 2, 10) and s.views.shape == (30, 3, 5)
    assert len(s.manifest["shards"]) == 3  # 12 + 12 + 6
    assert [t["name"] for t in s.teachers] == ["test_resnet", "sip_rednet_tiny"]
    ids = {k: build_teacher(TeacherSection(checkpoint=str(teachers[k]))).identity for k in teachers}
    assert s.teacher_indices([ids["sip_rednet_tiny"]]) == [1]
    assert s.teacher_indices([ids["sip_rednet_tiny"], ids["test_resnet"]]) == [1, 0]
    with pytest.raises(StoreMismatchError, match="other teachers"):
        s.teacher_indices([ids["other_resnet"]])
    assert s.views[:, 0].tolist() == [[0, 0, 32, 32, 0]] * 30  # view 0: the whole (32 px) image
    assert len({tuple(v) for v in s.views[:, 1:].reshape(-1, 5).tolist()}) > 20  # the other views differ
    # replay: the stored view of a sample, run through each teacher again, gives the stored logits
    from sip.train.inputs import build_train_images, class_names

    data = logits_recipe([teachers["test_resnet"]]).data
    real = build_train_images(data, class_names(data), seed=0).real
    for name, k in (("test_resnet", 0), ("sip_rednet_tiny", 1)):
        teacher = build_teacher(TeacherSection(checkpoint=str(teachers[name])))
        for i in (0, 17, 29):
            sid = real.sample_id(i)
            for v in range(3):
                view, logits = s.get(sid, v)
                x = view_input(real[i][0], view, teacher.input_config, input_transform(teacher.input_config))
                with torch.no_grad():
                    again = teacher.model(x[None])[0]
                torch.testing.assert_close(again, logits[k], atol=1e-4, rtol=1e-4)


def test_store_build_resumes_by_shard(store, teachers, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / "store.json").unlink()
    last = max(copy.glob("logits-*.safetensors"))
    last.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in copy.glob("logits-*.safetensors")}
    run_logits(logits_recipe([teachers["test_resnet"], teachers["sip_rednet_tiny"]], "store.dtype=float32",
                             "store.shard_size=12"), copy)
    after = {p.name: p.stat().st_mtime_ns for p in copy.glob("logits-*.safetensors")}
    assert all(after[n] == before[n] for n in before) and last.name in after  # kept two, rebuilt one
    a, b = TeacherLogitsStore(store), TeacherLogitsStore(copy)
    assert torch.equal(a.logits, b.logits) and a.ids == b.ids


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
    five = [f"data.real={{kind: folder, path: {folder}}}", f"data.eval={{kind: folder, path: {folder}}}"]
    run_training(load_config(TrainRecipe, overrides=[*DATA, *five, "model.name=test_resnet", "optim.epochs=1"]),
                 tmp_path / "t5")
    with pytest.raises(ValueError, match="predicts 5 classes but the data has 10"):
        run_distillation(distill_recipe([tmp_path / "t5"]), tmp_path / "s")
    with pytest.raises(ValueError, match="predicts 5 classes"):
        run_logits(logits_recipe([tmp_path / "t5"]), tmp_path / "store")
    with pytest.raises(ValueError, match="model.num_classes is 7"):
        run_distillation(distill_recipe([teachers["test_resnet"]], "student.num_classes=7"), tmp_path / "s2")
    assert not (tmp_path / "s" / "checkpoint").exists() and not (tmp_path / "s2" / "checkpoint").exists()


def test_teacher_checkpoint_must_be_safe(tmp_path):
    import argparse

    evil = tmp_path / "teacher.pt"
    torch.save({"state_dict": {}, "args": argparse.Namespace()}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        build_teacher(TeacherSection(checkpoint=str(evil), name="test_resnet"))
    with pytest.raises(ValueError, match="random weights"):
        TeacherSection(name="resnet50")
    with pytest.raises(ValueError, match="Close matches"):
        build_teacher(TeacherSection(name="resnet_50", pretrained=True))


def test_data_free_student_from_synthetic_images_only(teachers, tmp_path):
    """No real training image: the student learns from the teacher's soft outputs on synthetic images."""
    syn = write_txt2img_like(tmp_path / "syn", per_class=2)
    free = ["data.real=null", f"data.synthetic={syn}", "loss.use_labels=false", "loss.alpha=1.0"]
    store_dir = tmp_path / "store"
    info = run_logits(load_config(LogitsRecipe, overrides=[*DATA, "data.real=null", f"data.synthetic={syn}",
                                                           f"teachers=[{{checkpoint: {teachers['test_resnet']}}}]"]),
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


def test_views_follow_timm_random_resized_crop():
    import random

    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w, flip = sample_view(rng, 28, 28, (0.35, 1.0), (0.75, 1.333), 0.5)
        assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 28 and flip in (0, 1)
        assert 0.3 * 784 <= h * w <= 784


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
