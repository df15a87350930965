"""The judge: a :class:`SmallCNN` trained on the generator's own training split, cached by its settings."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .classifier import ARCH, SmallCNN, crop_flip, train_classifier
from .config import GENERATOR_SPLIT, SIZE, EvalConfig


def judge_settings(cfg: EvalConfig) -> dict[str, Any]:
    """Everything the judge's weights depend on: its cache key."""
    return {"arch": ARCH, "width": cfg.judge_width, "epochs": cfg.judge_epochs, "batch": cfg.judge_batch,
            "lr": cfg.judge_lr, "seed": cfg.seed, "train": list(GENERATOR_SPLIT), "size": SIZE,
            "input": "grey", "augment": "crop(pad 2)+flip"}


def judge_paths(cache: Path, settings: dict[str, Any]) -> tuple[Path, Path]:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"judge-{key}.safetensors", cache / f"judge-{key}.json"


def load_or_train_judge(cfg: EvalConfig, candidates: Sequence[EvalConfig], cache: Path, train_grey: np.ndarray,
                        train_labels: np.ndarray, progress: bool) -> tuple[SmallCNN, dict[str, Any]]:
    """Load the first cached judge among ``candidates`` (e.g. the full judge in quick mode); else train
    the judge ``cfg`` describes on train images 0-49,999 and cache it (safetensors + settings JSON)."""
    from safetensors.torch import load_file, save_file

    for candidate in candidates:
        settings = judge_settings(candidate)
        weights, meta = judge_paths(cache, settings)
        if weights.is_file():
            model = SmallCNN(candidate.judge_width)
            model.load_state_dict(load_file(weights))
            info = json.loads(meta.read_text()) if meta.is_file() else {}
            return model.to(memory_format=torch.channels_last).eval(), {
                **settings, "cache": str(weights), "trained_now": False, "train_seconds": info.get("train_seconds")}
    settings = judge_settings(cfg)
    weights, meta = judge_paths(cache, settings)
    lo, hi = GENERATOR_SPLIT
    x = torch.from_numpy(train_grey[lo:hi])[:, None]
    y = torch.from_numpy(train_labels[lo:hi])
    steps = math.ceil(cfg.judge_epochs * len(x) / cfg.judge_batch)
    t0 = time.time()
    model = train_classifier(x, y, cfg.judge_width, steps, cfg.judge_batch, cfg.judge_lr,
                             lambda b, g: crop_flip(b, g, pad=2), cfg.seed, "judge", progress)
    seconds = time.time() - t0
    cache.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    meta.write_text(json.dumps({**settings, "steps": steps, "train_seconds": round(seconds, 1)}, indent=2))
    return model, {**settings, "cache": str(weights), "trained_now": True, "train_seconds": round(seconds, 1)}
