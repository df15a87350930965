"""The variant index: which generated variants a source image has, by the content hash sip records.

A bank is read through :mod:`sip.data.bank` (``read_metadata``, ``read_run_info``), and the online
cache's new lines with ``read_metadata_since`` (whole lines only, so a line being written is read next
time). Used by :class:`sip.transforms.SIPAugment`.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from sip.data.bank import read_metadata, read_metadata_since, read_run_info
from sip.data.sources import to_rgb
from sip.ids import image_hash

logger = logging.getLogger("sip.transforms")

_ORIENTATION = 0x0112  # EXIF orientation tag


def source_key(image: Image.Image, resize_to: int | None = None) -> str:
    """The hash sip records as ``source_hash`` for ``image``: :func:`sip.ids.image_hash` of
    ``to_rgb(image)``, after a bicubic resize to ``resize_to`` × ``resize_to`` when given and the image
    has another size (what ``FashionMNISTSource(size=32)`` does to the 28×28 originals)."""
    if image.mode in ("L", "RGB") and image.getexif().get(_ORIENTATION, 1) == 1:
        # Fast path, same bytes: to_rgb would only copy (RGB) or convert (L) here, and a bicubic resize
        # works band by band, so resizing the grey band before copying it to R, G, B gives the same
        # pixels at a third of the cost (tests/test_transforms.py checks both paths agree).
        if resize_to and image.size != (resize_to, resize_to):
            image = image.resize((resize_to, resize_to), Image.BICUBIC)
        return image_hash(image.convert("RGB") if image.mode == "L" else image)
    rgb = to_rgb(image)
    if resize_to and rgb.size != (resize_to, resize_to):
        rgb = rgb.resize((resize_to, resize_to), Image.BICUBIC)
    return image_hash(rgb)


def bank_resize(root: Path) -> int | None:
    """The size a bank's sources were resized to before hashing, from its ``run.json``."""
    run = read_run_info(root)
    config = run.get("config", {}) if isinstance(run, dict) else {}
    source = config.get("source", {}) if isinstance(config, dict) else {}
    if isinstance(source, dict) and source.get("kind") == "fashion-mnist" and source.get("size") not in (None, 28):
        return int(source["size"])
    resize = config.get("resize_to") if isinstance(config, dict) else None  # an online cache records its own
    return int(resize) if resize else None


def fashion_mnist_aliases(root: Path, rows: list[dict[str, Any]], resize_to: int | None,
                           checks: int = 32) -> dict[str, str]:
    """Fast keys for a Fashion-MNIST bank: hash of the grey 28×28 original → its ``source_hash``.

    A torchvision ``FashionMNIST`` image is then found by hashing its 784 grey bytes, with no RGB copy
    and no resize. The originals are re-read from the idx files sip read them from (nothing when they
    are not on this machine), and the first ``checks`` are verified to give the recorded hash under
    this transform's normalisation (``resize_to``): any mismatch, and no alias is used at all.
    """
    from sip.data.sources import load_fashion_mnist_arrays

    if _bank_source_kind(root) != "fashion-mnist":
        return {}
    arrays: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    checked = 0
    seen: set[str] = set()
    for row in rows:
        m = re.fullmatch(r"fmnist/(train|test)/(\d+)", str(row.get("source")))
        h = row.get("source_hash")
        if not m or not h or m.group(0) in seen:  # each source once (it has several variants)
            continue
        seen.add(m.group(0))
        split, idx = m.group(1), int(m.group(2))
        try:
            if split not in arrays:
                arrays[split] = load_fashion_mnist_arrays(split, download=False)[0]
            grey = Image.fromarray(arrays[split][idx], mode="L")
        except (FileNotFoundError, ValueError, IndexError):
            return {}
        if checked < checks:
            if source_key(grey, resize_to) != h:
                return {}
            checked += 1
        aliases[image_hash(grey)] = h
    return aliases


def _bank_source_kind(root: Path) -> str | None:
    source = read_run_info(root).get("config", {})
    source = source.get("source", {}) if isinstance(source, dict) else {}
    return source.get("kind") if isinstance(source, dict) else None


class VariantIndex:
    """Source hash → sorted variant files, over one or more banks and an optional online cache.

    Loaded on first use in each process (never pickled: a DataLoader worker loads its own).

    Args:
        banks (Sequence[Path]): dataset folders (``OUT``), read with :func:`sip.data.bank.read_metadata`.
        cache_dir (Path, optional): an online cache (a sip dataset) whose new lines are read as they come.
        key (Callable[[Image], str], optional): image → hash, replacing :func:`source_key`.
        resize_to (int, optional): the hashing normalisation (see :func:`source_key`).
    """

    def __init__(self, banks: Sequence[Path], cache_dir: Path | None = None,
                 key: Callable[[Image.Image], str] | None = None, resize_to: int | None = None):
        self.banks, self.cache_dir, self.key = list(banks), cache_dir, key
        self.resize_to = resize_to if isinstance(resize_to, int) else None
        self.loaded: dict[str, list[str]] | None = None
        self.aliases = False
        self._cache_offset = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "loaded": None, "aliases": False, "_cache_offset": 0}

    def key_of(self, image: Image.Image) -> str:
        """The hash this transform looks ``image`` up by."""
        return self.key(image) if self.key is not None else source_key(image, self.resize_to)

    def add(self, index: dict[str, list[str]], root: Path, row: dict[str, Any]) -> None:
        h, name = row.get("source_hash"), row.get("file_name")
        if not h or not name:
            return
        path = str(root / "train" / name)
        files = index.setdefault(h, [])
        i = bisect.bisect_left(files, path)  # sorted: the choice is the same whatever order rows arrived in
        if i == len(files) or files[i] != path:
            files.insert(i, path)

    def load(self) -> dict[str, list[str]]:
        if self.loaded is None:
            index: dict[str, list[str]] = {}
            aliases: dict[str, str] = {}
            rows = 0
            for root in self.banks:
                bank_rows = read_metadata(root)
                for row in bank_rows:
                    self.add(index, root, row)
                rows += len(bank_rows)
                if self.key is None:
                    aliases.update(fashion_mnist_aliases(root, bank_rows, self.resize_to))
            for raw, h in aliases.items():
                index.setdefault(raw, index[h])  # the same list: variants added later show under both keys
            self.loaded, self.aliases = index, bool(aliases)
            self._cache_offset = 0
            if self.cache_dir is not None:
                rows += self.read_cache_tail()
            if rows and not index:
                logger.warning("SIPAugment: %s list %d images but none has a source_hash (written by an older sip?); "
                               "every lookup will miss", [str(b) for b in self.banks], rows)
        return self.loaded

    def read_cache_tail(self, on_row: Callable[[str], None] | None = None) -> int:
        """Add the cache's metadata lines written since the last read (by this or another process)."""
        rows, self._cache_offset = read_metadata_since(self.cache_dir, self._cache_offset)
        for row in rows:
            self.add(self.loaded, self.cache_dir, row)
            if on_row is not None and row.get("file_name"):
                on_row(Path(row["file_name"]).stem)
        return len(rows)

    def find(self, image: Image.Image) -> tuple[str | None, list[str] | None]:
        """(the image's key, its variant files); the key is None when a Fashion-MNIST alias found it."""
        index = self.load()
        if self.aliases and image.mode == "L":
            files = index.get(image_hash(image))  # the grey 28×28 image as torchvision yields it
            if files:
                return None, files
        key = self.key_of(image)
        return key, index.get(key)

