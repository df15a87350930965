"""Evaluation shared by ``sip train`` and ``sip distill``: top-1 / top-5 over a loader (:func:`evaluate`) and
the two held-out sets of a run (:class:`HeldOut`): the validation split, read every epoch and for every
choice, and the test set, read once at the end of a finished run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sip.train.inputs import TransformedImages


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


class HeldOut:
    """A run's validation and test images and when each is read.

    The validation split (``data.val``) is evaluated every ``run.eval_every`` epochs on a fixed subset of at
    most ``run.eval_max_samples`` images, and in full after the last epoch; the best epoch is chosen on it.
    The test set is evaluated once, after the last epoch (never during training). Without a validation split
    (``data.val: null``) there is no per-epoch evaluation.

    Args:
        val_images: ``(image, label)`` dataset of the validation split, or None.
        test_images: ``(image, label)`` dataset of the test set.
        transform (Callable): image → tensor for evaluation.
        batch_size (int): evaluation batch size; ``num_workers``: DataLoader workers.
        max_samples (int | None): the per-epoch subset's size (null = the whole split).
        accelerator: from :func:`sip.train.loop.make_accelerator`.
    """

    def __init__(self, val_images: Any | None, test_images: Any, transform: Callable, *, batch_size: int,
                 num_workers: int, max_samples: int | None, accelerator):
        self.test_images, self.accelerator = test_images, accelerator
        self.batch_size, self.num_workers = batch_size, num_workers
        self.test_set = TransformedImages(test_images, transform)
        self.val = self.val_subset = None
        if val_images is not None:
            self.val = self.val_subset = TransformedImages(val_images, transform)
            if max_samples and max_samples < len(val_images):
                pick = np.sort(np.random.default_rng(0).permutation(len(val_images))[:max_samples])
                self.val_subset = TransformedImages(val_images, transform, pick)

    def _loader(self, ds) -> torch.utils.data.DataLoader:
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False,
                                             num_workers=self.num_workers)
        # several processes: each evaluates its share (not the whole set each), results gathered once
        return self.accelerator.prepare_data_loader(loader) if self.accelerator.num_processes > 1 else loader

    def validate(self, model: nn.Module, progress: bool, whole: bool = False) -> dict[str, float] | None:
        """The validation split (its fixed per-epoch subset, or ``whole``), or None without one."""
        ds = self.val if whole else self.val_subset
        return None if ds is None else evaluate(model, self._loader(ds), self.accelerator, progress, "val")

    def test(self, model: nn.Module, progress: bool) -> dict[str, float]:
        """The whole test set: called once, at the end of a finished run."""
        return evaluate(model, self._loader(self.test_set), self.accelerator, progress, "test")
