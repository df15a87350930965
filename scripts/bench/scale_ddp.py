"""Part 2 of scripts/bench_scale.py: a DDP epoch of ``sip distill`` / ``sip train`` with one process and under
torchrun, read from each run's ``metrics.jsonl``, and the table."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .scale_launch import REPO, Launch, cell, fresh, launch


def build_teacher(recipe_path: Path, folder: Path) -> str:
    """A sip checkpoint of the recipe's model with random weights (a teacher's cost does not depend on them)."""
    import torch

    from sip.config import load_config
    from sip.models.checkpoints import model_metadata, save_model_file
    from sip.train.inputs import build_model, class_names, resolve_input_config
    from sip.train.recipe import TrainRecipe

    torch.set_num_threads(1)
    recipe = load_config(TrainRecipe, recipe_path)
    classes = class_names(recipe.data)
    torch.manual_seed(0)
    model, kwargs = build_model(recipe.model, len(classes), recipe.data.img_size)
    meta = model_metadata(recipe.model.name, kwargs, classes, resolve_input_config(model, recipe.data))
    save_model_file(model, fresh(folder) / "model.safetensors", meta)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"{recipe.model.name} ({params:.2f} M params, random weights, from {recipe_path.relative_to(REPO)})"


def ddp_argv(args: argparse.Namespace, out: Path, teacher: Path | None, processes: int) -> list[str]:
    recipe = Path(args.ddp_recipe) if args.ddp_recipe else REPO / "pipelines" / (
        "fmnist_student_cnn_real.yaml" if args.ddp == "distill" else "fmnist_teacher.yaml")
    sets = [f"optim.epochs={args.epochs}", f"run.eval_every={args.epochs}", f"data.eval.stop={args.eval_images}",
            "run.threads=1", "run.device=cpu", "run.progress=false"]
    if args.ddp == "distill":
        sets += [f"data.mix.epoch_size={args.epoch_images}", f"teachers=[{{checkpoint: {teacher}}}]"]
    else:
        sets += [f"data.real.stop={args.epoch_images}"]
    if args.ddp_batch:
        sets.append(f"data.batch_size={args.ddp_batch}")
    sip = ["-m", "sip", args.ddp, str(recipe), "-o", str(out), *[x for s in sets for x in ("--set", s)]]
    if processes == 1:
        return [sys.executable, *sip]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *sip]


@dataclass
class DDPRun:
    launch: Launch
    processes: int  # as final_metrics.json records them
    batch: int  # per process
    steps_per_epoch: int  # per process
    epoch_s: float  # the epoch reported (the faster of epochs 2+ when there are several)
    epochs_s: list[float]
    images_per_s_metrics: float  # metrics.jsonl's train_images_per_s of that epoch (all processes' images)
    eval_samples: int
    data_time_s: float  # of that epoch: the loop waiting for batches
    eval_time_s: float  # every evaluation of the run

    @property
    def global_images(self) -> int:
        return self.steps_per_epoch * self.batch * self.processes

    @property
    def global_rate(self) -> float:
        return self.global_images / self.epoch_s


def read_ddp_run(lnch: Launch, out: Path) -> DDPRun:
    import yaml

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "final_metrics.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    epochs = [float(x["epoch_time_s"]) for x in lines]
    pick = min(range(1, len(lines)), key=lambda i: epochs[i]) if len(lines) > 1 else 0  # epoch 1 warms up
    evals = [float(x["eval_time_s"]) for x in lines if "eval_time_s" in x]
    return DDPRun(lnch, int(final["processes"]), int(config["data"]["batch_size"]), int(lines[0]["step"]),
                  epochs[pick], epochs, float(lines[pick]["train_images_per_s"]), int(final["eval_samples"]),
                  float(lines[pick]["data_time_s"]), sum(evals))


def run_ddp(args: argparse.Namespace, root: Path) -> dict[str, DDPRun]:
    """The teacher (distill), then one process and torchrun, each into ``root/ddp/MODE`` (log next to it)."""
    teacher = None
    if args.ddp == "distill":
        if args.teacher:
            teacher = Path(args.teacher).resolve()
            what = f"{teacher} (given)"
        else:
            teacher = root / "ddp" / "teacher"
            what = build_teacher(REPO / args.teacher_recipe, teacher)
        print(f"\n## 2. DDP epoch: sip distill, teacher {what}", flush=True)
    else:
        print("\n## 2. DDP epoch: sip train", flush=True)
    runs = {}
    for processes in (1, args.processes):
        mode = "one" if processes == 1 else "torchrun"
        out = fresh(root / "ddp" / mode)
        name = "1 process" if processes == 1 else f"torchrun × {processes}"
        lnch = launch(name, ddp_argv(args, out, teacher, processes), root / "ddp" / f"{mode}.log", "local",
                      args.timeout)
        runs[mode] = read_ddp_run(lnch, out)
    return runs


def report_ddp(args: argparse.Namespace, runs: dict[str, DDPRun]) -> dict:
    """Print the table and its notes; return each configuration's numbers by mode."""
    one = runs["one"]
    print("\n| configuration | processes (final_metrics) | processes seen | batch/process | steps/process "
          "| images/epoch | epoch s | data wait s | images/s (global) | metrics train_images_per_s (global) "
          "| efficiency | wall s | outside the epoch s | eval s | eval samples | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary: dict = {}
    for mode, r in runs.items():
        eff = r.global_rate / (args.processes * one.global_rate) if mode != "one" else None
        outside = r.launch.wall_s - sum(r.epochs_s)
        print(f"| {r.launch.name} | {r.processes} | {len(r.launch.workers)} | {r.batch} | {r.steps_per_epoch} "
              f"| {r.global_images} | {r.epoch_s:.2f} | {r.data_time_s:.2f} | {r.global_rate:.1f} "
              f"| {r.images_per_s_metrics:.1f} | {cell(eff)} | {r.launch.wall_s:.1f} | {outside:.1f} "
              f"| {r.eval_time_s:.2f} | {r.eval_samples} "
              f"| {r.launch.cpu_s:.1f} |")
        summary[mode] = {"processes": r.processes, "processes_seen": len(r.launch.workers), "batch": r.batch,
                         "steps_per_epoch": r.steps_per_epoch, "images_per_epoch": r.global_images,
                         "epoch_s": r.epoch_s, "epochs_s": r.epochs_s, "images_per_s": round(r.global_rate, 2),
                         "metrics_train_images_per_s": r.images_per_s_metrics, "wall_s": round(r.launch.wall_s, 2),
                         "outside_epoch_s": round(outside, 2), "eval_samples": r.eval_samples,
                         "cpu_s": round(r.launch.cpu_s, 1), "efficiency": None if eff is None else round(eff, 3)}
    two = runs["torchrun"]
    if two.processes != args.processes or len(two.launch.workers) != args.processes:
        print(f"- WARNING: asked torchrun for {args.processes} processes; final_metrics.json says {two.processes}, "
              f"{len(two.launch.workers)} sip processes seen")
    which = "the faster of epochs 2+" if args.epochs > 1 else "the one epoch"
    print(f"- epoch s: metrics.jsonl epoch_time_s ({which}): data loading and steps (forward, backward, gradient "
          "all-reduce, optimiser) together; data wait s: the part of it the loop waited for batches "
          "(data_time_s); eval s: evaluation after the epoch, every evaluated epoch (eval_time_s)")
    print("- outside the epoch: wall clock minus every epoch_time_s: interpreter and imports, data and model set-up, "
          "the process group, evaluation, checkpoints and final weights")
    print("- images/s (global) = steps/process × batch/process × processes / epoch s; metrics.jsonl's "
          "train_images_per_s is the same global rate, as sip computes it")
    print(f"- the global batch is {args.processes} × the per-process batch under torchrun, at the same optim.lr")
    return summary
