"""Soft labels as training targets (``data.soft_labels: true``): an image whose metadata line carries a
``soft_label`` (Diff-Mix inter-class variants, latent CutMix / mixup, a teacher's probabilities) is learnt with
that distribution as its cross-entropy target instead of its one-hot label; every other image (real ones, lines
without a soft label) keeps its one-hot label.

``soft_label`` is ``{class name: probability}``; names are matched to the run's classes, the shares are
renormalised to sum to 1 (they are rounded to 4 decimals when written).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["SoftTargets", "soft_table"]


def soft_table(synthetic: Any, classes: Sequence[str]) -> tuple[np.ndarray, int]:
    """The target distribution of each image of a :class:`~sip.data.mixing.SyntheticImages` ``[N, C]`` (one-hot
    where its line has no soft label) and how many lines have one.

    Raises:
        ValueError: a soft label names a class the run does not have, or is not a distribution (naming the file).
    """
    from sip.data.bank import read_metadata

    index = {c: i for i, c in enumerate(classes)}
    soft: dict[str, Any] = {}
    where: dict[str, str] = {}
    for root in synthetic.roots:
        for row in read_metadata(root):
            if row.get("soft_label") is not None and row.get("file_name") is not None:
                soft[str(row["file_name"])], where[str(row["file_name"])] = row["soft_label"], str(root)
    table = np.zeros((len(synthetic.records), len(classes)), dtype=np.float32)
    found = 0
    for n, (rec, label) in enumerate(zip(synthetic.records, synthetic.labels)):
        dist = soft.get(rec.file_name)
        if dist is None:
            table[n, int(label)] = 1.0
            continue
        found += 1
        file = f"{where[rec.file_name]}/train/metadata.jsonl ({rec.file_name})"
        if not isinstance(dist, dict) or not dist:
            raise ValueError(f"{file}: soft_label must be {{class: probability}}, got {dist!r}")
        unknown = sorted(set(dist) - set(index))
        if unknown:
            raise ValueError(f"{file}: soft_label names classes {unknown} that are not among the run's classes "
                             f"{list(classes)}; train on the classes the dataset was made for, or set "
                             "data.soft_labels: false")
        values = [float(v) if isinstance(v, (int, float)) else float("nan") for v in dist.values()]
        total = sum(values)
        if not all(math.isfinite(v) and v >= 0 for v in values) or total <= 0:
            raise ValueError(f"{file}: soft_label must hold finite probabilities >= 0 with a positive sum, got {dist}")
        for c, v in zip(dist, values):
            table[n, index[c]] = v / total
    return table, found


class SoftTargets:
    """Item ``i`` of a :class:`~sip.data.mixing.MixedImages` epoch → its target distribution ``[C]`` (float32).

    Args:
        table (np.ndarray): :func:`soft_table` of the run's synthetic images.
        real_labels (np.ndarray | None): the real images' class indices (one-hot targets).
        num_classes (int): C.
    """

    def __init__(self, table: np.ndarray, real_labels: np.ndarray | None, num_classes: int):
        self.table, self.real_labels, self.num_classes = table, real_labels, num_classes

    @classmethod
    def build(cls, images: Any, classes: Sequence[str]) -> SoftTargets:
        """The soft targets of a run's training images (``data.soft_labels: true``).

        Raises:
            ValueError: the run has no synthetic images, or none of their metadata lines carries a soft label.
        """
        synthetic = getattr(images, "synthetic", None)
        if synthetic is None:
            raise ValueError("data.soft_labels is true but there are no synthetic images (data.synthetic) whose "
                             "metadata could carry a soft_label; set data.synthetic or data.soft_labels: false")
        table, found = soft_table(synthetic, classes)
        if not found:
            raise ValueError(f"data.soft_labels is true but no metadata line of {[str(r) for r in synthetic.roots]} "
                             "carries a soft_label (written by variants.interclass, latent_mix or a labelling "
                             "teacher); set data.soft_labels: false")
        real = images.real.labels if images.real is not None else None
        return cls(table, real, len(classes))

    def __call__(self, images: Any, index: int) -> torch.Tensor:
        """The target of item ``index`` of ``images``' current epoch plan."""
        code = int(images.plan[index])
        if code < 0:
            return torch.from_numpy(self.table[-code - 1].copy())
        out = torch.zeros(self.num_classes, dtype=torch.float32)
        out[int(self.real_labels[code])] = 1.0
        return out
