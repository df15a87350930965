"""Generation in rounds with the student (the data-free KD loop; DFAD, Fang et al., 2019; CMI, Fang et al., 2021;
DiffDFKD, Qi et al., 2025): distil a student, measure where it disagrees with its teacher, generate more of that,
and distil again.

``sip rounds RECIPE -o OUT`` (:func:`run_rounds`) reads top to bottom:

1. a probe pool: ``rounds.pool_per_class`` txt2img images per class (``OUT/pool``, never trained on);
2. round 0: the student of ``distill`` on its data as given (``OUT/round-0/student``);
3. round r = 1 … ``rounds.rounds``: the mean KL(teacher || student of round r - 1) of each class on the pool
   (``OUT/round-r/plan.json``); ``rounds.top_classes`` classes with the highest get ``rounds.per_class`` new
   txt2img images each (``OUT/round-r/synth``, an ordinary sip dataset), guided by the teacher and that student
   when ``guide.scale`` / ``guide.student_scale`` > 0 (:mod:`sip.augment.guidance`); the round's student
   trains on the data plus every round's images so far, from the previous student's weights
   (``rounds.warm_start``); ``OUT/round-r/done.json`` marks the round finished.

Resumable at round granularity and inside a round: a finished round (``done.json``) is skipped; an unfinished one
reuses its plan, its generation resumes (finished ids skipped) and its student resumes from its checkpoint.
Generation goes through the augment side's public API (:mod:`sip.augment.jobs` recipes, run by
:func:`sip.augment.run.run_synth`); the augment side imports nothing from here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sip.augment.guidance import GuideClassifier, GuideConfig
from sip.augment.jobs import SynthRecipe
from sip.config import save_config
from sip.data.durable import atomic_write
from sip.distill.run import DistillRecipe, run_distillation
from sip.distill.teachers import TeacherSection
from sip.ids import stable_seed

logger = logging.getLogger(__name__)

__all__ = ["RoundsRecipe", "RoundsSection", "class_disagreement", "run_rounds"]


@dataclass(frozen=True)
class RoundsSection:
    """How many rounds, and what each generates."""

    rounds: int = 3  # generation rounds after round 0 (each: measure, generate, distil)
    top_classes: int = 3  # the classes with the highest teacher-student KL on the pool get the round's images
    per_class: int = 100  # images generated for each chosen class per round
    pool_per_class: int = 20  # probe images per class (txt2img, never trained on) the KL is measured on
    warm_start: bool = True  # each round's student starts from the previous round's weights; false: from scratch

    def __post_init__(self):
        for key in ("rounds", "top_classes", "per_class", "pool_per_class"):
            if getattr(self, key) < 1:
                raise ValueError(f"rounds.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class RoundsGuide:
    """How each round's images are guided (:class:`~sip.augment.guidance.GuideConfig` without its classifiers:
    the teacher is ``distill.teachers[0]``, the student the previous round's)."""

    scale: float = 0.0  # the teacher's cross-entropy for the intended class; 0: unguided
    student_scale: float = 0.0  # the teacher-student KL guidance raises (images the student has not learnt); 0: off
    steps: list[float] = field(default_factory=lambda: [0.0, 1.0])  # [start, end) of the guided denoising steps
    every: int = 1  # guide every k-th step of that window

    def config(self, teacher: str, student: str) -> GuideConfig:
        """The round's ``guide:`` section (checked as ``sip synth`` checks it)."""
        return GuideConfig(teacher=teacher if self.scale > 0 or self.student_scale > 0 else None,
                           student=student if self.student_scale > 0 else None, scale=self.scale,
                           student_scale=self.student_scale, steps=list(self.steps), every=self.every)

    def __post_init__(self):
        self.config("teacher", "student")  # the same checks as guide:


