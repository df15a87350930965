"""No dead keys (issue 26): every field of every verb's recipe changes what runs, or the loader refuses it.

``ENTRIES`` maps a verb and a dotted key to how that is shown: ``Changes(value, probe)`` loads the recipe with and
without ``key=value`` and compares what ``probe`` builds from each (the resolved object the key feeds: a source's
items, the prompts, the training transforms' output, the model, the batch mix, the optimiser and its schedule — all
built without training or generating); ``Refused(value)`` expects a ConfigError naming the key; ``Pending(reason)``
is an xfail naming why (a dead key in another area, or a key whose probe needs a generation or training run and is
not written yet). ``test_every_recipe_field_has_an_entry`` fails when a field is added without an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import typing
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from sip.config import ConfigError, load_config

# --------------------------------------------------------------------------------------------------
# 1. the verbs and their recipe fields
# --------------------------------------------------------------------------------------------------


def verbs() -> dict[str, type]:
    from sip.augment.run import AugmentRecipe, SynthRecipe
    from sip.demo import DemoRecipe
    from sip.distill.run import DistillRecipe, LogitsRecipe
    from sip.train.recipe import TrainRecipe

    return {"augment": AugmentRecipe, "synth": SynthRecipe, "train": TrainRecipe, "distill": DistillRecipe,
            "logits": LogitsRecipe, "demo": DemoRecipe}


def recipe_fields(cls: type, prefix: str = "") -> dict[str, str]:
    """``{"dotted.key": "Class.field"}`` of every leaf field (a list of sections as ``key[0].field``)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out.update(recipe_fields(typing.get_args(tp)[0], key + "[0]."))
            continue
        sections = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if sections:
            out.update(recipe_fields(sections[0], key + "."))
        else:  # an inherited field (EvalSourceConfig's from SourceConfig) is its base class's field
            owner = next(c for c in reversed(cls.__mro__)
                         if dataclasses.is_dataclass(c) and f.name in {g.name for g in dataclasses.fields(c)})
            out[key] = f"{owner.__name__}.{f.name}"
    return out


# --------------------------------------------------------------------------------------------------
# 2. probes: what a key feeds, built cheaply from a loaded recipe
# --------------------------------------------------------------------------------------------------

def _digest(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().numpy()
    if isinstance(x, Image.Image):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16] + str(x.shape)
    return repr(x)


def source_items(section) -> Any:
    from sip.data.sources import open_source

    source = open_source(section)
    ids = list(source.source_ids())
    first = next(iter(source))
    return source.classes, ids[:8], len(ids), first.image.size, _digest(first.image)


def augment_source(cfg) -> Any:
    return source_items(cfg.source)


def train_real(cfg) -> Any:
    return source_items(cfg.data.real)


def train_eval(cfg) -> Any:
    return source_items(cfg.data.eval)


def prompts(cfg) -> Any:
    from sip.augment.prompts import PromptBuilder

    build = PromptBuilder(cfg.prompt, count_tokens=lambda text: len(text.split()))
    captions = [("T-shirt/top", "a grey shirt on a table with long sleeves and a pocket", 0),
                ("Bag", "a leather bag on a chair", 0),
                ("T-shirt/top", "a t-shirt", 1), ("Bag", None, 2), ("Bag", "", 0)]
    return [build(label, caption, v) for label, caption, v in captions], cfg.prompt.negative_prompt


def _tiny_model(data, model_section=None):
    from sip.train.inputs import build_model
    from sip.train.recipe import ModelSection

    section = model_section or ModelSection(name="resnet10t")
    torch.manual_seed(0)
    model, kwargs = build_model(section, 10, data.img_size)
    return model, kwargs


def transforms(cfg) -> Any:
    """The training and evaluation transforms' outputs on one seeded image (and the resolved input config)."""
    from sip.train.inputs import build_transforms, resolve_input_config

    model, _ = _tiny_model(cfg.data)
    input_config = resolve_input_config(model, cfg.data)
    train, evaluate = build_transforms(input_config, cfg.data)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    outs = []
    for seed in range(6):  # several draws: a probability key shows in some of them
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        outs.append(_digest(train(image)))
    return input_config, outs, _digest(evaluate(image))


