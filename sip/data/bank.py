"""The augmented dataset on disk: written append-only, resumable, readable without sip.

This module owns the format: the writer, the readers (:func:`read_jsonl`, :func:`read_metadata`,
:func:`read_run_info`), the resume check and the shard merge. Layout
(``datasets.load_dataset("imagefolder", data_dir=out)`` and
``torchvision.datasets.ImageFolder(out / "train")`` both read it)::

    out/run.json                     sip version, resolved config (paths resolved), models, seeds
    out/train/<label>/<id>.png       one file per image; <label> is a sanitised folder name
    out/train/metadata.jsonl         one JSON line per image (file_name, label, source, caption, ...)
    out/rejected.jsonl               variants the filter dropped (scores kept, image not written)

Guarantees (each has a test in ``tests/test_bank*.py``; ``scripts/fault_inject.py`` measures them):

- An image is written to a temporary name, fsynced and renamed, then its line is appended and fsynced,
  so a kill at any moment leaves no half-written image; a rerun skips every id that has a line.
- A torn last line (power loss, full disk) of a file the writer appends to is repaired when the writer
  opens it: the fragment is moved to ``.<name>.torn`` next to the file, with a warning naming the file,
  and never glued to the next row (:func:`repair_jsonl`; the caption cache calls it too).
- An image without its line (a kill between rename and append) is checked when its id is redone: the
  same bytes are adopted, different bytes are never overwritten silently (the old file is kept as
  ``.<id>.png.kept-<time>`` in its folder, with a warning naming it).
- A full disk raises :class:`DiskFullError` naming the folder; the half-written temp file or line is
  removed first, so rerunning after freeing space resumes.
- A shard (``--shard i/n``) writes ``train/metadata.shard-i-of-n.jsonl``; :func:`merge_shards` folds
  the shards into ``metadata.jsonl`` under a lock, one row per image however often it is rerun or
  wherever it was killed.

Test hooks (off unless the variable is set; used by ``scripts/fault_inject.py``):
``SIP_TEST_KILL_IN_MERGE=<point>`` SIGKILLs the process inside :func:`merge_shards` at ``replaced``
(after ``metadata.jsonl`` was replaced), ``marked`` (after the merge was recorded) or ``cleaning``
(after the first shard file was removed); ``SIP_TEST_ENOSPC_AFTER=<k>`` makes the writer's k-th file
write (images and lines, counted from 1) fail with ENOSPC half-way through.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

import sip
from sip.data.durable import (  # re-exported: the format's owner is this module
    DiskFullError,
    append_jsonl,
    atomic_write,
    jsonl_bytes,
    locked,
    read_jsonl,
    repair_jsonl,
)
from sip.ids import sanitize_label

__all__ = ["DatasetWriter", "DiskFullError", "WriteSummary", "append_jsonl", "atomic_write", "config_differences",
           "dataset_root", "is_dataset", "label_folders", "merge_shards", "read_jsonl", "read_metadata", "read_run_info",
           "repair_jsonl", "resolve_paths"]

logger = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
REJECTED = "rejected.jsonl"
RUN_INFO = "run.json"
# Config keys that decide where or how fast images are made, not what they are (compared nowhere).
VOLATILE_KEYS = frozenset({"shard", "batch_size", "device", "progress", "output", "chunk", "cache"})
# Config keys that may hold a local path (stored resolved, so `IN` and `/abs/IN` are the same config).
PATH_KEYS = frozenset({"path", "model", "tiny_vae", "cache"})
_SHIPPED_MODELS = Path(sip.__file__).resolve().parent / "models"

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

# --------------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------------

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
    return _rows_of(dataset_root(out_dir) / "train")


def _rows_of(train: Path) -> list[dict[str, Any]]:
    rows, seen = [], set()
    for path in [train / METADATA, *sorted(train.glob("metadata.shard-*.jsonl"))]:
        for row in read_jsonl(path):
            name = row.get("file_name")
            if name is None or name not in seen:
                seen.add(name)
                rows.append(row)
    return rows


def read_run_info(out_dir: str | Path, strict: bool = False) -> dict[str, Any]:
    """A dataset's ``run.json`` as a dict.

    Args:
        out_dir (str | Path): the dataset folder (``OUT`` or ``OUT/train``).
        strict (bool, optional): raise ``ValueError`` naming the file when it exists but is not a JSON
            object. Defaults to False ({} for a missing or unreadable file).
    """
    return _run_info_at(dataset_root(out_dir) / RUN_INFO, strict)


def _run_info_at(path: Path, strict: bool) -> dict[str, Any]:
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

# --------------------------------------------------------------------------------------------------
# resume: is this the same run?
# --------------------------------------------------------------------------------------------------

def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of a nested config, leaving out :data:`VOLATILE_KEYS` at any depth."""
    if not isinstance(node, dict):
        return {prefix: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if key in VOLATILE_KEYS:
            continue
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_paths(config: Any) -> Any:
    """The config with every local path (keys in :data:`PATH_KEYS`) made absolute and resolved, so a run
    started with ``--input IN`` and one with ``--input /abs/IN`` store and compare the same value. A
    model or cache value that is not an existing local path (a hub id) is left as it is."""
    if isinstance(config, dict):
        return {k: (_resolve(v, k == "path") if k in PATH_KEYS and isinstance(v, str) else resolve_paths(v))
                for k, v in config.items()}
    return config


def _resolve(value: str, always: bool) -> str:
    path = Path(value).expanduser()
    if always or path.exists():
        return str(path.resolve())
    return value


def _same_model_folder(value: Any) -> Any:
    """A model folder shipped inside some sip installation compares by its name (``sip/models/<name>``), so
    the previous release's install path and this one's are the same default model."""
    if isinstance(value, str):
        path = Path(value)
        if path.parent.name == "models" and path.parent.parent.name == "sip" and (_SHIPPED_MODELS / path.name).is_dir():
            return f"<sip>/models/{path.name}"
    return value


def config_differences(previous: dict[str, Any], current: dict[str, Any],
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """The image-deciding config keys on which two runs differ, as ``"key: <previous> in run.json, <current>
    now"`` lines ([] when a folder may be resumed).

    Keys in :data:`VOLATILE_KEYS` (output, shard, batch size, device, progress, chunk, caption cache) are
    not compared; paths are compared resolved; a key the previous run's config lacks (a newer sip added it)
    takes its value from ``defaults``, the config a recipe has when nothing is set.

    Args:
        previous (dict): the ``config`` of the folder's ``run.json``.
        current (dict): this run's resolved config.
        defaults (dict, optional): this sip's default config for the same recipe. Defaults to None (a key
            missing from ``previous`` is then a difference).
    """
    old, new = _flatten(resolve_paths(previous)), _flatten(resolve_paths(current))
    fill = _flatten(resolve_paths(defaults or {}))
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        before = old.get(key, fill.get(key, missing))
        after = new.get(key, missing)
        if _same_model_folder(before) != _same_model_folder(after):
            show = lambda v: "(absent)" if v is missing else json.dumps(v, ensure_ascii=False)
            was = show(before) + (" (absent, the default)" if key not in old and before is not missing else "")
            lines.append(f"{key}: {was} in run.json, {show(after)} now")
    return lines


# --------------------------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------------------------

@dataclass
class WriteSummary:
    """What a writer did: images written, ids skipped (already done), rejected, failed, orphans adopted or
    kept aside, torn lines moved aside on open."""

    written: int = 0
    skipped: int = 0
    rejected: int = 0
    failed: int = 0
    adopted: int = 0
    kept_aside: int = 0
    torn: int = 0


def _shard_suffix(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}"


class DatasetWriter:
    """Append-only writer of the augmented dataset layout.

    Args:
        out_dir (str | Path): output folder (created).
        run_info (dict): written to ``run.json`` (sip version, resolved config, models, seeds); paths in its
            ``config`` are stored resolved. A rerun must bring the same image-deciding config
            (:func:`config_differences`), else ``ValueError`` naming each differing key (nothing is touched).
        labels (Sequence[str]): every label the run may write (folder names are fixed from it).
        shard (tuple[int, int], optional): (i, n) of this process. Defaults to None.
        defaults (dict, optional): the recipe's default config (``to_dict(type(recipe)())``), filled in for
            keys a folder written by an older sip lacks. Defaults to None.

    Raises:
        ValueError: ``run.json`` is unreadable or holds another config.
        DiskFullError: the disk is full.
    """

    def __init__(self, out_dir: str | Path, run_info: dict[str, Any], labels: Sequence[str],
                 shard: tuple[int, int] | None = None, defaults: dict[str, Any] | None = None):
        # 1. the run's identity: a new folder records it, an existing one must match it
        self.root = Path(out_dir)
        self.train = self.root / "train"
        self.shard = shard
        self.folders = label_folders(labels)
        self.train.mkdir(parents=True, exist_ok=True)
        run_file = self.root / RUN_INFO
        run_info = {**run_info, "config": resolve_paths(run_info.get("config", {}))}
        if run_file.is_file():
            previous = _run_info_at(run_file, strict=True)
            differences = config_differences(previous.get("config", {}), run_info["config"], defaults)
            if differences:
                raise ValueError(
                    f"{self.root} holds a run with a different config ({run_file}); nothing was changed. Differing "
                    "keys: " + "; ".join(differences) + ". Use a new --output folder, or rerun with the same recipe "
                    "and flags to resume it.")
        else:
            atomic_write(run_file, json.dumps({**run_info, "label_folders": self.folders}, indent=2,
                                              ensure_ascii=False).encode("utf-8"), self.root)
        # 2. this process's append targets, repaired before anything is appended to them
        suffix = "" if shard is None else _shard_suffix(shard)
        self.metadata_path = self.train / (METADATA if shard is None else f"metadata.{suffix}.jsonl")
        self.rejected_path = self.root / (REJECTED if shard is None else f"rejected.{suffix}.jsonl")
        self.summary = WriteSummary()
        self.summary.torn = repair_jsonl(self.metadata_path) + repair_jsonl(self.rejected_path)
        # 3. what is done: every id with a line (any shard), every rejected id
        rows = _rows_of(self.train)
        self.done: set[str] = {Path(r["file_name"]).stem for r in rows if "file_name" in r}
        for path in [self.root / REJECTED, *self.root.glob("rejected.shard-*.jsonl")]:
            self.done |= {r["id"] for r in read_jsonl(path) if "id" in r}
        for stale in self.train.glob("*/.*.tmp"):
            stale.unlink(missing_ok=True)  # a temp file is never a finished image: the id has no line and is redone
        # 4. images without a line (killed between rename and append): checked when their id is redone
        listed = {r["file_name"] for r in rows if "file_name" in r}
        self.orphans = {p.stem: p for p in self.train.glob("*/*.png")
                        if f"{p.parent.name}/{p.name}" not in listed and p.stem not in self.done}
        if self.orphans:
            logger.warning("%s: %d image file(s) have no metadata line (a run stopped between image and line), "
                           "e.g. %s; each is compared with its regenerated image when its id is redone",
                           self.train, len(self.orphans), min(self.orphans))

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

    def _place(self, final: Path, data: bytes) -> bool:
        """Put the PNG bytes at ``final``; returns False when an identical orphan was adopted instead."""
        if final.exists():
            if final.read_bytes() == data:
                logger.info("%s: adopted (an image without its metadata line, identical to the one generated now)",
                            final)
                self.summary.adopted += 1
                return False
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            aside = final.with_name(f".{final.name}.kept-{stamp}")
            os.replace(final, aside)
            logger.warning("%s had no metadata line and differs from the image generated now: the old file is kept "
                           "as %s, the new one written", final, aside)
            self.summary.kept_aside += 1
        atomic_write(final, data, self.root)
        return True

    def write(self, image_id: str, image: Image.Image, label: str, record: dict[str, Any]) -> str:
        """Write one image (temp + rename) and append its metadata line; returns its file_name ("" when the id
        is already done).

        Raises:
            DiskFullError: the disk is full (the image and its half line are removed: the id is redone).
        """
        if image_id in self.done:
            self.summary.skipped += 1
            return ""
        folder = self.folder_for(label)
        folder.mkdir(exist_ok=True)
        final = folder / f"{image_id}.png"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        created = self._place(final, buffer.getvalue())
        file_name = f"{self.folders[label]}/{image_id}.png"
        row = {"file_name": file_name, "label": label, **record,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            append_jsonl(self.metadata_path, [row], self.root)
        except DiskFullError:
            if created:
                final.unlink(missing_ok=True)  # no image without its line: the id is redone on the rerun
            raise
        self.done.add(image_id)
        self.orphans.pop(image_id, None)
        self.summary.written += 1
        return file_name

    def reject(self, image_id: str, label: str, record: dict[str, Any]) -> None:
        """Record a variant the filter dropped (no image is written; its scores are kept)."""
        if image_id in self.done:
            return
        append_jsonl(self.rejected_path, [{"id": image_id, "label": label, **record}], self.root)
        self.done.add(image_id)
        self.summary.rejected += 1

    def finish(self) -> bool:
        """Mark this shard done and merge when every shard is; returns True when metadata.jsonl is whole."""
        if self.shard is None:
            return True
        i, n = self.shard
        (self.train / f".shard-{i}-of-{n}.done").touch()
        return merge_shards(self.root, n)


# --------------------------------------------------------------------------------------------------
# the shard merge
# --------------------------------------------------------------------------------------------------

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
