"""sip.config: YAML recipes onto frozen dataclasses, --set overrides, errors that name key and file."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from sip.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)


@dataclass(frozen=True)
class GenerateSection:
    strength: float = 0.5
    steps: int = 30
    scheduler: str | None = None
    mode: Literal["img2img", "txt2img"] = "img2img"

    def __post_init__(self):
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


@dataclass(frozen=True)
class SourceSection:
    path: str = "data"
    shots: int | None = None
    classes: list[str] = field(default_factory=list)
    size: tuple[int, int] = (32, 32)


@dataclass(frozen=True)
class FilterSection:
    threshold: float = 0.0
    model: str = "teacher"


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    seed: int = 0
    verbose: bool = False
    out: Path = Path("out")
    generate: GenerateSection = field(default_factory=GenerateSection)
    source: SourceSection = field(default_factory=SourceSection)
    filter: FilterSection | None = None
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NeedsName:
    name: str


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


RECIPE = """\
name: fmnist
seed: 3
verbose: true
out: runs/fmnist
generate:
  strength: 1        # an int where a float is expected is fine
  steps: 10
  mode: txt2img
source:
  path: /data/fmnist
  shots: 10
  classes: [cat, dog]
  size: [28, 28]
filter:
  threshold: 0.25
weights: {kd: 0.9, ce: 1}
"""


def test_loads_nested_dataclasses(tmp_path):
    cfg = load_config(Recipe, write(tmp_path / "r.yaml", RECIPE))
    assert cfg == Recipe(
        name="fmnist", seed=3, verbose=True, out=Path("runs/fmnist"),
        generate=GenerateSection(strength=1.0, steps=10, mode="txt2img"),
        source=SourceSection(path="/data/fmnist", shots=10, classes=["cat", "dog"], size=(28, 28)),
        filter=FilterSection(threshold=0.25), weights={"kd": 0.9, "ce": 1.0},
    )
    assert type(cfg.generate.strength) is float
    assert type(cfg.source.size) is tuple
    assert isinstance(cfg.out, Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]


def test_defaults_without_file_and_empty_file(tmp_path):
    assert load_config(Recipe) == Recipe()
    assert load_config(Recipe, write(tmp_path / "empty.yaml", "# nothing set\n")) == Recipe()


def test_overrides_are_parsed_as_yaml_and_win_over_the_file(tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE)
    cfg = load_config(Recipe, path, [
        "generate.strength=0.25", "seed=7", "verbose=false", "source.classes=[shirt, bag]",
        "source.shots=null", "name=hello world", "filter.model=clip", "generate.scheduler=DDIMScheduler",
    ])
    assert cfg.generate.strength == 0.25 and cfg.generate.steps == 10  # the rest of the section is kept
    assert cfg.seed == 7 and cfg.verbose is False
    assert cfg.source.classes == ["shirt", "bag"] and cfg.source.shots is None
    assert cfg.name == "hello world"
    assert cfg.filter == FilterSection(threshold=0.25, model="clip")
    assert cfg.generate.scheduler == "DDIMScheduler"


def test_override_creates_a_section_missing_from_the_file(tmp_path):
    cfg = load_config(Recipe, write(tmp_path / "r.yaml", "seed: 1\n"), ["filter.threshold=0.5"])
    assert cfg.filter == FilterSection(threshold=0.5)
    assert load_config(Recipe, None, ["generate.steps=2"]).generate.steps == 2


@pytest.mark.parametrize("text, match", [
    ("seed", "key=value"),
    ("=3", "empty key"),
    ("generate..steps=3", "empty key"),
    ("seed=[1, 2", "cannot parse"),
])
def test_malformed_overrides(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_override(text)


def test_override_into_a_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--set seed\.x: seed is a value"):
        load_config(Recipe, write(tmp_path / "r.yaml", "seed: 1\n"), ["seed.x=2"])


def test_override_leaves_input_untouched():
    data = {"generate": {"steps": 3}}
    out = apply_overrides(data, ["generate.steps=4"])
    assert out == {"generate": {"steps": 4}} and data == {"generate": {"steps": 3}}


def test_override_on_a_recipe_with_non_json_values(tmp_path):
    # YAML gives dates (and non-string keys); an override must not crash on them before validation.
    path = write(tmp_path / "r.yaml", "name: 2024-05-01\n")
    with pytest.raises(ConfigError, match=r"name: expected a string.*r\.yaml \+ --set"):
        load_config(Recipe, path, ["seed=1"])
    assert load_config(Recipe, path, ["name=may"]).name == "may"


@pytest.mark.parametrize("text, key", [
    ("sede: 1\n", "sede"),
    ("generate:\n  strenght: 0.5\n", "generate.strenght"),
    ("source:\n  path: x\n  shot: 2\n", "source.shot"),
])
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path / "recipe.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, path)
    message = str(info.value)
    assert f"unknown key {key}" in message
    assert str(path) in message
    assert "valid keys" in message


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="valid keys of generate: mode, scheduler, steps, strength"):
        load_config(Recipe, write(tmp_path / "r.yaml", "generate:\n  strenght: 0.5\n"))


def test_unknown_key_inside_an_optional_section_is_named(tmp_path):
    path = write(tmp_path / "r.yaml", "filter:\n  treshold: 0.5\n")
    with pytest.raises(ConfigError, match=rf"unknown key filter\.treshold in {path}"):
        load_config(Recipe, path)


def test_unknown_key_from_override_names_the_override(tmp_path):
    path = write(tmp_path / "r.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match=rf"unknown key generate\.stps in {path} \+ --set"):
        load_config(Recipe, path, ["generate.stps=3"])
    with pytest.raises(ConfigError, match=r"unknown key nope in --set"):
        load_config(Recipe, None, ["nope=3"])


@pytest.mark.parametrize("text, key, expected", [
    ("seed: abc\n", "seed", "integer"),
    ("seed: 1.5\n", "seed", "integer"),
    ("seed: true\n", "seed", "integer"),
    ("verbose: 1\n", "verbose", "true or false"),
    ("name: [a, b]\n", "name", "string"),
    ("generate:\n  strength: high\n", "generate.strength", "number"),
    ("generate:\n  mode: inpaint\n", "generate.mode", "one of 'img2img', 'txt2img'"),
    ("generate: 3\n", "generate", "mapping"),
    ("source:\n  classes: cat\n", "source.classes", "list"),
    ("source:\n  classes: [cat, 2]\n", r"source.classes[1]", "string"),
    ("source:\n  size: [1, 2, 3]\n", "source.size", "2 items"),
    ("source:\n  shots: many\n", "source.shots", "int | None"),
    ("weights: {kd: heavy}\n", "weights.kd", "number"),
    ("filter: 0.5\n", "filter", "FilterSection | None"),
])
def test_wrong_type_names_key_and_file(tmp_path, text, key, expected):
    path = write(tmp_path / "recipe.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, path)
    message = str(info.value)
    assert message.startswith(f"{key}: ")
    assert expected in message
    assert str(path) in message


def test_wrong_type_from_override(tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE)
    expected = rf"generate\.steps: expected an integer, got 'ten' in {path} \+ --set"
    with pytest.raises(ConfigError, match=expected):
        load_config(Recipe, path, ["generate.steps=ten"])


def test_bad_value_becomes_config_error_naming_the_file(tmp_path):
    path = write(tmp_path / "recipe.yaml", "generate:\n  strength: 1.7\n")
    with pytest.raises(ConfigError) as info:
        load_config(Recipe, path)
    message = str(info.value)
    assert "generate" in message
    assert "strength must be in (0, 1], got 1.7" in message
    assert str(path) in message
    assert isinstance(info.value, ValueError)  # callers may catch ValueError
    assert isinstance(info.value.__cause__, ValueError)


def test_bad_value_from_override(tmp_path):
    with pytest.raises(ConfigError, match=r"strength must be in \(0, 1\], got -0\.5 in --set"):
        load_config(Recipe, None, ["generate.strength=-0.5"])


def test_missing_required_field_names_the_file(tmp_path):
    path = write(tmp_path / "r.yaml", "{}\n")
    with pytest.raises(ConfigError, match=rf"NeedsName: .*name.* in {path}"):
        load_config(NeedsName, path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path / "recipe.yaml", text)
    expected = rf"{path}: the top level of a recipe must be a mapping, got {kind}"
    with pytest.raises(ConfigError, match=expected):
        load_config(Recipe, path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path / "recipe.yaml", "generate: {strength: 0.5\n")
    with pytest.raises(ConfigError, match=rf"{path} is not valid YAML"):
        load_config(Recipe, path)


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"recipe {path} does not exist.*pipelines/"):
        load_config(Recipe, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Recipe, tmp_path)  # a folder is not a recipe


def test_yaml_is_not_executed(tmp_path):
    path = write(tmp_path / "r.yaml", "name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Recipe, path)


def test_save_config_round_trip(tmp_path):
    cfg = load_config(Recipe, write(tmp_path / "r.yaml", RECIPE), ["generate.scheduler=DDIMScheduler"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert out == tmp_path / "run" / "config.yaml"
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    plain = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert plain == to_dict(cfg)
    assert plain["source"]["size"] == [28, 28] and plain["out"] == "runs/fmnist"
    assert list(plain) == [f.name for f in dataclasses.fields(Recipe)]  # field order kept
    assert load_config(Recipe, out) == cfg
    # defaults (None section, empty containers) round-trip too
    save_config(Recipe(), out)
    assert load_config(Recipe, out) == Recipe()


def test_from_dict_prefix_names_nested_keys():
    with pytest.raises(ConfigError, match=r"unknown key recipe\.generate\.x; valid keys of recipe\.generate"):
        from_dict(Recipe, {"generate": {"x": 1}}, prefix="recipe")


# --- NaN, infinity and empty strings (issue 31, findings 2 and 4) ---------------------------------------------

@pytest.mark.parametrize("recipe, override, key", [
    ("distill", "batch_mix.cutmix_alpha=.nan", "batch_mix.cutmix_alpha"),
    ("distill", "batch_mix.mixup_alpha=.inf", "batch_mix.mixup_alpha"),
    ("train", "model.kdeformer.min_tokens=.nan", "model.kdeformer.min_tokens"),
    ("train", "model.kdeformer.block_size=.nan", "model.kdeformer.block_size"),
    ("train", "model.kwargs.embed_dim=-.inf", "model.kwargs.embed_dim"),
    ("train", "optim.grad_clip=.inf", "optim.grad_clip"),
    ("train", "data.scale=[.nan, 1.0]", "data.scale[0]"),
    ("synth", "ray.num_cpus=.nan", "ray.num_cpus"),
    ("synth", "ray.num_gpus=.inf", "ray.num_gpus"),
    ("synth", "generate.guidance_scale=.nan", "generate.guidance_scale"),
    ("synth", "generate.kdeformer.num_samples=.nan", "generate.kdeformer.num_samples"),
])
def test_nan_and_infinity_are_refused_by_key(recipe, override, key):
    """NaN passed every range check (``nan < 0`` is false) and ran as if the key were unset; inf reached Ray."""
    cls, base = _recipe(recipe)
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": must be a finite number"):
        load_config(cls, None, base + [override])


@pytest.mark.parametrize("recipe, override, key", [
    ("train", "data.interpolation=", "data.interpolation"),
    ("train", "data.real.split=", "data.real.split"),
    ("train", "data.auto_augment=''", "data.auto_augment"),
    ("train", "model.checkpoint=''", "model.checkpoint"),
    ("synth", "generate.tiny_vae=", "generate.tiny_vae"),
    ("synth", "generate.lora=' '", "generate.lora"),
    ("synth", "generate.device=", "generate.device"),
    ("synth", "ray.address=", "ray.address"),
    ("synth", "classes=[shirt, '']", r"classes\[1\]"),
    ("distill", "logits=", "logits"),
])
def test_empty_strings_are_refused_where_the_default_is_not_empty(recipe, override, key):
    """An empty name fell back to the default silently (``data.interpolation=`` ran as the model's own)."""
    cls, base = _recipe(recipe)
    with pytest.raises(ConfigError, match=rf"^{key}: an empty string is not a valid value"):
        load_config(cls, None, base + [override])


def test_an_empty_string_stays_valid_where_it_is_the_default():
    from sip.augment.run import SynthRecipe
    from sip.demo import DemoRecipe

    assert load_config(SynthRecipe, None, ["prompt.negative_prompt="]).prompt.negative_prompt == ""
    assert load_config(DemoRecipe, None, ["model="]).model == ""


def test_kdeformer_settings_are_typed_like_a_section():
    from sip.train.recipe import TrainRecipe

    with pytest.raises(ConfigError, match=r"^model.kdeformer.block_size: expected an integer, got 1.5"):
        load_config(TrainRecipe, None, ["model.attention=kdeformer", "model.kdeformer.block_size=1.5"])


@pytest.mark.parametrize("value", ["bogus", "random"])
def test_unknown_interpolation_is_refused(value):
    from sip.train.recipe import TrainRecipe

    with pytest.raises(ConfigError, match="interpolation must be one of nearest, bilinear, bicubic"):
        load_config(TrainRecipe, None, [f"data.interpolation={value}"])
    assert load_config(TrainRecipe, None, ["data.interpolation=lanczos5"]).data.interpolation == "lanczos5"


def _recipe(kind: str):
    if kind == "train":
        from sip.train.recipe import TrainRecipe

        return TrainRecipe, []
    if kind == "synth":
        from sip.augment.run import SynthRecipe

        return SynthRecipe, []
    from sip.distill.run import DistillRecipe

    return DistillRecipe, ["teachers=[{name: resnet10t, pretrained: true}]"]


@pytest.mark.parametrize("override, message", [
    ("optim.grad_clip=-1", "optim.grad_clip: grad_clip must be positive or null"),  # a negative norm flips gradients
    ("run.threads=0", "run.threads: threads must be >= 1 or null"),  # 0 ran as torch's default
    ("run.eval_max_samples=0", "run.eval_max_samples: eval_max_samples must be >= 1"),
    ("data.std=[0.5, 0, 0.5]", "data.std: std must be positive"),
    ("data.crop_pct=-1", "data.crop_pct: crop_pct must be in"),
    ("data.color_jitter=-0.4", "data.color_jitter: color_jitter must be >= 0"),
    ("model.drop_rate=1.5", "model.drop_rate: drop_rate must be in"),
    ("optim.betas=[2, 3]", "optim.weight_decay: weight_decay must be >= 0 and betas in"),
])
def test_training_ranges_are_checked_when_the_recipe_loads(override, message):
    from sip.train.recipe import TrainRecipe

    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(TrainRecipe, None, [override])


@pytest.mark.parametrize("kind, override, message", [
    ("augment", "caption.kind=blip", "caption.kind must be one of "),
    ("augment", "caption.dtype=int8", "caption.dtype must be one of float32"),
    ("augment", "caption.min_prob=1.5", "caption.min_prob is a probability in [0, 1]"),
    ("augment", "caption.device=bogus", "caption.device must be auto, cpu, cuda"),
    ("augment", "filter.device=gpu", "filter.device must be auto, cpu, cuda"),
    ("augment", "generate.device=bogus", "generate.device must be auto, cpu, cuda"),
    ("synth", "generate.device=bogus", "generate.device must be auto, cpu, cuda"),
    ("train", "run.device=gpu", "run.device must be auto, cpu, cuda"),
    ("train", "model.name=resnet99", "model.name: name must be a timm or sip model name: unknown timm model 'resnet99'"),
    ("distill", "student.name=vit_bogus", "student.name: name must be a timm or sip model name"),
])
def test_unknown_names_and_devices_are_refused_when_the_recipe_loads(kind, override, message):
    """Issue 26: a bad captioner kind, dtype, device or model name is said at load time, naming the key and the valid
    values (it used to surface only when the model was built, after the data, or never)."""
    from sip.augment.jobs import AugmentRecipe

    cls, base = (AugmentRecipe, []) if kind == "augment" else _recipe(kind)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(cls, None, [*base, override])


def test_hub_and_tagged_model_names_still_load():
    from sip.train.recipe import TrainRecipe

    for name in ("resnet10t.c3_in1k", "hf-hub:timm/resnet10t.c3_in1k", "sip_rednet_tiny"):
        assert load_config(TrainRecipe, None, [f"model.name={name}"]).model.name == name


@pytest.mark.parametrize("progress", [True, False])
def test_the_demo_passes_its_progress_switch_to_every_stage(tmp_path, progress):
    """``scripts/demo_seeds.py --no-progress`` still drew the teacher's and students' bars (they kept the default)."""
    from sip.demo import DemoRecipe, demo_recipes

    recipes = demo_recipes(load_config(DemoRecipe, None, []), tmp_path, progress=progress)
    assert {name: r.progress if hasattr(r, "progress") else r.run.progress for name, r in recipes.items()} == {
        name: progress for name in ("augment", "synth", "teacher", "student-real", "student-real+sip")}


def test_the_demo_prompts_are_grammatical(tmp_path):
    """The demo's txt2img and img2img prompts read as English: "a photo of a pair of trousers", "an ankle boot"."""
    from sip.augment.prompts import PromptBuilder
    from sip.data.fashion_mnist import FASHION_MNIST_CLASSES
    from sip.demo import DemoRecipe, demo_recipes

    recipes = demo_recipes(load_config(DemoRecipe, None, []), tmp_path)
    txt2img, img2img = PromptBuilder(recipes["synth"].prompt), PromptBuilder(recipes["augment"].prompt)
    assert txt2img("Trouser") == "a photo of a pair of trousers"
    assert txt2img("Ankle boot") == "a photo of an ankle boot"
    assert img2img("Ankle boot", "clog, sandal") == "a photo of an ankle boot, clog, sandal"
    for label in FASHION_MNIST_CLASSES:
        words = txt2img(label).split()
        assert not any(a in ("a", "an") and b in ("a", "an") for a, b in zip(words, words[1:])), txt2img(label)
        assert not any(a == "a" and b[0] in "aeiou" for a, b in zip(words, words[1:])), txt2img(label)
