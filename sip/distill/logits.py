"""Precomputed teacher logits: run the teachers once, distil many times without them.

For each training image the store keeps ``views`` augmented views — a crop box in the image's own
pixels plus a horizontal flip, drawn like timm's ``RandomResizedCrop`` (:mod:`sip.distill.views`, whose
names are re-exported here) — and every teacher's logits for each view. A student then *replays* a
stored view (same crop, same flip, resized to its own input size) and learns from the logits that belong
to exactly that view: the idea of ReLabel (Yun et al., "Re-labeling ImageNet", CVPR 2021) and FKD (Shen &
Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022), applied to sip's datasets.

Layout of a store folder::

    store.json                          manifest: format, dataset fingerprint, teacher identities,
                                        classes, view settings, shards
    logits-00000-of-00003.safetensors   logits [n, V, K, C], views [n, V, 5] (top, left, h, w, flip),
                                        labels [n]; metadata: sample ids (JSON)

The store records a fingerprint of the dataset (ids, labels and a sample of image bytes of every
underlying set) and each teacher's identity (including a SHA-256 of its weights). :meth:`TeacherLogitsStore.check`
raises :class:`StoreMismatchError` when a store is used with another dataset, other teachers or another
label space. A killed build resumes: finished shards are kept when their metadata matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sip.distill.views import (  # re-exported: users of the store import the views from here
    ViewConfig,
    apply_view,
    identity_view,
    sample_view,
    view_input,
)
from sip.distill.logits_shards import (
    _check_build,
    _input_groups,
    _shard_finished,
    _shard_list,
    _warn_idle,
    _write_shard,
)
from sip.ids import stable_seed
from sip.models.checkpoints import input_transform  # re-exported: sip.distill.run imports it from here

logger = logging.getLogger(__name__)

STORE_FORMAT = "sip-teacher-logits"
STORE_VERSION = 1
MANIFEST = "store.json"


__all__ = ["MANIFEST", "STORE_FORMAT", "STORE_VERSION", "StoreMismatchError", "TeacherLogitsStore", "ViewConfig",
           "apply_view", "dataset_fingerprint", "identity_view", "input_transform", "sample_view", "view_input"]


class StoreMismatchError(ValueError):
    """A logits store used with a dataset, teachers or classes other than the ones it was built for."""


# ----------------------------------------------------------------------------------------------------
# Dataset fingerprint
# ----------------------------------------------------------------------------------------------------

def dataset_fingerprint(datasets: Sequence[Any], content_samples: int = 16) -> dict[str, Any]:
    """Identify the images a store is built on: every sample id and label, plus the pixels of
    ``content_samples`` evenly spaced images of each set (so a changed file behind the same id is caught
    with good odds, without reading the whole set).

    Args:
        datasets: the underlying sets in order (e.g. ``[RealImages, SyntheticImages]``), each with
            ``__len__``, ``__getitem__ -> (image, label)``, ``sample_id``, ``labels``.

    Returns:
        dict: ``{"sha256": ..., "samples": n, "parts": [{"kind", "samples", "first_id"}, ...]}``.
    """
    h = hashlib.sha256()
    parts = []
    for ds in datasets:
        n = len(ds)
        ids = [ds.sample_id(i) for i in range(n)]
        h.update(f"{type(ds).__name__}|{n}|".encode())
        h.update("\n".join(ids).encode())
        h.update(np.asarray(ds.labels, dtype=np.int64).tobytes())
        for i in sorted(set(np.linspace(0, n - 1, min(n, content_samples)).astype(int).tolist())):
            image, _ = ds[i]
            h.update(f"{image.size}{image.mode}".encode())
            h.update(image.tobytes())
        parts.append({"kind": type(ds).__name__, "samples": n, "first_id": ids[0] if ids else None})
    return {"sha256": h.hexdigest(), "samples": sum(p["samples"] for p in parts), "parts": parts}


# ----------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------

def _teachers_digest(identities: Sequence[dict]) -> str:
    keys = [(t["name"], t["weights_sha256"], t["num_classes"]) for t in identities]
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()


class _ViewBatchSource(torch.utils.data.Dataset):
    """Item i of the pool → every teacher group's inputs for all of its views (store building)."""

    def __init__(self, datasets, offsets, views: ViewConfig, groups: list[dict[str, Any]], start: int, stop: int):
        self.datasets, self.offsets, self.views, self.groups = datasets, offsets, views, groups
        self.start, self.stop = start, stop
        self.tails = [input_transform(g) for g in groups]

    def __len__(self) -> int:
        return self.stop - self.start

    def locate(self, i: int):
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.datasets[d], i - self.offsets[d]

    def __getitem__(self, k: int) -> dict[str, Any]:
        ds, j = self.locate(self.start + k)
        image, label = ds[j]
        sid = ds.sample_id(j)
        params = []
        for v in range(self.views.views):
            if v == 0 and self.views.identity_view:
                params.append(identity_view(*image.size))
            else:
                rng = random.Random(stable_seed("view", self.views.seed, sid, v))
                params.append(sample_view(rng, image.width, image.height, self.views.scale, self.views.ratio,
                                          self.views.hflip))
        item = {"label": label, "views": torch.tensor(params, dtype=torch.int32)}
        for g, (cfg, tail) in enumerate(zip(self.groups, self.tails)):
            item[f"input_{g}"] = torch.stack([view_input(image, p, cfg, tail) for p in params])
        return item


