"""No dead keys (issue 26): every field of every verb's recipe changes what runs, or the loader refuses it.

``ENTRIES`` maps a verb and a dotted key to how that is shown (one entry, or a tuple of them): ``Changes(value,
probe)`` loads the recipe with and without ``key=value`` and compares what ``probe`` builds from each (the resolved
object the key feeds: a source's items, the prompts, the training transforms' output, the model, the batch mix, the
optimiser and its schedule, the captioner and its captions, the filter's verdicts, the loss and its named terms, the
teacher, the validation split, the demo's stage recipes — built without training or generating — or, for the run
section, the logits store and the distillation store, a real run of a few steps on four tiny images; for sip adapt,
a real 2-step run of the tiny SD; for sip scenes, the composed scenes; for detection, the scene sets, the built
detector, one KD step's terms or a real 1-epoch run; for sip rounds, the driver's plan of generations and students);
``Refused(value)`` expects a ConfigError naming the key; ``Pending(reason)`` is an xfail naming why (display only,
speed only, hub weights, or a key added by another change whose probe is still to write).
``test_every_recipe_field_has_an_entry`` fails when a field is added without an entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import typing
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from sip.config import ConfigError, load_config
from conftest import build_tiny_lora, build_tiny_taesd

# --------------------------------------------------------------------------------------------------
# 1. the verbs and their recipe fields
# --------------------------------------------------------------------------------------------------


def verbs() -> dict[str, type]:
    """Each verb's recipe (``detect``: sip train's ``task: detection`` recipe)."""
    from sip.adapt.recipe import AdaptRecipe
    from sip.augment.run import AugmentRecipe, SynthRecipe
    from sip.demo import DemoRecipe
    from sip.detect.coco import SceneRecipe
    from sip.detect.train import DetectRecipe
    from sip.distill.rounds import RoundsRecipe
    from sip.distill.run import DistillRecipe, LogitsRecipe
    from sip.train.recipe import TrainRecipe

    return {"augment": AugmentRecipe, "synth": SynthRecipe, "train": TrainRecipe, "distill": DistillRecipe,
            "logits": LogitsRecipe, "demo": DemoRecipe, "adapt": AdaptRecipe, "scenes": SceneRecipe,
            "detect": DetectRecipe, "rounds": RoundsRecipe}


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


def two_class_model(cfg) -> Any:
    """The built 2-class model's weights (what model.checkpoint loads into it)."""
    from sip.train.inputs import build_model

    torch.manual_seed(0)
    net, _ = build_model(cfg.model, 2, 32)
    return _digest(torch.cat([p.detach().flatten() for p in net.parameters()]))


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


def generation_plan(cfg) -> Any:
    """What generate.per_image / per_class feed: the variant plan of a source and the txt2img job grid."""
    from sip.augment.jobs import SynthRecipe, synth_grid

    syn = SynthRecipe(generate=cfg.generate, classes=["a", "b"])
    return variant_plan(cfg), [tuple(b) for b in synth_grid(["a", "b"], syn, None)]


def unet_batches(cfg) -> Any:
    """The batch sizes the UNet sees for two seeded img2img images, and the images (batch_invariant: one at a time)."""
    from sip.augment.generate import DiffusionGenerator

    gen = DiffusionGenerator.from_config(cfg.generate)
    sizes = []
    hook = gen.pipe.unet.register_forward_hook(lambda m, i, o: sizes.append(len(i[0])))
    sources = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)) for i in range(2)]
    try:
        images = gen.img2img(sources, ["a shirt", "a bag"], [1, 2])
    finally:
        hook.remove()
    return sizes, [_digest(im) for im in images]


def latent_mixes(cfg) -> Any:
    """sip synth's txt2img grid and each mixed image's draw (partner, seed, share, latent box: latent_mix.*)."""
    from sip.augment.jobs import synth_grid
    from sip.augment.latent_mix import draw_mix

    draws = [draw_mix(cfg.latent_mix, ["a", "b", "c"], "a", k, cfg.generate.seed, (8, 8))
             for k in range(cfg.latent_mix.count)]
    return [tuple(b) for b in synth_grid(["a", "b", "c"], cfg, None)], draws


def demo(cfg) -> Any:
    """Every stage's recipe the demo builds from its keys (sip.demo.demo_recipes: nothing runs)."""
    from sip.config import to_dict
    from sip.demo import demo_recipes

    return {name: to_dict(r) for name, r in demo_recipes(cfg, "OUT", progress=False).items()}


def output_folder(cfg) -> Any:
    """The checked output folder and the classes a run writes (sip.augment.jobs.prepare_*: no model is loaded)."""
    from sip.augment.jobs import SynthRecipe, prepare_augment, prepare_synth

    if isinstance(cfg, SynthRecipe):
        return prepare_synth(cfg)
    source, out = prepare_augment(cfg)
    return str(out), source.classes


_CAPTIONERS: dict[Any, Any] = {}


def captions(cfg) -> Any:
    """Captions of three fixed images through caption_images: the captioner's identity and dtype, the captions
    (a prefilled caption.cache answers from the file), and the batch sizes the captioner was called with."""
    from sip.augment.caption import CaptionCache, build_captioner, caption_images

    if cfg.caption not in _CAPTIONERS:  # one build per distinct config (EfficientNet-Lite0 loads in ~1 s)
        _CAPTIONERS[cfg.caption] = build_captioner(cfg.caption)
    captioner, calls = _CAPTIONERS[cfg.caption], []

    def counted(images):
        calls.append(len(images))
        return captioner(images)

    counted.identity = captioner.identity
    model = getattr(captioner, "model", None)
    out = caption_images(CAPTION_IMAGES, counted, CaptionCache(cfg.caption.cache), cfg.caption.batch_size)
    return captioner.identity, type(captioner).__name__, model and str(next(model.parameters()).dtype), out, calls


CAPTION_IMAGES = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8))
                  for i in range(3)]


class _PlugIn:
    """A registered plug-in captioner / filter (the registries' user path): says what it was built from."""

    identity = "dead-keys-plug-in"

    def __init__(self, config):
        self.config = config

    def __call__(self, images, labels=None, prompts=None):
        if labels is None:
            return [f"a {im.width} px picture" for im in images]
        return [(True, {"plug_in": self.config.threshold}) for _ in images]


def _register_plug_ins() -> None:
    from sip.augment.caption import CAPTIONERS
    from sip.augment.filter import FILTERS

    CAPTIONERS.register("dead-keys-test", _PlugIn, overwrite=True)
    FILTERS.register("dead-keys-test", _PlugIn, overwrite=True)


def image_filter(cfg) -> Any:
    """The built filter on four fixed images (keep flags and scores) and the batch sizes its classifier saw."""
    from sip.augment.filter import build_filter

    f = build_filter(cfg.filter)
    if f is None:
        return None
    sizes = []
    hook = f.model.register_forward_hook(lambda m, i, o: sizes.append(len(i[0]))) if hasattr(f, "model") else None
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(4)]
    out = f(images, ["cat", "dog", "cat", "dog"], ["p"] * 4)
    if hook is not None:
        hook.remove()
    return type(f).__name__, [(keep, json.dumps(scores, sort_keys=True)) for keep, scores in out], sizes


def val_split(cfg) -> Any:
    """The training and validation images' ids (sip.train.inputs.open_splits)."""
    from sip.train.inputs import open_splits

    real, held = open_splits(cfg.data)
    return list(real.source_ids()), held and list(held.source_ids())