def model(cfg) -> Any:
    """The built model: its class, parameter shapes, settings and seeded output on a fixed batch."""
    net, kwargs = _tiny_model(cfg.data, cfg.model)
    net.train()
    torch.manual_seed(0)
    size = cfg.model.img_size or cfg.data.img_size or 32
    out = net(torch.randn(2, cfg.model.in_chans, size, size))
    modules = sorted({type(m).__name__ for m in net.modules()})
    return type(net).__name__, kwargs, modules, [tuple(p.shape) for p in net.parameters()], _digest(out)


def batch_mix(cfg) -> Any:
    from sip.distill.mixup import draw_batch_mix

    draws = [draw_batch_mix(cfg.batch_mix, 8, (32, 32), 0, 0, step) for step in range(12)]
    return [(round(d.lam, 6), d.box, d.perm.tolist()) for d in draws]


def optimiser(cfg) -> Any:
    """Learning rates over 3 epochs of 4 steps, and the optimiser's groups (lr, decay, betas)."""
    from sip.train.loop import build_optimizer, build_scheduler

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(net, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 4)
    lrs = []
    for _ in range(4 * cfg.optim.epochs):
        lrs.append(round(opt.param_groups[0]["lr"], 9))
        opt.step(), sched.step()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return lrs, repr(groups)


def generation(cfg) -> Any:
    """One seeded img2img image of a fixed source and what the generator resolved (no compile is triggered)."""
    from sip.augment.generate import DiffusionGenerator
    from sip.ids import image_seed

    gen = DiffusionGenerator.from_config(cfg.generate)
    unet = gen.pipe.unet
    state = (gen.settings(), gen.precision, str(next(unet.parameters()).dtype),
             next(p for p in unet.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last),
             sorted({type(p).__name__ for p in unet.attn_processors.values()}), unet._compiled_call_impl is not None)
    if cfg.generate.compile:  # compiling takes minutes on a CPU: the wiring is what this key decides here
        return state
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8))
    image = gen.img2img([source], ["a photo of a shirt"], [image_seed(cfg.generate.seed, "src", 0)])[0]
    return state, image.size, _digest(image)


def batches(cfg) -> Any:
    from sip.augment.loop import batch_grid

    return [len(b) for b in batch_grid(list(range(10)), cfg.generate.batch_size)]


def variant_plan(cfg) -> Any:
    """Every variant of a source of class "a" (prompt class, strength, guidance, soft label): what variants.* feed."""
    from sip.augment.variants import VariantPlan, variant_fields

    g = cfg.generate
    plan = VariantPlan(cfg.variants, ["a", "b", "c"], g.strength, g.guidance_scale, g.per_image)
    return [variant_fields(plan, "a", "src", v) for v in range(plan.count)]


def guidance_terms(cfg) -> Any:
    """The guide's loss on fixed images (tiny seeded classifiers) and its guided steps out of 10: what guide.* feed."""
    from torch import nn

    from sip.augment.guidance import ClassifierGuidance, GuideClassifier

    def classifier(seed: int) -> GuideClassifier:
        torch.manual_seed(seed)
        return GuideClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), ["a", "b"],
                               {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3})

    guidance = ClassifierGuidance(cfg.guide, classifier(0), classifier(1) if cfg.guide.student else None)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    aimed = guidance.toward(["a", "b"])
    return round(float(guidance.loss(images, aimed.targets)), 6), sorted(aimed.guided_steps(10))


GUIDED = ("guide.teacher=runs/teacher", "guide.scale=1.0")
STUDENT = (*GUIDED, "guide.student=runs/student", "guide.student_scale=1.0")
INTERCLASS = ("variants.interclass=all",)


# --------------------------------------------------------------------------------------------------
# 3. the table
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Changes:
    value: Any
    probe: Callable
    base: tuple[str, ...] = ()  # overrides both sides load with (e.g. the kind a key belongs to)


@dataclass(frozen=True)
class Refused:
    value: Any
    base: tuple[str, ...] = ()
    match: str = ""
    probe: Callable | None = None  # refused when the probe builds the object (before any training): a ValueError


@dataclass(frozen=True)
class Pending:
    reason: str