class TeacherLogitsStore:
    """Teacher logits for several replayable views of every image of a dataset (see the module docstring).

    Open an existing store with ``TeacherLogitsStore(path)``; build one with :meth:`build`.

    Attributes:
        logits (torch.Tensor): ``[N, V, K, C]`` (stored dtype).
        views (torch.Tensor): ``[N, V, 5]`` int32 ``(top, left, h, w, flip)``.
        labels (torch.Tensor): ``[N]`` the dataset's labels.
        ids (list[str]): sample ids, row order.
        teachers (list[dict]): identities, in the K order of ``logits``.
        fingerprint (dict): of the dataset the store was built on.
        classes (list[str]): label space.
    """

    def __init__(self, root: str | Path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.root} is not a teacher-logits store ({MANIFEST} missing); "
                                    "build one with `sip logits` (sip.distill.run.run_logits)")
        self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        if self.manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"{manifest} is not a {STORE_FORMAT} manifest")
        if self.manifest.get("version", 0) > STORE_VERSION:
            raise ValueError(f"{manifest} has format version {self.manifest['version']}; this sip reads up to "
                             f"{STORE_VERSION} (upgrade sip)")
        logits, views, labels, ids = [], [], [], []
        for shard in self.manifest["shards"]:
            path = self.root / shard["file"]
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                ids.extend(json.loads(f.metadata()["ids"]))
            logits.append(tensors["logits"])
            views.append(tensors["views"])
            labels.append(tensors["labels"])
        self.logits = torch.cat(logits)
        self.views = torch.cat(views)
        self.labels = torch.cat(labels)
        self.ids = ids
        self.row = {sid: i for i, sid in enumerate(ids)}
        if len(self.row) != len(ids):
            raise ValueError(f"{self.root}: duplicate sample ids in the store")
        self.teachers = self.manifest["teachers"]
        self.fingerprint = self.manifest["fingerprint"]
        self.classes = self.manifest["classes"]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_views(self) -> int:
        return int(self.views.shape[1])

    @property
    def num_teachers(self) -> int:
        return int(self.logits.shape[2])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[3])

    def get(self, sample_id: str, view: int) -> tuple[tuple[int, ...], torch.Tensor]:
        """The crop/flip of ``view`` of ``sample_id`` and the teachers' logits for it (``[K, C]`` float32)."""
        row = self.row[sample_id]
        return tuple(int(v) for v in self.views[row, view]), self.logits[row, view].float()

    # -- checks ---------------------------------------------------------------------------------------
    def check(self, fingerprint: dict[str, Any] | None = None, teachers: Sequence[dict] | None = None,
              classes: Sequence[str] | None = None) -> None:
        """Raise :class:`StoreMismatchError` if the store does not belong to this dataset / teachers / classes."""
        where = f"logits store {self.root}"
        if fingerprint is not None and fingerprint["sha256"] != self.fingerprint["sha256"]:
            mine, theirs = self.fingerprint, fingerprint
            detail = f"{mine['samples']} samples ({_parts(mine)}) vs {theirs['samples']} ({_parts(theirs)})"
            raise StoreMismatchError(
                f"{where} was built on a different dataset: fingerprint {mine['sha256'][:12]} vs "
                f"{theirs['sha256'][:12]}; {detail}. Rebuild it for this data with `sip logits`.")
        if teachers is not None:
            self.teacher_indices(teachers)
        if classes is not None and list(classes) != list(self.classes):
            raise StoreMismatchError(f"{where} was built for classes {self.classes}, the data has {list(classes)}")

    def teacher_indices(self, teachers: Sequence[dict]) -> list[int]:
        """Where each of ``teachers`` (identities) sits in the store's K axis; a recipe may use any subset
        of the stored teachers, in any order. Teachers match by name and weights SHA-256.

        Raises:
            StoreMismatchError: a teacher whose logits the store does not hold.
        """
        stored = [(t["name"], t["weights_sha256"]) for t in self.teachers]
        indices, unknown = [], []
        for t in teachers:
            key = (t["name"], t["weights_sha256"])
            if key in stored:
                indices.append(stored.index(key))
            else:
                unknown.append(key)
        if unknown:
            fmt = lambda ts: ", ".join(f"{n} ({h[:12]})" for n, h in ts)
            raise StoreMismatchError(
                f"logits store {self.root} holds logits of other teachers: stored [{fmt(stored)}], not "
                f"[{fmt(unknown)}] (name and weights SHA-256). Rebuild it with `sip logits` for these teachers.")
        return indices

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [s for s in ids if s not in self.row]

    def _record_identity_agreement(self) -> None:
        """With an identity view: how often the teachers' mean agrees with the dataset's labels, in the manifest."""
        if self.manifest["views"].get("identity_view"):
            agree = (self.logits[:, 0].float().mean(1).argmax(-1) == self.labels).float().mean().item()
            self.manifest["identity_view_top1"] = round(100.0 * agree, 3)
            _write_manifest(self.root, self.manifest)

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, root: str | Path, datasets: Sequence[Any], teachers: Sequence[Any], classes: Sequence[str],
              views: ViewConfig = ViewConfig(), batch_size: int = 128, shard_size: int = 10000,
              dtype: str = "float16", device: str | torch.device = "cpu", num_workers: int = 0,
              autocast_dtype: torch.dtype | None = None, progress: bool = True, rank: int = 0,
              world: int = 1) -> TeacherLogitsStore | None:
        """Run ``teachers`` over every image of ``datasets`` (in order) and write the store.

        Process ``rank`` of ``world`` builds shards ``s % world == rank`` of the one-process layout (the same
        bytes); whichever process finds every shard finished writes ``store.json`` (none waits on another).

        Args:
            root (str | Path): output folder.
            datasets (Sequence): underlying image sets (``RealImages`` / ``SyntheticImages``), stored in order.
            teachers (Sequence[Teacher]): from :func:`sip.distill.teachers.build_teachers`.
            classes (Sequence[str]): label space (checked against each teacher's class count).
            views (ViewConfig, optional): views per image and how they are drawn.
            batch_size (int, optional): images per step (each with all its views). Defaults to 128.
            shard_size (int, optional): images per safetensors shard. Defaults to 10000.
            dtype ("float16" | "float32", optional): stored logit precision (float16 halves the size).
            device, num_workers, autocast_dtype: where the teachers run (default cpu), DataLoader workers
                preparing the views (0), bf16/fp16 autocast for the teachers (None: off).
            progress (bool, optional): tqdm bar. Defaults to True.
            rank, world (int, optional): this process's place in a launch. Defaults to 0 of 1.

        Returns:
            TeacherLogitsStore | None: the store, or None when other processes' shards are still being built.
        """
        from tqdm.auto import tqdm

        _check_build(teachers, classes, dtype, rank, world)
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        fingerprint = dataset_fingerprint(datasets)
        identities = [t.identity for t in teachers]
        digest = _teachers_digest(identities)
        groups, teacher_group = _input_groups(teachers)
        offsets = np.cumsum([0] + [len(d) for d in datasets])
        total = int(offsets[-1])
        n_shards = max(1, math.ceil(total / shard_size))
        _warn_idle(world, n_shards, shard_size, total)
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        device = torch.device(device)

        def span(s: int) -> tuple[str, _ViewBatchSource, list[str]]:
            start, stop = s * shard_size, min((s + 1) * shard_size, total)
            source = _ViewBatchSource(datasets, offsets, views, groups, start, stop)
            ids = [d.sample_id(j) for d, j in map(source.locate, range(start, stop))]  # one lookup per id
            return f"logits-{s:05d}-of-{n_shards:05d}.safetensors", source, ids

        def finished(name: str, ids: list[str]) -> bool:
            return _shard_finished(root / name, fingerprint["sha256"], digest, ids, views)

        mine = [s for s in range(n_shards) if s % world == rank]
        t0 = time.perf_counter()
        bar = tqdm(total=sum(min(shard_size, total - s * shard_size) for s in mine), desc="teacher logits",
                   unit="img", disable=not progress or rank > 0)
        spans = {}
        for s in mine:
            name, source, ids = spans[s] = span(s)
            path = root / name
            if finished(name, ids):  # a resumed build: keep a finished shard that matches
                bar.update(len(ids))
                continue
            loader = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            _write_shard(path, loader, teachers, teacher_group, device, autocast_dtype, torch_dtype, bar,
                         {"format": STORE_FORMAT, "fingerprint": fingerprint["sha256"], "teachers": digest,
                          "views": json.dumps(asdict(views)), "ids": json.dumps(ids)})
        bar.close()
        shards = _shard_list(n_shards, shard_size, lambda s: spans[s] if s in spans else span(s),
                             lambda s, name, ids: s in spans or finished(name, ids), rank, world)
        if shards is None:  # other processes' shards are still being built
            return None
        _write_manifest(root, _new_manifest(fingerprint, identities, classes, views, total, dtype, shards,
                                            time.perf_counter() - t0))
        store = cls(root)
        store._record_identity_agreement()
        return store


def _new_manifest(fingerprint: dict[str, Any], identities: list[dict], classes: Sequence[str], views: ViewConfig,
                  total: int, dtype: str, shards: list[dict], seconds: float) -> dict[str, Any]:
    """``store.json`` of a finished build: what was stored, from which data and teachers, in which shards."""
    from sip import __version__

    return {"format": STORE_FORMAT, "version": STORE_VERSION, "sip_version": __version__,
            "fingerprint": fingerprint, "teachers": identities, "classes": list(classes),
            "views": asdict(views), "num_samples": total, "num_views": views.views,
            "num_teachers": len(identities), "num_classes": len(classes), "dtype": dtype, "shards": shards,
            "build_time_s": round(seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(root / MANIFEST)


def _parts(fp: dict[str, Any]) -> str:
    return ", ".join(f"{p['kind']} {p['samples']} from {p['first_id']!r}" for p in fp.get("parts", []))
