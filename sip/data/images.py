"""The record every source yields (:class:`Sample`), the source base class and image decoding.

:func:`load_image` decodes one file as RGB or raises ``ValueError`` naming it and the reason (including
decompression bombs); :func:`to_rgb` converts any PIL mode, scaling deep images by their bit depth.
"""

from __future__ import annotations

import copy

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def display_path(path: str | os.PathLike | bytes) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (``caf\\xe9.png``) shown as ``\\xNN`` escapes.

    Used for ids, metadata and messages, so a file name that is not UTF-8 never breaks JSON or logging.
    """
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


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
    """Convert any PIL mode to 8-bit RGB: EXIF orientation applied, transparency composited on white.

    Integer modes are scaled by their bit depth, not by the image's own maximum (as PIL and torchvision
    do): 16-bit ``I;16*`` by 1/257, 32-bit ``I`` by 1/257 when its values fit in 16 bits (PNG 16-bit grey
    opens as ``I``) and by 1/16843009 otherwise; float ``F`` is taken as [0, 1] when its values lie there
    and as [0, 255] otherwise. Out-of-range values are clipped.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            finite = arr[np.isfinite(arr)]
            scale = 255.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 1.0
            arr = np.nan_to_num(arr, nan=0.0, posinf=255.0 / scale, neginf=0.0)
        elif image.mode == "I" and arr.size and (arr.max() > 65535 or arr.min() < 0):
            scale = 255.0 / (2**32 - 1)
            arr = arr - min(float(arr.min()), 0.0)
        else:
            scale = 1.0 / 257.0
        image = Image.fromarray(np.rint(arr * scale).clip(0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file as RGB. Raises ``ValueError`` naming the file when it cannot."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image {display_path(path)}: decompression bomb refused ({e}); "
                         "shrink the image or raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read image {display_path(path)}: {e.__class__.__name__}: {e}") from e


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

    def source_ids(self) -> Iterator[str]:
        """The source ids, in iteration order, without decoding any image (subclasses override)."""
        return (s.source_id for s in self)

    def load(self) -> list[Sample]:
        """Decode every readable sample (unreadable ones land in ``skipped``)."""
        return list(self)

    def subset(self, positions: Sequence[int]) -> "ImageSource":
        """A view of this source holding only the samples at ``positions`` (of the iteration order), decoded
        exactly as a full iteration decodes them: how a worker reads its batch of a source it opened once."""
        view = copy.copy(self)
        view.skipped = []
        view._restrict([int(p) for p in positions])
        return view

    def _restrict(self, positions: list[int]) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError(f"{type(self).__name__} cannot be read by position")

    def _skip(self, path: str, reason: str) -> None:
        if any(s.path == path for s in self.skipped):  # iterated again: already reported
            return
        self.skipped.append(Skipped(path, reason))
        logger.warning("skipping %s: %s", path, reason)
