"""Real images, their sip variants / synthetic images, and the two mixed together, as torch Datasets.

Three map-style datasets share one small protocol: ``classes`` (label names, in class-index order),
``labels`` (an int array, readable without decoding any image), ``sample_id(i)`` (a stable string id),
and ``__getitem__(i) -> (PIL RGB image, class index)``.

- :class:`RealImages` gives random access to any ``sip.data.sources`` source (Fashion-MNIST arrays, an image
  folder, a saved Hugging Face dataset).
- :class:`SyntheticImages` reads a dataset written by ``sip augment`` / ``sip generate``
  (``DIR/train/metadata.jsonl``); labels are matched to class indices by the *label name* recorded in
  each metadata line, never by the sanitised folder name.
- :class:`MixedImages` mixes the two, epoch by epoch: by ``ratio`` (the synthetic share of each epoch),
  or by ``swap`` (each real image is replaced, with probability ``p``, by one of its *own* variants,
  found through the ``source`` id recorded in the metadata), optionally class-balanced. Every epoch's
  plan is a pure function of ``(seed, epoch)``: the same on every run, worker and resumed process.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from sip.data.fashion_mnist import FashionMNISTSource
from sip.data.images import ImageSource, load_image, to_rgb
from sip.data.sources import HFDatasetSource, ImageFolderSource
from sip.ids import stable_seed

logger = logging.getLogger(__name__)

SYNTHETIC_ID_PREFIX = "syn:"


class RealImages(torch.utils.data.Dataset):
    """Random access to a ``sip.data.sources`` source.

    Args:
        source (ImageSource): a :class:`~sip.data.sources.FashionMNISTSource`, :class:`~sip.data.sources.ImageFolderSource`
            or :class:`~sip.data.sources.HFDatasetSource` (e.g. from :func:`sip.data.sources.open_source`).

    An image that cannot be decoded raises ``ValueError`` naming the file: a training set is expected to
    be readable (``sip.data.sources`` sources list unreadable files in ``skipped`` when iterated).
    """

    def __init__(self, source: ImageSource):
        self.source = source
        self.classes = list(source.classes)
        if isinstance(source, FashionMNISTSource):
            self.labels = source.labels[source.indices].astype(np.int64)
            self._ids = list(source.source_ids())
        elif isinstance(source, ImageFolderSource):
            self.labels = np.array([label for _, label in source.files], dtype=np.int64)
            self._ids = list(source.source_ids())  # the ids the source's samples carry (UTF-8 safe)
        elif isinstance(source, HFDatasetSource):
            self.labels = np.asarray(source.dataset[source.label_column], dtype=np.int64)
            self._ids = list(source.source_ids())  # row numbers survive a few-shot select
        else:
            raise TypeError(f"RealImages takes a sip.data.sources source, got {type(source).__name__}")

    def __len__(self) -> int:
        return len(self.labels)

    def sample_id(self, i: int) -> str:
        return self._ids[i]

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        src = self.source
        if isinstance(src, FashionMNISTSource):
            return src.sample(i).image, int(self.labels[i])
        if isinstance(src, ImageFolderSource):
            return load_image(src.files[i][0]), int(self.labels[i])
        cell = src.dataset[i][src.image_column]
        if cell.get("bytes") is not None:
            import io

            with Image.open(io.BytesIO(cell["bytes"])) as im:
                im.load()
                return to_rgb(im), int(self.labels[i])
        return load_image(cell["path"]), int(self.labels[i])


@dataclass(frozen=True)
class SyntheticRecord:
    """One line of ``metadata.jsonl`` that training uses."""

    file_name: str
    label: str
    source: str | None


class SyntheticImages(torch.utils.data.Dataset):
    """A dataset written by sip: ``ROOT/train/<label folder>/<id>.png`` + ``ROOT/train/metadata.jsonl``,
    or several such folders read as one (e.g. the img2img variants of the real shots and a txt2img set).

    Args:
        root (str | Path | Sequence): the dataset folder (``ROOT``; ``ROOT/train`` is also accepted), or a
            list of them; an image id listed in two of them is an error naming both.
        classes (Sequence[str]): class names in index order (the real data's or the teacher's). Each
            line's ``label`` must be one of them; an unknown label is an error listing them.

    Attributes:
        records (list[SyntheticRecord]): file, label name and source id of every image, in file order.
        sources (list[str | None]): the real image each one varies (``None`` for txt2img).
    """

    def __init__(self, root: str | Path | Sequence[str | Path], classes: Sequence[str]):
        roots = [root] if isinstance(root, (str, Path)) else list(root)
        if not roots:
            raise ValueError("SyntheticImages needs at least one dataset folder")
        self.classes = list(classes)
        self.roots, self.train_dirs, self.records, folder_of, owner = [], [], [], [], {}
        for k, r in enumerate(roots):
            r, records = self._read_folder(Path(r))
            for rec in records:
                if rec.file_name in owner:
                    raise ValueError(f"image {rec.file_name} is listed in both {self.roots[owner[rec.file_name]]} "
                                     f"and {r}: list each dataset folder once in data.synthetic")
                owner[rec.file_name] = k
            self.roots.append(r)
            self.train_dirs.append(r / "train")
            self.records.extend(records)
            folder_of.extend([k] * len(records))
        self.root, self.train_dir = self.roots[0], self.train_dirs[0]
        self._folder = np.array(folder_of, dtype=np.int64)
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.array([index[r.label] for r in self.records], dtype=np.int64)
        self.sources = [r.source for r in self.records]

    def _read_folder(self, root: Path) -> tuple[Path, list[SyntheticRecord]]:
        """One dataset folder's records, checked against the classes and the files on disk."""
        from sip.data.bank import read_metadata

        if root.name == "train" and (root / "metadata.jsonl").is_file():
            root = root.parent
        train = root / "train"
        rows = read_metadata(root)  # the merged file and any unmerged shard files; torn last lines skipped
        if not rows:
            raise FileNotFoundError(
                f"{root} is not a sip dataset (or an empty one): {train}/metadata.jsonl lists no images "
                "(write one with `sip augment` or `sip generate`)")
        index = set(self.classes)
        records, unknown, seen, missing = [], Counter(), set(), []
        for n, row in enumerate(rows, 1):
            try:
                rec = SyntheticRecord(str(row["file_name"]), str(row["label"]), row.get("source"))
            except (KeyError, TypeError) as e:
                raise ValueError(f"{train}: metadata line {n} has no file_name or label ({e})") from e
            if rec.file_name in seen:  # listed twice (a merged file next to its shard files)
                continue
            seen.add(rec.file_name)
            if rec.label not in index:
                unknown[rec.label] += 1
            if not (train / rec.file_name).is_file():
                missing.append(rec.file_name)
            records.append(rec)
        if unknown:
            raise ValueError(
                f"{train}/metadata.jsonl: labels {sorted(unknown)} are not among the classes {self.classes}; the "
                "synthetic dataset was made for another label set (labels are matched by name)")
        if missing:
            raise FileNotFoundError(f"{train}: {len(missing)} images listed in the metadata are missing "
                                    f"(e.g. {missing[:3]})")
        return root, records

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, i: int) -> str:
        return SYNTHETIC_ID_PREFIX + self.records[i].file_name

    @property
    def ids(self) -> list[str]:
        return [SYNTHETIC_ID_PREFIX + r.file_name for r in self.records]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return load_image(self.train_dirs[self._folder[i]] / self.records[i].file_name), int(self.labels[i])


