"""The ``sip`` command line: each verb loads a recipe (plus flags and ``--set`` overrides), calls the
library, and saves the resolved config next to its outputs. Nothing here that a Python user could
not call directly."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer

from sip.config import ConfigError, load_config, save_config
from sip.data.bank import DiskFullError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sip: diffusion-driven data augmentation (SIP) and knowledge distillation.")

RecipeArg = typer.Argument(None, help="YAML recipe (see pipelines/); flags and --set override it.")
SetOpt = typer.Option([], "--set", help="Override a recipe key, e.g. --set generate.strength=0.6 (repeatable).")
EngineOpt = typer.Option(None, help="'local' (this process; one per rank under torchrun / accelerate launch) or "
                                    "'ray' (a Ray Data pipeline of actor pools; pip install 'sip[ray]').")
TeacherOpt = typer.Option(None, "--teacher", help="sip run folder of a teacher that guides sampling (guide.teacher; "
                                                    "set guide.scale) and labels inter-class variants.")
StudentOpt = typer.Option(None, "--student", help="sip run folder of the student; guidance seeks where it disagrees "
                                                    "with the teacher (guide.student; set guide.student_scale).")
AddressOpt = typer.Option(None, "--address", help="Ray cluster to join with --engine ray (e.g. auto, "
                                                  "ray://head:10001); default: a local Ray for this run.")
AdapterOpt = typer.Option(None, "--adapter", help="Output folder of `sip adapt` (generate.adapter): its class tokens, "
                                                  "LoRA or fine-tuned UNet, for the model it was adapted from.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _flags(**pairs: Any) -> list[str]:
    """CLI flags as ``--set`` overrides (None means: not given)."""
    return [f"{k}={json.dumps(v)}" for k, v in pairs.items() if v is not None]


def _load(cls, recipe: Optional[Path], overrides: list[str]):
    try:
        return load_config(cls, recipe, overrides)
    except ConfigError as e:
        _fail(str(e))


def _run_and_record(cls, run, recipe: Optional[Path], overrides: list[str]) -> None:
    """Load ``recipe`` with ``overrides`` into ``cls``, run it, save the resolved recipe beside its output and
    print the result as one JSON line (the verbs whose job writes one output folder)."""
    cfg = _load(cls, recipe, overrides)
    result = _run(run, cfg)
    save_config(cfg, Path(cfg.output) / "config.yaml")
    typer.echo(json.dumps(result))


def _input_overrides(input: Optional[Path]) -> list[str]:
    if input is None:
        return []
    kind = "hf" if any((input / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")) else "folder"
    # the input replaces the recipe's source: a start / stop range of its images (Fashion-MNIST's 50000-) does not
    # carry over to another folder (--set source.start=... after --input sets one for it)
    return _flags(**{"source.kind": kind, "source.path": str(input)}) + ["source.start=null", "source.stop=null"]


def _captioner_overrides(captioner: Optional[str]) -> list[str]:
    if captioner is None:
        return []
    from sip.augment.caption import CAPTIONERS

    if captioner in CAPTIONERS:
        return _flags(**{"caption.kind": captioner})
    return _flags(**{"caption.kind": "transformers", "caption.model": captioner})


def _finish_generation(cfg, summary) -> None:
    """Save the resolved recipe (one process of a launch does it) and print the summary line, naming the rank
    under a multi-process launch (each process reports its own share)."""
    from sip.scale.launch import detect_launch

    launch = detect_launch()
    if launch.rank == 0:
        save_config(cfg, Path(cfg.output) / "config.yaml")
    typer.echo(summary.line() if launch.world == 1 else f"{launch.describe()}: {summary.line()}")
    if summary.failed and not summary.written and not summary.skipped:
        raise typer.Exit(1)


def _run(fn, *args, **kwargs):
    """Call the library; turn the errors users can fix into a clear message and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as e:
        _fail(str(e))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # sip's writer raises DiskFullError naming the folder; any other full-disk write says where it was
        _fail(str(e) if isinstance(e, DiskFullError) else f"no space left on the device ({e.filename or e}); free "
              "some space and rerun the same command: it resumes where it stopped", 1)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        for name in ("diffusers", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)


