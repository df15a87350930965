"""The shard merge of the augmented dataset on disk (the format is described in :mod:`sip.data.bank`).

Test hook (off unless the variable is set; used by ``scripts/fault_inject.py``):
``SIP_TEST_KILL_IN_MERGE=<point>`` SIGKILLs the process inside :func:`merge_shards` at ``replaced``
(after ``metadata.jsonl`` was replaced), ``marked`` (after the merge was recorded) or ``cleaning``
(after the first shard file was removed).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sip.data.durable import atomic_write, jsonl_bytes, locked, read_jsonl
from sip.data.readers import METADATA, REJECTED

__all__ = ["merge_shards"]


def _test_kill(point: str) -> None:
    if os.environ.get("SIP_TEST_KILL_IN_MERGE") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _unique(rows: Iterable[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    seen, out = set(), []
    for row in rows:
        k = row.get(key)
        if k is None or k not in seen:
            seen.add(k)
            out.append(row)
    return out


# metadata.shard-i-of-n.jsonl, rejected.shard-i-of-n.jsonl, .shard-i-of-n.done (group 1: n)
_SHARD_FILE = re.compile(r"(?:metadata\.|rejected\.|\.)shard-\d+-of-(\d+)\.(?:jsonl|done)")


def _other_counts(root: Path, n: int | None) -> list[Path]:
    """Shard files (metadata, rejected, done markers) of launches split into another count than ``n``."""
    found = [*(root / "train").glob("metadata.shard-*-of-*.jsonl"), *root.glob("rejected.shard-*-of-*.jsonl"),
             *(root / "train").glob(".shard-*-of-*.done")]
    return sorted(p for p in found if (m := _SHARD_FILE.fullmatch(p.name)) and int(m.group(1)) != n)


def merge_shards(out_dir: str | Path, n: int | None) -> bool:
    """Fold the finished shards' ``metadata.shard-i-of-n.jsonl`` (and rejected files) into
    ``metadata.jsonl`` once all n shards are done.

    Shard files of a launch split into another count (a run killed under 2 processes and resumed under 3,
    or under one) are folded in with them: their ids were skipped as done, so each row is kept once. They
    must not be written to any more (two launches with different counts into one folder at the same time
    are not supported). ``n`` None is an unsharded run's finish: it folds only those.

    Idempotent and atomic: under a lock, the merged file is written to a temp name and renamed, the merge
    is recorded (``train/.merged-of-n``), then the shard files and markers are removed; rows are unique by
    file_name (rejected ones by id), so a merge killed at any point and rerun gives one row per image. After
    a recorded merge, a shard that is rerun and finishes is folded in at once.

    Returns:
        bool: True when ``metadata.jsonl`` is whole; False (and nothing changed) while a shard is missing.
    """
    root = Path(out_dir)
    train = root / "train"
    marker = lambda i: train / f".shard-{i}-of-{n}.done"
    meta = lambda i: train / f"metadata.shard-{i}-of-{n}.jsonl"
    rejected = lambda i: root / f"rejected.shard-{i}-of-{n}.jsonl"
    merged_mark = train / f".merged-of-{n}"
    train.mkdir(parents=True, exist_ok=True)
    if n is None and not _other_counts(root, None):
        return True  # an unsharded run with nothing left over: its metadata.jsonl is whole, leave it be
    with locked(train / ".merge.lock"):
        finished = [i for i in range(1, n + 1) if marker(i).exists()] if n else []
        if n and len(finished) < n and not merged_mark.exists():
            return False
        others = _other_counts(root, n)
        metas = [*map(meta, finished), *(p for p in others if p.name.startswith("metadata."))]
        rejects = [*map(rejected, finished), *(p for p in others if p.name.startswith("rejected."))]
        rows = _unique([r for p in [train / METADATA, *metas] for r in read_jsonl(p)], "file_name")
        atomic_write(train / METADATA, jsonl_bytes(rows), root)
        _test_kill("replaced")
        drops = _unique([r for p in [root / REJECTED, *rejects] for r in read_jsonl(p)], "id")
        if drops:
            atomic_write(root / REJECTED, jsonl_bytes(drops), root)
        if n:
            atomic_write(merged_mark, b"", root)
        _test_kill("marked")
        for k, path in enumerate([*metas, *rejects]):
            path.unlink(missing_ok=True)
            if k == 0:
                _test_kill("cleaning")
        for path in [*map(marker, finished), *(p for p in others if p.suffix == ".done")]:
            path.unlink(missing_ok=True)
        return not n or not any(meta(i).exists() or rejected(i).exists() for i in range(1, n + 1))
