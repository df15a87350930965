"""sip.augment.variants through sip augment: inter-class variants (Diff-Mix) labelled by the teacher or by their
strength's soft label, several (strength, guidance) settings per source, and pairs naming unknown classes refused
before any model loads."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.guidance import GuideClassifier, GuideConfig
from sip.augment.run import AugmentRecipe, run_augment
from sip.augment.variants import InterclassLabeller, Teaching, VariantPlan, VariantsConfig
from sip.data.bank import read_metadata
from sip.data.sources import SourceConfig

GEN = {"steps": 4, "per_image": 1, "batch_size": 4, "strength": 0.5, "device": "cpu"}
CLASSES = ["bird", "cat", "dog"]


def recipe(folder, out, variants: VariantsConfig, **extra) -> AugmentRecipe:
    return AugmentRecipe(source=SourceConfig(kind="folder", path=str(folder)), generate=GenerateConfig(**GEN),
                         variants=variants, output=str(out), progress=False, chunk=4, **extra)


@pytest.fixture(scope="module")
def generator(tiny_sd_img2img):
    return DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**GEN), model_id="tiny")


def teacher() -> GuideClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))
    with torch.no_grad():
        net[-1].weight.mul_(30)
    return GuideClassifier(net, CLASSES, {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3}, "t")


def teaching(variants: VariantsConfig, labeller_teacher=None) -> Teaching:
    plan = VariantPlan(variants, CLASSES, GEN["strength"], 4.0, GEN["per_image"])
    return Teaching(None, plan, InterclassLabeller(labeller_teacher) if variants.interclass else None)


def test_interclass_labels_come_from_the_teacher(image_folder, tmp_path, generator, fixed_captioner):
    variants = VariantsConfig(interclass="all", interclass_strengths=[0.6, 0.9])
    t = teacher()
    summary = run_augment(recipe(image_folder, tmp_path / "out", variants), generator, fixed_captioner,
                          teaching=teaching(variants, t))
    lines = read_metadata(tmp_path / "out")
    inter = [r for r in lines if r.get("interclass")]
    assert summary.written == len(lines) == 10 * 3 and len(inter) == 10 * 2  # 10 readable sources, 1 + 2 variants
    images = [Image.open(tmp_path / "out" / "train" / r["file_name"]).convert("RGB") for r in inter]
    predicted = [CLASSES[i] for i in t.predict(images).argmax(-1).tolist()]
    assert [r["label"] for r in inter] == predicted
    prompted = [next(c for c in CLASSES if c in r["prompt"]) for r in inter]
    assert predicted != prompted  # the teacher's word, not the prompt's class
    assert all(r["label_by"] == "teacher" and abs(sum(r["soft_label"].values()) - 1) < 1e-2 for r in inter)
    # each inter-class image was drawn under another class's prompt, at the recorded strength
    assert {r["strength"] for r in inter} == {0.6, 0.9}
    assert all(r["source_label"] not in r["prompt"] for r in inter)
    # intra-class variants keep the source's label and carry no inter-class keys
    assert all(r["label"] == r["file_name"].split("/")[0] and "soft_label" not in r for r in lines if r not in inter)


def test_without_a_teacher_interclass_images_carry_the_soft_label_of_their_strength(image_folder, tmp_path,
                                                                                  generator, fixed_captioner):
    variants = VariantsConfig(interclass=[["bird", "cat"], ["cat", "dog"], ["dog", "bird"]],
                              interclass_strengths=[0.3, 0.8], soft_gamma=1.0)
    run_augment(recipe(image_folder, tmp_path / "out", variants), generator, fixed_captioner,
                teaching=teaching(variants))
    target = {"bird": "cat", "cat": "dog", "dog": "bird"}
    inter = [r for r in read_metadata(tmp_path / "out") if r.get("interclass")]
    assert len(inter) == 10 * 2
    for r in inter:
        a, b, s = r["source_label"], target[r["source_label"]], r["strength"]
        assert r["soft_label"] == {a: round(1 - s, 4), b: s}
        assert r["label"] == (b if s > 0.5 else a)


def test_each_source_is_drawn_at_each_strength_and_guidance_setting(image_folder, tmp_path, generator,
                                                                   fixed_captioner):
    variants = VariantsConfig(strengths=[0.3, 0.7], guidance_scales=[1.0, 3.0])
    run_augment(recipe(image_folder, tmp_path / "out", variants), generator, fixed_captioner,
                teaching=teaching(variants))
    lines = read_metadata(tmp_path / "out")
    by_source: dict[str, set] = {}
    for r in lines:
        by_source.setdefault(r["source"], set()).add((r["strength"], r["guidance_scale"]))
    assert len(by_source) == 10 and len(lines) == 40
    assert all(s == {(0.3, 1.0), (0.3, 3.0), (0.7, 1.0), (0.7, 3.0)} for s in by_source.values())


def test_default_variants_keep_the_plain_run(image_folder, tmp_path, generator, fixed_captioner):
    plain = run_augment(recipe(image_folder, tmp_path / "a", VariantsConfig()), generator, fixed_captioner)
    assert plain.written == 10
    lines = read_metadata(tmp_path / "a")
    assert all("interclass" not in r and r["strength"] == 0.5 and r["guidance_scale"] == 4.0 for r in lines)


def fail_if_models_load(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was checked")
    monkeypatch.setattr(DiffusionGenerator, "from_config", boom)


def test_a_pair_naming_an_unknown_class_is_refused_before_any_model_loads(image_folder, tmp_path, monkeypatch,
                                                                          fixed_captioner):
    fail_if_models_load(monkeypatch)
    bad = VariantsConfig(interclass=[["bird", "cat"], ["cat", "horse"], ["dog", "bird"]])
    with pytest.raises(ValueError, match=r"pair \[cat, horse\] names unknown class 'horse'.*\['bird', 'cat', 'dog'\]"):
        run_augment(recipe(image_folder, tmp_path / "out", bad), captioner=fixed_captioner)
    lonely = VariantsConfig(interclass=[["bird", "cat"]])
    with pytest.raises(ValueError, match=r"classes \['cat', 'dog'\] have no pair"):
        run_augment(recipe(image_folder, tmp_path / "out", lonely), captioner=fixed_captioner)


@pytest.mark.parametrize("kwargs, match", [
    ({"strengths": [0.5, 1.5]}, r"variants.strengths: every strength must be in \(0, 1\]"),
    ({"interclass": "all", "interclass_strengths": [0.0]}, r"variants.interclass_strengths: every strength"),
    ({"guidance_scales": [float("nan")]}, "variants.guidance_scales: each must be a finite number"),
    ({"interclass": [["cat", "cat"]]}, "A != B"),
    ({"interclass": "some"}, "'all'"),
    ({"soft_gamma": float("inf")}, "soft_gamma must be a finite number"),
])
def test_bad_variant_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VariantsConfig(**kwargs)


def test_a_teacher_nothing_uses_is_refused(tmp_path):
    with pytest.raises(ValueError, match="guide.teacher is .* but guide.scale and guide.student_scale are 0"):
        AugmentRecipe(guide=GuideConfig(teacher=str(tmp_path)))
    AugmentRecipe(guide=GuideConfig(teacher=str(tmp_path)), variants=VariantsConfig(interclass="all"))  # labels
