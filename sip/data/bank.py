"""The augmented dataset on disk: written append-only, resumable, readable without sip.

Layout (``datasets.load_dataset("imagefolder", data_dir=out)`` and
``torchvision.datasets.ImageFolder(out / "train")`` both read it)::

    out/run.json                     sip version, resolved config, models, seeds
    out/train/<label>/<id>.png       one file per image; <label> is a sanitised folder name
    out/train/metadata.jsonl         one JSON line per image (file_name, label, source, caption, ...)
    out/rejected.jsonl               variants the filter dropped (scores kept, image not written)

An image is written to a temporary name and renamed, then its line is appended and flushed (fsync),
so a run killed at any moment leaves no half-written image, and a rerun skips every id that has a
line. A shard (``--shard i/n``) writes ``train/metadata.shard-i-of-n.jsonl``; :func:`merge_shards`
concatenates the shards into ``metadata.jsonl`` once every shard is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from sip.ids import sanitize_label

METADATA = "metadata.jsonl"
REJECTED = "rejected.jsonl"
def label_folders(labels: Sequence[str]) -> dict[str, str]:
    """Map each label to a distinct sanitised folder name (a short hash is added on a collision)."""
    folders: dict[str, str] = {}
    taken: dict[str, str] = {}
    for label in labels:
        folder = sanitize_label(label)
        if folder.lower() in taken and taken[folder.lower()] != label:
            folder = f"{folder[:55]}-{hashlib.sha1(str(label).encode()).hexdigest()[:8]}"
        taken[folder.lower()] = label
        folders[label] = folder
    return folders


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run: its image is redone
    return rows


def read_metadata(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every metadata row of a written dataset (merged file and unmerged shard files)."""
    train = Path(out_dir) / "train"
    rows = _read_jsonl(train / METADATA)
    for shard_file in sorted(train.glob("metadata.shard-*.jsonl")):
        rows += _read_jsonl(shard_file)
    return rows


