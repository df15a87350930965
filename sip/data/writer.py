"""The writer of the augmented dataset on disk: append-only and resumable (the format and its guarantees
are described in :mod:`sip.data.bank`).

Test hook (off unless the variable is set; used by ``scripts/fault_inject.py``): ``SIP_TEST_ENOSPC_AFTER=<k>``
makes the writer's k-th file write (images and lines, counted from 1) fail with ENOSPC half-way through
(:mod:`sip.data.durable`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from sip.data.durable import DiskFullError, append_jsonl, atomic_write, read_jsonl, repair_jsonl
from sip.data.merge import merge_shards
from sip.data.readers import METADATA, REJECTED, RUN_INFO, rows_of, run_info_at
from sip.data.resume import LAUNCH_KEYS, config_differences, resolve_paths
from sip.data.run_lock import pid_alive
from sip.ids import sanitize_label

__all__ = ["DatasetWriter", "WriteSummary", "label_folders"]

# The writer's records keep the name of the module users know the format by (``sip.data.bank``), so a
# logging setup (or a test's caplog) that listens to it still hears the adopted / kept-aside orphans.
logger = logging.getLogger("sip.data.bank")


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


def _writer_alive(temp: Path) -> bool:
    """Whether the process that owns a temp file (``.<name>.<pid>.tmp``, :func:`atomic_write`) still runs here."""
    pid = temp.name.rsplit(".", 2)[-2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    return pid_alive(int(pid))


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
            previous = run_info_at(run_file, strict=True)
            differences = config_differences(previous.get("config", {}), run_info["config"], defaults)
            if differences:
                raise ValueError(
                    f"{self.root} holds a run with a different config ({run_file}); nothing was changed. Differing "
                    "keys: " + "; ".join(differences) + ". Use a new --output folder, or rerun with the same recipe "
                    "and flags to resume it.")
            launch = {k: run_info[k] for k in LAUNCH_KEYS if k in run_info}
            if any(previous.get(k) != v for k, v in launch.items()):  # resumed under another launch: say so
                atomic_write(run_file, json.dumps({**previous, **launch}, indent=2, ensure_ascii=False).encode("utf-8"),
                             self.root)
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
        rows = rows_of(self.train)
        self.done: set[str] = {Path(r["file_name"]).stem for r in rows if "file_name" in r}
        for path in [self.root / REJECTED, *self.root.glob("rejected.shard-*.jsonl")]:
            self.done |= {r["id"] for r in read_jsonl(path) if "id" in r}
        for stale in self.train.glob("*/.*.tmp"):
            if not _writer_alive(stale):  # another process of the same launch may be renaming its own right now
                stale.unlink(missing_ok=True)  # a temp file is never a finished image: the id has no line, is redone
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
        """Mark this shard done and merge when every shard is; returns True when metadata.jsonl is whole. An
        unsharded run folds in the shard files an earlier launch with several processes left."""
        if self.shard is None:
            return merge_shards(self.root, None)
        i, n = self.shard
        (self.train / f".shard-{i}-of-{n}.done").touch()
        return merge_shards(self.root, n)

