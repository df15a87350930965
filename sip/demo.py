"""``sip demo``: the main job on the embedded default, end to end, in one run folder.

1-shot Fashion-MNIST (one real image per class by default, pool 50,000-59,999, disjoint from the generator's training images)
→ captions (offline ImageNet top-k captioner) → SIP prompts → img2img with the shipped model
→ augmented dataset, and txt2img from label prompts → synthetic dataset → a teacher trained on
Fashion-MNIST 0-13,999 → two students distilled from it with the same recipe (patient, consistent KD:
the teacher labels the student's own mixup / CutMix view), on the real shots alone and on the real
shots + their sip variants + the txt2img images → results.json → HTML report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sip.config import load_config, save_config
from sip.data.fashion_mnist import FASHION_MNIST_PHRASES


@dataclass(frozen=True)
class DemoRecipe:
    """What the demo runs (override with ``sip demo --set key=value``). The defaults fit 10 minutes on
    2 CPU cores.

    Attributes:
        shots: real images per class.
        seed: chooses the shots and seeds every stage.
        per_image: sip img2img variants per real image.
        per_class: txt2img images per class (the data-free part of the transfer set).
        strength, guidance_scale, steps: img2img settings (moderate strength keeps the label);
            txt2img uses ``txt2img_guidance``.
        teacher: timm name of the teacher; teacher_images: how many Fashion-MNIST training images
            (from index 0) it sees; teacher_epochs: its epochs.
        student: timm name of the students; student_epochs: epochs of ``epoch_size`` items each (both
            students take the same number of steps).
        mixup_alpha, cutmix_alpha: the batch mix the teacher labels (function matching).
        alpha, temperature: Hinton KD settings (alpha 1: the teacher's soft labels only).
    """

    # 1 shot per class: where sip's data pays under KD (scripts/demo_seeds.py: 3 seeds, val and test gain above 0)
    shots: int = 1
    seed: int = 0
    per_image: int = 10
    per_class: int = 150
    strength: float = 0.5
    guidance_scale: float = 4.0
    txt2img_guidance: float = 3.0  # lower guidance: more varied images; the teacher labels them anyway
    steps: int = 20
    teacher: str = "resnet10t"
    teacher_images: int = 14000
    teacher_epochs: int = 5
    student: str = "resnet10t"
    student_epochs: int = 12
    epoch_size: int = 3000
    mixup_alpha: float = 1.0
    cutmix_alpha: float = 1.0
    alpha: float = 1.0
    temperature: float = 2.0
    model: str = field(default="")  # Stable Diffusion folder or hub id; empty = the shipped model


QUICK = ["per_image=2", "per_class=10", "steps=8", "teacher_images=3000", "teacher_epochs=1", "student_epochs=2",
         "epoch_size=500"]


def demo_prompts():
    """Grammatical prompts: each class as a noun phrase with its article ("a photo of a pair of trousers, ...")."""
    from sip.augment.prompts import PromptConfig

    return PromptConfig(label_names=FASHION_MNIST_PHRASES, template="a photo of {label}, {caption}",
                        template_no_caption="a photo of {label}")


def augment_recipe(recipe: DemoRecipe, out: Path, progress: bool = True):
    """The ``sip augment`` recipe of stage 1: captions → SIP prompts → img2img of the real shots."""
    from sip.augment.caption import CaptionConfig
    from sip.augment.generate import GenerateConfig
    from sip.augment.jobs import AugmentRecipe
    from sip.data.sources import SourceConfig
    from sip.models.diffusion import DEFAULT_SD_MODEL

    return AugmentRecipe(
        source=SourceConfig(kind="fashion-mnist", shots=recipe.shots, seed=recipe.seed, start=50000, size=32),
        caption=CaptionConfig(kind="imagenet-topk", image_size=96),
        prompt=demo_prompts(),
        generate=GenerateConfig(model=recipe.model or DEFAULT_SD_MODEL, strength=recipe.strength,
                                guidance_scale=recipe.guidance_scale, steps=recipe.steps, per_image=recipe.per_image,
                                batch_size=128, seed=recipe.seed),
        output=str(out), progress=progress)


def synth_recipe(recipe: DemoRecipe, out: Path, progress: bool = True):
    """The ``sip synth`` recipe of stage 1: txt2img from label prompts (the data-free part)."""
    from sip.augment.generate import GenerateConfig
    from sip.augment.jobs import SynthRecipe
    from sip.data.sources import SourceConfig
    from sip.models.diffusion import DEFAULT_SD_MODEL

    return SynthRecipe(
        source=SourceConfig(kind="fashion-mnist"),
        prompt=demo_prompts(),
        generate=GenerateConfig(model=recipe.model or DEFAULT_SD_MODEL, guidance_scale=recipe.txt2img_guidance,
                                steps=recipe.steps, per_class=recipe.per_class, batch_size=128, seed=recipe.seed),
        output=str(out), progress=progress)


def teacher_recipe(recipe: DemoRecipe, progress: bool = True):
    """The ``sip train`` recipe of stage 2: the teacher on Fashion-MNIST 0 … teacher_images - 1."""
    from sip.data.sources import SourceConfig
    from sip.train.recipe import DataSection, ModelSection, OptimSection, RunSection, TrainRecipe, ValSection

    # the validation split leaves the teacher's pool: a tenth of it (at most the default 1,000)
    val = ValSection(size=max(1, min(1000, recipe.teacher_images // 10)))
    return TrainRecipe(
        data=DataSection(real=SourceConfig(kind="fashion-mnist", start=0, stop=recipe.teacher_images, size=None),
                         val=val, img_size=28, scale=(0.6, 1.0), batch_size=128),
        model=ModelSection(name=recipe.teacher),
        optim=OptimSection(epochs=recipe.teacher_epochs, lr=3e-3, warmup_epochs=0.1, weight_decay=0.05),
        run=RunSection(seed=recipe.seed, eval_every=recipe.teacher_epochs, progress=progress))


def student_recipe(recipe: DemoRecipe, teacher_dir: Path, synthetic: list[Path], progress: bool = True):
    """The ``sip distill`` recipe of stage 3: a student on the real shots (+ ``synthetic`` folders) from the teacher."""
    from sip.data.mixing import MixConfig
    from sip.data.sources import SourceConfig
    from sip.distill.mixup import BatchMixConfig
    from sip.distill.run import DistillRecipe, LossSection
    from sip.distill.teachers import TeacherSection
    from sip.train.recipe import DataSection, ModelSection, OptimSection, RunSection

    # both students take epoch_size items per epoch: the real shots repeated, or a quarter real shots and
    # three quarters synthetic images
    mix = (MixConfig(mode="ratio", ratio=0.75, epoch_size=recipe.epoch_size) if synthetic
           else MixConfig(mode="concat", epoch_size=recipe.epoch_size))
    data = DataSection(real=SourceConfig(kind="fashion-mnist", shots=recipe.shots, seed=recipe.seed, start=50000,
                                         size=None),
                       synthetic=[str(p) for p in synthetic] or None, mix=mix, img_size=28, batch_size=64)
    return DistillRecipe(
        data=data,
        student=ModelSection(name=recipe.student),
        teachers=[TeacherSection(checkpoint=str(teacher_dir))],
        loss=LossSection(name="hinton", temperature=recipe.temperature, alpha=recipe.alpha),
        batch_mix=BatchMixConfig(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha),
        optim=OptimSection(epochs=recipe.student_epochs, lr=3e-3, warmup_epochs=0.5),
        # a validation point per epoch: the report's curves
        run=RunSection(seed=recipe.seed, eval_every=1, progress=progress))


def demo_recipes(recipe: DemoRecipe, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Every stage's recipe, built from the demo's keys (pure: nothing runs, nothing is written).

    Returns:
        dict: ``augment`` (AugmentRecipe), ``synth`` (SynthRecipe), ``teacher`` (TrainRecipe), ``student-real`` and
        ``student-real+sip`` (DistillRecipe), with the run folders ``run_demo`` uses under ``out``.
    """
    out = Path(out)
    teacher_dir = out / "train" / "teacher"
    return {"augment": augment_recipe(recipe, out / "augmented", progress),
            "synth": synth_recipe(recipe, out / "synthetic", progress),
            "teacher": teacher_recipe(recipe, progress),
            "student-real": student_recipe(recipe, teacher_dir, [], progress),
            "student-real+sip": student_recipe(recipe, teacher_dir, [out / "augmented", out / "synthetic"],
                                               progress)}


def run_demo(output: str | Path = "runs/demo", quick: bool = False, overrides: list[str] | None = None,
             progress: bool = True) -> str:
    """Run the demo into ``output`` and return a short text summary (the accuracy table)."""
    from sip.augment.run import run_augment, run_synth
    from sip.distill.run import run_distillation
    from sip.train.run import run_training

    t0 = time.perf_counter()
    recipe = load_config(DemoRecipe, None, (QUICK if quick else []) + list(overrides or []))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(recipe, out / "demo.yaml")
    recipes = demo_recipes(recipe, out, progress)
    timings: dict[str, float] = {}

    def stage(name: str):
        print(f"\n== {name}", flush=True)

    stage("1/4 SIP augmentation (caption → prompt → img2img → dataset) and txt2img")
    t = time.perf_counter()
    summary = run_augment(recipes["augment"])
    save_config(recipes["augment"], out / "augmented" / "config.yaml")
    print(summary.line(), flush=True)
    synth = run_synth(recipes["synth"])
    save_config(recipes["synth"], out / "synthetic" / "config.yaml")
    print(synth.line(), flush=True)
    timings["generate"] = time.perf_counter() - t

    stage("2/4 teacher")
    t = time.perf_counter()
    teacher = run_training(recipes["teacher"], out / "train" / "teacher")
    timings["teacher"] = time.perf_counter() - t

    stage(f"3/4 students: the same KD recipe on {recipe.shots} real shot(s) per class, with and without sip data")
    t = time.perf_counter()
    real_only = run_distillation(recipes["student-real"], out / "train" / "student-real")
    with_sip = run_distillation(recipes["student-real+sip"], out / "train" / "student-real+sip")
    timings["students"] = time.perf_counter() - t

    runs = [
        {"name": "teacher", "data": f"Fashion-MNIST 0-{recipe.teacher_images - 1}", **_pick(teacher)},
        {"name": "student-real", "data": f"{recipe.shots} real/class + KD", **_pick(real_only)},
        {"name": "student-real+sip", "data": f"{recipe.shots} real/class + {recipe.per_image} sip variants each + "
                                             f"{recipe.per_class} txt2img/class + KD", **_pick(with_sip)},
    ]
    results = {"runs": runs, "augment": {"written": summary.written, "seconds": round(summary.seconds, 1)},
               "synthetic": {"written": synth.written, "seconds": round(synth.seconds, 1)},
               "timings_s": {k: round(v, 1) for k, v in timings.items()}, "quick": quick}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    stage("4/4 report")
    report = None
    try:
        from sip.report.page import write_report

        report = write_report(out)
    except ImportError:
        pass
    table = "\n".join(f"  {r['name']:<18} top-1 {r.get('top1', float('nan')):6.2f}%   ({r['data']})" for r in runs)
    return (f"\nsip demo finished in {time.perf_counter() - t0:.0f}s. Test accuracy on the 10k Fashion-MNIST test set:\n"
            f"{table}\nEverything is in {out.resolve()}" + (f"\nReport: {report}" if report else ""))


def _pick(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("top1", "top5", "eval_top1", "test_top1", "best_top1", "epochs", "seconds")
    found = {k: metrics[k] for k in keys if k in metrics}
    if "top1" not in found:
        for k in ("eval_top1", "test_top1", "best_top1"):
            if k in found:
                found["top1"] = found[k]
                break
    return found
