"""sip distill's ``select:`` (sip.distill.select): each epoch draws its synthetic items from the share of the pool the
student most disagrees with its teacher on; the choice is written before the epoch and read back on a resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

import sip.train.loop as loop
from sip.config import ConfigError
from sip.data.mixing import MixConfig, MixedImages, SyntheticImages
from sip.distill.run import run_distillation
from sip.distill.select import DivergenceSelector, SelectSection, choose

from conftest import distill_recipe
from test_distill import write_txt2img_like
from test_mixing import CLASSES, real_folder, write_synthetic  # noqa: F401 (a fixture)


def test_choose_keeps_the_highest_scores_of_each_class_or_of_all():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert choose(scores, labels, 0.34, class_balanced=True).tolist() == [1, 4]
    assert choose(scores, labels, 0.5, class_balanced=False).tolist() == [1, 2, 4]
    assert choose(scores, labels, 0.01, class_balanced=True).tolist() == [1, 4]  # at least one per class
    assert choose(np.zeros(4), np.zeros(4, dtype=int), 0.5, class_balanced=False).tolist() == [0, 1]  # ties: lower


def test_a_restricted_mix_draws_its_synthetic_items_from_the_subset_in_the_same_numbers(real_folder,  # noqa: F811
                                                                                        tmp_path):
    syn = SyntheticImages(write_synthetic(tmp_path / "syn", [{"label": CLASSES[k % 3]} for k in range(12)]), CLASSES)
    for cfg in (MixConfig(mode="ratio", ratio=0.75, epoch_size=40), MixConfig(mode="concat", epoch_size=30),
                MixConfig(mode="concat"), MixConfig(mode="ratio", ratio=0.5, class_balanced=True, epoch_size=20)):
        mixed = MixedImages(real_folder, syn, cfg, seed=3)
        whole = mixed.plan.copy()
        mixed.restrict_synthetic(np.array([2, 5, 7]))
        mixed.set_epoch(0)
        assert len(mixed.plan) == len(whole) and (mixed.plan < 0).sum() == (whole < 0).sum()
        assert set((-mixed.plan[mixed.plan < 0] - 1).tolist()) <= {2, 5, 7}
        labels = real_folder.labels
        assert Counter(labels[mixed.plan[mixed.plan >= 0]]) == Counter(labels[whole[whole >= 0]])
        mixed.restrict_synthetic(None)
        mixed.set_epoch(0)
        assert np.array_equal(mixed.plan, whole)  # the whole pool again, the same plan
    swap = MixedImages(real_folder, SyntheticImages(write_synthetic(tmp_path / "sw", [
        {"label": CLASSES[real_folder.labels[0]], "source": real_folder.sample_id(0)}]), CLASSES),
        MixConfig(mode="swap"))
    with pytest.raises(ValueError, match="mode 'ratio' or 'concat'"):
        swap.restrict_synthetic(np.array([0]))


class _Accelerator:
    device, is_main_process = torch.device("cpu"), True

    def wait_for_everyone(self):
        pass


@pytest.mark.parametrize("cache", [True, False])  # the pool's inputs kept between epochs, or decoded each time
def test_the_selector_keeps_the_highest_kl_images_and_reads_its_choice_back(make_tiny_classifier, tmp_path, cache,
                                                                           monkeypatch):
    import sip.distill.select as select_module

    if not cache:
        monkeypatch.setattr(select_module, "CACHE_BYTES", 0)
    from sip.models.checkpoints import input_transform
    from sip.data.sources import FASHION_MNIST_CLASSES

    syn = SyntheticImages(write_txt2img_like(tmp_path / "syn", per_class=4), FASHION_MNIST_CLASSES)
    images = MixedImages(None, syn, MixConfig(mode="concat", epoch_size=60))
    config = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    teacher_cfg = {"input_size": (3, 32, 32), "mean": (0.4, 0.4, 0.4), "std": (0.2, 0.2, 0.2)}
    teacher = make_tiny_classifier("test_resnet", seed=1).eval()
    student = make_tiny_classifier("test_resnet", seed=2).train()

    class T:
        model, input_config, weight = teacher, teacher_cfg, 1.0

    section = SelectSection(keep=0.5, start_epoch=1, temperature=2.0)
    sel = DivergenceSelector(section, images, [T], input_transform(config), config, tmp_path / "run", _Accelerator())
    sel(student, 0)  # before start_epoch: the whole pool, nothing written
    assert images.synthetic_subset is None and not (tmp_path / "run" / "selection").exists()

    # the KL computed here from the two models on the same pixels, each through its own normalisation
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.asarray(syn[j][0], dtype=np.float32) / 255).permute(2, 0, 1)
                              for j in range(len(syn))])
        norm = lambda c: (pixels - torch.tensor(c["mean"]).view(1, 3, 1, 1)) / torch.tensor(c["std"]).view(1, 3, 1, 1)
        p_t = (teacher(norm(teacher_cfg)) / 2).softmax(-1)
        log_s = (student.eval()(norm(config)) / 2).log_softmax(-1)
        kl = (p_t * (p_t.log() - log_s)).sum(-1).numpy()
    student.train()
    sel(student, 1)
    assert student.training and all(p.requires_grad for p in student.parameters())
    expected = choose(kl, syn.labels, 0.5, class_balanced=True)
    assert np.array_equal(images.synthetic_subset, expected) and len(expected) == 20
    assert (sel._inputs is not None) == cache
    record = json.loads((tmp_path / "run" / "selection" / "epoch-0001.json").read_text())
    assert record["chosen"] == 20 and record["pool"] == 40 and record["mean_kl_chosen"] > record["mean_kl_pool"]
    assert record["mean_kl_pool"] == pytest.approx(float(kl.mean()), rel=1e-4)

    # the same epoch again (a resume inside it) reads the written choice, whatever the weights are now
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(-1.0)
    images.restrict_synthetic(None)
    sel(student, 1)
    assert np.array_equal(images.synthetic_subset, expected)


SELECT = ["select.keep=0.5", "select.start_epoch=1", "optim.epochs=2", "run.checkpoint_every_steps=2",
          "data.mix.mode=concat", "data.mix.epoch_size=20", "run.eval_max_samples=5"]


def test_a_selecting_run_killed_inside_an_epoch_resumes_to_the_uninterrupted_weights(teachers, tmp_path,
                                                                                    monkeypatch):
    from safetensors.torch import load_file

    syn = write_txt2img_like(tmp_path / "syn", per_class=3)
    recipe = distill_recipe([teachers["test_resnet"]], f"data.synthetic={syn}", *SELECT)
    run_distillation(recipe, tmp_path / "whole")
    chosen = json.loads((tmp_path / "whole" / "selection" / "epoch-0001.json").read_text())
    assert chosen["chosen"] == 20 and not (tmp_path / "whole" / "selection" / "epoch-0000.json").exists()

    real_save, calls = loop.save_checkpoint, {"n": 0}

    def killed_inside_epoch_2(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 1's end is the 2nd save (steps 2 and its end), step 2 of epoch 2 the 3rd
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(loop, "save_checkpoint", killed_inside_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_distillation(recipe, tmp_path / "resumed")
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    run_distillation(recipe, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "selection" / "epoch-0001.json").read_text() == json.dumps(chosen) + "\n"
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and selecting changes what is learnt
    run_distillation(distill_recipe([teachers["test_resnet"]], f"data.synthetic={syn}", *SELECT[1:]),
                     tmp_path / "all")
    c = load_file(tmp_path / "all" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("sets, match", [
    (["select.keep=0"], "select.keep must be a share"),
    (["select.keep=.nan"], "select.keep: must be a finite number"),
    (["select.keep=1.5"], "select.keep must be a share"),
    (["select.temperature=0"], "select.temperature"),
    (["select.start_epoch=0"], "select.keep is 1.0"),
    (["select.keep=0.5"], "data.synthetic is null"),
    (["select.keep=0.5", "data.synthetic=SYN", "data.mix.mode=swap"], "swap"),
    (["select.keep=0.5", "data.synthetic=SYN", "select.start_epoch=2"], "not before optim.epochs 2"),
])
def test_bad_selections_are_refused_naming_the_key(teachers, tmp_path, sets, match):
    syn = write_txt2img_like(tmp_path / "syn", per_class=1)
    with pytest.raises((ConfigError, ValueError), match=match):
        distill_recipe([teachers["test_resnet"]], *[s.replace("SYN", str(syn)) for s in sets])