FOLDER = ("source.kind=folder", "source.path=FOLDER")
HF = ("source.kind=hf", "source.path=HF")
TINY = ("generate.model=TINY_SD", "generate.device=cpu", "generate.steps=4")
SMALL = ("source.shots=2",)
GEN = "probe needs a generation run (a tiny SD per value); not written in this pass: see tests/test_generate.py, " \
      "tests/test_few_step.py, tests/test_augment.py for the key's own test"
TRAIN_RUN = "probe needs a training / distillation run; not written in this pass"
DISTILL_VIEWS = ("issue 26 finding 4 (H3): sip distill's views only crop and flip, so this data key (honoured by "
                 "sip train) does not reach the student's view")

ENTRIES: dict[tuple[str, str], Any] = {
    # -- sources (the same SourceConfig in every verb) ---------------------------------------------------------
    ("augment", "source.path"): Changes("FOLDER2", augment_source, FOLDER),
    ("augment", "source.split"): Changes("test", augment_source, SMALL),
    ("augment", "source.shots"): Changes(3, augment_source, ("source.stop=50100",)),
    ("augment", "source.seed"): Changes(1, augment_source, SMALL),
    ("augment", "source.start"): Changes(50100, augment_source, SMALL),
    ("augment", "source.stop"): Changes(50050, augment_source, ("source.shots=null",)),
    ("augment", "source.size"): Changes(None, augment_source, SMALL),
    ("augment", "source.image_column"): Changes("picture", augment_source, HF),
    ("augment", "source.label_column"): Changes("y", augment_source, HF),
    ("augment", "source.classes"): Changes(["cat"], augment_source, FOLDER),
    ("train", "data.eval.split"): Changes("train", train_eval, ("data.eval.stop=64",)),
    ("train", "data.eval.start"): Changes(10, train_eval, ("data.eval.stop=64",)),
    ("train", "data.real.start"): Changes(0, train_real, ("data.real.shots=1",)),
    # -- prompts ---------------------------------------------------------------------------------------------
    ("augment", "prompt.template"): Changes("a {label} photo, {caption}", prompts),
    ("augment", "prompt.template_with_label"): Changes("an image of {caption}", prompts),
    ("augment", "prompt.template_no_caption"): Changes("a picture of a {label}", prompts),
    ("augment", "prompt.label_names"): Changes({"T-shirt/top": "tee"}, prompts),
    ("augment", "prompt.synonyms"): Changes({"T-shirt/top": ["top"]}, prompts),
    ("augment", "prompt.negative_prompt"): Changes("blurry", prompts),
    ("augment", "prompt.max_tokens"): Changes(8, prompts),
    ("augment", "prompt.parts"): Changes("label", prompts),
    # -- training inputs ----------------------------------------------------------------------------------------
    ("train", "data.img_size"): Changes(24, transforms),
    ("train", "data.crop_pct"): Changes(0.75, transforms),
    ("train", "data.scale"): Changes([0.1, 0.5], transforms),
    ("train", "data.ratio"): Changes([0.5, 2.0], transforms),
    ("train", "data.hflip"): Changes(0.0, transforms),
    ("train", "data.color_jitter"): Changes(0.4, transforms),
    ("train", "data.auto_augment"): Changes("rand-m9-mstd0.5", transforms),
    ("train", "data.re_prob"): Changes(1.0, transforms),
    ("train", "data.interpolation"): Changes("nearest", transforms),
    ("train", "data.mean"): Changes([0.5, 0.5, 0.5], transforms),
    ("train", "data.std"): Changes([0.2, 0.2, 0.2], transforms),
    ("distill", "data.re_prob"): Pending(DISTILL_VIEWS),
    ("distill", "data.color_jitter"): Pending(DISTILL_VIEWS),
    ("distill", "data.auto_augment"): Pending(DISTILL_VIEWS),
    ("train", "data.synthetic"): Pending(TRAIN_RUN),
    ("train", "data.mix.mode"): Pending(TRAIN_RUN),
    ("train", "data.mix.ratio"): Pending(TRAIN_RUN),
    ("train", "data.mix.p"): Pending(TRAIN_RUN),
    ("train", "data.mix.class_balanced"): Pending(TRAIN_RUN),
    ("train", "data.mix.epoch_size"): Pending(TRAIN_RUN),
    ("train", "data.batch_size"): Pending(TRAIN_RUN),
    ("train", "data.eval_batch_size"): Pending(TRAIN_RUN + " (inference batch size: changes speed, not results)"),
    ("train", "data.num_workers"): Pending(TRAIN_RUN + " (DataLoader workers: changes speed, not results)"),
    ("train", "data.repeat"): Pending(TRAIN_RUN),
    # -- the model ------------------------------------------------------------------------------------------------
    ("train", "model.name"): Changes("resnet14t", model, ("model.name=resnet10t",)),
    ("train", "model.in_chans"): Changes(1, model, ("model.name=resnet10t",)),
    ("train", "model.img_size"): Changes(16, model, ("model.patch_size=4", "model.kwargs={depth: 1}")),
    ("train", "model.patch_size"): Changes(8, model, ("model.kwargs={depth: 1}",)),
    ("train", "model.drop_rate"): Changes(0.5, model, ("model.name=resnet10t",)),
    ("train", "model.drop_path_rate"): Changes(0.5, model, ("model.patch_size=4", "model.kwargs={depth: 1}")),
    ("train", "model.pretrained"): Pending("needs timm's hub weights (no network here)"),
    ("train", "model.checkpoint"): Pending(TRAIN_RUN + " (a run folder to start from)"),
    ("train", "model.kwargs"): Changes({"depth": 2}, model, ("model.patch_size=4", "model.kwargs={depth: 1}")),
    ("train", "model.attention"): Changes("kdeformer", model, ("model.patch_size=4", "model.kwargs={depth: 1}")),
    ("train", "model.kdeformer"): Changes({"min_tokens": 4, "num_samples": 2, "block_size": 4}, model,
                                          ("model.patch_size=4", "model.kwargs={depth: 1}",
                                           "model.attention=kdeformer")),
    # -- optimiser ---------------------------------------------------------------------------------------------
    ("train", "optim.epochs"): Changes(2, optimiser, ("optim.epochs=3",)),
    ("train", "optim.lr"): Changes(0.01, optimiser, ("optim.epochs=3",)),
    ("train", "optim.weight_decay"): Changes(0.5, optimiser, ("optim.epochs=3",)),
    ("train", "optim.betas"): Changes([0.8, 0.99], optimiser, ("optim.epochs=3",)),
    ("train", "optim.warmup_epochs"): Changes(0.0, optimiser, ("optim.epochs=3",)),
    ("train", "optim.min_lr_ratio"): Changes(0.5, optimiser, ("optim.epochs=3",)),
    ("train", "optim.label_smoothing"): Pending(TRAIN_RUN + " (a loss term)"),
    ("train", "optim.grad_clip"): Pending(TRAIN_RUN),
    # -- batch mix (distill) ------------------------------------------------------------------------------------
    ("distill", "batch_mix.mixup_alpha"): Changes(0.5, batch_mix, ("batch_mix.mixup_alpha=1.0",)),
    ("distill", "batch_mix.cutmix_alpha"): Changes(1.0, batch_mix),
    ("distill", "batch_mix.prob"): Changes(0.3, batch_mix, ("batch_mix.mixup_alpha=1.0",)),
    ("distill", "batch_mix.switch_prob"): Changes(0.9, batch_mix, ("batch_mix.mixup_alpha=1.0",
                                                                   "batch_mix.cutmix_alpha=1.0")),
    # -- generation (a tiny random SD; one image per value) -------------------------------------------------------
    ("augment", "generate.model"): Changes("SHIPPED", generation, TINY),
    ("augment", "generate.strength"): Changes(0.9, generation, TINY),
    ("augment", "generate.guidance_scale"): Changes(1.0, generation, TINY),
    ("augment", "generate.steps"): Changes(6, generation, TINY),
    ("augment", "generate.scheduler"): Changes("EulerDiscreteScheduler", generation, TINY),
    ("augment", "generate.resolution"): Changes(16, generation, TINY),
    ("augment", "generate.resize"): Changes("center-crop", generation, TINY),
    ("augment", "generate.seed"): Changes(1, generation, TINY),
    ("augment", "generate.dtype"): Changes("bfloat16", generation, TINY),
    ("augment", "generate.precision"): Changes("bf16", generation, (*TINY, "generate.precision=fp32")),
    ("augment", "generate.channels_last"): Changes(True, generation, TINY),
    ("augment", "generate.compile"): Changes(True, generation, TINY),
    ("augment", "generate.cache_interval"): Changes(2, generation, TINY),
    ("augment", "generate.attention"): Changes("kdeformer", generation, TINY),
    ("augment", "generate.kdeformer"): Changes({"min_tokens": 4, "num_samples": 4, "block_size": 4}, generation,
                                               (*TINY, "generate.attention=kdeformer")),
    ("augment", "generate.batch_size"): Changes(4, batches),
    # -- refused where they mean nothing -----------------------------------------------------------------------
    ("augment", "engine"): Refused("dask", (), "engine must be one of"),
    ("augment", "shard"): Refused("3/2", (), "shard"),
    ("synth", "engine"): Refused("dask", (), "engine must be one of"),
    ("synth", "shard"): Refused("0/2", (), "shard"),
    ("augment", "source.kind"): Changes("hf", augment_source, ("source.kind=folder", "source.path=HF")),
    ("train", "model.num_classes"): Refused(7, ("model.name=resnet10t",), "model.num_classes is 7 but the data has 10",
                                            model),
    ("augment", "chunk"): Refused(0, (), "chunk must be positive"),
    ("augment", "guide.teacher"): Refused("runs/teacher", (), "guide.scale and guide.student_scale are 0"),
    ("augment", "guide.student"): Refused("runs/student", GUIDED, "student_scale is 0"),
    ("augment", "guide.scale"): Changes(2.0, guidance_terms, GUIDED),
    ("augment", "guide.student_scale"): Changes(2.0, guidance_terms, STUDENT),
    ("augment", "guide.steps"): Changes([0.5, 1.0], guidance_terms, GUIDED),
    ("augment", "guide.every"): Changes(3, guidance_terms, GUIDED),
    ("augment", "variants.strengths"): Changes([0.3, 0.6], variant_plan),
    ("augment", "variants.guidance_scales"): Changes([1.0, 2.0], variant_plan),
    ("augment", "variants.interclass"): Changes("all", variant_plan),
    ("augment", "variants.interclass_strengths"): Changes([0.4], variant_plan, INTERCLASS),
    ("augment", "variants.interclass_per_source"): Changes(2, variant_plan, INTERCLASS),
    ("augment", "variants.soft_gamma"): Changes(0.5, variant_plan, INTERCLASS),
}

