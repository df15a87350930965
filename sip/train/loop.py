"""The training loop shared by ``sip train`` and ``sip distill``: accelerator, optimiser and schedule,
:func:`evaluate`, and :func:`fit` (epochs of steps; the step itself is passed in)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sip.ids import stable_seed
from sip.models.checkpoints import MODEL_FILE, save_model_file
from sip.runtime import large_input, resolve_device, resolve_precision
from sip.train.inputs import EpochView, TransformedImages
from sip.train.recipe import DataSection, OptimSection, RunSection
from sip.train.run_dir import load_checkpoint, rewrite_metrics, save_checkpoint

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------------------

def make_accelerator(run: RunSection, img_size: int | None = None):
    """An ``accelerate.Accelerator`` for ``run.device`` / ``run.precision`` (multi-process under
    ``accelerate launch``). ``img_size``: the model's input size; ``precision: auto`` on an AMX CPU takes
    bf16 only from ``sip.runtime.AMX_MIN_IMG_SIZE`` up (smaller inputs train faster in fp32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device, large_input(img_size))
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    state = AcceleratorState._shared_state
    if state and PartialState().num_processes == 1 and (
            state.get("_mixed_precision") != mixed or PartialState().device.type != device.type):
        # Several runs in one single-process Python session (a notebook, the test suite) may ask for
        # different precisions; accelerate keeps one global state, so start it afresh for this run.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")


# ----------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW; biases, norm weights and the model's ``no_weight_decay()`` parameters are not decayed."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, optim.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, steps_per_epoch: int):
    """Per-step linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    total = max(optim.epochs * steps_per_epoch, 1)
    warmup = min(round(optim.warmup_epochs * steps_per_epoch), total - 1)
    floor = optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rescale_to_world(counters: dict[str, float], scheduler, optimizer, world: int, batch_size: int,
                     steps_per_epoch: int) -> None:
    """A checkpoint made by another process count: the items already taken in the epoch stay taken (the
    view resumes at that global offset), the step counters are restated in this count's steps, and the
    learning-rate schedule (per step, so its length depends on the count) is moved to the same point."""
    logger.warning("resuming a run made by %d processes with %d: %d items of epoch %d were taken; the rest of "
                   "the epoch is split over %d", int(counters["world"]), world, int(counters["epoch_items"]),
                   int(counters["epoch"]) + 1, world)
    counters["step_in_epoch"] = float(int(counters["epoch_items"]) // (batch_size * world))
    counters["global_step"] = counters["epoch"] * steps_per_epoch + counters["step_in_epoch"]
    counters["world"] = float(world)
    step = int(counters["global_step"])
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.last_epoch, scheduler._last_lr = step, lrs


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def merge_heads(out: Any) -> torch.Tensor:
    """A distilled model's tuple of head outputs (class + distillation tokens) → their mean."""
    if isinstance(out, (tuple, list)):
        return torch.stack([o.float() for o in out]).mean(0)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, accelerator, progress: bool = False,
             desc: str = "eval") -> dict[str, float]:
    """Top-1, top-5 (top-k for k = min(5, classes)) accuracy in %, mean cross-entropy and the number of
    samples seen over ``loader``. Under several processes pass a loader prepared by the accelerator (each
    process evaluates its share; ``gather_for_metrics`` drops the padding of the last batch)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x = batch["image"].to(accelerator.device)
        y = batch["label"].to(accelerator.device)
        with accelerator.autocast():
            logits = merge_heads(model(x)).float()
        logits, y = accelerator.gather_for_metrics((logits, y))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        total += len(y)
    model.train(was_training)
    total = max(total, 1)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total,
            "samples": total}




StepFn = Callable[[nn.Module, dict[str, Any], int, int],
                  tuple[dict[str, torch.Tensor] | torch.Tensor, Any, torch.Tensor | None]]
"""A step: ``(model, batch, epoch, step_in_epoch) → (loss terms, logits for accuracy, labels or None)``.

The terms are a dict of named, already weighted scalars (``{"ce": …, "kd": …}``) whose sum is minimised;
each is averaged over the epoch into ``metrics.jsonl`` as ``train_<name>``. A bare tensor counts as one
term, ``loss``. ``epoch`` and ``step_in_epoch`` (0-based) let a step draw batch-level randomness (mixup,
CutMix) that a resumed run replays exactly."""


def total_loss(terms: dict[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A step's terms → (their sum, the terms as a dict)."""
    if isinstance(terms, torch.Tensor):
        return terms, {"loss": terms}
    if not terms:
        raise ValueError("a training step returned no loss terms")
    return torch.stack([t.float() for t in terms.values()]).sum(), terms


@dataclass
class FitResult:
    """What :func:`fit` returns: the final evaluation and the run's counters."""

    metrics: dict[str, Any]
    model: nn.Module