def train_images(cfg) -> Any:
    """Two epochs of the training images (real and synthetic, mixed per data.mix): their ids, in order."""
    from sip.train.inputs import build_train_images, class_names

    images = build_train_images(cfg.data, class_names(cfg.data), cfg.run.seed)
    epochs = []
    for epoch in range(2):
        images.set_epoch(epoch)
        epochs.append([images.sample_id(i) for i in range(len(images))])
    return epochs


def eval_loaders(cfg) -> Any:
    """The evaluation DataLoader the loop builds (sip.train.evaluate.HeldOut): its batching and workers."""
    from sip.train.evaluate import HeldOut

    from sip.train.loop import make_accelerator

    held = HeldOut([0] * 4, [0] * 4, None, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                   max_samples=cfg.run.eval_max_samples, accelerator=make_accelerator(cfg.run, cfg.data.img_size))
    loader = held._loader([0] * 4)
    return loader.batch_size, loader.num_workers


def _tiny_config() -> dict[str, Any]:
    return {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
            "crop_pct": 1.0}


class _Heads(torch.nn.Module):
    """A tiny seeded classifier over 8x8 images; ``heads`` > 1 returns (cls, dist_1, ...) as distilled ViTs do."""

    def __init__(self, seed: int, heads: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.fc, self.heads = torch.nn.Linear(3 * 8 * 8, 4), heads

    def forward(self, x):
        z = self.fc(x.flatten(1))
        return z if self.heads == 1 else tuple(z * (k + 1) for k in range(self.heads))


def distill_terms(cfg) -> Any:
    """One DistillStep on a fixed batch with a tiny online teacher: the loss module and its named terms."""
    from sip.distill.run import build_loss
    from sip.distill.step import DistillStep, TeacherInputs

    loss_fn = build_loss(cfg.loss)
    heads = 2 if cfg.loss.name in ("multi_token", "deit_soft", "deit_hard") else 1
    teachers = TeacherInputs([_Heads(1)], [0], [_tiny_config()], [None])
    step = DistillStep(loss_fn, input_config=_tiny_config(), student_tail=None, data=cfg.data, teachers=teachers,
                       mix=cfg.batch_mix, use_labels=cfg.loss.use_labels, num_classes=4, seed=cfg.run.seed)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    terms, _, labels = step(_Heads(0, heads), {"image": x, "label": torch.tensor([0, 1, 2, 3]),
                                               "teacher_image_0": x}, 0, 0)
    return repr(loss_fn), {k: round(float(v.detach()), 6) for k, v in terms.items()}, labels is None


def distill_views(cfg) -> Any:
    """The student's view of one seeded image as sip distill draws it (DistillStep.make_item), six draws."""
    from sip.distill.logits import input_transform
    from sip.distill.step import DistillStep
    from sip.train.inputs import resolve_input_config
    from sip.train.views import seed_item_rngs

    net, _ = _tiny_model(cfg.data)
    input_config = resolve_input_config(net, cfg.data)
    step = DistillStep(torch.nn.Identity(), input_config=input_config, student_tail=input_transform(input_config),
                       data=cfg.data, num_classes=10, seed=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    outs = []
    for seed in range(6):
        seed_item_rngs(seed)
        outs.append(_digest(step.make_item([(image, 0)], 0, random.Random(seed))["image"]))
    return outs


def teacher(cfg) -> Any:
    """The built teacher (sip.distill.teachers.build_teacher): identity, input config, logits on a fixed batch."""
    from sip.distill.teachers import build_teacher

    t = build_teacher(cfg.teachers[0], cfg.data)
    size = list(t.input_config["input_size"])[-2:]
    out = t.model(torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)))
    return {k: v for k, v in t.identity.items() if k != "source"}, repr(t.input_config), _digest(out), t.weight


def trained(cfg) -> Any:
    """A real sip train run on 4 tiny images (2 epochs of 2 steps, test_resnet at 32 px, ~1 s): the final weights,
    the per-epoch validation rows, the final metrics, the checkpoint saves and the torch threads it ran with."""
    import tempfile

    import sip.train.loop as loop
    from safetensors.torch import load_file

    from sip.train.run import run_training

    saves, save, threads = [], loop.save_checkpoint, torch.get_num_threads()

    def counted(*args, **kwargs):
        saves.append(int(args[4].get("global_step", 0)))
        return save(*args, **kwargs)

    loop.save_checkpoint = counted
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            metrics = run_training(cfg, run_dir)
            used = torch.get_num_threads()
            weights = load_file(f"{run_dir}/model.safetensors")
            rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    finally:
        loop.save_checkpoint = save
        torch.set_num_threads(threads)
    keep = ("top1", "loss", "samples", "steps", "epoch", "lr")
    return (_digest(torch.cat([v.flatten().float() for v in weights.values()])),
            [{k: v for k, v in r.items() if any(w in k for w in keep)} for r in rows],
            {k: v for k, v in metrics.items() if any(w in k for w in keep)}, saves, used)


def distilled(cfg) -> Any:
    """A real sip distill run on the tiny folders (1 epoch, test_resnet at 32 px): the student's final weights and
    what the run reports it learnt from."""
    import tempfile

    from safetensors.torch import load_file

    from sip.distill.run import run_distillation

    with tempfile.TemporaryDirectory() as run_dir:
        metrics = run_distillation(cfg, run_dir)
        weights = load_file(f"{run_dir}/model.safetensors")
    return (_digest(torch.cat([v.flatten().float() for v in weights.values()])), bool(metrics["logits"]),
            metrics.get("store_views"))


def selection(cfg) -> Any:
    """A real sip distill run's per-epoch selections (sip.distill.select): each RUN/selection/epoch-<e>.json."""
    import tempfile

    from sip.distill.run import run_distillation

    with tempfile.TemporaryDirectory() as run_dir:
        run_distillation(cfg, run_dir)
        return {p.name: json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("selection/*.json"))}


def resumes(cfg) -> Any:
    """Whether a run folder holding a checkpoint is continued (sip.train.run_dir.prepare_run_dir)."""
    import tempfile

    from sip.train.run_dir import prepare_run_dir

    with tempfile.TemporaryDirectory() as run_dir:
        (Path(run_dir) / "checkpoint").mkdir()
        (Path(run_dir) / "checkpoint" / "state.pt").write_bytes(b"")
        return prepare_run_dir(cfg, run_dir)[1]


def store(cfg) -> Any:
    """A real sip logits store of the tiny teacher over 4 images: its manifest, shards and stored logits."""
    import tempfile

    from sip.distill.logits import TeacherLogitsStore
    from sip.distill.run import run_logits

    with tempfile.TemporaryDirectory() as out:
        run_logits(cfg, out)
        st = TeacherLogitsStore(out)
        return (st.manifest["dtype"], str(st.logits.dtype), len(st.manifest["shards"]), st.ids,
                st.views.tolist(), _digest(st.logits))


def adapted(cfg) -> Any:
    """A real sip adapt run of the tiny SD on the tiny folder (2 steps, a fresh folder): the checkpoint's tensor
    shapes and digest, the losses, each class's prompt word and token, the files written (the validation grids'
    pixels) and the steps that saved a checkpoint."""
    import tempfile

    import sip.adapt.run as adapt_run
    import sip.adapt.steps as adapt_steps
    from sip.adapt.loop import CHECKPOINT_FILE, load_checkpoint

    saves, save = [], adapt_steps.save_checkpoint

    def counted(path, state, optimizer, step, info):
        saves.append(step)
        return save(path, state, optimizer, step, info)

    adapt_steps.save_checkpoint = counted
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "adapt"
            adapt_run.run_adapt(dataclasses.replace(cfg, output=str(out)))
            state, _, _, info = load_checkpoint(out / CHECKPOINT_FILE)
            run = json.loads((out / "run.json").read_text())
            files = {p.relative_to(out).as_posix(): _digest(Image.open(p)) if p.suffix == ".png" else None
                     for p in sorted(out.rglob("*")) if p.is_file()}
    finally:
        adapt_steps.save_checkpoint = save
    return ({k: tuple(v.shape) for k, v in state.items()}, _digest(torch.cat([v.flatten().float() for v in state.values()])),
            info["losses"], run["names"], run["tokens"], run["template"], files, saves)