@dataclass(frozen=True)
class RoundsRecipe:
    """``sip rounds``: a student recipe, a generation recipe and the rounds between them.

    Attributes:
        distill: the student recipe (one teacher, online: it measures the disagreement and guides generation).
        synth: the generation recipe (classes, prompt, generate settings and seed); the driver sets its output,
            per-class count, classes and guide each round.
        guide: how each round's images are guided by the teacher and the previous round's student.
        rounds: the rounds.
    """

    distill: DistillRecipe = field(default_factory=lambda: DistillRecipe(
        teachers=[TeacherSection(checkpoint="runs/fmnist_teacher")]))
    synth: SynthRecipe = field(default_factory=SynthRecipe)
    guide: RoundsGuide = field(default_factory=RoundsGuide)
    rounds: RoundsSection = field(default_factory=RoundsSection)

    def __post_init__(self):
        if len(self.distill.teachers) != 1 or self.distill.logits:
            raise ValueError("sip rounds needs exactly one online teacher in distill.teachers (it measures the "
                             "student's disagreement on new images and guides their generation) and no "
                             "distill.logits store (it would not hold the rounds' new images)")
        set_by_driver = {"synth.output": self.synth.output != SynthRecipe.output,
                         "synth.generate.per_class": self.synth.generate.per_class != SynthRecipe().generate.per_class,
                         "synth.guide": self.synth.guide != GuideConfig()}
        given = [k for k, v in set_by_driver.items() if v]
        if given:
            raise ValueError(f"{', '.join(given)} are set by sip rounds each round (the output folder, "
                             "rounds.per_class, and guide: with distill's teacher and the previous round's student): "
                             "remove them")
        if self.synth.latent_mix.active and self.rounds.top_classes < 2:
            raise ValueError("synth.latent_mix mixes two of a round's classes: set rounds.top_classes >= 2")
        if self.synth.engine != "local":
            raise ValueError("sip rounds generates guided images: synth.engine must be local")


def class_disagreement(teacher: GuideClassifier, student: GuideClassifier, pool: Path,
                       batch_size: int = 64) -> dict[str, float]:
    """Mean KL(teacher || student) of each class's images in the sip dataset ``pool`` (by their labels)."""
    from sip.data.bank import read_metadata
    from sip.data.images import load_image

    rows = [r for r in read_metadata(pool) if r.get("file_name")]
    images = [load_image(Path(pool) / "train" / r["file_name"]) for r in rows]
    p_t, p_s = teacher.predict(images, batch_size), student.predict(images, batch_size)
    kl = (p_t * (p_t.clamp_min(1e-8).log() - p_s.clamp_min(1e-8).log())).sum(-1)
    sums: dict[str, list[float]] = {}
    for r, v in zip(rows, kl.tolist()):
        sums.setdefault(str(r["label"]), []).append(v)
    return {c: sum(v) / len(v) for c, v in sums.items()}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class _Rounds:
    """One ``sip rounds`` run: its folders, its classes and the steps of a round."""

    def __init__(self, recipe: RoundsRecipe, out: Path, generator: Any = None):
        from sip.train.inputs import class_names

        self.recipe, self.out, self._generator = recipe, out, generator
        self.classes = class_names(recipe.distill.data)
        if recipe.synth.classes and list(recipe.synth.classes) != self.classes:
            raise ValueError(f"synth.classes {list(recipe.synth.classes)} differ from the student's classes "
                             f"{self.classes} (distill.data.eval): leave synth.classes empty or list those")
        if recipe.rounds.top_classes > len(self.classes):
            raise ValueError(f"rounds.top_classes is {recipe.rounds.top_classes} but there are only "
                             f"{len(self.classes)} classes")
        self.teacher_path = recipe.distill.teachers[0].checkpoint

    def generator(self) -> Any:
        """The diffusion generator, built once from ``synth.generate`` (seed and per_class come from each job)."""
        if self._generator is None:
            from sip.augment.generate import DiffusionGenerator

            self._generator = DiffusionGenerator.from_config(self.recipe.synth.generate)
        return self._generator

    def synth(self, output: Path, classes: list[str], per_class: int, seed: int, student: Path | None):
        """Generate ``per_class`` images of each of ``classes`` into ``output`` (resumes a started folder)."""
        from sip.augment.run import run_synth

        s = self.recipe.synth
        guide = self.recipe.guide.config(self.teacher_path, str(student)) if student is not None else GuideConfig()
        cfg = replace(s, classes=classes, output=str(output), guide=guide,
                      generate=replace(s.generate, per_class=per_class, seed=seed))
        summary = run_synth(cfg, self.generator())
        save_config(cfg, output / "config.yaml")
        return summary

    def distill(self, r: int, synthetic: list[str], previous: Path | None) -> dict[str, Any]:
        """Round ``r``'s student on the data plus ``synthetic`` (from ``previous``'s weights when warm-starting)."""
        d = self.recipe.distill
        given = d.data.synthetic
        base = [] if given is None else [given] if isinstance(given, str) else list(given)
        student = d.student
        if previous is not None and self.recipe.rounds.warm_start:
            student = replace(student, checkpoint=str(previous))
        cfg = replace(d, data=replace(d.data, synthetic=(base + synthetic) or None), student=student)
        return run_distillation(cfg, self.out / f"round-{r}" / "student")

    def plan(self, r: int, previous: Path) -> dict[str, Any]:
        """Round ``r``'s classes from the previous student's disagreement on the pool (computed once, then read)."""
        path = self.out / f"round-{r}" / "plan.json"
        if (saved := _read_json(path)) is not None:
            return saved
        device = "cpu"
        teacher = GuideClassifier.from_checkpoint(self.teacher_path, device)
        student = GuideClassifier.from_checkpoint(previous, device)
        with torch.no_grad():
            kl = class_disagreement(teacher, student, self.out / "pool")
        ranked = sorted(self.classes, key=lambda c: (-kl.get(c, 0.0), self.classes.index(c)))
        plan = {"round": r, "student": str(previous), "kl": {c: round(kl.get(c, 0.0), 6) for c in self.classes},
                "classes": ranked[: self.recipe.rounds.top_classes]}
        _write_json(path, plan)
        return plan


