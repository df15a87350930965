"""sip.augment.guidance: teacher guidance moves the teacher toward the intended class, a zero scale is the
unguided sampler byte for byte, and a guide that cannot work is refused before any model loads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.guidance import ClassifierGuidance, GuideClassifier, GuideConfig, check_guide
from sip.models.checkpoints import model_metadata, save_model_file

CLASSES = ["cat", "dog"]
INPUT = {"input_size": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def sharp_teacher(seed: int = 0) -> GuideClassifier:
    """A tiny seeded CNN whose logits react strongly to its input (a random one barely moves: it is near uniform)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2))
    with torch.no_grad():
        net[-1].weight.mul_(30)
    return GuideClassifier(net, CLASSES, INPUT, "sharp-teacher")


@pytest.fixture(scope="module")
def generator(tiny_sd_img2img):
    return DiffusionGenerator(tiny_sd_img2img, GenerateConfig(steps=6, strength=0.7, guidance_scale=2.0, device="cpu"),
                              model_id="tiny")


def sources() -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")) for i in range(2)]


def png(images) -> list[bytes]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def target_log_prob(teacher: GuideClassifier, images, labels) -> torch.Tensor:
    return teacher.predict(images)[torch.arange(len(labels)), teacher.index(labels)].log()


@pytest.mark.parametrize("mode", ["img2img", "txt2img"])
def test_guidance_moves_the_teachers_probability_of_the_intended_class_up(generator, mode):
    teacher = sharp_teacher()
    labels = ["cat", "dog"] * 3
    seeds = list(range(6))

    def draw(guide):
        if mode == "img2img":
            src = sources()
            return generator.img2img([src[0]] * 3 + [src[1]] * 3, ["a cat"] * 6, seeds, guide=guide)
        return generator.text2img(["a cat"] * 6, seeds, guide=guide)

    plain = target_log_prob(teacher, draw(None), labels)
    guided = target_log_prob(teacher, draw(ClassifierGuidance(GuideConfig(teacher="t", scale=30.0), teacher)
                                            .toward(labels)), labels)
    assert (guided > plain).all(), (plain, guided)
    # toward the other class: the same images' probability of the first labels goes down
    other = [CLASSES[1 - CLASSES.index(lab)] for lab in labels]
    away = target_log_prob(teacher, draw(ClassifierGuidance(GuideConfig(teacher="t", scale=30.0), teacher)
                                         .toward(other)), labels)
    assert (away < plain).all(), (plain, away)


def test_a_zero_scale_gives_the_unguided_bytes(generator):
    teacher = sharp_teacher()
    labels = ["cat", "dog", "cat"]
    guide = ClassifierGuidance(GuideConfig(teacher="t", scale=0.0), teacher).toward(labels)
    src = sources()
    assert png(generator.img2img([src[0]] * 3, ["a cat"] * 3, [1, 2, 3], guide=guide)) == \
        png(generator.img2img([src[0]] * 3, ["a cat"] * 3, [1, 2, 3]))
    assert png(generator.text2img(["a dog"] * 3, [1, 2, 3], guide=guide)) == png(generator.text2img(["a dog"] * 3,
                                                                                                     [1, 2, 3]))


def test_guided_generation_is_seeded_and_restores_the_scheduler(generator):
    teacher = sharp_teacher()
    guide = ClassifierGuidance(GuideConfig(teacher="t", scale=30.0, steps=[0.5, 1.0]), teacher).toward(["dog"] * 2)
    step = generator.pipe.scheduler.step
    first = png(generator.text2img(["a dog"] * 2, [5, 6], guide=guide))
    assert png(generator.text2img(["a dog"] * 2, [5, 6], guide=guide)) == first
    assert generator.pipe.scheduler.step == step and "step" not in vars(generator.pipe.scheduler)
    assert first != png(generator.text2img(["a dog"] * 2, [5, 6]))