def _fsync_append(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run config that decides the images (not where or how fast they are made)."""
    volatile = {"shard", "batch_size", "device", "progress", "output"}

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in volatile}
        return node

    return strip(config)


@dataclass
class WriteSummary:
    written: int = 0
    skipped: int = 0
    rejected: int = 0
    failed: int = 0


class DatasetWriter:
    """Append-only writer of the augmented dataset layout.

    Args:
        out_dir (str | Path): output folder (created).
        run_info (dict): written to ``run.json`` (sip version, resolved config, models, seeds). A rerun
            must bring the same image-deciding config, else ``ValueError`` (nothing is touched).
        labels (Sequence[str]): every label the run may write (folder names are fixed from it).
        shard (tuple[int, int], optional): (i, n) of this process. Defaults to None.
    """

    def __init__(self, out_dir: str | Path, run_info: dict[str, Any], labels: Sequence[str],
                 shard: tuple[int, int] | None = None):
        self.root = Path(out_dir)
        self.train = self.root / "train"
        self.shard = shard
        self.folders = label_folders(labels)
        self.train.mkdir(parents=True, exist_ok=True)
        run_file = self.root / "run.json"
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{run_file} is not valid JSON ({e}); move the folder aside or pick another --output") from e
            if _comparable(previous.get("config", {})) != _comparable(run_info.get("config", {})):
                raise ValueError(
                    f"{self.root} holds a run with a different config (see {run_file}); nothing was changed. "
                    "Use a new --output folder, or rerun with the same recipe and flags to resume it."
                )
        else:
            tmp = run_file.with_name(".run.json.tmp")
            tmp.write_text(json.dumps({**run_info, "label_folders": self.folders}, indent=2, ensure_ascii=False),
                           encoding="utf-8")
            tmp.replace(run_file)
        name = METADATA if shard is None else f"metadata.shard-{shard[0]}-of-{shard[1]}.jsonl"
        self.metadata_path = self.train / name
        self.rejected_path = self.root / (REJECTED if shard is None else f"rejected.shard-{shard[0]}-of-{shard[1]}.jsonl")
        self.done: set[str] = {Path(r["file_name"]).stem for r in read_metadata(self.root) if "file_name" in r}
        self.done |= {r["id"] for r in _read_jsonl(self.root / REJECTED) if "id" in r}
        for f in self.root.glob("rejected.shard-*.jsonl"):
            self.done |= {r["id"] for r in _read_jsonl(f) if "id" in r}
        for stale in self.train.glob("*/.*.tmp"):
            stale.unlink()  # a temp file is never a finished image: the id has no line and is redone
        self.summary = WriteSummary()

    def folder_for(self, label: str) -> Path:
        """The label's folder, checked to be inside ``train/`` (labels never escape the output)."""
        if label not in self.folders:
            raise ValueError(f"label {label!r} is not among this run's labels")
        path = (self.train / self.folders[label]).resolve()
        if path.parent != self.train.resolve():
            raise ValueError(f"label {label!r} maps outside {self.train}")
        return path

    def is_done(self, image_id: str) -> bool:
        return image_id in self.done

    def write(self, image_id: str, image: Image.Image, label: str, record: dict[str, Any]) -> str:
        """Write one image (temp + rename) and append its metadata line; returns its file_name."""
        if image_id in self.done:
            self.summary.skipped += 1
            return ""
        folder = self.folder_for(label)
        folder.mkdir(exist_ok=True)
        final = folder / f"{image_id}.png"
        tmp = folder / f".{image_id}.png.tmp"
        with tmp.open("wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(final)
        file_name = f"{self.folders[label]}/{image_id}.png"
        row = {"file_name": file_name, "label": label, **record,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _fsync_append(self.metadata_path, [row])
        self.done.add(image_id)
        self.summary.written += 1
        return file_name

    def reject(self, image_id: str, label: str, record: dict[str, Any]) -> None:
        """Record a variant the filter dropped (no image is written; its scores are kept)."""
        if image_id in self.done:
            return
        _fsync_append(self.rejected_path, [{"id": image_id, "label": label, **record}])
        self.done.add(image_id)
        self.summary.rejected += 1

    def finish(self) -> bool:
        """Mark this shard done and merge when every shard is; returns True when metadata.jsonl is whole."""
        if self.shard is None:
            return True
        i, n = self.shard
        (self.train / f".shard-{i}-of-{n}.done").touch()
        return merge_shards(self.root, n)


def merge_shards(out_dir: str | Path, n: int) -> bool:
    """Concatenate ``metadata.shard-*-of-n.jsonl`` into ``metadata.jsonl`` when all n shards are done.

    The merged file is written to a temp name and renamed; shard files are removed only after that.
    Returns False (and changes nothing) while a shard is missing.
    """
    root = Path(out_dir)
    train = root / "train"
    if not all((train / f".shard-{i}-of-{n}.done").exists() for i in range(1, n + 1)):
        return False
    rows = _read_jsonl(train / METADATA)
    for i in range(1, n + 1):
        rows += _read_jsonl(train / f"metadata.shard-{i}-of-{n}.jsonl")
    tmp = train / f".{METADATA}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(train / METADATA)
    rejected = _read_jsonl(root / REJECTED)
    for i in range(1, n + 1):
        rejected += _read_jsonl(root / f"rejected.shard-{i}-of-{n}.jsonl")
    if rejected:
        tmp = root / f".{REJECTED}.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected), encoding="utf-8")
        tmp.replace(root / REJECTED)
    for i in range(1, n + 1):
        for f in (train / f"metadata.shard-{i}-of-{n}.jsonl", root / f"rejected.shard-{i}-of-{n}.jsonl",
                  train / f".shard-{i}-of-{n}.done"):
            f.unlink(missing_ok=True)
    return True