def run_rounds(recipe: RoundsRecipe, out: str | Path, generator: Any = None) -> dict[str, Any]:
    """Run (or resume) ``sip rounds`` into ``out``; returns each round's classes and student metrics.

    Args:
        recipe (RoundsRecipe): the resolved recipe.
        out (str | Path): the run folder.
        generator (DiffusionGenerator, optional): built once from ``synth.generate`` when None.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(recipe, out / "config.yaml")
    state = _Rounds(recipe, out, generator)
    seed, n = recipe.synth.generate.seed, recipe.rounds.rounds
    # 1. the probe pool (unguided, its own seed: never the images a round trains on)
    state.synth(out / "pool", state.classes, recipe.rounds.pool_per_class, stable_seed("rounds-pool", seed) % 2**31,
                None)
    results, synthetic, previous = [], [], None
    for r in range(n + 1):
        done = out / f"round-{r}" / "done.json"
        saved = _read_json(done)  # a finished round is read, not redone
        student_dir = out / f"round-{r}" / "student"
        if r > 0:
            data_dir = out / f"round-{r}" / "synth"
            if saved is None:  # 3a. generate more of what the previous student gets wrong
                plan = state.plan(r, previous)
                state.synth(data_dir, plan["classes"], recipe.rounds.per_class,
                            stable_seed("rounds", seed, r) % 2**31, previous)
            synthetic.append(str(data_dir))
        if saved is None:  # 2. / 3b. distil (an interrupted student resumes its own checkpoint)
            metrics = state.distill(r, list(synthetic), previous)
            saved = {"round": r, "classes": plan["classes"] if r else None, "synthetic": list(synthetic),
                     **{k: metrics.get(k) for k in ("val_top1", "best_val_top1", "test_top1", "best_epoch")}}
            _write_json(done, saved)
        results.append(saved)
        previous = student_dir
    summary = {"rounds": results, "student": str(previous)}
    _write_json(out / "rounds.json", summary)
    return summary