@app.command()
def augment(
    recipe: Optional[Path] = RecipeArg,
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Image folder root/<label>/* or a saved HF dataset "
                                         "(replaces the recipe's source kind, path and start / stop range)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion hub id or folder (default: the shipped model)."),
    captioner: Optional[str] = typer.Option(None, help="'imagenet-topk' (offline) or an image-to-text hub id / folder."),
    per_image: Optional[int] = typer.Option(None, "--per-image", help="Variants per source image."),
    strength: Optional[float] = typer.Option(None, help="img2img strength in (0, 1]."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    seed: Optional[int] = typer.Option(None, help="Run seed."),
    shard: Optional[str] = typer.Option(None, help="Do part i of n, e.g. 2/4 (not under torchrun / accelerate "
                                                   "launch, where each process takes its part by rank)."),
    engine: Optional[str] = EngineOpt,
    address: Optional[str] = AddressOpt,
    teacher: Optional[str] = TeacherOpt,
    student: Optional[str] = StudentOpt,
    adapter: Optional[str] = AdapterOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Caption → SIP prompt → img2img → filter → write an augmented dataset (resumable)."""
    from sip.augment.run import AugmentRecipe, run_augment

    overrides = _input_overrides(input) + _captioner_overrides(captioner) + _flags(**{
        "output": str(output) if output else None, "generate.model": model, "generate.per_image": per_image,
        "generate.strength": strength, "generate.guidance_scale": guidance, "generate.steps": steps,
        "generate.seed": seed, "shard": shard, "engine": engine, "ray.address": address, "guide.teacher": teacher,
        "guide.student": student, "generate.adapter": adapter}) + list(set_)
    cfg = _load(AugmentRecipe, recipe, overrides)
    _finish_generation(cfg, _run(run_augment, cfg))


@app.command()
def synth(
    recipe: Optional[Path] = RecipeArg,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder."),
    model: Optional[str] = typer.Option(None, help="Stable Diffusion hub id or folder (default: the shipped model)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Images per class."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps."),
    seed: Optional[int] = typer.Option(None, help="Run seed."),
    shard: Optional[str] = typer.Option(None, help="Do part i of n, e.g. 2/4 (not under torchrun / accelerate "
                                                   "launch, where each process takes its part by rank)."),
    engine: Optional[str] = EngineOpt,
    address: Optional[str] = AddressOpt,
    teacher: Optional[str] = TeacherOpt,
    student: Optional[str] = StudentOpt,
    adapter: Optional[str] = AdapterOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Data-free: txt2img from label prompts, N images per class, written as a dataset (resumable)."""
    from sip.augment.run import SynthRecipe, run_synth

    overrides = _flags(**{"output": str(output) if output else None, "generate.model": model,
                          "generate.per_class": per_class, "generate.guidance_scale": guidance,
                          "generate.steps": steps, "generate.seed": seed, "shard": shard, "engine": engine,
                          "ray.address": address, "guide.teacher": teacher, "guide.student": student,
                          "generate.adapter": adapter}) + list(set_)
    cfg = _load(SynthRecipe, recipe, overrides)
    _finish_generation(cfg, _run(run_synth, cfg))


@app.command()
def scenes(
    recipe: Optional[Path] = RecipeArg,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (COCO JSON + images)."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Objects: a sip dataset (sip synth output) or "
                                         "a folder of labelled object crops root/<label>/*."),
    set_: list[str] = SetOpt,
) -> None:
    """Detection scenes: objects (Fashion-MNIST, crops or generated) placed with tight boxes, written as COCO
    JSON + images (resumable); --set scenes.count=N sets the size."""
    from sip.data.bank import is_dataset
    from sip.detect.coco import SceneRecipe, run_scenes

    objects = [] if input is None else _flags(**{
        "objects.kind": "sip-dataset" if is_dataset(input) else "folder", "objects.path": str(input)}) + [
        "objects.start=0", "objects.stop=null"]  # a Fashion-MNIST range does not carry over to another folder
    _run_and_record(SceneRecipe, run_scenes, recipe, objects + _flags(output=str(output) if output else None)
                    + list(set_))


@app.command()
def adapt(
    recipe: Optional[Path] = RecipeArg,
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Shots: image folder root/<label>/* or a saved HF "
                                         "dataset (replaces the recipe's source)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (rerun to resume)."),
    model: Optional[str] = typer.Option(None, help="Base Stable Diffusion hub id or folder (default: the shipped model)."),
    method: Optional[str] = typer.Option(None, help="textual_inversion, lora or finetune."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps."),
    set_: list[str] = SetOpt,
) -> None:
    """Teach the generator the user's few shots (textual inversion, LoRA, fine-tuning); resumable."""
    from sip.adapt.recipe import AdaptRecipe
    from sip.adapt.run import run_adapt

    overrides = _input_overrides(input) + _flags(**{"output": str(output) if output else None, "model": model,
                                                    "method": method, "steps": steps}) + list(set_)
    _run_and_record(AdaptRecipe, run_adapt, recipe, overrides)


@app.command()
def caption(
    recipe: Optional[Path] = RecipeArg,
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Image folder or saved HF dataset."),
    output: Path = typer.Option(Path("runs/captions"), "--output", "-o", help="Folder for captions.jsonl."),
    captioner: Optional[str] = typer.Option(None, help="'imagenet-topk' (offline) or an image-to-text hub id / folder."),
    set_: list[str] = SetOpt,
) -> None:
    """Caption every image of a source (cached) and write output/captions.jsonl."""
    from sip.augment.caption import run_captions
    from sip.augment.run import AugmentRecipe

    cfg = _load(AugmentRecipe, recipe, _input_overrides(input) + _captioner_overrides(captioner) + list(set_))
    n, path, cache = _run(run_captions, cfg.source, cfg.caption, output, cfg.progress)
    save_config(cfg, output / "config.yaml")
    typer.echo(f"captioned {n} images ({cache.hits} from cache, {cache.misses} new) → {path}")


def _run_recipe(cls, fn, recipe: Optional[Path], output: Optional[Path], set_: list[str], default: str) -> None:
    """Load ``cls`` from the recipe and overrides, run ``fn(config, output folder)``, print its result as JSON."""
    cfg = _load(cls, recipe, list(set_))
    typer.echo(json.dumps(_run(fn, cfg, output or Path("runs") / default)))


@app.command()
def train(recipe: Optional[Path] = RecipeArg,
          output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder."),
          set_: list[str] = SetOpt) -> None:
    """Train a timm classifier on real, synthetic or mixed data (a recipe with task: detection trains a detector
    on scene sets, distilled from kd.teacher when set)."""
    from sip.train.recipe import TrainRecipe
    from sip.train.run import run_training

    from sip.detect.train import task_of

    if _run(task_of, recipe, list(set_)) == "detection":
        from sip.detect.train import DetectRecipe, run_detection

        _run_recipe(DetectRecipe, run_detection, recipe, output, set_, "detect")
        return
    _run_recipe(TrainRecipe, run_training, recipe, output, set_, "train")


@app.command()
def distill(recipe: Optional[Path] = RecipeArg,
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder."),
            set_: list[str] = SetOpt) -> None:
    """Distil teachers into a student (Hinton KD, DeiT token, teacher ensembles, data-free; a recipe with task:
    detection distils a detector from kd.teacher)."""
    from sip.detect.train import task_of
    from sip.distill.run import DistillRecipe, run_distillation

    if _run(task_of, recipe, list(set_)) == "detection":
        from sip.detect.train import DetectRecipe, run_detection_distillation

        _run_recipe(DetectRecipe, run_detection_distillation, recipe, output, set_, "detect")
        return
    _run_recipe(DistillRecipe, run_distillation, recipe, output, set_, "distill")


@app.command()
def rounds(recipe: Optional[Path] = RecipeArg,
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (resumed when it exists)."),
           set_: list[str] = SetOpt) -> None:
    """Generation in rounds with the student: distil, find the classes it gets wrong against its teacher,
    generate more of them (guided by teacher and student), distil again (resumable by round)."""
    from sip.distill.rounds import RoundsRecipe, run_rounds

    _run_recipe(RoundsRecipe, run_rounds, recipe, output, set_, "rounds")


@app.command()
def logits(recipe: Optional[Path] = RecipeArg,
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="Logits store folder."),
           set_: list[str] = SetOpt) -> None:
    """Run teachers once over a dataset and store their logits (with augmentation replay)."""
    from sip.distill.run import LogitsRecipe, run_logits

    _run_recipe(LogitsRecipe, run_logits, recipe, output, set_, "logits")


@app.command()
def merge(output: Path = typer.Argument(..., help="Output folder of a sharded run."),
          shards: int = typer.Option(..., "--shards", "-n", help="Number of shards (n of --shard i/n).")) -> None:
    """Merge the per-shard metadata of a sharded run once every shard is done."""
    from sip.data.bank import merge_shards

    if not _run(merge_shards, output, shards):
        _fail(f"not every shard of {output} is done yet (each writes train/.shard-i-of-{shards}.done)", 1)
    typer.echo(f"merged {shards} shards into {output / 'train' / 'metadata.jsonl'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder written by sip demo / augment / train."),
           max_sources: int = typer.Option(10, "--max-sources", help="Source images per dataset grid."),
           max_variants: int = typer.Option(4, "--max-variants", help="Variants shown per source."),
           max_scenes: int = typer.Option(8, "--max-scenes", help="Scenes per detection run's grid of boxes."),
           min_score: float = typer.Option(0.3, "--min-score", help="Smallest score of a predicted box drawn.")) -> None:
    """Write an HTML report (variant grid, training curves, predicted boxes, accuracy table) for a run folder."""
    from sip.report.page import write_report

    path = _run(write_report, run_dir, max_sources=max_sources, max_variants=max_variants, max_scenes=max_scenes,
                min_score=min_score)
    typer.echo(f"report → {path}")


@app.command()
def export(dataset: Path = typer.Argument(..., help="A dataset written by sip augment / synth."),
           dest: Optional[Path] = typer.Option(None, "--dest", "-o", help="save_to_disk folder (default: DATASET-hf)."),
           hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Hub repo id (needs network and a token)."),
           private: bool = typer.Option(False, help="Private hub repo."),
           overwrite: bool = typer.Option(False, help="Replace an existing --dest.")) -> None:
    """Convert a written dataset to a Hugging Face DatasetDict (save_to_disk), or push it to the Hub."""
    from sip.export import export_dataset, push_to_hub

    if hub:
        _run(push_to_hub, dataset, hub, private=private)
        typer.echo(f"pushed {dataset} → {hub}")
        return
    dest = dest or dataset.with_name(dataset.name + "-hf")
    ds = _run(export_dataset, dataset, dest, overwrite=overwrite)
    typer.echo(f"{len(ds['train'])} images → {dest}")


@app.command()
def demo(
    output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Run folder for every output."),
    quick: bool = typer.Option(False, help="Smaller everything (a smoke run, ~1 minute)."),
    set_: list[str] = SetOpt,
) -> None:
    """The main job on the embedded default: 1-shot Fashion-MNIST → captions → SIP prompts → img2img
    → dataset → student with vs. without sip data (KD from a teacher) → report."""
    from sip.demo import run_demo

    result = _run(run_demo, output, quick=quick, overrides=list(set_))
    typer.echo(result)