MixMode = Literal["concat", "ratio", "swap"]


@dataclass(frozen=True)
class MixConfig:
    """How real and synthetic images share an epoch.

    Attributes:
        mode: "concat" (every real and every synthetic image once per epoch), "ratio" (a fixed
            synthetic share of each epoch) or "swap" (each real image replaced by one of its own sip
            variants with probability ``p``, the way the SIP/SGID papers and DA-Fusion train).
        ratio: synthetic share of each epoch for "ratio", in [0, 1]; the real images fill the rest.
        p: swap probability per real image for "swap", in [0, 1].
        class_balanced: draw each part of an epoch with the same count per class (oversampling small
            classes), for imbalanced real or synthetic sets.
        epoch_size: items per epoch; null keeps every real image once (ratio/swap) or both sets (concat).
    """

    mode: MixMode = "concat"
    ratio: float = 0.5
    p: float = 0.5
    class_balanced: bool = False
    epoch_size: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"mix ratio must be in [0, 1], got {self.ratio}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"mix p must be in [0, 1], got {self.p}")
        if self.epoch_size is not None and self.epoch_size <= 0:
            raise ValueError(f"mix epoch_size must be positive or null, got {self.epoch_size}")
        for key, mode in (("ratio", "ratio"), ("p", "swap")):  # read by one mode only: refused, not ignored
            if self.mode != mode and getattr(self, key) != getattr(MixConfig, key):
                raise ValueError(f"mix {key} is read by mode {mode!r} only, not {self.mode!r}: remove data.mix.{key} "
                                 f"or set data.mix.mode: {mode}")