def adapt_written(cfg) -> Any:
    """Where a real sip adapt run writes (the run's own output folder) and what it writes there."""
    from sip.adapt.run import run_adapt

    result = run_adapt(cfg)
    return result["output"], sorted(p.name for p in Path(cfg.output).iterdir())


def adapt_files(cfg) -> Any:
    """The files a real sip adapt run writes into a fresh folder (relative paths)."""
    import tempfile

    from sip.adapt.run import run_adapt

    with tempfile.TemporaryDirectory() as tmp:
        run_adapt(dataclasses.replace(cfg, output=str(Path(tmp) / "adapt")))
        return sorted(p.relative_to(Path(tmp) / "adapt").as_posix() for p in (Path(tmp) / "adapt").rglob("*"))


def adapter_prompts(cfg) -> Any:
    """The prompts sip augment / synth build with the generator's adapter (sip.augment.jobs.prompt_builder) and the
    loaded pipeline's vocabulary (a textual-inversion adapter adds each class's token to both)."""
    from sip.augment.generate import DiffusionGenerator
    from sip.augment.jobs import prompt_builder

    gen = DiffusionGenerator.from_config(cfg.generate)
    build = prompt_builder(cfg.prompt, gen)
    return [build(label, "a small thing", 0) for label in ("cat", "dog")], len(gen.pipe.tokenizer)


def scenes(cfg) -> Any:
    """The object pool's classes and four composed scenes (records and pixels): sip.detect.scenes."""
    from sip.detect.scenes import compose_scene, load_object_pool

    pool = load_object_pool(cfg.objects)
    out = [compose_scene(pool, cfg.scenes, i) for i in range(4)]
    return pool.classes, [(record, _digest(image)) for image, record in out]


def scene_run(cfg) -> Any:
    """A real sip scenes run into a fresh folder named as ``output`` is: the COCO file's place, the counts, the
    statistics (``output: null`` is refused by the run)."""
    import tempfile

    from sip.detect.coco import run_scenes

    if cfg.output is None:
        return run_scenes(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_scenes(dataclasses.replace(cfg, output=str(Path(tmp) / Path(cfg.output).name)))
        return Path(result["annotations"]).relative_to(tmp).as_posix(), result["written"], result["stats"]


def scene_sets(cfg) -> Any:
    """The checked train / validation / test scene sets of a detection recipe (sip.detect.train._scene_sets)."""
    from sip.detect.train import _scene_sets

    return [s and (s.classes, len(s), s.size, _digest(s.item(0)["image"]), _digest(s.item(0)["boxes"]))
            for s in _scene_sets(cfg.data)]


def scene_items(cfg) -> Any:
    """Six seeded draws of a training scene's boxes as the loop's items take them (scene_item_maker)."""
    from sip.detect.data import SceneImages, scene_item_maker

    train, make = SceneImages(cfg.data.train), scene_item_maker(cfg.data.hflip)
    return [_digest(make(train, i % len(train), random.Random(i))["boxes"]) for i in range(6)]


def detector(cfg) -> Any:
    """The built detector (seeded): class, module types, parameter shapes and weights, and its detections on a
    fixed 64 px scene in eval mode (count and scores)."""
    from sip.detect.models import build_detector

    torch.manual_seed(0)
    net = build_detector(cfg.detector, 2, 64).eval()
    with torch.no_grad():
        out = net([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))])[0]
    return (type(net).__name__, sorted({type(m).__name__ for m in net.modules()}),
            [tuple(p.shape) for p in net.parameters()], _digest(torch.cat([p.flatten() for p in net.parameters()])),
            len(out["boxes"]), _digest(out["scores"]))


def detection_terms(cfg) -> Any:
    """One detection step (sip.detect.step.make_detection_step) of a seeded student on two training scenes, with
    the recipe's teacher: the named loss terms."""
    from sip.detect.data import SceneImages, collate_scenes
    from sip.detect.models import build_detector, load_detector
    from sip.detect.step import make_detection_step

    train = SceneImages(cfg.data.train)
    torch.manual_seed(0)
    student = build_detector(cfg.detector, len(train.classes), train.size).train()
    teacher = load_detector(cfg.kd.teacher)[0] if cfg.kd.teacher else None
    box_low = 0.0 if cfg.detector.head == "fcos" else -cfg.kd.box_max
    step = make_detection_step(cfg.kd, teacher, "cpu", train.size, box_low)
    terms, _, _ = step(student, collate_scenes([train.item(0), train.item(1)]), 0, 0)
    return {k: round(float(v.detach()), 6) for k, v in terms.items()}


def detected(cfg) -> Any:
    """A real sip train (task: detection) run on the tiny scenes (1 epoch): the final weights, the training
    DataLoader's batching and workers, the evaluation batches and the final metrics."""
    import tempfile

    import sip.detect.evaluate as evaluate
    from safetensors.torch import load_file

    from sip.detect.train import run_detection

    loaders, eval_batches, threads = [], [], torch.get_num_threads()
    real_loader, real_collate = torch.utils.data.DataLoader, evaluate.collate_scenes

    class Recorded(real_loader):
        def __init__(self, dataset, *args, **kwargs):
            loaders.append((len(dataset), kwargs.get("batch_size"), kwargs.get("num_workers"), kwargs.get("drop_last")))
            super().__init__(dataset, *args, **kwargs)

    def collate(items):
        eval_batches.append(len(items))
        return real_collate(items)

    torch.utils.data.DataLoader, evaluate.collate_scenes = Recorded, collate
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            metrics = run_detection(cfg, run_dir)
            weights = load_file(f"{run_dir}/model.safetensors")
    finally:
        torch.utils.data.DataLoader, evaluate.collate_scenes = real_loader, real_collate
        torch.set_num_threads(threads)
    return (_digest(torch.cat([v.flatten().float() for v in weights.values()])), loaders, eval_batches,
            {k: v for k, v in metrics.items() if "map" in k})


def round_plan(cfg) -> Any:
    """sip rounds' real driver (sip.distill.rounds.run_rounds) with its stages recorded instead of run: each
    generation (folder, classes, per class, seed, guide) and each student (folder, warm start, data), the teacher-
    student KL fixed (dog above cat). The stages themselves run in tests/test_rounds.py."""
    import tempfile

    import sip.augment.run as augment_run
    from sip.distill import rounds as rounds_module

    calls: list[tuple] = []

    with tempfile.TemporaryDirectory() as tmp:
        def rel(p):
            return p and Path(p).relative_to(tmp).as_posix()

        def synth(c, generator=None):
            g = c.guide
            calls.append(("synth", rel(c.output), list(c.classes), c.generate.per_class, c.generate.seed, g.scale,
                          g.student_scale, list(g.steps), g.every, g.teacher, rel(g.student)))

        def distill(c, run_dir):
            synthetic = c.data.synthetic
            calls.append(("distill", rel(run_dir), rel(c.student.checkpoint),
                          synthetic and [rel(s) for s in ([synthetic] if isinstance(synthetic, str) else synthetic)]))
            return {}

        class Classifier:
            @staticmethod
            def from_checkpoint(path, device="cpu"):
                return path

        saved = (augment_run.run_synth, rounds_module.run_distillation, rounds_module.GuideClassifier,
                 rounds_module.class_disagreement)
        augment_run.run_synth, rounds_module.run_distillation = synth, distill
        rounds_module.GuideClassifier = Classifier
        rounds_module.class_disagreement = lambda teacher, student, pool, batch_size=64: {"cat": 0.1, "dog": 0.2}
        try:
            summary = rounds_module.run_rounds(cfg, tmp, generator=object())
        finally:
            (augment_run.run_synth, rounds_module.run_distillation, rounds_module.GuideClassifier,
             rounds_module.class_disagreement) = saved
    return calls, [r["classes"] for r in summary["rounds"]]


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
IMAGES = ("data.real.kind=folder", "data.real.path=FOLDER", "data.eval.kind=folder", "data.eval.path=FOLDER2",
          "data.val.size=2")  # sip train's images from two small folders: 4 train, 2 validation, 4 test