_PENDING_SECTIONS = {  # whole sections whose probes need a model run, not written in this pass
    "generate.": GEN + " (lora, tiny_vae: tests/test_few_step.py, tests/test_models.py)", "caption.": "probe needs a captioner run (EfficientNet / BLIP); not written in this pass",
    "filter.": "probe needs a filter model; not written in this pass",
    "ray.": "read only with engine: ray (tests/test_scale_ray*.py); probe not written in this pass",
    "run.": TRAIN_RUN, "teachers[0].": TRAIN_RUN, "loss.": TRAIN_RUN + " (loss terms)", "store.": TRAIN_RUN,
    "student.": "the same ModelSection as train's model.* (probed there)",
    "data.val.": "the validation split (issue 26 finding 7, another helper's work in progress); probe not written",
}
_PENDING_KEYS = {"output": "the output folder: where, not what (tests/test_augment_run.py)",
                 "progress": "a progress bar: display only", "classes": "synth's class list; probe not written",
                 "logits": TRAIN_RUN}


def entry_for(verb: str, key: str) -> Any:
    """The entry of ``key`` in ``verb``: its own, else the section rule, else None."""
    if (verb, key) in ENTRIES:
        return ENTRIES[verb, key]
    if verb == "demo":
        return Pending("sip demo's keys build the other verbs' recipes (sip/demo.py); probe not written in this pass")
    for prefix, reason in _PENDING_SECTIONS.items():
        if key.startswith(prefix):
            return Pending(reason)
    if key in _PENDING_KEYS:
        return Pending(_PENDING_KEYS[key])
    return None


