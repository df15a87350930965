"""Readers of the augmented dataset on disk (the format is described in :mod:`sip.data.bank`).

Every reader skips a torn or foreign line and never changes a file: only the writer repairs the files it
appends to (:func:`sip.data.durable.repair_jsonl`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sip.data.durable import parse_line, read_jsonl

__all__ = ["METADATA", "REJECTED", "RUN_INFO", "dataset_root", "is_dataset", "read_metadata", "read_metadata_since",
           "read_run_info", "rows_of", "run_info_at"]

METADATA = "metadata.jsonl"
REJECTED = "rejected.jsonl"
RUN_INFO = "run.json"


def dataset_root(path: str | Path) -> Path:
    """The dataset folder of ``path`` (``OUT`` or ``OUT/train`` both name ``OUT``)."""
    root = Path(path)
    if root.name == "train" and ((root / METADATA).is_file() or any(root.glob("metadata.shard-*.jsonl"))):
        return root.parent
    return root


def is_dataset(path: str | Path) -> bool:
    """Whether ``path`` holds a sip dataset (merged or shard metadata under ``train/``)."""
    train = dataset_root(path) / "train"
    return (train / METADATA).is_file() or any(train.glob("metadata.shard-*.jsonl"))


def read_metadata(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every metadata row of a written dataset (merged file, then unmerged shard files), one per file_name:
    a row a half-finished merge left in both the merged and a shard file counts once."""
    return rows_of(dataset_root(out_dir) / "train")


def rows_of(train: Path) -> list[dict[str, Any]]:
    """The rows of ``train/metadata.jsonl`` then of each shard file, one per file_name (see
    :func:`read_metadata`, which takes the dataset folder)."""
    rows, seen = [], set()
    for path in [train / METADATA, *sorted(train.glob("metadata.shard-*.jsonl"))]:
        for row in read_jsonl(path):
            name = row.get("file_name")
            if name is None or name not in seen:
                seen.add(name)
                rows.append(row)
    return rows


def read_metadata_since(out_dir: str | Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The rows appended to a dataset's merged ``train/metadata.jsonl`` since byte ``offset``, and the offset
    to pass next time (an online cache, read as another process writes it).

    Only whole lines are read: a line being written is read by the next call. Torn or foreign lines are
    skipped as :func:`read_metadata` skips them. Shard files are not read (an online cache is never sharded).

    Args:
        out_dir (str | Path): the dataset folder (``OUT`` or ``OUT/train``).
        offset (int): where the previous call stopped (0 the first time).

    Returns:
        tuple[list[dict], int]: the new rows, and the offset just past the last whole line read (``offset``
        itself when the file does not exist or holds no new whole line).
    """
    path = dataset_root(out_dir) / "train" / METADATA
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    rows = [row for line in data[:end].splitlines() if (row := parse_line(line)) is not None]
    return rows, offset + end


def read_run_info(out_dir: str | Path, strict: bool = False) -> dict[str, Any]:
    """A dataset's ``run.json`` as a dict.

    Args:
        out_dir (str | Path): the dataset folder (``OUT`` or ``OUT/train``).
        strict (bool, optional): raise ``ValueError`` naming the file when it exists but is not a JSON
            object. Defaults to False ({} for a missing or unreadable file).
    """
    return run_info_at(dataset_root(out_dir) / RUN_INFO, strict)


def run_info_at(path: Path, strict: bool) -> dict[str, Any]:
    """The JSON object in the ``run.json`` at ``path`` (see :func:`read_run_info`)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if strict:
            raise ValueError(f"{path} is not valid JSON ({e}); move the folder aside or pick another --output") from e
        return {}
    if not isinstance(info, dict):
        if strict:
            raise ValueError(f"{path} is not a JSON object; move the folder aside or pick another --output")
        return {}
    return info
