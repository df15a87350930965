"""``sip demo``: the main job on the embedded default, end to end, in one run folder.

10-shot Fashion-MNIST (pool 50,000-59,999, disjoint from the generator's training images)
→ captions (offline ImageNet top-k captioner) → SIP prompts → img2img with the shipped model
→ augmented dataset → a teacher trained on Fashion-MNIST 0-49,999 → two students distilled from it,
on the 10 real shots alone and on real + sip variants → results.json → HTML report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sip.config import load_config, save_config
from sip.data.sources import FASHION_MNIST_READABLE


@dataclass(frozen=True)
class DemoRecipe:
    """What the demo runs (override with ``sip demo --set key=value``).

    Attributes:
        shots: real images per class.
        seed: chooses the shots and seeds every stage.
        per_image: sip variants per real image.
        strength, guidance_scale, steps: img2img settings (moderate strength keeps the label).
        teacher: timm name of the teacher; teacher_images: how many Fashion-MNIST training images
            (from index 0) it sees; teacher_epochs: its epochs.
        student: timm name of the student (a small ViT with 4-px patches); student_epochs: epochs over
            the (repeated) student set; student_repeat: passes over the 100 real images per epoch.
        swap_p: with sip data, each real image is replaced by one of its own variants with this
            probability (as SIP/SGID train), so both students take the same number of steps.
        alpha, temperature: Hinton KD settings.
    """

    shots: int = 10
    seed: int = 0
    per_image: int = 10
    strength: float = 0.5
    guidance_scale: float = 4.0
    steps: int = 20
    teacher: str = "resnet10t"
    teacher_images: int = 10000
    teacher_epochs: int = 2
    student: str = "vit_tiny_patch16_224"
    student_depth: int = 4
    student_epochs: int = 6
    student_repeat: int = 10
    swap_p: float = 0.5
    alpha: float = 0.7
    temperature: float = 4.0
    model: str = field(default="")  # Stable Diffusion folder or hub id; empty = the shipped model


QUICK = ["per_image=2", "steps=8", "teacher_images=3000", "student_epochs=2", "student_repeat=3"]


def _augment(recipe: DemoRecipe, out: Path, progress: bool):
    from sip.augment.caption import CaptionConfig
    from sip.augment.generate import GenerateConfig
    from sip.augment.prompts import PromptConfig
    from sip.augment.run import AugmentRecipe, run_augment
    from sip.data.sources import SourceConfig
    from sip.models.diffusion import DEFAULT_SD_MODEL

    aug = AugmentRecipe(
        source=SourceConfig(kind="fashion-mnist", shots=recipe.shots, seed=recipe.seed, start=50000, size=32),
        caption=CaptionConfig(kind="imagenet-topk", image_size=96),
        prompt=PromptConfig(label_names=FASHION_MNIST_READABLE),
        generate=GenerateConfig(model=recipe.model or DEFAULT_SD_MODEL, strength=recipe.strength,
                                guidance_scale=recipe.guidance_scale, steps=recipe.steps, per_image=recipe.per_image,
                                batch_size=128, seed=recipe.seed),
        output=str(out), progress=progress)
    summary = run_augment(aug)
    save_config(aug, out / "config.yaml")
    return summary


def _train_teacher(recipe: DemoRecipe, run_dir: Path) -> dict[str, Any]:
    from sip.data.sources import SourceConfig
    from sip.train.recipe import DataSection, ModelSection, OptimSection, RunSection, TrainRecipe
    from sip.train.run import run_training

    cfg = TrainRecipe(
        data=DataSection(real=SourceConfig(kind="fashion-mnist", start=0, stop=recipe.teacher_images, size=32),
                         img_size=32, batch_size=128),
        model=ModelSection(name=recipe.teacher),
        optim=OptimSection(epochs=recipe.teacher_epochs, lr=2e-3, warmup_epochs=0.1, weight_decay=0.05),
        run=RunSection(seed=recipe.seed, eval_every=recipe.teacher_epochs))
    return run_training(cfg, run_dir)


def _distill(recipe: DemoRecipe, teacher_dir: Path, synthetic: Path | None, run_dir: Path) -> dict[str, Any]:
    from sip.data.mixing import MixConfig
    from sip.data.sources import SourceConfig
    from sip.distill.run import DistillRecipe, LossSection, run_distillation
    from sip.distill.teachers import TeacherSection
    from sip.train.recipe import DataSection, ModelSection, OptimSection, RunSection

    data = DataSection(real=SourceConfig(kind="fashion-mnist", shots=recipe.shots, seed=recipe.seed, start=50000,
                                         size=32),
                       synthetic=str(synthetic) if synthetic else None,
                       mix=MixConfig(mode="swap", p=recipe.swap_p) if synthetic else MixConfig(),
                       img_size=32, batch_size=64, repeat=recipe.student_repeat)
    cfg = DistillRecipe(
        data=data,
        student=ModelSection(name=recipe.student, patch_size=4, kwargs={"depth": recipe.student_depth}),
        teachers=[TeacherSection(checkpoint=str(teacher_dir))],
        loss=LossSection(name="hinton", temperature=recipe.temperature, alpha=recipe.alpha),
        optim=OptimSection(epochs=recipe.student_epochs, lr=1e-3, warmup_epochs=1.0),
        run=RunSection(seed=recipe.seed, eval_every=recipe.student_epochs))
    return run_distillation(cfg, run_dir)


def run_demo(output: str | Path = "runs/demo", quick: bool = False, overrides: list[str] | None = None,
             progress: bool = True) -> str:
    """Run the demo into ``output`` and return a short text summary (the accuracy table)."""
    t0 = time.time()
    recipe = load_config(DemoRecipe, None, (QUICK if quick else []) + list(overrides or []))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(recipe, out / "demo.yaml")
    timings: dict[str, float] = {}

    def stage(name: str):
        print(f"\n== {name}", flush=True)
        timings[name] = time.time()

    stage("1/4 SIP augmentation (caption → prompt → img2img → dataset)")
    summary = _augment(recipe, out / "augmented", progress)
    print(summary.line(), flush=True)
    timings["augment"] = time.time() - timings.pop("1/4 SIP augmentation (caption → prompt → img2img → dataset)")

    stage("2/4 teacher")
    teacher = _train_teacher(recipe, out / "train" / "teacher")
    timings["teacher"] = time.time() - timings.pop("2/4 teacher")

    stage("3/4 students: KD on 10 real shots, with and without sip variants")
    real_only = _distill(recipe, out / "train" / "teacher", None, out / "train" / "student-real")
    with_sip = _distill(recipe, out / "train" / "teacher", out / "augmented", out / "train" / "student-real+sip")
    timings["students"] = time.time() - timings.pop("3/4 students: KD on 10 real shots, with and without sip variants")

    runs = [
        {"name": "teacher", "data": f"Fashion-MNIST 0-{recipe.teacher_images - 1}", **_pick(teacher)},
        {"name": "student-real", "data": f"{recipe.shots} real/class + KD", **_pick(real_only)},
        {"name": "student-real+sip", "data": f"{recipe.shots} real/class + {recipe.per_image} sip variants each + KD",
         **_pick(with_sip)},
    ]
    results = {"runs": runs, "augment": {"written": summary.written, "seconds": round(summary.seconds, 1)},
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
    return (f"\nsip demo finished in {time.time() - t0:.0f}s. Test accuracy on the 10k Fashion-MNIST test set:\n"
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
