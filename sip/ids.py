"""Identity and seeds: content hashes, per-image seeds, source / variant / synthetic ids, shard membership.

One owner for every id sip mints or parses, so the writer, the readers, the transform and the report
agree byte for byte.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

from PIL import Image

FASHION_MNIST_ID = re.compile(r"fmnist/(train|test)/(\d+)")


def fashion_mnist_id(split: str, index: int) -> str:
    """The source id of Fashion-MNIST image ``index`` of ``split`` (``"fmnist/train/123"``)."""
    return f"fmnist/{split}/{int(index)}"


def parse_fashion_mnist_id(source_id: object) -> tuple[str, int] | None:
    """``"fmnist/train/123"`` → ``("train", 123)``; None for any other id."""
    m = FASHION_MNIST_ID.fullmatch(str(source_id))
    return (m.group(1), int(m.group(2))) if m else None


def image_hash(image: Image.Image) -> str:
    """Content hash of an image's decoded pixels (mode + size + bytes): the same picture read from
    PNG, from a dataset or from memory gets the same hash."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks), as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_seed(run_seed: int, key: str, variant: int) -> int:
    """The seed of one image: a hash of (run seed, source id or class key, variant index)."""
    digest = hashlib.sha256(f"{run_seed}\x00{key}\x00{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, the same in every process (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def sanitize_label(name: str, max_len: int = 64) -> str:
    """A file-system-safe folder name for a label: letters, digits, ``-`` ``_`` ``.`` only; never
    empty, never ``.``/``..``, never a path. ``"T-shirt/top"`` → ``"T-shirt_top"``."""
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._ ")
    text = re.sub(r"_+", "_", text)[:max_len].rstrip("._")
    if not text or text.lower() in _WINDOWS_RESERVED:
        text = "label_" + hashlib.sha1(str(name).encode()).hexdigest()[:8]
    return text


def variant_id(source_id: str, variant: int) -> str:
    """A file-name-safe, stable id for variant ``variant`` of the image ``source_id``."""
    slug = sanitize_label(source_id.rsplit(".", 1)[0], max_len=40)
    digest = hashlib.sha1(source_id.encode()).hexdigest()[:8]
    return f"{slug}-{digest}-v{variant}"


def synthetic_id(label: str, index: int) -> str:
    """Stable id of the ``index``-th txt2img image of ``label``."""
    return f"synth-{sanitize_label(label, max_len=40)}-{hashlib.sha1(label.encode()).hexdigest()[:6]}-{index:06d}"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1-based, as printed to users) → (i, n); None for no sharding."""
    if text in (None, "", "1/1"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"--shard takes i/n with 1 <= i <= n (e.g. 2/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Deterministic shard membership of a work item, by a hash of its key (order-independent)."""
    if shard is None:
        return True
    i, n = shard
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) % n == i - 1
