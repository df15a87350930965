"""Real-image sources: an image folder, a Hugging Face dataset saved to disk, and Fashion-MNIST.

Every source yields the same record, :class:`Sample` (RGB PIL image, label index, label name, a stable
source id), so every later stage is source-agnostic. Unreadable files are reported by path and skipped:
they are collected in ``source.skipped`` and logged, never silently dropped and never fatal.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sip.ids import fashion_mnist_id

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Readable names for prompts ("T-shirt/top" → "t-shirt"): the shipped model was trained on prompts built
# with these (scripts/train_tiny_sd.py), so prompts for it should use them too.
FASHION_MNIST_READABLE = {
    "T-shirt/top": "t-shirt", "Trouser": "trousers", "Pullover": "pullover", "Dress": "dress", "Coat": "coat",
    "Sandal": "sandal", "Shirt": "shirt", "Sneaker": "sneaker", "Bag": "bag", "Ankle boot": "ankle boot",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Sample:
    """One labelled real image, the record every source yields.

    Attributes:
        image (PIL.Image.Image): RGB image.
        label (int): class index into the source's ``classes``.
        label_name (str): human-readable class name (not yet sanitised for the file system).
        source_id (str): stable id of the image within its source (a relative path, ``split/index``).
    """

    image: Image.Image
    label: int
    label_name: str
    source_id: str


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: EXIF orientation applied, transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(float(arr.max()), 1.0)
        image = Image.fromarray((arr * scale).clip(0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file as RGB. Raises ``ValueError`` naming the file when it cannot."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from e


@dataclass
class Skipped:
    """A file a source could not read, and why."""

    path: str
    reason: str


class ImageSource:
    """Base of the sources: ``classes``, ``__len__``, ``__iter__`` of :class:`Sample`, ``skipped``."""

    classes: list[str]
    skipped: list[Skipped]

    def __len__(self) -> int:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _skip(self, path: str, reason: str) -> None:
        if any(s.path == path for s in self.skipped):  # iterated again: already reported
            return
        self.skipped.append(Skipped(path, reason))
        logger.warning("skipping %s: %s", path, reason)


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
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = list(classes) if classes is not None else found
        self.skipped = []
        self.ignored: list[str] = []
        self.files: list[tuple[Path, int]] = []
        for idx, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir():
                continue
            for p in sorted(folder.rglob("*")):
                if not p.is_file() or p.name.startswith("."):
                    continue
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    self.files.append((p, idx))
                elif p.name != "metadata.jsonl":
                    self.ignored.append(str(p))
        if not self.files:
            raise ValueError(
                f"no images found in {self.root}: expected files like {self.root}/<label>/<name>.png "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Sample]:
        for path, label in self.files:
            try:
                image = load_image(path)
            except ValueError as e:
                self._skip(str(path), str(e))
                continue
            yield Sample(image, label, self.classes[label], path.relative_to(self.root).as_posix())


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
            except (ValueError, OSError, UnidentifiedImageError) as e:
                self._skip(f"{self.path}:{sid}", f"cannot decode image: {e}")
                continue
            label = int(row[self.label_column])
            yield Sample(image, label, self.classes[label], sid)


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw), read-only. Cached per file (and its modification time), so
    sources share one copy of the training set while a changed ``$SIP_FASHION_MNIST_DIR`` still counts."""
    stat = path.stat()
    return _read_idx_file(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _read_idx_file(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dirs() -> list[Path]:
    """Where Fashion-MNIST idx files are looked for, in order."""
    dirs = []
    if os.environ.get("SIP_FASHION_MNIST_DIR"):
        dirs.append(Path(os.environ["SIP_FASHION_MNIST_DIR"]))
    dirs += [DEBIAN_FASHION_MNIST, Path.home() / ".cache" / "sip" / "FashionMNIST" / "raw"]
    return dirs


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist_arrays(split: Literal["train", "test"] = "train", download: bool = True,
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as (images uint8 [N, 28, 28], labels int64 [N]).

    Looks in ``$SIP_FASHION_MNIST_DIR``, Debian's ``/usr/share/datasets/fashion-mnist`` and
    ``~/.cache/sip``; with ``download`` and a network, torchvision's downloader fills the cache.
    """
    prefix = "train" if split == "train" else "t10k"
    for folder in fashion_mnist_dirs():
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return _read_idx(images), _read_idx(labels).astype(np.int64)
    hint = (
        "Fashion-MNIST not found (looked in " + ", ".join(str(d) for d in fashion_mnist_dirs()) + "). "
        "On Debian/Ubuntu: `apt-get install dataset-fashion-mnist`; elsewhere run once with network access "
        "(torchvision downloads it to ~/.cache/sip), or set SIP_FASHION_MNIST_DIR to a folder with the idx files."
    )
    if not download:
        raise FileNotFoundError(hint)
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(Path.home() / ".cache" / "sip"), train=split == "train", download=True)
    except Exception as e:  # no network, or a mirror down: the hint says what to do
        raise FileNotFoundError(f"{hint} (download failed: {e})") from e
    return load_fashion_mnist_arrays(split, download=False)


def select_shots(labels: np.ndarray, shots: int, seed: int, pool: Sequence[int] | None = None) -> np.ndarray:
    """Choose ``shots`` indices per class from ``pool`` (default: all), reproducibly from ``seed``.

    Returns sorted indices. Raises ``ValueError`` when a class has fewer than ``shots`` images.
    """
    if shots <= 0:
        raise ValueError(f"shots must be positive, got {shots}")
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} images in the pool, fewer than shots={shots}")
        chosen.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(chosen))


class FashionMNISTSource(ImageSource):
    """Fashion-MNIST (28×28 grey, shown as RGB) from Debian's idx files, optionally subsampled.

    Args:
        split ("train" | "test", optional): Defaults to "train".
        shots (int, optional): images per class, chosen by ``seed`` from the pool. Defaults to all.
        seed (int, optional): Defaults to 0.
        start (int, optional): first index of the pool (e.g. 50000 to keep 10-shot sets disjoint from
            the generator's training images 0-49999). Defaults to 0.
        stop (int, optional): end of the pool (exclusive). Defaults to the split's size.
        size (int, optional): resize to size×size (bicubic); None keeps 28. Defaults to None.
    """

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, split: Literal["train", "test"] = "train", shots: int | None = None, seed: int = 0,
                 start: int = 0, stop: int | None = None, size: int | None = None, download: bool = True):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.images, self.labels = load_fashion_mnist_arrays(split, download=download)
        stop = len(self.labels) if stop is None else stop
        if not 0 <= start < stop <= len(self.labels):
            raise ValueError(f"pool [{start}, {stop}) is not inside [0, {len(self.labels)}) of the {split} split")
        pool = np.arange(start, stop)
        self.indices = pool if shots is None else select_shots(self.labels, shots, seed, pool)
        self.split, self.size = split, size
        self.skipped = []

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, i: int) -> Sample:
        idx = int(self.indices[i])
        image = Image.fromarray(self.images[idx], mode="L").convert("RGB")
        if self.size and self.size != 28:
            image = image.resize((self.size, self.size), Image.BICUBIC)
        label = int(self.labels[idx])
        return Sample(image, label, self.classes[label], fashion_mnist_id(self.split, idx))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.sample(i)


@dataclass(frozen=True)
class SourceConfig:
    """Where the real images come from.

    Attributes:
        kind: "fashion-mnist" (Debian idx files), "folder" (root/<label>/*.png) or "hf" (save_to_disk).
        path: the folder for "folder" and "hf".
        split: split to read ("train"/"test" for Fashion-MNIST, any split of an HF DatasetDict).
        shots: images per class (few-shot subsample chosen by seed); null keeps all.
        seed: chooses the subsample.
        start, stop: Fashion-MNIST index pool; the shipped generator trained on 0-49999, so
            few-shot sets default to 50000-59999 to keep the benchmark free of leakage.
        size: Fashion-MNIST output size (28 native; the shipped model works at 32).
        image_column, label_column: columns of an HF dataset.
    """

    kind: Literal["fashion-mnist", "folder", "hf"] = "fashion-mnist"
    path: str | None = None
    split: str = "train"
    shots: int | None = None
    seed: int = 0
    start: int = 50000
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


def open_source(config: SourceConfig) -> ImageSource:
    """Build the source a :class:`SourceConfig` describes."""
    if config.kind == "fashion-mnist":
        return FashionMNISTSource(config.split, config.shots, config.seed,  # type: ignore[arg-type]
                                  config.start if config.split == "train" else 0, config.stop, config.size)
    if config.kind == "folder":
        folder = ImageFolderSource(config.path, classes=config.classes or None)
        if config.shots is not None:
            keep = select_shots(np.array([label for _, label in folder.files]), config.shots, config.seed)
            folder.files = [folder.files[i] for i in keep]
        return folder
    hf = HFDatasetSource(config.path, config.split, config.image_column, config.label_column)
    if config.shots is not None:
        hf.select(select_shots(np.array(hf.dataset[config.label_column]), config.shots, config.seed))
    return hf
