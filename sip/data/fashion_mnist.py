"""Fashion-MNIST: idx file reading, where the files live (Debian, cache, ``$SIP_FASHION_MNIST_DIR``),
the source, few-shot selection and the class names.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from sip.data.images import ImageSource, Sample
from sip.ids import fashion_mnist_id

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Readable names for prompts ("T-shirt/top" → "t-shirt"): the shipped model was trained on prompts built
# with these (scripts/train_tiny_sd.py), so prompts for it should use them too.
FASHION_MNIST_READABLE = {
    "T-shirt/top": "t-shirt", "Trouser": "trousers", "Pullover": "pullover", "Dress": "dress", "Coat": "coat",
    "Sandal": "sandal", "Shirt": "shirt", "Sneaker": "sneaker", "Bag": "bag", "Ankle boot": "ankle boot",
}
# The same names as English noun phrases with their article, for templates without one ("a photo of {label}"):
# "a photo of a pair of trousers", "a photo of an ankle boot". The shipped model draws them as faithfully as the
# names it was trained on (the demo's teacher kept 28/30 trousers and 29/30 ankle boots under either form).
FASHION_MNIST_PHRASES = {
    "T-shirt/top": "a t-shirt", "Trouser": "a pair of trousers", "Pullover": "a pullover", "Dress": "a dress",
    "Coat": "a coat", "Sandal": "a sandal", "Shirt": "a shirt", "Sneaker": "a sneaker", "Bag": "a bag",
    "Ankle boot": "an ankle boot",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")



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

    def _restrict(self, positions: list[int]) -> None:
        self.indices = self.indices[positions]

    def source_ids(self) -> Iterator[str]:
        """Ids minted by :func:`sip.ids.fashion_mnist_id`, without building any image."""
        return (fashion_mnist_id(self.split, int(i)) for i in self.indices)
