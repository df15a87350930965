"""Real-image sources: an image folder and a Hugging Face dataset saved to disk; :class:`SourceConfig`
and :func:`open_source` (which also builds the Fashion-MNIST source of :mod:`sip.data.fashion_mnist`).

Every source yields the same record, :class:`~sip.data.images.Sample`, so every later stage is
source-agnostic. Unreadable files are reported by path and reason and skipped: they are collected in
``source.skipped`` and logged, never silently dropped and never fatal.

Symlinks: a link whose target lies inside the input folder is followed; a link pointing outside it is
refused (listed in ``skipped`` with the reason), so a crafted input cannot make sip read files elsewhere.
Hidden folders and files (``.git``, ``..evil``) and empty class folders are not read, and are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from sip.data.fashion_mnist import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_READABLE,
    FashionMNISTSource,
    fashion_mnist_dirs,
    load_fashion_mnist_arrays,
    select_shots,
)
from sip.data.images import (
    IMAGE_EXTENSIONS,
    ImageSource,
    Sample,
    Skipped,
    display_path,
    load_image,
    to_rgb,
)

# Re-exported for modules that still import them from here (move to sip.data.images / fashion_mnist).
__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_READABLE",
    "IMAGE_EXTENSIONS",
    "FashionMNISTSource",
    "HFDatasetSource",
    "ImageFolderSource",
    "ImageSource",
    "Sample",
    "Skipped",
    "SourceConfig",
    "fashion_mnist_dirs",
    "load_fashion_mnist_arrays",
    "load_image",
    "open_source",
    "select_shots",
    "to_rgb",
]

logger = logging.getLogger(__name__)


class ImageFolderSource(ImageSource):
    """Images in ``root/<label>/*.{png,jpg,...}``; classes are the sorted sub-folder names.

    Args:
        root (str | Path): the folder.
        classes (Sequence[str], optional): fix the class list (and order); folders not in it are
            ignored. Defaults to every sub-folder.

    Files with an image extension that cannot be decoded are skipped and listed in ``skipped``; files
    with other extensions are ignored (listed in ``ignored``).
    """

    def __init__(self, root: str | Path, classes: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"input folder {self.root} does not exist (expected root/<label>/<image>)")
        self.skipped = []
        self.ignored: list[str] = []
        self.files: list[tuple[Path, int]] = []
        real_root = self.root.resolve()
        found = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir():
                continue
            if p.name.startswith("."):
                logger.warning("not reading hidden folder %s (rename it without the leading dot to use it "
                               "as a class)", display_path(p))
                self.ignored.append(display_path(p))
            elif not self._inside(p, real_root):
                self._skip(display_path(p), f"class folder is a link to {display_path(p.resolve())}, outside "
                           f"the input folder {display_path(real_root)}; copy it in to use it")
            else:
                found.append(p.name)
        self.classes = list(classes) if classes is not None else found
        for idx, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir() or not self._inside(folder, real_root):
                continue
            n_before = len(self.files)
            for p in sorted(folder.rglob("*")):
                if p.name.startswith(".") or any(part.startswith(".") for part in p.relative_to(folder).parts):
                    if p.is_file():
                        logger.warning("not reading hidden file %s", display_path(p))
                        self.ignored.append(display_path(p))
                    continue
                if p.is_symlink() and not self._inside(p, real_root):
                    self._skip(display_path(p), f"link to {display_path(p.resolve())}, outside the input "
                               f"folder {display_path(real_root)}; copy the file in to use it")
                    continue
                if not p.is_file():
                    continue
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    self.files.append((p, idx))
                elif p.name != "metadata.jsonl":
                    self.ignored.append(display_path(p))
            if len(self.files) == n_before:
                logger.warning("class folder %s holds no images (extensions %s); class %r gets no samples",
                               display_path(folder), ", ".join(IMAGE_EXTENSIONS), name)
        if not self.files:
            raise ValueError(
                f"no images found in {self.root}: expected files like {self.root}/<label>/<name>.png "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
            )

    @staticmethod
    def _inside(path: Path, real_root: Path) -> bool:
        try:
            path.resolve().relative_to(real_root)
            return True
        except ValueError:
            return False

    def source_id(self, path: Path) -> str:
        """The id of a file: its path relative to the root, as valid UTF-8 (non-UTF-8 bytes escaped)."""
        return display_path(path.relative_to(self.root).as_posix())

    def source_ids(self) -> Iterator[str]:
        """Ids of the listed files, without decoding any image."""
        return (self.source_id(p) for p, _ in self.files)

    def __len__(self) -> int:
        return len(self.files)

    def _restrict(self, positions: list[int]) -> None:
        self.files = [self.files[i] for i in positions]

    def __iter__(self) -> Iterator[Sample]:
        for path, label in self.files:
            try:
                image = load_image(path)
            except ValueError as e:
                self._skip(display_path(path), str(e))
                continue
            yield Sample(image, label, self.classes[label], self.source_id(path))


class HFDatasetSource(ImageSource):
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (a Dataset or DatasetDict).

    Args:
        path (str | Path): folder written by ``save_to_disk``.
        split (str, optional): split of a DatasetDict. Defaults to "train".
        image_column (str, optional): Defaults to "image".
        label_column (str, optional): a ``ClassLabel`` (names come from it) or int column.
            Defaults to "label".

    ``rows[i]`` is the row number (in the split) of ``dataset[i]``; source ids use it, so they stay the
    same after :meth:`select`.
    """

    def __init__(self, path: str | Path, split: str = "train", image_column: str = "image",
                 label_column: str = "label"):
        import datasets

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset folder {self.path} does not exist (write it with Dataset.save_to_disk)")
        ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{self.path} has no split {split!r}; splits: {', '.join(ds)}")
            ds = ds[split]
        elif split != "train":  # a single Dataset has no splits: another split name would be ignored
            raise ValueError(f"{self.path} is a single Dataset with no splits; split {split!r} cannot be read: remove "
                             "split (or save a DatasetDict)")
        for col in (image_column, label_column):
            if col not in ds.column_names:
                raise ValueError(f"{self.path}: no column {col!r}; columns: {', '.join(ds.column_names)}")
        feature = ds.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            self.classes = list(feature.names)
        else:
            self.classes = [str(i) for i in range(int(max(ds[label_column])) + 1)]
        self.split, self.image_column, self.label_column = split, image_column, label_column
        self.dataset = ds.cast_column(image_column, datasets.Image(decode=False))
        self.rows: list[int] = list(range(len(ds)))
        self.skipped = []

    def select(self, indices: Sequence[int]) -> None:
        """Keep only ``dataset[indices]`` (e.g. a few-shot subsample); source ids keep naming the rows."""
        self.dataset = self.dataset.select(indices)
        self.rows = [self.rows[int(i)] for i in indices]

    def __len__(self) -> int:
        return len(self.dataset)

    def _restrict(self, positions: list[int]) -> None:
        self.select(positions)

    def source_ids(self) -> Iterator[str]:
        """``split/row`` ids, without decoding any image."""
        return (f"{self.split}/{r}" for r in self.rows)

    def __iter__(self) -> Iterator[Sample]:
        import io

        for i, row in enumerate(self.dataset):
            sid = f"{self.split}/{self.rows[i]}"
            cell = row[self.image_column]
            try:
                if cell.get("bytes") is not None:
                    with Image.open(io.BytesIO(cell["bytes"])) as im:
                        im.load()
                        image = to_rgb(im)
                else:
                    image = load_image(cell["path"])
            except (ValueError, OSError, EOFError, UnidentifiedImageError, Image.DecompressionBombError) as e:
                self._skip(f"{self.path}:{sid}", f"cannot decode image: {e}")
                continue
            label = int(row[self.label_column])
            yield Sample(image, label, self.classes[label], sid)


@dataclass(frozen=True)
class SourceConfig:
    """Where the real images come from. Every key is read by the kinds it names; set for another kind it is an error
    (never ignored).

    Attributes:
        kind: "fashion-mnist" (Debian idx files), "folder" (root/<label>/*.png) or "hf" (save_to_disk).
        path: the folder for "folder" and "hf".
        split: "train" / "test" for Fashion-MNIST, any split of an HF DatasetDict; a folder has none (point
            ``path`` at the split's folder).
        shots: images per class (few-shot subsample chosen by seed, from ``start``-``stop``); null keeps all.
        seed: chooses the subsample.
        start, stop: the range of images read, by position: Fashion-MNIST indices of the split, a folder's files in
            sorted order, an HF split's rows. ``start`` null: 50000 on Fashion-MNIST's train split (the shipped
            generator trained on 0-49999, so few-shot sets stay free of leakage), else 0. ``stop`` null: the end.
        size: Fashion-MNIST output size (28 native, null keeps it; the shipped model works at 32). Other kinds keep
            their images' size (``generate.resolution`` / ``data.img_size`` resize them).
        image_column, label_column: columns of an HF dataset.
        classes: a folder's class list and order (sub-folders not in it are not read); empty: every sub-folder.
    """

    kind: Literal["fashion-mnist", "folder", "hf"] = "fashion-mnist"
    path: str | None = None
    split: str = "train"
    shots: int | None = None
    seed: int = 0
    start: int | None = None
    stop: int | None = None
    size: int | None = 32
    image_column: str = "image"
    label_column: str = "label"
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.kind in ("folder", "hf") and not self.path:
            raise ValueError(f"source kind {self.kind!r} needs a path (--input FOLDER)")
        if self.shots is not None and self.shots <= 0:
            raise ValueError(f"shots must be positive or null, got {self.shots}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.start is None:  # resolved, so the saved config says which images were read
            object.__setattr__(self, "start", 50000 if (self.kind, self.split) == ("fashion-mnist", "train") else 0)
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise ValueError(f"start and stop must satisfy 0 <= start < stop, got start {self.start}, stop {self.stop}")
        if problems := _unread_keys(self):
            raise ValueError("; ".join(problems))


def _unread_keys(config: SourceConfig) -> list[str]:
    """The keys set to something the source kind does not read, each with what to do instead."""
    defaults = {f.name: f.default for f in fields(type(config))}  # EvalSourceConfig: split "test"
    kind, problems = config.kind, []
    if kind == "fashion-mnist":
        if config.split not in ("train", "test"):
            problems.append(f"split of Fashion-MNIST must be 'train' or 'test', got {config.split!r}")
        if config.size is not None and config.size < 8:
            problems.append(f"size must be at least 8 (or null for the native 28), got {config.size}")
        if config.path is not None:
            problems.append(f"path {config.path!r} is read by kinds folder and hf; Fashion-MNIST comes from Debian's "
                            "idx files: set kind: folder (or hf), or remove path")
        if config.classes:
            problems.append("classes fixes a folder's class list; Fashion-MNIST has its ten: remove classes")
    else:
        if config.size != defaults["size"] and config.size is not None:
            problems.append(f"size resizes Fashion-MNIST only; {kind} images keep their size (generate.resolution "
                            "or data.img_size resize them): remove size")
        if kind == "hf" and config.classes:
            problems.append("classes fixes a folder's class list; an HF dataset's come from its label column: "
                            "remove classes")
    if kind == "folder":
        if config.split != defaults["split"]:
            problems.append(f"split {config.split!r}: an image folder has no splits; point path at the split's own "
                            f"folder (e.g. {config.path}/{config.split}) and remove split")
        for key in ("image_column", "label_column"):
            if getattr(config, key) != defaults[key]:
                problems.append(f"{key} names a column of an HF dataset; a folder's labels are its sub-folders: "
                                f"remove {key}")
    if kind == "fashion-mnist":
        for key in ("image_column", "label_column"):
            if getattr(config, key) != defaults[key]:
                problems.append(f"{key} names a column of an HF dataset (kind: hf); remove {key}")
    return problems


def _position_range(n: int, config: SourceConfig, what: str) -> range:
    """``start``-``stop`` over the ``n`` images of a folder or HF split (positions in reading order)."""
    stop = n if config.stop is None else config.stop
    if not 0 <= config.start < stop <= n:
        raise ValueError(f"source start {config.start}, stop {config.stop}: not inside the {n} images of {what}")
    return range(config.start, stop)


def open_source(config: SourceConfig) -> ImageSource:
    """Build the source a :class:`SourceConfig` describes."""
    if config.kind == "fashion-mnist":
        return FashionMNISTSource(config.split, config.shots, config.seed,  # type: ignore[arg-type]
                                  config.start, config.stop, config.size)
    if config.kind == "folder":
        folder = ImageFolderSource(config.path, classes=config.classes or None)
        folder.files = [folder.files[i] for i in _position_range(len(folder.files), config, f"folder {config.path}")]
        if config.shots is not None:
            keep = select_shots(np.array([label for _, label in folder.files]), config.shots, config.seed)
            folder.files = [folder.files[i] for i in keep]
        return folder
    hf = HFDatasetSource(config.path, config.split, config.image_column, config.label_column)
    rows = _position_range(len(hf), config, f"{config.path} split {config.split}")
    if len(rows) != len(hf):
        hf.select(list(rows))
    if config.shots is not None:
        hf.select(select_shots(np.array(hf.dataset[config.label_column]), config.shots, config.seed))
    return hf