TINY_RUN = (*IMAGES, "data.img_size=32", "data.batch_size=2", "model.name=test_resnet", "optim.epochs=2",
            "run.device=cpu", "run.precision=fp32", "run.progress=false", "run.threads=1")
TEACHER = ("teachers=[{checkpoint: CLS}]",)
STORE = ("data.real.kind=folder", "data.real.path=FOLDER", "data.eval.kind=folder", "data.eval.path=FOLDER2",
         "data.val=null", "data.img_size=32", *TEACHER, "store.views=2", "run.device=cpu", "run.precision=fp32",
         "run.progress=false")
DISTILL_RUN = ("data.real.kind=folder", "data.real.path=FOLDER", "data.eval.kind=folder", "data.eval.path=FOLDER2",
               "data.val=null", "data.img_size=32", "data.batch_size=2", *TEACHER, "student.name=test_resnet",
               "student.patch_size=null", "student.kwargs={}", "optim.epochs=1", "run.device=cpu", "run.precision=fp32",
               "run.progress=false", "run.threads=1")
# two epochs on the tiny folders + SYN, the second drawing its synthetic items from the pool's most-disputed half
SELECTING = (*DISTILL_RUN, "data.synthetic=SYN", "data.mix.mode=ratio", "data.mix.epoch_size=8", "optim.epochs=2",
             "select.keep=0.5")
CAPTION_T = ("caption.kind=transformers", "caption.model=BLIP", "caption.max_new_tokens=4")
FILTER_CLS = ("filter.kind=classifier", "filter.model=CLS")
OUTPUT = ("output=OUT",)
HF = ("source.kind=hf", "source.path=HF")
TINY = ("generate.model=TINY_SD", "generate.device=cpu", "generate.steps=4")
SMALL = ("source.shots=2",)

ADAPT = ("model=TINY_SD", "source.kind=folder", "source.path=FOLDER", "steps=2", "batch_size=2", "lr=0.01",
         "checkpoint_every=2", "validation.every=0", "progress=false")  # 2 steps of the tiny SD on 6 shots
ADAPT_TI = (*ADAPT, "method=textual_inversion")
ADAPT_FT = (*ADAPT, "method=finetune")
ADAPT_FT_TEXT = (*ADAPT_FT, "finetune.text_encoder=true")
ADAPT_VAL = (*ADAPT, "validation.every=2", "validation.per_class=1", "validation.steps=2")
ADAPT_PRIOR = (*ADAPT, "prior.prompts=[a photo of a cat]", "prior.per_prompt=1", "prior.steps=2")
SCENE = ("objects.kind=folder", "objects.path=FOLDER", "objects.stop=null", "scenes.count=2", "scenes.size=64",
         "scenes.object_size=[12, 30]", "scenes.max_objects=4")  # scenes of the tiny folder's cat / dog crops
DETECTOR = ("detector.backbone=test_resnet", "detector.fpn_channels=32", "detector.head_convs=1")
DETECT_DATA = ("data.train=SCENES_A", "data.test=SCENES_B")
DETECT_RUN = (*DETECT_DATA, *DETECTOR, "data.batch_size=2", "data.eval_batch_size=2", "optim.epochs=1",
              "run.device=cpu", "run.precision=fp32", "run.progress=false", "run.threads=1")