def test_a_student_term_changes_what_guidance_draws(generator):
    teacher, student = sharp_teacher(0), sharp_teacher(1)
    labels = ["cat", "dog"]
    teacher_only = ClassifierGuidance(GuideConfig(teacher="t", scale=10.0), teacher).toward(labels)
    with_student = ClassifierGuidance(GuideConfig(teacher="t", student="s", scale=10.0, student_scale=10.0), teacher,
                                      student).toward(labels)

    def kl(images):
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                         for im in images])
        with torch.no_grad():
            log_t, log_s = teacher(x).log_softmax(-1), student(x).log_softmax(-1)
        return (log_t.exp() * (log_t - log_s)).sum(-1)

    a = generator.text2img(["a cat"] * 2, [3, 4], guide=teacher_only)
    b = generator.text2img(["a cat"] * 2, [3, 4], guide=with_student)
    assert (kl(b) > kl(a)).all()  # the student term seeks where teacher and student disagree


# ----------------------------------------------------------------------------------------------------
# bad input: refused before any model loads
# ----------------------------------------------------------------------------------------------------

def save_classifier(folder, make_tiny_classifier, classes=CLASSES, name="test_resnet", recipe_name=None):
    model = make_tiny_classifier(name, num_classes=len(classes))
    save_model_file(model, folder / "model.safetensors", model_metadata(name, {"num_classes": len(classes)},
                                                                        classes, INPUT))
    if recipe_name:
        (folder / "config.yaml").write_text(f"student:\n  name: {recipe_name}\n")
    return folder


@pytest.mark.parametrize("kwargs, match", [
    ({"scale": float("nan")}, "guide.scale must be a finite number"),
    ({"scale": float("inf")}, "guide.scale must be a finite number"),
    ({"student_scale": float("nan"), "student": "s"}, "guide.student_scale must be a finite number"),
    ({"scale": -1.0}, "guide.scale must be a finite number >= 0"),
    ({"steps": [0.5, 0.2]}, r"guide.steps is \[start, end\)"),
    ({"teacher": None, "scale": 1.0}, "need guide.teacher"),
    ({"student": "s", "student_scale": 0.0}, "student_scale is 0"),
])
def test_bad_guide_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuideConfig(**{"teacher": "t", "scale": 1.0, **kwargs})


def test_a_strength_outside_0_1_is_refused():
    for strength in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            GenerateConfig(strength=strength)


def test_a_teacher_that_does_not_know_the_datasets_labels_is_refused(tmp_path, make_tiny_classifier):
    teacher = save_classifier(tmp_path, make_tiny_classifier, classes=["bird", "fish"])
    with pytest.raises(ValueError, match=r"guide.teacher .* predicts \['bird', 'fish'\].*\['cat', 'dog'\]"):
        check_guide(GuideConfig(teacher=str(teacher), scale=1.0), CLASSES)


def test_a_student_of_another_architecture_than_its_recipe_is_refused(tmp_path, make_tiny_classifier):
    teacher = save_classifier(tmp_path / "t", make_tiny_classifier)
    student = save_classifier(tmp_path / "s", make_tiny_classifier, recipe_name="resnet10t")
    config = GuideConfig(teacher=str(teacher), student=str(student), scale=1.0, student_scale=1.0)
    with pytest.raises(ValueError, match=r"guide.student .* is a test_resnet but its recipe .*config.yaml.* names "
                                         r"resnet10t"):
        check_guide(config, CLASSES)
    (student / "config.yaml").write_text("student:\n  name: test_resnet\n")
    check_guide(config, CLASSES)  # the same folder once its recipe agrees


def test_a_student_with_other_classes_than_the_teacher_is_refused(tmp_path, make_tiny_classifier):
    teacher = save_classifier(tmp_path / "t", make_tiny_classifier)
    student = save_classifier(tmp_path / "s", make_tiny_classifier, classes=["dog", "cat"])
    with pytest.raises(ValueError, match="must share the teacher's classes"):
        check_guide(GuideConfig(teacher=str(teacher), student=str(student), scale=1.0, student_scale=1.0), CLASSES)


