"""The run folder: resume rules (only keys that change results are compared, defaults filled in),
checkpoints (safetensors weights + optimiser state) and ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from sip.config import ConfigError, from_dict, save_config, to_dict
from sip.models.checkpoints import (
    CHECKPOINT_DIR,
    MODEL_FILE,
    load_checkpoint_file,
    load_weights,
    save_model_file,
)

_RESUME_FREE_KEYS = {"run.resume", "run.progress", "run.threads", "run.device", "data.num_workers",
                     "data.eval_batch_size", "run.eval_every", "run.eval_max_samples", "run.checkpoint_every_steps"}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _resume_view(recipe: Any, saved: Path | None = None) -> dict[str, Any]:
    """The flat settings that decide a run's outputs: of ``recipe``, or of the recipe saved at ``saved``.

    A saved config is read back into the current recipe class, so a key added since it was written takes
    its default (a newer sip can resume an older run); keys the current class no longer has are dropped.
    A recipe with ``output_settings()`` (e.g. :class:`sip.distill.run.DistillRecipe`) resolves its unset
    fields to the values actually used, so "unset" and "set to the default" compare equal.
    """
    if saved is not None:
        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        known = _flatten(json.loads(json.dumps(to_dict(recipe))))
        try:
            recipe = from_dict(type(recipe), data, source=str(saved))
        except ConfigError:  # a key this sip no longer knows: keep the keys both know, fill the rest
            recipe = from_dict(type(recipe), _prune(data, known), source=str(saved))
    view = recipe.output_settings() if hasattr(recipe, "output_settings") else to_dict(recipe)
    return _flatten(json.loads(json.dumps(view)))


def _prune(data: Any, known: dict[str, Any], prefix: str = "") -> Any:
    """``data`` without the keys (dotted, as in ``known``) the current recipe class does not have."""
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in known or any(name.startswith(key + ".") for name in known):
            out[k] = _prune(v, known, key)
    return out


def recipe_changes(recipe: Any, saved: str | Path) -> list[str]:
    """The dotted keys that decide a run's outputs and differ between ``recipe`` and the config saved at ``saved``.

    Keys that do not change what the run computes (progress, evaluation batch size, ...; threads and device
    change the order of float sums only, so their weights agree to rounding, not bit for bit) are left out, and
    unset keys compare equal to their resolved defaults, so an empty list means: the run at ``saved`` is this run.

    Args:
        recipe: The requested recipe (e.g. a ``TrainRecipe`` or ``DistillRecipe``).
        saved: A run folder's ``config.yaml``.
    """
    old, new = _resume_view(recipe, Path(saved)), _resume_view(recipe)
    return sorted(k for k in set(old) | set(new) if k not in _RESUME_FREE_KEYS and old.get(k) != new.get(k))


def prepare_run_dir(recipe: Any, run_dir: str | Path) -> tuple[Path, bool]:
    """Create ``run_dir``, check a resumed run has the same recipe, and write the resolved config.

    Returns:
        (run_dir, resuming): ``resuming`` is True when a checkpoint will be continued.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    has_checkpoint = (run_dir / CHECKPOINT_DIR / "state.pt").is_file()
    resume = recipe.run.resume and has_checkpoint
    saved = run_dir / "config.yaml"
    if resume and saved.is_file():
        changed = recipe_changes(recipe, saved)
        if changed:
            raise ConfigError(
                f"{run_dir} holds a checkpoint of a run with a different recipe (changed: {', '.join(changed[:8])}). "
                "Use a new run folder, restore the recipe, or set run.resume=false to start over.")
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, process 0 owns the folder
        return run_dir, resume
    if not resume:  # a fresh run: nothing of an earlier one may leak into this one's files
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        for name in ("metrics.jsonl", MODEL_FILE, "final_metrics.json"):
            (run_dir / name).unlink(missing_ok=True)
    save_config(recipe, saved)
    return run_dir, resume




def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, meta: dict, counters: dict) -> None:
    tmp = run_dir / (CHECKPOINT_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model_file(model, tmp / MODEL_FILE, meta)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "counters": {k: torch.tensor(v, dtype=torch.float64) for k, v in counters.items()}},
               tmp / "state.pt")
    final = run_dir / CHECKPOINT_DIR
    old = run_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler) -> dict[str, float]:
    folder = run_dir / CHECKPOINT_DIR
    state, _ = load_checkpoint_file(folder / MODEL_FILE)
    load_weights(model, state, str(folder / MODEL_FILE))
    try:
        blob = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{folder / 'state.pt'} cannot be loaded with torch.load(weights_only=True): {e}") from e
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return {k: float(v) for k, v in blob["counters"].items()}


def rewrite_metrics(path: Path, upto_epoch: int) -> None:
    """Keep only the metric lines of epochs a resumed run has already completed."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
             if ln.strip() and json.loads(ln).get("epoch", 0) <= upto_epoch]
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