KD = (*DETECT_DATA, *DETECTOR, "kd.teacher=DETECTOR")
VIT_DETECTOR = ("detector.backbone=sip_vit_spt_lsa_tiny", "detector.patch_size=8", "detector.fpn_channels=32",
                "detector.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "detector.head_convs=1")
ROUNDS = ("distill.teachers=[{checkpoint: CLS}]", "distill.data.real.kind=folder", "distill.data.real.path=FOLDER",
          "distill.data.eval.kind=folder", "distill.data.eval.path=FOLDER2", "rounds.rounds=1", "rounds.top_classes=1", "rounds.per_class=2",
          "rounds.pool_per_class=1")


def _peft_takes_text_encoder() -> bool:
    """Whether the installed peft adapts transformers 5's text encoder (0.22+; older: sip adapt refuses it)."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("peft")) >= Version("0.22")


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
    ("distill", "data.re_prob"): Changes(1.0, distill_views),
    ("distill", "data.color_jitter"): Changes(0.4, distill_views),
    ("distill", "data.auto_augment"): Changes("rand-m9-mstd0.5", distill_views),
    ("train", "data.synthetic"): Changes("SYN", train_images, IMAGES),
    ("train", "data.mix.mode"): (Changes("swap", train_images, (*IMAGES, "data.synthetic=SYN")),
                                 Refused("ratio", IMAGES, "needs both real and synthetic", train_images)),
    ("train", "data.mix.ratio"): (Changes(0.2, train_images, (*IMAGES, "data.synthetic=SYN", "data.mix.mode=ratio")),
                                  Refused(0.2, (), "read by mode 'ratio' only")),
    ("train", "data.mix.p"): (Changes(1.0, train_images, (*IMAGES, "data.synthetic=SYN", "data.mix.mode=swap")),
                              Refused(0.2, (), "read by mode 'swap' only")),
    ("train", "data.mix.class_balanced"): Changes(True, train_images, (*IMAGES, "data.synthetic=SYN")),
    ("train", "data.mix.epoch_size"): Changes(5, train_images, (*IMAGES, "data.synthetic=SYN")),
    ("train", "data.batch_size"): Changes(4, trained, TINY_RUN),
    ("train", "data.eval_batch_size"): Changes(3, eval_loaders),
    ("train", "data.num_workers"): Changes(1, eval_loaders),
    ("train", "data.repeat"): Changes(2, trained, TINY_RUN),
    ("train", "data.val.size"): Changes(3, val_split, IMAGES),
    ("train", "data.val.seed"): Changes(1, val_split, IMAGES),
    # -- the model ------------------------------------------------------------------------------------------------
    ("train", "model.name"): (Changes("resnet14t", model, ("model.name=resnet10t",)),
                              Refused("resnet99", (), "model.name: name must be a timm or sip model")),
    ("train", "model.in_chans"): Changes(1, model, ("model.name=resnet10t",)),
    ("train", "model.img_size"): Changes(16, model, ("model.patch_size=4", "model.kwargs={depth: 1}")),
    ("train", "model.patch_size"): Changes(8, model, ("model.kwargs={depth: 1}",)),
    ("train", "model.drop_rate"): Changes(0.5, model, ("model.name=resnet10t",)),
    ("train", "model.drop_path_rate"): Changes(0.5, model, ("model.patch_size=4", "model.kwargs={depth: 1}")),
    ("train", "model.pretrained"): Pending("needs timm's hub weights (no network here)"),
    ("train", "model.checkpoint"): Changes("CLS", two_class_model, ("model.name=test_resnet",)),
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
    ("train", "optim.label_smoothing"): Changes(0.3, trained, TINY_RUN),
    ("train", "optim.grad_clip"): Changes(0.001, trained, TINY_RUN),
    # -- the run section (a real tiny sip train run per value) -------------------------------------------------
    ("train", "run.seed"): Changes(1, trained, TINY_RUN),
    ("train", "run.device"): Refused("bogus", (), "run.device must be auto, cpu, cuda"),
    ("train", "run.precision"): Changes("bf16", trained, TINY_RUN),
    ("train", "run.eval_every"): Changes(2, trained, TINY_RUN),
    ("train", "run.eval_max_samples"): Changes(1, trained, TINY_RUN),
    ("train", "run.checkpoint_every_steps"): Changes(1, trained, TINY_RUN),
    ("train", "run.resume"): Changes(False, resumes),
    ("train", "run.threads"): Changes(2, trained, TINY_RUN),
    ("train", "run.progress"): Pending("a tqdm progress bar: display only (what runs is the same; the bar's "
                                       "disable flag is all it sets)"),
    # -- distillation: the loss, the teachers, the store ---------------------------------------------------------
    ("distill", "loss.name"): Changes("ce", distill_terms),
    ("distill", "loss.temperature"): Changes(2.0, distill_terms),
    ("distill", "loss.alpha"): Changes(0.9, distill_terms),
    ("distill", "loss.mode"): Changes("soft", distill_terms, ("loss.name=multi_token",)),
    ("distill", "loss.label_smoothing"): Changes(0.2, distill_terms),
    ("distill", "loss.use_labels"): Changes(False, distill_terms, ("loss.alpha=1.0",)),
    ("distill", "student.name"): Refused("vit_bogus", (), "student.name: name must be a timm or sip model"),
    ("distill", "teachers[0].checkpoint"): Changes("CLS2", teacher, TEACHER),
    ("distill", "teachers[0].kwargs"): Changes({"act_layer": "gelu"}, teacher, TEACHER),
    ("distill", "teachers[0].name"): Refused("resnet99", (), "teachers\\[0\\].name: name must be a timm"),
    ("distill", "teachers[0].weight"): Refused(0.5, TEACHER, "one teacher"),
    ("distill", "teachers[0].pretrained"): Pending("timm's hub weights (no network here); a name without a "
                                                   "checkpoint or pretrained: true is refused (test_distill_teachers)"),
    ("distill", "logits"): Changes("LOGITS", distilled, DISTILL_RUN),
    ("distill", "select.keep"): Changes(0.5, distilled, SELECTING[:-1]),
    ("distill", "select.start_epoch"): Changes(0, selection, SELECTING),
    ("distill", "select.class_balanced"): Changes(False, selection, (*SELECTING[:-1], "select.keep=0.1")),
    ("distill", "select.temperature"): Changes(4.0, selection, SELECTING),
    ("distill", "select.batch_size"): Pending("images per scoring forward pass: the same scores and choice at any "
                                              "batch (speed only)"),
    ("logits", "store.views"): Changes(3, store, STORE),
    ("logits", "store.identity_view"): Changes(False, store, STORE),
    ("logits", "store.seed"): Changes(1, store, STORE),
    ("logits", "store.dtype"): Changes("float32", store, STORE),
    ("logits", "store.shard_size"): Changes(2, store, STORE),
    ("logits", "store.batch_size"): Pending("teacher forward batch size: the same logits at any batch (speed only; "
                                            "a shard is resumed whole, so it changes no file either)"),
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
    ("augment", "generate.per_image"): Changes(3, generation_plan),
    ("augment", "generate.per_class"): Changes(3, generation_plan),
    ("augment", "generate.batch_invariant"): Changes(True, unet_batches, TINY),
    ("augment", "generate.token_merge_ratio"): Changes(0.5, generation, TINY),
    ("augment", "generate.tiny_vae"): Changes("TAESD", generation, TINY),
    ("augment", "generate.lora"): Changes("LORA", generation, TINY),
    ("augment", "generate.lora_scale"): Changes(0.3, generation, (*TINY, "generate.lora=LORA")),
    ("augment", "generate.device"): Refused("bogus", (), "generate.device must be auto, cpu, cuda"),
    # -- captioning (EfficientNet-Lite0 from PyPI, a tiny random BLIP, a registered plug-in) ---------------------
    ("augment", "caption.kind"): (Changes("dead-keys-test", captions),
                                  Refused("blip", (), "caption.kind must be one of")),
    ("augment", "caption.model"): (Changes("BLIP2", captions, CAPTION_T),
                                   Refused("BLIP", (), "read by caption.kind 'transformers' only")),
    ("augment", "caption.prefix"): Changes("a photo of", captions, CAPTION_T),
    ("augment", "caption.max_new_tokens"): Changes(6, captions, CAPTION_T),
    ("augment", "caption.dtype"): (Changes("bfloat16", captions, CAPTION_T),
                                   Refused("int8", CAPTION_T, "caption.dtype must be one of"),
                                   Refused("bfloat16", (), "read by caption.kind 'transformers' only")),
    ("augment", "caption.top_k"): (Changes(3, captions),
                                   Refused(3, CAPTION_T, "read by caption.kind 'imagenet-topk' only")),
    ("augment", "caption.min_prob"): (Changes(0.5, captions), Refused(1.5, (), "caption.min_prob is a probability")),
    ("augment", "caption.image_size"): Changes(64, captions),
    ("augment", "caption.batch_size"): Changes(2, captions),
    ("augment", "caption.device"): Refused("bogus", (), "caption.device must be auto, cpu, cuda"),
    ("augment", "caption.precision"): Changes("bf16", captions, ("caption.precision=fp32",)),
    ("augment", "caption.cache"): Changes("CAPTION_CACHE", captions),
    # -- the filter (a classifier trained by sip train on the tiny folders, a registered plug-in) -----------------
    ("augment", "filter.kind"): (Changes("classifier", image_filter, ("filter.kind=dead-keys-test", "filter.model=CLS")),
                                 Refused("bogus", ("filter.model=CLS",), "filter.kind must be none or one of")),
    ("augment", "filter.model"): (Changes("CLS2", image_filter, FILTER_CLS),
                                  Refused("CLS", (), "filter.kind is 'none'")),
    ("augment", "filter.threshold"): Changes(0.99, image_filter, FILTER_CLS),
    ("augment", "filter.batch_size"): Changes(3, image_filter, FILTER_CLS),
    ("augment", "filter.device"): Refused("bogus", (), "filter.device must be auto, cpu, cuda"),
    # -- ray.*: read by engine ray only (tests/test_scale_ray*.py run it); the local engine refuses them --------
    **{(verb, f"ray.{key}"): Refused(value, (), f"ray.{key} is read only with engine: ray")
       for verb in ("augment", "synth") for key, value in
       {"address": "auto", "workers": 3, "caption_workers": 2, "num_cpus": 2.0, "num_gpus": 1.0}.items()},
    # -- where a run writes, which classes synth draws ----------------------------------------------------------
    ("augment", "output"): Changes("OUT2", output_folder, (*FOLDER, *OUTPUT)),
    ("synth", "latent_mix.mode"): Changes("cutmix", latent_mixes),
    ("synth", "latent_mix.alpha"): Changes(0.2, latent_mixes, ("latent_mix.mode=cutmix",)),
    ("synth", "latent_mix.per_class"): Changes(2, latent_mixes, ("latent_mix.mode=cutmix",)),
    ("synth", "latent_mix.lam"): Changes(0.25, latent_mixes, ("latent_mix.mode=mixup",)),
    ("train", "data.soft_labels"): Changes(True, trained, (*TINY_RUN, "data.synthetic=SYN")),
    ("synth", "output"): Changes("OUT2", output_folder, OUTPUT),
    ("synth", "classes"): Changes(["sock", "hat"], output_folder, OUTPUT),
    # -- sip demo: the stage recipes it builds (sip.demo.demo_recipes) -------------------------------------------
    **{("demo", key): Changes(value, demo) for key, value in {
        "shots": 5, "seed": 1, "per_image": 3, "per_class": 7, "strength": 0.3, "guidance_scale": 2.0,
        "txt2img_guidance": 5.0, "steps": 4, "teacher": "resnet14t", "teacher_images": 500, "teacher_epochs": 2,
        "student": "resnet14t", "student_epochs": 2, "epoch_size": 100, "mixup_alpha": 0.5, "cutmix_alpha": 0.0,
        "alpha": 0.7, "temperature": 4.0, "model": "runs/my-sd"}.items()},
    # -- sip adapt: a real 2-step run of the tiny SD per value (sip.adapt.run.run_adapt) ---------------------------
    ("adapt", "method"): (Changes("textual_inversion", adapted, ADAPT), Changes("finetune", adapted, ADAPT),
                          Refused("dreambooth", (), "method: must be one of")),
    ("adapt", "model"): Changes("TINY_SD2", adapted, ADAPT),
    ("adapt", "template"): (Changes("a {label} picture", adapted, ADAPT),
                            Refused("a photo", (), "template must contain")),
    ("adapt", "label_names"): (Changes({"cat": "kitty"}, adapted, ADAPT),
                               Refused({"cat": "kitty"}, ("method=textual_inversion",), "label_names names classes")),
    ("adapt", "steps"): Changes(3, adapted, ADAPT),
    ("adapt", "batch_size"): Changes(3, adapted, ADAPT),
    ("adapt", "lr"): Changes(0.05, adapted, ADAPT),
    ("adapt", "warmup_steps"): (Changes(1, adapted, ADAPT), Refused(2, ADAPT, "warmup_steps must be in")),
    ("adapt", "weight_decay"): Changes(0.5, adapted, ADAPT),
    ("adapt", "max_grad_norm"): Changes(0.0, adapted, (*ADAPT, "max_grad_norm=0.000000001")),
    ("adapt", "seed"): Changes(1, adapted, ADAPT),
    ("adapt", "checkpoint_every"): Changes(1, adapted, ADAPT),
    ("adapt", "device"): (Changes("cpu", adapted, ADAPT) if torch.cuda.is_available()
                          else Refused("cuda", ADAPT, "CUDA is not available", adapted)),
    ("adapt", "output"): Changes("ADAPT_OUT2", adapt_written, (*ADAPT, "output=ADAPT_OUT")),
    ("adapt", "textual_inversion.vectors"): (Changes(2, adapted, ADAPT_TI),
                                             Refused(0, ("method=textual_inversion",), "vectors must be >= 1")),
    ("adapt", "textual_inversion.tokens"): (Changes({"cat": "<kitty>"}, adapted, ADAPT_TI),
                                            Refused({"cat": "a"}, ADAPT_TI, "already a word", adapted),
                                            Refused({"cat": "<k>"}, (), "read by method textual_inversion only")),
    ("adapt", "textual_inversion.init_word"): Changes("shirt", adapted, ADAPT_TI),
    ("adapt", "lora.rank"): (Changes(2, adapted, ADAPT), Refused(0, (), "lora.rank must be a positive integer")),
    ("adapt", "lora.alpha"): Changes(16.0, adapted, ADAPT),
    ("adapt", "lora.text_encoder"): (Changes(True, adapted, ADAPT) if _peft_takes_text_encoder()
                                     else Refused(True, ADAPT, "lora.text_encoder: .*pip install -U peft", adapted)),
    ("adapt", "lora.target_modules"): Changes(["to_q"], adapted, ADAPT),
    ("adapt", "lora.per_class"): (Changes(True, adapt_files, ADAPT),
                                  Refused(True, ("lora.text_encoder=true",), "lora.per_class with lora.text_encoder")),
    ("adapt", "finetune.text_encoder"): (Changes(True, adapted, ADAPT_FT),
                                         Refused(True, (), "read by method finetune only; method is lora"),
                                         Refused(True, ("method=textual_inversion",), "read by method finetune only")),
    ("adapt", "finetune.text_encoder_lr"): (Changes(0.5, adapted, ADAPT_FT_TEXT),
                                            Refused(0.5, ADAPT_FT, "read only when finetune.text_encoder is true"),
                                            Refused(0, ADAPT_FT_TEXT, "text_encoder_lr must be a finite number > 0")),
    ("adapt", "prior.prompts"): (Changes(["a photo of a dog"], adapted, ADAPT_PRIOR),
                                 Refused(["a photo of a dog"], (), "read only when prior.per_prompt > 0")),
    ("adapt", "prior.per_prompt"): (Changes(2, adapted, ADAPT_PRIOR), Refused(1, (), "prior.prompts is empty")),
    ("adapt", "prior.weight"): Changes(3.0, adapted, ADAPT_PRIOR),
    ("adapt", "prior.guidance_scale"): Changes(1.5, adapted, ADAPT_PRIOR),
    ("adapt", "prior.steps"): Changes(3, adapted, ADAPT_PRIOR),
    ("adapt", "prior.seed"): Changes(1, adapted, ADAPT_PRIOR),
    ("adapt", "validation.every"): Changes(1, adapted, ADAPT_VAL),
    ("adapt", "validation.per_class"): Changes(2, adapted, ADAPT_VAL),
    ("adapt", "validation.steps"): Changes(3, adapted, ADAPT_VAL),
    ("adapt", "validation.guidance_scale"): Changes(1.0, adapted, ADAPT_VAL),
    ("adapt", "validation.seed"): Changes(1, adapted, ADAPT_VAL),
    # -- generate.adapter: a finished textual-inversion adapter of the tiny SD puts its tokens in the prompts -------
    ("augment", "generate.adapter"): (Changes("ADAPTER", adapter_prompts, TINY),
                                      Refused("ADAPTER", ("generate.model=TINY_SD2", "generate.device=cpu"),
                                              "an adapter only fits its own base", adapter_prompts)),
    # -- sip scenes: the composed scenes of the tiny folder's crops (sip.detect.scenes) ------------------------------
    ("scenes", "objects.kind"): Changes("sip-dataset", scenes, (*SCENE, "objects.path=SYN")),
    ("scenes", "objects.path"): Changes("FOLDER2", scenes, SCENE),
    ("scenes", "objects.split"): (Changes("test", scenes, ("objects.stop=200", *SCENE[3:])),
                                  Refused("test", SCENE, "objects.split 'test' is read by kind fashion-mnist only")),
    ("scenes", "objects.start"): Changes(2, scenes, SCENE),
    ("scenes", "objects.stop"): Changes(4, scenes, SCENE),
    ("scenes", "objects.mask_threshold"): Changes(100, scenes, SCENE),
    ("scenes", "objects.classes"): Changes(["cat"], scenes, SCENE),
    ("scenes", "objects.shots"): (Changes(2, scenes, ("objects.stop=200", *SCENE[3:])),
                                  Refused(2, SCENE, r"objects.shots \(2\) is a positive count of Fashion-MNIST")),
    ("scenes", "objects.shots_seed"): Changes(1, scenes, ("objects.stop=200", "objects.shots=2", *SCENE[3:])),
    ("scenes", "scenes.count"): Changes(3, scene_run, (*SCENE, "output=SCENES_OUT")),
    ("scenes", "scenes.size"): Changes(48, scenes, SCENE),
    ("scenes", "scenes.min_objects"): Changes(3, scenes, SCENE),
    ("scenes", "scenes.max_objects"): Changes(2, scenes, SCENE),
    ("scenes", "scenes.object_size"): Changes([20, 40], scenes, SCENE),
    ("scenes", "scenes.max_overlap"): Changes(0.0, scenes, SCENE),
    ("scenes", "scenes.min_visible"): Changes(1.0, scenes, SCENE),
    ("scenes", "scenes.tries"): Changes(1, scenes, SCENE),
    ("scenes", "scenes.background"): Changes("black", scenes, SCENE),
    ("scenes", "scenes.background_max"): Changes(10, scenes, SCENE),
    ("scenes", "scenes.seed"): Changes(1, scenes, SCENE),
    ("scenes", "output"): (Changes("SCENES_OUT2", scene_run, (*SCENE, "output=SCENES_OUT")),
                           Refused(None, SCENE, "needs an output folder", scene_run)),
    # -- sip train with task: detection (tiny scene sets of the folder's crops, a test_resnet FCOS) ---------------
    ("detect", "task"): Refused("classification", (), "task: must be one of 'detection'"),
    ("detect", "data.train"): Changes("SCENES_B", scene_sets, DETECT_DATA),
    ("detect", "data.val"): Changes("SCENES_A", scene_sets, DETECT_DATA),
    ("detect", "data.test"): Changes("SCENES_A", scene_sets, DETECT_DATA),
    ("detect", "data.train_extra"): Changes(["SCENES_B"], scene_sets, DETECT_DATA),
    ("detect", "data.classes"): Refused(["dog", "cat"], DETECT_DATA, "do not match the run's classes", scene_sets),
    ("detect", "data.hflip"): Changes(0.0, scene_items, DETECT_DATA),
    ("detect", "data.repeat"): Changes(2, detected, DETECT_RUN),
    ("detect", "data.batch_size"): Changes(4, detected, DETECT_RUN),
    ("detect", "data.eval_batch_size"): Changes(1, detected, DETECT_RUN),
    ("detect", "data.num_workers"): Changes(1, detected, DETECT_RUN),
    ("detect", "detector.head"): Changes("retinanet", detector, DETECTOR[:2]),
    ("detect", "detector.backbone"): (Changes("resnet10t", detector, DETECTOR),
                                      Changes("vit_tiny_patch16_224", detector, VIT_DETECTOR),
                                      Refused("efficientnet_b0", (), "a timm ResNet .* or a ViT")),
    ("detect", "detector.norm"): (Changes("group", detector, DETECTOR), Changes("group", detector, VIT_DETECTOR)),
    ("detect", "detector.patch_size"): (Changes(16, detector, VIT_DETECTOR),
                                        Refused(16, DETECTOR, "read by ViT backbones only")),
    ("detect", "detector.backbone_kwargs"): (Changes({"embed_dim": 64, "depth": 1, "num_heads": 2}, detector,
                                                     VIT_DETECTOR),
                                             Refused({"img_size": 64}, VIT_DETECTOR, "may not set img_size")),
    ("detect", "detector.gn_groups"): (Changes(4, detector, (*DETECTOR, "detector.norm=group")),
                                       Refused(4, (), "read by norm: group only")),
    ("detect", "detector.fpn_channels"): (Changes(64, detector, DETECTOR), Refused(48, (), "multiple of 32")),
    ("detect", "detector.head_convs"): Changes(2, detector, DETECTOR),
    ("detect", "detector.score_thresh"): Changes(0.5, detector, DETECTOR),
    ("detect", "detector.detections_per_img"): Changes(1, detector, DETECTOR),
    ("detect", "detector.checkpoint"): Changes("DETECTOR", detected, DETECT_RUN),
    ("detect", "kd.teacher"): Changes("DETECTOR", detection_terms, (*DETECT_DATA, *DETECTOR)),
    ("detect", "kd.gt"): (Changes(0.5, detection_terms, KD), Refused(0.0, (), "kd.gt is 0 without kd.teacher")),
    ("detect", "kd.cls"): Changes(0.5, detection_terms, KD),
    ("detect", "kd.box"): Changes(0.5, detection_terms, KD),
    ("detect", "kd.feat"): Changes(1.0, detection_terms, KD),
    ("detect", "kd.temperature"): Changes(2.0, detection_terms, KD),
    ("detect", "kd.box_temperature"): Changes(5.0, detection_terms, KD),
    ("detect", "kd.box_bins"): Changes(8, detection_terms, KD),
    ("detect", "kd.box_max"): Changes(4.0, detection_terms, KD),
    ("detect", "kd.feat_alpha"): Changes(2.0, detection_terms, (*KD, "kd.feat=1.0")),
    ("detect", "kd.feat_beta"): Changes(1.0, detection_terms, (*KD, "kd.feat=1.0")),
    ("detect", "optim.label_smoothing"): Refused(0.1, (), "classification loss setting"),
    # -- sip rounds: the driver's plan of generations and students (its distill / synth keys: those verbs') -------
    ("rounds", "rounds.rounds"): (Changes(2, round_plan, ROUNDS), Refused(0, (), "rounds.rounds must be >= 1")),
    ("rounds", "rounds.top_classes"): Changes(2, round_plan, ROUNDS),
    ("rounds", "rounds.per_class"): Changes(3, round_plan, ROUNDS),
    ("rounds", "rounds.pool_per_class"): Changes(2, round_plan, ROUNDS),
    ("rounds", "rounds.warm_start"): Changes(False, round_plan, ROUNDS),
    ("rounds", "guide.scale"): Changes(1.0, round_plan, ROUNDS),
    ("rounds", "guide.student_scale"): Changes(1.0, round_plan, ROUNDS),
    ("rounds", "guide.steps"): Changes([0.5, 1.0], round_plan, (*ROUNDS, "guide.scale=1.0")),
    ("rounds", "guide.every"): Changes(2, round_plan, (*ROUNDS, "guide.scale=1.0")),
    ("rounds", "synth.output"): Refused("OUT", (), "set by sip rounds each round"),
    ("rounds", "synth.generate.per_class"): Refused(5, (), "set by sip rounds each round"),
    ("rounds", "distill.logits"): Refused("LOGITS", (), "exactly one online teacher"),
}

_PENDING_SECTIONS = {  # whole sections whose probes need a model run, not written in this pass
    "student.": "the same ModelSection as train's model.* (probed there)",
}
_PENDING_KEYS = {"progress": "a progress bar: display only"}


def entry_for(verb: str, key: str) -> Any:
    """The entry of ``key`` in ``verb`` (one, or a tuple of them): its own, else the section rule, else None."""
    if (verb, key) in ENTRIES:
        return ENTRIES[verb, key]
    for prefix, reason in _PENDING_SECTIONS.items():
        if key.startswith(prefix):
            return Pending(reason)
    if key in _PENDING_KEYS:
        return Pending(_PENDING_KEYS[key])
    return None


def _each(entry: Any) -> tuple:
    return entry if isinstance(entry, tuple) else (entry,)


# --------------------------------------------------------------------------------------------------
# 4. the tests
# --------------------------------------------------------------------------------------------------

def test_every_recipe_field_has_an_entry():
    """A new recipe field without a probe, a refusal or a stated reason fails here."""
    # a field shared by several verbs (sip rounds' distill.* / synth.* sections) is shown once, by any verb's entry
    covered = {n for v, c in verbs().items() for k, n in recipe_fields(c).items() if entry_for(v, k) is not None}
    missing = [f"{verb}: {key} ({name})" for verb, cls in verbs().items()
               for key, name in recipe_fields(cls).items() if entry_for(verb, key) is None and name not in covered]
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
        for n, one in enumerate(_each(entry)):
            marks = [pytest.mark.xfail(reason=one.reason, run=False)] if isinstance(one, Pending) else []
            out.append(pytest.param(verb, key, one, id=f"{verb}:{key}" + (f"#{n + 1}" if n else ""), marks=marks))
    return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_sd_dir, tiny_blip_dir):
    """Small image folders, a saved HF dataset with other column names, a sip dataset of variants of the first
    folder, two classifiers trained by sip train on the folders, a second tiny BLIP and a prefilled caption cache."""
    import datasets

    from conftest import build_tiny_blip

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

    out = {"FOLDER": str(root / "folder"), "FOLDER2": str(root / "folder2"), "HF": str(root / "hf"),
           "TINY_SD": str(tiny_sd_dir), "SHIPPED": DEFAULT_SD_MODEL, "BLIP": str(tiny_blip_dir),
           "BLIP2": str(build_tiny_blip(root / "blip2", seed=1)), "OUT": str(root / "out"),
           "OUT2": str(root / "out2"), "SYN": str(_synthetic_set(root / "syn", str(root / "folder"))),
           "CAPTION_CACHE": str(root / "caption-cache.jsonl")}
    for name, seed in (("CLS", 0), ("CLS2", 1)):  # sip train's own output: what filters and teachers load
        from sip.train.run import run_training

        run_training(_load("train", [*TINY_RUN, f"run.seed={seed}"], out), root / name.lower())
        out[name] = str(root / name.lower())
    _prefill_caption_cache(out["CAPTION_CACHE"])
    out.update(_new_verbs_inputs(root, out))
    out["TAESD"], out["LORA"] = _tiny_vae(root / "taesd"), _tiny_lora(tiny_sd_dir, root / "lora")
    from sip.distill.run import run_logits

    run_logits(_load("logits", list(STORE), out), root / "logits")  # a store of CLS over the tiny folder
    out["LOGITS"] = str(root / "logits")
    return out


def _new_verbs_inputs(root: Path, out: dict[str, str]) -> dict[str, str]:
    """A second tiny SD, a finished textual-inversion adapter of the first (sip adapt, 1 step), two scene sets of
    the tiny folder's crops (sip scenes) and a tiny FCOS trained on one (sip train task: detection)."""
    from conftest import build_tiny_sd
    from sip.adapt.run import run_adapt
    from sip.detect.coco import run_scenes
    from sip.detect.train import run_detection

    new = {"TINY_SD2": str(build_tiny_sd(root / "sd2", seed=1)), "ADAPTER": str(root / "adapter"),
           "ADAPT_OUT": str(root / "adapt-out"), "ADAPT_OUT2": str(root / "adapt-out2"),
           "SCENES_A": str(root / "scenes-a"), "SCENES_B": str(root / "scenes-b"), "DETECTOR": str(root / "detector"),
           "SCENES_OUT": str(root / "scenes-out"), "SCENES_OUT2": str(root / "scenes-out2")}
    paths = {**out, **new}
    run_adapt(_load("adapt", [*ADAPT_TI, "steps=1", "output=ADAPTER"], paths))
    for name, seed in (("SCENES_A", 0), ("SCENES_B", 1)):
        run_scenes(_load("scenes", [*SCENE, "scenes.count=4", "scenes.max_objects=3", f"scenes.seed={seed}",
                                    "progress=false", f"output={name}"], paths))
    run_detection(_load("detect", DETECT_RUN, paths), new["DETECTOR"])
    return new


def _tiny_vae(out: Path) -> str:
    """A random AutoencoderTiny (TAESD layout) that fits the tiny SD's 2x, 4-channel latents."""
    build_tiny_taesd().save_pretrained(out)
    return str(out)


def _tiny_lora(sd_dir: Path, out: Path) -> str:
    return str(build_tiny_lora(sd_dir, out))


def _synthetic_set(root: Path, real_folder: str) -> Path:
    """A sip dataset: one variant of each real image of ``real_folder`` (its source id recorded) + two txt2img."""
    from sip.data.sources import SourceConfig, open_source

    rows = []
    real = open_source(SourceConfig(kind="folder", path=real_folder))
    for k, sample in enumerate(real):
        rows.append((f"v{k}", sample.label_name, sample.source_id))
    rows += [("t0", "cat", None), ("t1", "dog", None)]
    soft = {"t0": {"cat": 0.6, "dog": 0.4}}  # an inter-class image's soft label (data.soft_labels reads it)
    for k, (image_id, label, source) in enumerate(rows):
        (root / "train" / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 24), (k * 30, 90, 200)).save(root / "train" / label / f"{image_id}.png")
    with open(root / "train" / "metadata.jsonl", "w") as f:
        for image_id, label, source in rows:
            f.write(json.dumps({"file_name": f"{label}/{image_id}.png", "label": label, "source": source,
                                "soft_label": soft.get(image_id)}) + "\n")
    return root