def test_a_missing_teacher_names_the_folder_and_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"guide.teacher: .*nothing.*sip train"):
        check_guide(GuideConfig(teacher=str(tmp_path / "nothing"), scale=1.0), CLASSES)


def test_a_teacher_checkpoint_loads_with_its_classes_and_preprocessing(tmp_path, make_tiny_classifier):
    teacher = GuideClassifier.from_checkpoint(save_classifier(tmp_path, make_tiny_classifier))
    assert teacher.classes == CLASSES and teacher.input_size == (3, 16, 16)
    logits = teacher(torch.zeros(2, 3, 32, 32))  # decoded 32 px images, resized to its 16 px input
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------------
# through sip synth: metadata and resume
# ----------------------------------------------------------------------------------------------------

def test_a_guided_synth_killed_mid_batch_resumes_with_the_bytes_of_an_uninterrupted_one(tiny_sd_img2img, tmp_path,
                                                                                        monkeypatch):
    import hashlib

    from sip.augment.run import SynthRecipe, run_synth
    from sip.augment.variants import Teaching
    from sip.data.bank import DatasetWriter, read_metadata

    gen = {"steps": 4, "per_class": 5, "batch_size": 4, "device": "cpu"}
    generator = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**gen), model_id="tiny")
    guided = Teaching(ClassifierGuidance(GuideConfig(teacher="t", scale=30.0), sharp_teacher()))

    def synth(out):
        return SynthRecipe(classes=CLASSES, generate=GenerateConfig(**gen), output=str(out), progress=False)

    def digests(out):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "train").rglob("*.png"))}

    run_synth(synth(tmp_path / "clean"), generator, teaching=guided)
    run_synth(synth(tmp_path / "plain"), generator)
    real, count = DatasetWriter.write, {"n": 0}

    def write(self, *args, **kwargs):
        if count["n"] == 6:
            raise KeyboardInterrupt
        count["n"] += 1
        return real(self, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(DatasetWriter, "write", write)
        with pytest.raises(KeyboardInterrupt):
            run_synth(synth(tmp_path / "resumed"), generator, teaching=guided)
    again = run_synth(synth(tmp_path / "resumed"), generator, teaching=guided)
    assert again.skipped == 6 and again.written == 4
    assert digests(tmp_path / "resumed") == digests(tmp_path / "clean") != digests(tmp_path / "plain")
    line = read_metadata(tmp_path / "clean")[0]
    assert line["guide"] == {"teacher": "sharp-teacher", "scale": 30.0, "steps": [0.0, 1.0], "every": 1}


def test_the_cli_teacher_and_student_options_reach_the_guide_and_are_checked_before_any_model_loads(
        tmp_path, make_tiny_classifier, monkeypatch):
    from typer.testing import CliRunner

    from sip.cli import app

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the guide was checked")
    monkeypatch.setattr(DiffusionGenerator, "from_config", boom)
    missing = tmp_path / "no-teacher"
    result = CliRunner().invoke(app, ["synth", "--teacher", str(missing), "--set", "guide.scale=1.0", "--set",
                                      "classes=[cat, dog]", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "guide.teacher" in result.output and "no-teacher" in result.output
    teacher = save_classifier(tmp_path / "t", make_tiny_classifier, classes=["bird", "fish"])
    result = CliRunner().invoke(app, ["synth", "--teacher", str(teacher), "--set", "guide.scale=1.0", "--set",
                                      "classes=[cat, dog]", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not among them" in result.output
    result = CliRunner().invoke(app, ["synth", "--teacher", str(teacher), "--student", str(teacher), "--set",
                                      "classes=[cat, dog]", "--set", "guide.scale=.nan", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "guide.scale" in result.output and "finite number" in result.output
