"""sip adapt's bad input (issue 28): refused before training with an error naming the key and the fix."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from sip.adapt.recipe import AdaptRecipe, LoraSettings, TextualInversionConfig, ValidationConfig
from sip.adapt.run import run_adapt
from sip.config import ConfigError, load_config
from test_adapt import _recipe, _shots

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return _shots(tmp_path_factory.mktemp("shots") / "train")


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "lora.rank must be a positive integer"),
    ("lora.rank=-2", "lora.rank must be a positive integer"),
    ("lr=.nan", "lr"), ("lr=.inf", "lr"), ("lr=0", "lr must be a finite number > 0"),
    ("method=dreambooth", "method"),
    ("textual_inversion.vectors=2", "the textual_inversion section is read by method textual_inversion only"),
    ("template=a photo", "template must contain {label}"),
    ("device=gpu", "device must be auto, cpu, cuda"),  # at load, before any model is read
])
def test_recipe_errors(override, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("{", r"\{").replace("}", r"\}")):
        load_config(AdaptRecipe, None, [override])


def test_non_finite_lr_from_python():
    with pytest.raises(ValueError, match="lr must be a finite number"):
        AdaptRecipe(lr=math.nan)


def test_class_with_no_image_is_refused(tiny_sd_dir, shots, tmp_path):
    from sip.data.sources import SourceConfig

    shots = shutil.copytree(shots, tmp_path / "shots")
    (shots / "green").mkdir()  # an empty class folder
    source = SourceConfig(kind="folder", path=str(shots))
    with pytest.raises(ValueError, match=r"class\(es\) \['green'\] have no readable image"):
        run_adapt(_recipe("lora", tiny_sd_dir, shots, tmp_path / "out", source=source))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_token_that_is_already_a_word_is_refused(tiny_sd_dir, shots, tmp_path):
    recipe = _recipe("textual_inversion", tiny_sd_dir, shots, tmp_path / "out",
                     textual_inversion=TextualInversionConfig(tokens={"red": "a"}))
    with pytest.raises(ValueError, match=r"textual_inversion.tokens\['red'\]: 'a' is already a word"):
        run_adapt(recipe)
    with pytest.raises(ValueError, match="share a token"):
        run_adapt(_recipe("textual_inversion", tiny_sd_dir, shots, tmp_path / "out2",
                          textual_inversion=TextualInversionConfig(tokens={"red": "<x>", "blue": "<x>"})))


def test_run_folder_of_another_method_or_recipe_is_refused(tiny_sd_dir, shots, tmp_path):
    out = tmp_path / "out"
    run_adapt(_recipe("lora", tiny_sd_dir, shots, out, steps=2, validation=ValidationConfig(every=0)))
    with pytest.raises(ValueError, match="holds a lora run, not finetune"):
        run_adapt(_recipe("finetune", tiny_sd_dir, shots, out, steps=2))
    with pytest.raises(ValueError, match="keys lr differ"):
        run_adapt(_recipe("lora", tiny_sd_dir, shots, out, steps=2, lr=0.5, validation=ValidationConfig(every=0)))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a run")
    with pytest.raises(FileExistsError, match="not a `sip adapt` run folder"):
        run_adapt(_recipe("lora", tiny_sd_dir, shots, tmp_path / "other", steps=2))


def test_text_encoder_lora_works_or_says_what_to_install(tiny_sd_dir, shots, tmp_path):
    import peft
    from packaging.version import Version

    recipe = _recipe("lora", tiny_sd_dir, shots, tmp_path / "out", steps=1, lora=LoraSettings(text_encoder=True),
                     validation=ValidationConfig(every=0))
    if Version(peft.__version__) >= Version("0.22"):
        assert run_adapt(recipe)["steps"] == 1
    else:
        with pytest.raises(ValueError, match="lora.text_encoder: .*pip install -U peft"):
            run_adapt(recipe)


def test_adapter_for_another_base_or_unfinished_is_refused(tiny_sd_dir, shots, tmp_path):
    from sip.adapt.use import check_adapter

    out = tmp_path / "ti"
    run_adapt(_recipe("textual_inversion", tiny_sd_dir, shots, out, steps=1, validation=ValidationConfig(every=0)))
    assert check_adapter(out, str(tiny_sd_dir)).tokens == {"red": "<sip-red>", "blue": "<sip-blue>"}
    other = tmp_path / "other-model"
    shutil.copytree(tiny_sd_dir, other)
    assert check_adapter(out, str(other)).method == "textual_inversion"  # a copy is the same base
    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # another model: one bit of its UNet differs
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="generate.adapter: .* was adapted from .* an adapter only fits its own base"):
        check_adapter(out, str(other))
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "finished": False}))
    with pytest.raises(ValueError, match="unfinished `sip adapt` run"):
        check_adapter(out, str(tiny_sd_dir))
    with pytest.raises(FileNotFoundError, match="holds no run.json"):
        check_adapter(tmp_path, str(tiny_sd_dir))


@pytest.mark.parametrize("method", ["textual_inversion", "lora", "finetune"])
def test_shipped_recipes_load(method):
    from pathlib import Path

    cfg = load_config(AdaptRecipe, Path(__file__).parents[1] / "pipelines" / f"adapt_{method}.yaml")
    assert cfg.method == method and cfg.source.kind == "fashion-mnist" and cfg.source.shots == 10


def test_cli_adapt_then_synth_with_the_adapter(tiny_sd_dir, shots, tmp_path):
    from typer.testing import CliRunner

    from sip.cli import app

    out = tmp_path / "adapt"
    res = CliRunner().invoke(app, ["adapt", "--input", str(shots), "-o", str(out), "--model", str(tiny_sd_dir),
                                   "--method", "textual_inversion", "--steps", "2", "--set", "progress=false",
                                   "--set", "validation.every=0", "--set", "device=cpu"])
    assert res.exit_code == 0, res.output
    result = json.loads(re.search(r'\{"output".*\}', res.output).group(0))
    assert result["steps"] == 2 and (out / "config.yaml").is_file()
    res = CliRunner().invoke(app, ["synth", "-o", str(tmp_path / "synth"), "--model", str(tiny_sd_dir),
                                   "--adapter", str(out), "--per-class", "1", "--steps", "2", "--set",
                                   "classes=[red, blue]", "--set", "progress=false", "--set", "generate.device=cpu"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["adapt", "--input", str(shots), "-o", str(out), "--model", str(tiny_sd_dir),
                                   "--method", "lora", "--steps", "2"])
    assert res.exit_code == 2 and "holds a textual_inversion run, not lora" in res.output