# --------------------------------------------------------------------------------------------------
# 4. the tests
# --------------------------------------------------------------------------------------------------

def test_every_recipe_field_has_an_entry():
    """A new recipe field without a probe, a refusal or a stated reason fails here."""
    missing = [f"{verb}: {key} ({name})" for verb, cls in verbs().items()
               for key, name in recipe_fields(cls).items()
               if entry_for(verb, key) is None and name not in {n for v, c in verbs().items()
                                                                for k, n in recipe_fields(c).items()
                                                                if (v, k) in ENTRIES}]
    assert not missing, "recipe fields with no entry in tests/test_no_dead_keys.py ENTRIES: " + ", ".join(missing)
    stale = [f"{verb}: {key}" for verb, key in ENTRIES if key not in recipe_fields(verbs()[verb])]
    assert not stale, f"entries for keys that no longer exist: {stale}"


def _params():
    """Every entry, and one xfail per field left pending by a section rule (so each gap shows in the report)."""
    entries = dict(ENTRIES)
    seen = {name for verb, cls in verbs().items() for key, name in recipe_fields(cls).items() if (verb, key) in ENTRIES}
    for verb, cls in verbs().items():
        for key, name in recipe_fields(cls).items():
            if name not in seen and isinstance(entry := entry_for(verb, key), Pending):
                entries[verb, key] = entry
                seen.add(name)
    out = []
    for (verb, key), entry in sorted(entries.items(), key=lambda kv: kv[0]):
        marks = [pytest.mark.xfail(reason=entry.reason, run=False)] if isinstance(entry, Pending) else []
        out.append(pytest.param(verb, key, entry, id=f"{verb}:{key}", marks=marks))
    return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_sd_dir):
    """A small image folder (two of them) and a saved HF dataset with other column names."""
    import datasets

    root = tmp_path_factory.mktemp("dead-keys")
    rng = np.random.default_rng(0)
    for name in ("folder", "folder2"):
        for label in ("cat", "dog"):
            (root / name / label).mkdir(parents=True)
            for i in range(3 if name == "folder" else 2):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / label / f"{i}.png")
    images = [Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]),
                                 picture=datasets.Image(), y=datasets.ClassLabel(names=["x", "y", "z"]))
    for label in ("cat", "dog"):  # the HF folder also holds class folders: kind folder and kind hf read other items
        (root / "hf" / label).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "hf" / label / "0.png")
    datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 3, "picture": images[::-1], "y": [0, 1, 2] * 2},
                               features=features).save_to_disk(str(root / "hf"))
    from sip.models.diffusion import DEFAULT_SD_MODEL

    return {"FOLDER": str(root / "folder"), "FOLDER2": str(root / "folder2"), "HF": str(root / "hf"),
            "TINY_SD": str(tiny_sd_dir), "SHIPPED": DEFAULT_SD_MODEL}


