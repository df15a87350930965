"""The shard merge of the augmented dataset on disk (the format is described in :mod:`sip.data.bank`).

Test hook (off unless the variable is set; used by ``scripts/fault_inject.py``):
``SIP_TEST_KILL_IN_MERGE=<point>`` SIGKILLs the process inside :func:`merge_shards` at ``replaced``
(after ``metadata.jsonl`` was replaced), ``marked`` (after the merge was recorded) or ``cleaning``
(after the first shard file was removed).
"""

from __future__ import annotations

import os
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


def merge_shards(out_dir: str | Path, n: int) -> bool:
    """Fold the finished shards' ``metadata.shard-i-of-n.jsonl`` (and rejected files) into
    ``metadata.jsonl`` once all n shards are done.

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
    with locked(train / ".merge.lock"):
        finished = [i for i in range(1, n + 1) if marker(i).exists()]
        if len(finished) < n and not merged_mark.exists():
            return False
        rows = _unique([r for p in [train / METADATA, *map(meta, finished)] for r in read_jsonl(p)], "file_name")
        atomic_write(train / METADATA, jsonl_bytes(rows), root)
        _test_kill("replaced")
        drops = _unique([r for p in [root / REJECTED, *map(rejected, finished)] for r in read_jsonl(p)], "id")
        if drops:
            atomic_write(root / REJECTED, jsonl_bytes(drops), root)
        atomic_write(merged_mark, b"", root)
        _test_kill("marked")
        for k, path in enumerate([*map(meta, finished), *map(rejected, finished)]):
            path.unlink(missing_ok=True)
            if k == 0:
                _test_kill("cleaning")
        for i in finished:
            marker(i).unlink(missing_ok=True)
        return not any(meta(i).exists() or rejected(i).exists() for i in range(1, n + 1))