def fit(*, model: nn.Module, train_view: EpochView, eval_images: Any, eval_transform: Callable, step_fn: StepFn,
        optim: OptimSection, run: RunSection, data: DataSection, run_dir: Path, accelerator, model_meta: dict,
        resume: bool, desc: str = "train", modules_to_device: Sequence[nn.Module] = ()) -> FitResult:
    """The epoch loop: train with ``step_fn``, evaluate, log, checkpoint, resume; returns final metrics.

    Args:
        model (nn.Module): the network being trained (not yet prepared by accelerate).
        train_view (EpochView): the training items.
        eval_images: ``(image, label)`` dataset for evaluation.
        eval_transform (Callable): image → tensor for evaluation.
        step_fn (StepFn): ``(model, batch, epoch, step_in_epoch) -> (loss terms, logits for train
            accuracy, labels or None)``; runs inside the accelerator's autocast.
        optim, run, data: recipe sections.
        run_dir (Path): output folder (already prepared by :func:`prepare_run_dir`).
        accelerator: from :func:`make_accelerator`.
        model_meta (dict): saved in the weights' metadata (timm name, kwargs, classes, input config).
        resume (bool): continue from ``run_dir/checkpoint``.
        desc (str, optional): progress-bar label. Defaults to "train".
        modules_to_device (Sequence[nn.Module], optional): extra modules (teachers) to move to the device.
    """
    from tqdm.auto import tqdm

    bs = data.batch_size
    n_epoch = train_view.epoch_length
    drop_last = n_epoch >= bs
    steps_per_epoch = n_epoch // bs if drop_last else 1
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    world = accelerator.num_processes
    # epoch_items: items of the current epoch all processes together have taken (the resume offset);
    # world: the process count that took them
    counters = {"epoch": 0.0, "step_in_epoch": 0.0, "global_step": 0.0, "best_top1": -1.0, "best_epoch": 0.0,
                "train_time_s": 0.0, "train_images": 0.0, "epoch_items": 0.0, "world": float(world)}
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        saved = load_checkpoint(run_dir, model, optimizer, scheduler)
        saved.setdefault("epoch_items", saved.get("step_in_epoch", 0.0) * bs * saved.get("world", 1.0))
        counters.update(saved)
        if int(counters["world"]) != world:
            rescale_to_world(counters, scheduler, optimizer, world, bs, steps_per_epoch)
        rewrite_metrics(metrics_path, int(counters["epoch"]))
        logger.info("resuming %s at epoch %d step %d", run_dir, counters["epoch"], counters["global_step"])
    model, optimizer = accelerator.prepare(model, optimizer)
    for m in modules_to_device:
        m.to(accelerator.device)

    eval_full = TransformedImages(eval_images, eval_transform)
    eval_subset = eval_full
    if run.eval_max_samples and run.eval_max_samples < len(eval_images):
        pick = np.sort(np.random.default_rng(0).permutation(len(eval_images))[: run.eval_max_samples])
        eval_subset = TransformedImages(eval_images, eval_transform, pick)

    def eval_loader(ds):
        loader = torch.utils.data.DataLoader(ds, batch_size=data.eval_batch_size, shuffle=False,
                                             num_workers=data.num_workers)
        # several processes: each evaluates its share (not the whole set each), results gathered once
        return accelerator.prepare_data_loader(loader) if accelerator.num_processes > 1 else loader

    progress = run.progress and accelerator.is_main_process
    last_eval: dict[str, float] = {}
    start_epoch = int(counters["epoch"])
    for epoch in range(start_epoch, optim.epochs):
        # 7a. one epoch of training
        steps_before = int(counters["step_in_epoch"])
        train_view.set_epoch(epoch, start=int(counters["epoch_items"]))
        loader = torch.utils.data.DataLoader(train_view, batch_size=bs, shuffle=False, drop_last=drop_last,
                                             num_workers=data.num_workers)
        model.train()
        loss_sum = correct = seen = labelled = 0.0
        term_sums: dict[str, float] = {}
        nonfinite = 0
        t0 = t_mark = t_ready = time.perf_counter()
        seen_mark = data_wait = 0.0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{optim.epochs}", leave=False, disable=not progress)
        for batch in bar:
            data_wait += time.perf_counter() - t_ready  # the loop waiting for this batch (loading, augmenting)
            torch.manual_seed(stable_seed("step", run.seed, int(counters["global_step"])))
            with accelerator.autocast():
                terms, logits, labels = step_fn(model, batch, epoch, int(counters["step_in_epoch"]))
            loss, terms = total_loss(terms)
            accelerator.backward(loss)
            # one device sync per step for all values (each .item() would wait for the device)
            values = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()]).tolist()
            loss_value = values[0]
            # the norm is needed anyway for clipping; a non-finite one means a bad step: skip it, as fp16's
            # GradScaler does. Seen here: torch 2.14's bf16 (AMX) conv weight-gradient is sometimes NaN for a
            # stride-2 3x3 conv over a 1x1 map (tiny inputs in deep ResNets); one such step ruins the weights.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf"))
            if torch.isfinite(torch.as_tensor(grad_norm)):
                optimizer.step()
            else:
                nonfinite += 1
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n = batch["image"].shape[0]
            if math.isfinite(loss_value):
                loss_sum += loss_value * n
                for name, v in zip(terms, values[1:]):
                    term_sums[name] = term_sums.get(name, 0.0) + v * n
            seen += n
            if labels is not None:
                correct += (merge_heads(logits).argmax(1) == labels).sum().item()
                labelled += n
            counters["global_step"] += 1
            counters["step_in_epoch"] += 1
            counters["epoch_items"] += n * world
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if (run.checkpoint_every_steps and counters["global_step"] % run.checkpoint_every_steps == 0
                    and counters["step_in_epoch"] < steps_per_epoch):
                counters["train_time_s"] += time.perf_counter() - t_mark
                counters["train_images"] += (seen - seen_mark) * world
                if accelerator.is_main_process:
                    save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler,
                                     {**model_meta, "epoch": epoch}, counters)
                t_mark, seen_mark = time.perf_counter(), seen
            t_ready = time.perf_counter()
        epoch_time = time.perf_counter() - t0
        if nonfinite:
            steps_done = int(counters["step_in_epoch"]) - steps_before
            logger.warning("epoch %d: %d of %d steps had non-finite gradients and were skipped",
                           epoch + 1, nonfinite, steps_done)
            if nonfinite == steps_done:
                raise FloatingPointError(
                    f"every step of epoch {epoch + 1} had non-finite gradients (precision "
                    f"{accelerator.mixed_precision}); lower optim.lr, set optim.grad_clip, or rerun with "
                    f"--set run.precision=fp32. The last checkpoint in {run_dir} is untouched.")
        counters["train_time_s"] += time.perf_counter() - t_mark
        counters["train_images"] += (seen - seen_mark) * world
        counters["epoch"] = epoch + 1
        counters["step_in_epoch"] = counters["epoch_items"] = 0

        # 7b. evaluation, metrics line, checkpoint
        line: dict[str, Any] = {"epoch": epoch + 1, "step": int(counters["global_step"]),
                                "lr": scheduler.get_last_lr()[0], "train_loss": loss_sum / max(seen, 1),
                                "epoch_time_s": round(epoch_time, 3), "nonfinite_steps": nonfinite,
                                "train_images_per_s": round(seen * world / max(epoch_time, 1e-9), 2),
                                "data_time_s": round(data_wait, 3)}
        if list(term_sums) != ["loss"]:
            line.update({f"train_{name}": v / max(seen, 1) for name, v in term_sums.items()})
        if labelled:
            line["train_top1"] = 100.0 * correct / labelled
        is_last = epoch + 1 == optim.epochs
        if is_last or (epoch + 1) % run.eval_every == 0:
            t_eval = time.perf_counter()
            result = evaluate(model, eval_loader(eval_full if is_last else eval_subset), accelerator, progress)
            line["eval_time_s"] = round(time.perf_counter() - t_eval, 3)
            line.update({f"eval_{k}": v for k, v in result.items() if k != "samples"})
            last_eval = result
            if result["top1"] > counters["best_top1"]:
                counters["best_top1"], counters["best_epoch"] = result["top1"], epoch + 1
        if accelerator.is_main_process:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler,
                             {**model_meta, "epoch": epoch + 1}, counters)
        if progress:
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}
            tqdm.write(f"[{desc}] " + json.dumps(shown))

    # 8. final weights and metrics
    unwrapped = accelerator.unwrap_model(model)
    if not last_eval:  # resumed after the last epoch had finished: evaluate the saved weights
        last_eval = evaluate(model, eval_loader(eval_full), accelerator, progress)
    n_params = sum(p.numel() for p in unwrapped.parameters())
    metrics = {"top1": last_eval["top1"], "top5": last_eval["top5"], "eval_loss": last_eval["loss"],
               "best_top1": max(counters["best_top1"], last_eval["top1"]),
               "best_epoch": int(counters["best_epoch"]) or optim.epochs, "epochs": optim.epochs,
               "steps": int(counters["global_step"]), "train_time_s": round(counters["train_time_s"], 2),
               "train_images_per_s": round(counters["train_images"] / max(counters["train_time_s"], 1e-9), 2),
               "num_params": n_params, "eval_samples": last_eval.get("samples", len(eval_images)),
               "processes": accelerator.num_processes, "run_dir": str(run_dir)}
    if accelerator.is_main_process:
        save_model_file(unwrapped, run_dir / MODEL_FILE, {**model_meta, "epoch": optim.epochs, "metrics": metrics})
        (run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return FitResult(metrics, unwrapped)
