"""The work of one teacher-logits shard (:meth:`sip.distill.logits.TeacherLogitsStore.build`): which teachers share
an input, whether a shard on disk is finished, and the teachers' logits over a shard's batches of views."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sip.distill.views import ViewConfig

logger = logging.getLogger(__name__)


def _input_groups(teachers: Sequence[Any]) -> tuple[list[dict[str, Any]], list[int]]:
    """Teachers with the same input configuration share one input: (each group's config, each teacher's group)."""
    keys: list[str] = []
    for t in teachers:
        if t.input_key() not in keys:
            keys.append(t.input_key())
    groups = [next(t.input_config for t in teachers if t.input_key() == k) for k in keys]
    return groups, [keys.index(t.input_key()) for t in teachers]


def _shard_finished(path: Path, fingerprint: str, digest: str, ids: list[str], views: ViewConfig) -> bool:
    """A shard file on disk that a build with these teachers, views and data wrote whole."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        return (meta.get("fingerprint") == fingerprint and meta.get("teachers") == digest
                and json.loads(meta["ids"]) == ids and meta.get("views") == json.dumps(asdict(views)))
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # half-written or foreign: rebuild
        logger.info("rebuilding shard %s (%s)", path, e)
        return False


def _check_build(teachers: Sequence[Any], classes: Sequence[str], dtype: str, rank: int, world: int) -> None:
    from sip.distill.teachers import check_teacher_classes

    if dtype not in ("float16", "float32"):
        raise ValueError(f"store dtype must be float16 or float32, got {dtype!r}")
    if not teachers:
        raise ValueError("a logits store needs at least one teacher")
    check_teacher_classes(teachers, classes)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world), got {rank} of {world}")


@torch.no_grad()
def _write_shard(path: Path, loader, teachers: Sequence[Any], teacher_group: list[int], device: torch.device,
                 autocast_dtype: torch.dtype | None, torch_dtype: torch.dtype, bar, metadata: dict[str, str]) -> None:
    """Every teacher over one shard's batches of views (logits [n, V, K, C], views, labels), written atomically."""
    from safetensors.torch import save_file

    for t in teachers:
        t.model.to(device)

    out_logits, out_views, out_labels = [], [], []
    for batch in loader:
        b, v = batch["views"].shape[:2]
        per_teacher = []
        for t, g in zip(teachers, teacher_group):
            x = batch[f"input_{g}"].flatten(0, 1).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                z = t.model(x)
            z = z[0] if isinstance(z, (tuple, list)) else z
            per_teacher.append(z.float().view(b, v, -1).cpu())
        out_logits.append(torch.stack(per_teacher, dim=2).to(torch_dtype))
        out_views.append(batch["views"])
        out_labels.append(batch["label"].long())
        bar.update(b)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"logits": torch.cat(out_logits).contiguous(), "views": torch.cat(out_views).contiguous(),
               "labels": torch.cat(out_labels).contiguous()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def _warn_idle(world: int, n_shards: int, shard_size: int, total: int) -> None:
    if world > n_shards:
        logger.warning("%d processes but the store has %d shard(s) of store.shard_size %d images: %d process(es) "
                       "have nothing to build; set store.shard_size <= %d to use them all", world, n_shards,
                       shard_size, world - n_shards, max(1, total // world))


def _shard_list(n_shards: int, shard_size: int, span, done, rank: int, world: int) -> list[dict[str, Any]] | None:
    """The manifest's shard entries, or None while a shard of another process is not finished yet."""
    shards = []
    for s in range(n_shards):  # every shard, whoever built it (other processes' may still be running)
        name, _, ids = span(s)
        if not done(s, name, ids):
            logger.info("process %d of %d: shard %s not finished yet; the last process writes store.json",
                        rank + 1, world, name)
            return None
        shards.append({"file": name, "start": s * shard_size, "count": len(ids)})
    return shards