def _draw(rng: np.random.Generator, members: np.ndarray, n: int) -> np.ndarray:
    """``n`` of ``members``: whole shuffled copies, then a shuffled part (no repeats before all are used)."""
    if n <= 0 or len(members) == 0:
        return np.zeros(0, dtype=np.int64)
    reps, rest = divmod(n, len(members))
    parts = [rng.permutation(members) for _ in range(reps)]
    if rest:
        parts.append(rng.permutation(members)[:rest])
    return np.concatenate(parts).astype(np.int64)


def _draw_balanced(rng: np.random.Generator, labels: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices into ``labels`` with (almost) the same count per present class."""
    present = np.unique(labels)
    if n <= 0 or len(present) == 0:
        return np.zeros(0, dtype=np.int64)
    per, extra = divmod(n, len(present))
    lucky = set(rng.permutation(present)[:extra].tolist())
    picks = [_draw(rng, np.flatnonzero(labels == c), per + (c in lucky)) for c in present]
    return np.concatenate(picks)


class MixedImages(torch.utils.data.Dataset):
    """Real images mixed with their synthetic counterpart, re-planned every epoch.

    Args:
        real (RealImages | None): real images (None: synthetic only, e.g. data-free distillation).
        synthetic (SyntheticImages | None): sip variants / txt2img images, labelled in ``real``'s classes.
        config (MixConfig, optional): mode, ratio, p, class balance. Defaults to concat.
        seed (int, optional): the plan of epoch e is a function of (seed, e) only. Defaults to 0.

    Items are ``(PIL image, class index)``; ``sample_id(i)`` names the item at position ``i`` of the
    current epoch (real ids as the source gives them, synthetic ids prefixed ``syn:``). Call
    :meth:`set_epoch` before each epoch (a ``DataLoader`` pickles the dataset into its workers when an
    epoch's iterator is created, so the workers see the plan too). ``stats`` counts the current plan's
    real, synthetic and swapped items, and the real images a swap found no variant for (``no_variant``;
    they stay real, which is never an error mid-epoch).
    """

    def __init__(self, real: RealImages | None, synthetic: SyntheticImages | None,
                 config: MixConfig = MixConfig(), seed: int = 0):
        if real is None and synthetic is None:
            raise ValueError("MixedImages needs real images, synthetic images, or both")
        if real is not None and synthetic is not None and list(real.classes) != list(synthetic.classes):
            raise ValueError(f"real classes {real.classes} and synthetic classes {synthetic.classes} differ")
        if config.mode in ("ratio", "swap") and (real is None or synthetic is None):
            raise ValueError(f"mix mode {config.mode!r} needs both real and synthetic images; "
                             "use mode 'concat' for one of them alone")
        self.real, self.synthetic, self.config, self.seed = real, synthetic, config, seed
        self.classes = list((real or synthetic).classes)
        self._variants: dict[int, np.ndarray] = {}
        if config.mode == "swap":
            by_source = defaultdict(list)
            for j, src in enumerate(synthetic.sources):
                if src is not None:
                    by_source[src].append(j)
            self._variants = {i: np.array(by_source[sid], dtype=np.int64)
                              for i, sid in enumerate(real.ids) if sid in by_source}
            if not self._variants:
                example = next((s for s in synthetic.sources if s is not None), None)
                raise ValueError(
                    f"mix mode 'swap': none of the {len(synthetic)} synthetic images names one of the "
                    f"{len(real)} real images as its source (a synthetic source looks like {example!r}, "
                    f"a real id like {real.sample_id(0)!r}); were the variants made from this real set?")
        self.epoch = -1
        self.synthetic_subset: np.ndarray | None = None  # restrict_synthetic: the synthetic items an epoch may draw
        self.set_epoch(0)

    def restrict_synthetic(self, subset: np.ndarray | None) -> None:
        """Let the next plans draw their synthetic items from ``subset`` (indices into ``synthetic``) only, in
        the same numbers as from the whole set (None: the whole set again); the epoch's length does not change.
        Used by ``sip distill``'s ``select:`` (the images the student most disagrees with its teacher on)."""
        if subset is not None:
            if self.synthetic is None or self.config.mode == "swap":
                raise ValueError("restrict_synthetic needs synthetic images mixed by mode 'ratio' or 'concat' "
                                 f"(this mix: mode {self.config.mode!r}, synthetic {self.synthetic is not None})")
            subset = np.unique(np.asarray(subset, dtype=np.int64))
            if len(subset) == 0 or subset[0] < 0 or subset[-1] >= len(self.synthetic):
                raise ValueError(f"a synthetic subset must name 1 to {len(self.synthetic)} of its items by index")
        changed = (subset is None) != (self.synthetic_subset is None) or (
            subset is not None and not np.array_equal(subset, self.synthetic_subset))
        self.synthetic_subset = subset
        if changed:
            self.epoch = -1  # the next set_epoch plans again

    # -- the plan ---------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Build the plan of ``epoch``: an array of codes, ``i >= 0`` for real item i, ``-(j+1)`` for
        synthetic item j."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        rng = np.random.default_rng(stable_seed("mix", self.seed, epoch))
        cfg, real, syn = self.config, self.real, self.synthetic
        n_real = len(real) if real is not None else 0
        n_syn = len(syn) if syn is not None else 0
        stats = Counter()

        def take(labels: np.ndarray, n: int) -> np.ndarray:
            if cfg.class_balanced:
                return _draw_balanced(rng, labels, n)
            return _draw(rng, np.arange(len(labels)), n)

        subset = self.synthetic_subset

        def take_synthetic(n: int) -> np.ndarray:
            if subset is None:
                return take(syn.labels, n)
            return subset[take(syn.labels[subset], n)]

        if cfg.mode == "concat":
            if cfg.epoch_size is None and not cfg.class_balanced and subset is None:
                plan = np.concatenate([np.arange(n_real), -(np.arange(n_syn) + 1)]).astype(np.int64)
            else:
                total = cfg.epoch_size or (n_real + n_syn)
                k_real = round(total * n_real / (n_real + n_syn))
                parts = []
                if real is not None:
                    parts.append(take(real.labels, k_real))
                if syn is not None:
                    parts.append(-(take_synthetic(total - k_real) + 1))
                plan = np.concatenate(parts)
        elif cfg.mode == "ratio":
            if cfg.epoch_size is not None:
                k_syn = round(cfg.epoch_size * cfg.ratio)
                k_real = cfg.epoch_size - k_syn
            elif cfg.ratio >= 1.0:
                k_real, k_syn = 0, n_syn
            else:
                k_real, k_syn = n_real, round(n_real * cfg.ratio / (1.0 - cfg.ratio))
            plan = np.concatenate([take(real.labels, k_real), -(take_synthetic(k_syn) + 1)])
        else:  # swap
            picks = take(real.labels, cfg.epoch_size or n_real)
            plan = picks.copy()
            coins = rng.random(len(picks))
            choices = rng.random(len(picks))
            for k, (i, coin) in enumerate(zip(picks.tolist(), coins)):
                if coin >= cfg.p:
                    continue
                variants = self._variants.get(i)
                if variants is None:
                    stats["no_variant"] += 1
                    continue
                plan[k] = -(int(variants[int(choices[k] * len(variants))]) + 1)
                stats["swapped"] += 1
        self.plan = plan.astype(np.int64)
        stats["real"] += int((self.plan >= 0).sum())
        stats["synthetic"] += int((self.plan < 0).sum())
        self.stats = dict(stats)
        self.labels = np.array([real.labels[c] if c >= 0 else syn.labels[-c - 1] for c in self.plan.tolist()],
                               dtype=np.int64)

    # -- access -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.plan)

    def sample_id(self, i: int) -> str:
        code = int(self.plan[i])
        return self.real.sample_id(code) if code >= 0 else self.synthetic.sample_id(-code - 1)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        code = int(self.plan[i])
        return self.real[code] if code >= 0 else self.synthetic[-code - 1]

    def pool(self) -> list[RealImages | SyntheticImages]:
        """The underlying datasets (real first), whatever the epoch plan draws from them."""
        return [d for d in (self.real, self.synthetic) if d is not None]

    def __repr__(self) -> str:
        c = self.config
        return (f"MixedImages(real={len(self.real) if self.real else 0}, "
                f"synthetic={len(self.synthetic) if self.synthetic else 0}, mode={c.mode!r}, ratio={c.ratio}, "
                f"p={c.p}, class_balanced={c.class_balanced}, epoch_size={len(self)}, seed={self.seed})")
