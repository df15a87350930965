"""The training loop shared by ``sip train`` and ``sip distill``: accelerator, optimiser and schedule, and
:func:`fit` (epochs of steps; the step itself is passed in; evaluation in :mod:`sip.train.evaluate`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sip.ids import stable_seed
from sip.models.checkpoints import MODEL_FILE, save_model_file
from sip.runtime import large_input, resolve_device, resolve_precision
from sip.train.evaluate import HeldOut, merge_heads
from sip.train.inputs import EpochView
from sip.train.recipe import DataSection, OptimSection, RunSection
from sip.train.run_dir import load_checkpoint, rewrite_metrics, save_checkpoint
from sip.train.schedule import warmup_cosine

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
    """Per-step linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` (:func:`warmup_cosine`)."""
    total = max(optim.epochs * steps_per_epoch, 1)
    warmup = min(round(optim.warmup_epochs * steps_per_epoch), total - 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total, optim.min_lr_ratio))


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






# ----------------------------------------------------------------------------------------------------
# The epoch loop
# ----------------------------------------------------------------------------------------------------

_TALLY = "tally."  # counters under this prefix are an unfinished epoch's running sums (mid-epoch checkpoints)


@dataclass
class EpochTally:
    """Running sums of one epoch's steps (this process's share). A mid-epoch checkpoint saves them, so the
    resumed epoch's line in ``metrics.jsonl`` covers the whole epoch as an uninterrupted run's does, and its
    ``epoch_time_s`` / ``data_time_s`` add up the parts before and after the resume."""

    loss: float = 0.0  # Σ loss · batch size over the steps whose loss was finite
    seen: float = 0.0  # images trained on
    correct: float = 0.0  # train top-1 hits (labelled batches)
    labelled: float = 0.0
    steps: float = 0.0
    nonfinite: float = 0.0  # steps skipped for a non-finite gradient norm
    time_s: float = 0.0  # wall time of the epoch's parts before the last resume
    data_s: float = 0.0  # time spent waiting for batches
    terms: dict[str, float] = field(default_factory=dict)  # Σ term · batch size, per named loss term

    def add(self, n: int, loss: float, terms: dict[str, float], correct: float | None) -> None:
        """Count one step of ``n`` images (``correct``: None for a batch without hard labels)."""
        if math.isfinite(loss):
            self.loss += loss * n
            for name, v in terms.items():
                self.terms[name] = self.terms.get(name, 0.0) + v * n
        self.seen += n
        self.steps += 1
        if correct is not None:
            self.correct += correct
            self.labelled += n

    def to_counters(self, elapsed_s: float, data_s: float) -> dict[str, float]:
        """The tally as checkpoint counters, with this part's elapsed and data-wait time added."""
        out = {f"{_TALLY}{k}": float(getattr(self, k)) for k in
               ("loss", "seen", "correct", "labelled", "steps", "nonfinite")}
        out[f"{_TALLY}time_s"], out[f"{_TALLY}data_s"] = self.time_s + elapsed_s, self.data_s + data_s
        out.update({f"{_TALLY}term.{name}": v for name, v in self.terms.items()})
        return out

    @classmethod
    def from_counters(cls, counters: dict[str, float]) -> EpochTally:
        """Take (and remove) the tally's keys out of loaded checkpoint counters; none → an empty tally."""
        keys = [k for k in counters if k.startswith(_TALLY)]
        values = {k[len(_TALLY):]: counters.pop(k) for k in keys}
        terms = {k[len("term."):]: v for k, v in values.items() if k.startswith("term.")}
        return cls(**{k: v for k, v in values.items() if not k.startswith("term.")}, terms=terms)

    def line(self, world: int, epoch_time: float, data_time: float) -> dict[str, Any]:
        """The epoch's training part of its ``metrics.jsonl`` line."""
        seen = max(self.seen, 1)
        out: dict[str, Any] = {"train_loss": self.loss / seen, "epoch_time_s": round(epoch_time, 3),
                               "nonfinite_steps": int(self.nonfinite),
                               "train_images_per_s": round(self.seen * world / max(epoch_time, 1e-9), 2),
                               "data_time_s": round(data_time, 3)}
        if list(self.terms) != ["loss"]:
            out.update({f"train_{name}": v / seen for name, v in self.terms.items()})
        if self.labelled:
            out["train_top1"] = 100.0 * self.correct / self.labelled
        return out


class _Fit:
    """The state of one :func:`fit` (model, optimiser, schedule, counters, the epoch's tally) and its steps."""

    def __init__(self, *, model: nn.Module, train_view: EpochView, step_fn: StepFn, optim: OptimSection,
                 run: RunSection, data: DataSection, run_dir: Path, accelerator, model_meta: dict, desc: str,
                 collate_fn: Callable | None = None, score_key: str = "top1"):
        self.model, self.train_view, self.step_fn, self.optim, self.run = model, train_view, step_fn, optim, run
        self.collate_fn, self.score_key = collate_fn, score_key  # detection: lists of boxes; best epoch by mAP
        self.data, self.run_dir, self.accelerator, self.model_meta, self.desc = data, run_dir, accelerator, model_meta, desc
        n_epoch = train_view.epoch_length
        self.drop_last = n_epoch >= data.batch_size
        self.steps_per_epoch = n_epoch // data.batch_size if self.drop_last else 1
        self.optimizer = build_optimizer(model, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, self.steps_per_epoch)
        self.world = accelerator.num_processes
        # epoch_items: items of the current epoch all processes together have taken (the resume offset);
        # world: the process count that took them
        self.counters = {"epoch": 0.0, "step_in_epoch": 0.0, "global_step": 0.0, "best_val_top1": -1.0,
                         "best_epoch": 0.0, "train_time_s": 0.0, "train_images": 0.0, "epoch_items": 0.0,
                         "world": float(self.world)}
        self.tally = EpochTally()
        self.metrics_path = run_dir / "metrics.jsonl"
        self.progress = run.progress and accelerator.is_main_process

    def resume(self) -> None:
        """Continue from ``run_dir/checkpoint``: weights, optimiser, schedule, counters, an unfinished epoch's tally."""
        saved = load_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler)
        self.tally = EpochTally.from_counters(saved)
        saved.setdefault("epoch_items", saved.get("step_in_epoch", 0.0) * self.data.batch_size * saved.get("world", 1.0))
        self.counters.update(saved)
        if int(self.counters["world"]) != self.world:
            rescale_to_world(self.counters, self.scheduler, self.optimizer, self.world, self.data.batch_size,
                             self.steps_per_epoch)
        rewrite_metrics(self.metrics_path, int(self.counters["epoch"]))
        logger.info("resuming %s at epoch %d step %d", self.run_dir, self.counters["epoch"], self.counters["global_step"])

    def checkpoint(self, epochs_done: int, tally: dict[str, float] | None = None) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.run_dir, self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler,
                            {**self.model_meta, "epoch": epochs_done}, {**self.counters, **(tally or {})})

    def step(self, batch: dict[str, Any], epoch: int) -> float:
        """One optimiser step on ``batch``; returns its loss."""
        torch.manual_seed(stable_seed("step", self.run.seed, int(self.counters["global_step"])))
        with self.accelerator.autocast():
            terms, logits, labels = self.step_fn(self.model, batch, epoch, int(self.counters["step_in_epoch"]))
        loss, terms = total_loss(terms)
        self.accelerator.backward(loss)
        # one device sync per step for all values (each .item() would wait for the device)
        values = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()]).tolist()
        # the norm is needed anyway for clipping; a non-finite one means a bad step: skip it, as fp16's
        # GradScaler does. Seen here: torch 2.14's bf16 (AMX) conv weight-gradient is sometimes NaN for a
        # stride-2 3x3 conv over a 1x1 map (tiny inputs in deep ResNets); one such step ruins the weights.
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip or float("inf"))
        if torch.isfinite(torch.as_tensor(grad_norm)):
            self.optimizer.step()
        else:
            self.tally.nonfinite += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = batch["image"].shape[0]
        correct = None if labels is None else (merge_heads(logits).argmax(1) == labels).sum().item()
        self.tally.add(n, values[0], dict(zip(terms, values[1:])), correct)
        self.counters["global_step"] += 1
        self.counters["step_in_epoch"] += 1
        self.counters["epoch_items"] += n * self.world
        return values[0]

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """7a. The rest of ``epoch``'s steps; returns the epoch's wall time and data-wait time (all its parts)."""
        from tqdm.auto import tqdm

        c, tally = self.counters, self.tally
        self.train_view.set_epoch(epoch, start=int(c["epoch_items"]))
        loader = torch.utils.data.DataLoader(self.train_view, batch_size=self.data.batch_size, shuffle=False,
                                             drop_last=self.drop_last, num_workers=self.data.num_workers,
                                             collate_fn=self.collate_fn)
        self.model.train()
        t0 = t_mark = t_ready = time.perf_counter()
        seen_mark, data_wait = tally.seen, 0.0
        bar = tqdm(loader, desc=f"{self.desc} {epoch + 1}/{self.optim.epochs}", leave=False, disable=not self.progress)
        for batch in bar:
            data_wait += time.perf_counter() - t_ready  # the loop waiting for this batch (loading, augmenting)
            loss_value = self.step(batch, epoch)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            every = self.run.checkpoint_every_steps
            if every and c["global_step"] % every == 0 and c["step_in_epoch"] < self.steps_per_epoch:
                now = time.perf_counter()
                c["train_time_s"] += now - t_mark
                c["train_images"] += (tally.seen - seen_mark) * self.world
                self.checkpoint(epoch, tally.to_counters(now - t0, data_wait))
                t_mark, seen_mark = time.perf_counter(), tally.seen
            t_ready = time.perf_counter()
        now = time.perf_counter()
        c["train_time_s"] += now - t_mark
        c["train_images"] += (tally.seen - seen_mark) * self.world
        self._check_nonfinite(epoch)
        return tally.time_s + now - t0, tally.data_s + data_wait

    def _check_nonfinite(self, epoch: int) -> None:
        bad, steps = int(self.tally.nonfinite), int(self.tally.steps)
        if not bad:
            return
        logger.warning("epoch %d: %d of %d steps had non-finite gradients and were skipped", epoch + 1, bad, steps)
        if bad == steps:
            raise FloatingPointError(
                f"every step of epoch {epoch + 1} had non-finite gradients (precision "
                f"{self.accelerator.mixed_precision}); lower optim.lr, set optim.grad_clip, or rerun with "
                f"--set run.precision=fp32. The last checkpoint in {self.run_dir} is untouched.")

    def end_epoch(self, epoch: int, times: tuple[float, float], held_out: HeldOut) -> dict[str, float] | None:
        """7b. Validation (the whole split after the last epoch), the metrics line, the checkpoint; returns the
        whole split's validation after the last epoch (else None)."""
        c = self.counters
        c["epoch"], c["step_in_epoch"], c["epoch_items"] = epoch + 1, 0, 0
        line: dict[str, Any] = {"epoch": epoch + 1, "step": int(c["global_step"]),
                                "lr": self.scheduler.get_last_lr()[0], **self.tally.line(self.world, *times)}
        self.tally = EpochTally()
        is_last = epoch + 1 == self.optim.epochs
        val = None
        if is_last or (epoch + 1) % self.run.eval_every == 0:
            t_eval = time.perf_counter()
            val = held_out.validate(self.model, self.progress, whole=is_last)
            if val is not None:
                line["val_time_s"] = round(time.perf_counter() - t_eval, 3)
                line.update({f"val_{k}": v for k, v in val.items() if k != "samples"})
                if val[self.score_key] > c["best_val_top1"]:  # the counter keeps its name: old checkpoints resume
                    c["best_val_top1"], c["best_epoch"] = val[self.score_key], epoch + 1
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        self.checkpoint(epoch + 1)
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"[{self.desc}] " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                      for k, v in line.items()}))
        return val if is_last else None

    def finish(self, last_val: dict[str, float] | None, held_out: HeldOut) -> FitResult:
        """8. The test set (read here only), final weights and ``final_metrics.json``."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if last_val is None:  # resumed after the last epoch had finished: validate the saved weights again
            last_val = held_out.validate(self.model, self.progress, whole=True)
        test = held_out.test(self.model, self.progress)
        c = self.counters
        metrics: dict[str, Any] = {f"test_{k}": v for k, v in test.items()}
        if "top1" in test:  # classification: the test set's, as drivers and reports read them
            metrics.update(top1=test["top1"], top5=test["top5"])
        if last_val is not None:
            metrics.update({f"val_{k}": v for k, v in last_val.items()})
            metrics.update({f"best_val_{self.score_key}": max(c["best_val_top1"], last_val[self.score_key]),
                            "best_epoch": int(c["best_epoch"]) or self.optim.epochs})
        metrics.update({"epochs": self.optim.epochs, "steps": int(c["global_step"]),
                        "train_time_s": round(c["train_time_s"], 2),
                        "train_images_per_s": round(c["train_images"] / max(c["train_time_s"], 1e-9), 2),
                        "num_params": sum(p.numel() for p in unwrapped.parameters()),
                        "processes": self.world, "run_dir": str(self.run_dir)})
        if self.accelerator.is_main_process:
            save_model_file(unwrapped, self.run_dir / MODEL_FILE,
                            {**self.model_meta, "epoch": self.optim.epochs, "metrics": metrics})
            (self.run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        return FitResult(metrics, unwrapped)


def fit(*, model: nn.Module, train_view: EpochView, val_images: Any | None, test_images: Any,
        eval_transform: Callable, step_fn: StepFn, optim: OptimSection, run: RunSection, data: DataSection,
        run_dir: Path, accelerator, model_meta: dict, resume: bool, desc: str = "train",
        modules_to_device: Sequence[nn.Module] = (), held_out: Any | None = None,
        collate_fn: Callable | None = None, before_epoch: Callable[[nn.Module, int], None] | None = None
        ) -> FitResult:
    """The epoch loop: train with ``step_fn``, validate, log, checkpoint, resume; test once; returns final metrics.

    Args:
        model (nn.Module): the network being trained (not yet prepared by accelerate).
        train_view (EpochView): the training items.
        val_images: ``(image, label)`` dataset of the validation split (every epoch, the best epoch), or None.
        test_images: ``(image, label)`` dataset of the test set, read once after the last epoch.
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
        held_out (optional): another task's evaluator (``validate(model, progress, whole)`` / ``test(model,
            progress)`` returning metric dicts, ``score_key`` naming the one that picks the best epoch, e.g.
            :class:`sip.detect.evaluate.DetectionHeldOut`'s mAP); ``val_images`` / ``test_images`` /
            ``eval_transform`` are then unused. Defaults to None (top-1 on the images given).
        collate_fn (Callable, optional): the training DataLoader's (detection batches hold lists of boxes).
        before_epoch (Callable, optional): ``(model, epoch)`` called before each epoch's items are planned (also
            when a resumed run re-enters an epoch), with the unwrapped model: e.g. sip distill's ``select:``.
    """
    state = _Fit(model=model, train_view=train_view, step_fn=step_fn, optim=optim, run=run, data=data,
                 run_dir=run_dir, accelerator=accelerator, model_meta=model_meta, desc=desc, collate_fn=collate_fn,
                 score_key=getattr(held_out, "score_key", "top1"))
    if resume:
        state.resume()
    state.model, state.optimizer = accelerator.prepare(state.model, state.optimizer)
    for m in modules_to_device:
        m.to(accelerator.device)
    if held_out is None:
        held_out = HeldOut(val_images, test_images, eval_transform, batch_size=data.eval_batch_size,
                           num_workers=data.num_workers, max_samples=run.eval_max_samples, accelerator=accelerator)
    last_val = None
    for epoch in range(int(state.counters["epoch"]), optim.epochs):
        if before_epoch is not None:
            before_epoch(accelerator.unwrap_model(state.model), epoch)
        times = state.train_epoch(epoch)
        last_val = state.end_epoch(epoch, times, held_out)
    return state.finish(last_val, held_out)