def _prefill_caption_cache(path: str) -> None:
    """Captions "from the cache" for the probe's images under the default captioner's identity."""
    from sip.augment.caption import build_captioner
    from sip.ids import image_hash

    cfg = load_config(verbs()["augment"]).caption
    _CAPTIONERS.setdefault(cfg, build_captioner(cfg))
    with open(path, "w") as f:
        for im in CAPTION_IMAGES:
            f.write(json.dumps({"hash": image_hash(im), "captioner": _CAPTIONERS[cfg].identity,
                                "caption": "from the cache"}) + "\n")


_BASE: dict[tuple, Any] = {}
DEFAULT_TEACHER = "teachers=[{name: resnet10t, pretrained: true}]"


def _load(verb: str, overrides: list[str], paths: dict[str, str]):
    import re

    if verb == "distill":
        overrides = [DEFAULT_TEACHER, *overrides]
    for name, value in paths.items():  # whole words only: FOLDER is not FOLDER2
        overrides = [re.sub(rf"\b{name}\b", value, o) for o in overrides]
    return load_config(verbs()[verb], None, overrides)


def _change(verb: str, key: str, value: Any, base: tuple[str, ...]) -> str:
    """``key=value`` as an override; a key inside a list of sections (``teachers[0].name``) rewrites the list."""
    import yaml

    from sip.config import to_dict

    if "[0]." not in key:
        return f"{key}={json.dumps(to_dict(value))}"
    section, field = key.split("[0].")
    given = [o for o in ([DEFAULT_TEACHER] if verb == "distill" else []) + list(base) if o.startswith(section + "=")]
    items = yaml.safe_load(given[-1].split("=", 1)[1])
    items[0][field] = to_dict(value)
    return f"{section}={json.dumps(items)}"


@pytest.mark.parametrize("verb, key, entry", _params())
def test_a_key_changes_what_runs_or_is_refused(verb, key, entry, paths):
    _register_plug_ins()
    value = paths.get(entry.value, entry.value) if isinstance(entry.value, str) else entry.value
    change = _change(verb, key, value, entry.base)
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
    pending = {f"{verb}: {key}": one.reason for verb, cls in verbs().items() for key in recipe_fields(cls)
               for one in _each(entry_for(verb, key)) if isinstance(one, Pending)}
    assert all(reason for reason in pending.values())