_BASE: dict[tuple, Any] = {}


def _load(verb: str, overrides: list[str], paths: dict[str, str]):
    for name, value in paths.items():
        overrides = [o.replace(f"={name}", f"={value}") for o in overrides]
    if verb == "distill":
        overrides = ["teachers=[{name: resnet10t, pretrained: true}]", *overrides]
    return load_config(verbs()[verb], None, overrides)


@pytest.mark.parametrize("verb, key, entry", _params())
def test_a_key_changes_what_runs_or_is_refused(verb, key, entry, paths):
    from sip.config import to_dict

    value = paths.get(entry.value, entry.value) if isinstance(entry.value, str) else entry.value
    change = f"{key}={json.dumps(to_dict(value))}"
    if isinstance(entry, Refused):
        with pytest.raises(ValueError if entry.probe else ConfigError, match=entry.match):
            loaded = _load(verb, [*entry.base, change], paths)
            if entry.probe:
                entry.probe(loaded)
        return
    base_key = (verb, entry.probe, entry.base)  # entries sharing a base build it once
    if base_key not in _BASE:
        _BASE[base_key] = entry.probe(_load(verb, list(entry.base), paths))
    before = _BASE[base_key]
    after = entry.probe(_load(verb, [*entry.base, change], paths))
    assert before != after, f"{verb}: {key}={value!r} changed nothing the probe sees: a dead key"


def test_pending_entries_are_listed():
    """Every key left without a probe is named with its reason (so the gap is visible, not silent)."""
    pending = {f"{verb}: {key}": entry_for(verb, key).reason for verb, cls in verbs().items()
               for key in recipe_fields(cls) if isinstance(entry_for(verb, key), Pending)}
    assert all(reason for reason in pending.values())
