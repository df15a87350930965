"""Scenes of several objects with tight boxes: where the objects come from (:class:`ObjectPool`) and how a
scene is composed (:func:`compose_scene`). The writer of a scene dataset is :mod:`sip.detect.coco`.

Placement follows DIODE's box and category sampling (Chawla et al., "Data-free Knowledge Distillation for
Object Detection", WACV 2021): per scene an object count, then per object a category drawn uniformly over the
classes, a size (log-uniform side length) and a position (uniform, the box fully inside the scene). A candidate
whose box overlaps an earlier one by more than ``max_overlap`` IoU, or that would hide more than
``1 - min_visible`` of an earlier object's visible pixels, is redrawn (``tries`` times, then the scene has one
object fewer). Later objects occlude earlier ones; every box is tight to the object's *visible* mask (for
Fashion-MNIST-like objects on black, the mask is the pixels brighter than ``mask_threshold``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from sip.ids import stable_seed

BACKGROUNDS = ("black", "flat", "noise", "gradient")


@dataclass(frozen=True)
class ObjectsSection:
    """Where a scene's objects come from: real crops or a sip dataset of generated objects."""

    # fashion-mnist (Debian idx files), folder (root/<label>/*: the user's labelled object crops, --input DIR) or
    # sip-dataset (a folder written by sip synth / augment: DIR/train/metadata.jsonl)
    kind: Literal["fashion-mnist", "folder", "sip-dataset"] = "fashion-mnist"
    path: str | None = None  # the folder of kinds folder and sip-dataset
    split: Literal["train", "test"] = "train"  # Fashion-MNIST split (test: evaluation scenes)
    # the objects read, by position (Fashion-MNIST index; a folder's files / a dataset's rows in reading order):
    # teachers take train 0-49,999 (sip's shipped generator trained on them too; 50,000+ stay unseen)
    start: int = 0
    stop: int | None = 50000  # one past the last object read; null = the end
    # a pixel belongs to the object when its grey level is above this (objects on a dark background)
    mask_threshold: int = 24
    classes: list[str] | None = None  # category order (ids 1..C); null = Fashion-MNIST's / the dataset's own order
    # fashion-mnist: only this many objects per class of start-stop, drawn from shots_seed (null = all). With the
    # pool and seed of a `sip augment` source (start 50000, stop 60000, its shots and seed) these are its shots.
    shots: int | None = None
    shots_seed: int = 0

    def __post_init__(self):
        if self.kind != "fashion-mnist" and not self.path:
            raise ValueError(f"objects.kind {self.kind!r} needs objects.path (or --input DIR)")
        if self.kind == "fashion-mnist" and self.path:
            raise ValueError("objects.path is read by kinds folder and sip-dataset; remove it or set objects.kind")
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise ValueError(f"objects.start / objects.stop must satisfy 0 <= start < stop, got {self.start}, {self.stop}")
        if not 0 <= self.mask_threshold < 255:
            raise ValueError(f"objects.mask_threshold must be in [0, 255), got {self.mask_threshold}")
        if self.kind != "fashion-mnist" and self.split != "train":
            raise ValueError(f"objects.split {self.split!r} is read by kind fashion-mnist only; point objects.path at "
                             "the split's own folder and remove objects.split")
        if self.classes is not None and not self.classes:
            raise ValueError("objects.classes is an empty list: name at least one class, or null for the source's own")
        if self.shots is not None and (self.kind != "fashion-mnist" or self.shots < 1):
            raise ValueError(f"objects.shots ({self.shots}) is a positive count of Fashion-MNIST objects per class "
                             f"(kind fashion-mnist); for kind {self.kind!r} put the chosen crops in objects.path")


@dataclass(frozen=True)
class SceneSection:
    """How many scenes, how big, and how objects are placed in them."""

    count: int = 1000  # scenes written (--set scenes.count=N)
    size: int = 128  # scene side in pixels; must be at least the detector's largest stride
    min_objects: int = 1  # objects per scene, drawn uniformly in [min_objects, max_objects]
    max_objects: int = 6
    object_size: tuple[int, int] = (16, 56)  # object side range in px (log-uniform); 28 px crops are up/down-scaled
    max_overlap: float = 0.3  # max IoU of a new box with any placed box (0 = no overlap at all)
    min_visible: float = 0.6  # share of an earlier object's visible pixels that must stay visible
    tries: int = 20  # redraws of an object that breaks max_overlap / min_visible before it is left out
    background: Literal["black", "flat", "noise", "gradient", "mix"] = "mix"  # mix: one of the four per scene
    background_max: int = 80  # brightest grey level of a background (objects are brighter: keep it low)
    seed: int = 0  # scene i is drawn from (seed, i) alone: any order, shard or resume gives the same scene

    def __post_init__(self):
        if self.count <= 0:
            raise ValueError(f"scenes.count must be positive, got {self.count}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"scenes.min_objects / max_objects must satisfy 1 <= min <= max, got "
                             f"{self.min_objects}, {self.max_objects}")
        lo, hi = self.object_size
        if not 2 <= lo <= hi <= self.size:
            raise ValueError(f"scenes.object_size {list(self.object_size)} must satisfy 2 <= min <= max <= "
                             f"scenes.size ({self.size})")
        if not 0 <= self.max_overlap <= 1 or not 0 < self.min_visible <= 1:
            raise ValueError(f"scenes.max_overlap must be in [0, 1] and min_visible in (0, 1], got "
                             f"{self.max_overlap}, {self.min_visible}")
        if self.tries < 1 or not 0 <= self.background_max <= 255:
            raise ValueError(f"scenes.tries must be >= 1 and background_max in [0, 255], got {self.tries}, "
                             f"{self.background_max}")


# ----------------------------------------------------------------------------------------------------
# Objects
# ----------------------------------------------------------------------------------------------------

def object_mask(pixels: np.ndarray, threshold: int) -> np.ndarray:
    """The object's pixels: grey level (channel mean) above ``threshold``."""
    grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
    return grey > threshold


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The COCO box ``(x, y, w, h)`` tight to ``mask``'s true pixels (w = last column - first column + 1); None
    for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


class ObjectPool:
    """Labelled object images (RGB uint8) with their masks; ``by_class[c]`` lists the indices of class ``c``.

    Args:
        images (list[np.ndarray]): H×W×3 uint8 images, one object each.
        labels (list[int]): class index per image.
        ids (list[str]): a stable id per image (its source), recorded in each annotation.
        classes (list[str]): class names (category ``c`` has COCO id ``c + 1``).
        threshold (int): grey level above which a pixel is the object's.
        where (str): the source, for error messages.
    """

    def __init__(self, images: list[np.ndarray], labels: list[int], ids: list[str], classes: list[str],
                 threshold: int, where: str):
        if not classes:
            raise ValueError(f"{where}: the object source has no classes (an empty class list); give it labelled "
                             "objects (root/<label>/*) or set objects.classes")
        self.images, self.labels, self.ids, self.classes, self.threshold = images, labels, ids, classes, threshold
        self.by_class = [[i for i, y in enumerate(labels) if y == c and object_mask(images[i], threshold).any()]
                         for c in range(len(classes))]
        empty = [classes[c] for c, idx in enumerate(self.by_class) if not idx]
        if empty:
            raise ValueError(f"{where}: no object of class(es) {empty} has a pixel above objects.mask_threshold "
                             f"({threshold}); objects must be brighter than their background, or lower the threshold")

    def crop(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Object ``index`` cut to its mask's box: (pixels, mask)."""
        pixels = self.images[index]
        mask = object_mask(pixels, self.threshold)
        x, y, w, h = tight_box(mask)
        return pixels[y:y + h, x:x + w], mask[y:y + h, x:x + w]


def load_object_pool(objects: ObjectsSection) -> ObjectPool:
    """The :class:`ObjectPool` an :class:`ObjectsSection` names."""
    if objects.kind == "fashion-mnist":
        from sip.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays

        images, labels = load_fashion_mnist_arrays(objects.split)
        stop = len(images) if objects.stop is None else objects.stop
        if stop > len(images):
            raise ValueError(f"objects.stop {stop} is past the {len(images)} images of Fashion-MNIST {objects.split}")
        keep = range(objects.start, stop)
        if objects.shots is not None:  # the same draw as a FashionMNISTSource with this pool, shots and seed
            from sip.data.fashion_mnist import select_shots

            pool = np.arange(objects.start, stop)
            keep = [int(i) for i in select_shots(labels, objects.shots, objects.shots_seed, pool)]
        classes = list(objects.classes or FASHION_MNIST_CLASSES)
        rgb = [np.repeat(images[i][:, :, None], 3, axis=2) for i in keep]
        return ObjectPool(rgb, [int(labels[i]) for i in keep], [f"{objects.split}/{i}" for i in keep], classes,
                          objects.mask_threshold, f"Fashion-MNIST {objects.split} {objects.start}-{stop}"
                          + (f", {objects.shots} per class (seed {objects.shots_seed})" if objects.shots else ""))
    if objects.kind == "folder":
        return _folder_pool(objects)
    return _dataset_pool(objects)


def _folder_pool(objects: ObjectsSection) -> ObjectPool:
    """The user's labelled object crops, ``root/<label>/*`` (read by sip's folder source)."""
    from sip.data.sources import SourceConfig, open_source

    source = open_source(SourceConfig(kind="folder", path=objects.path, classes=list(objects.classes or [])))
    samples = _in_range(source.load(), objects, f"folder {objects.path}")
    classes = list(objects.classes or source.classes)
    return ObjectPool([np.asarray(s.image.convert("RGB")) for s in samples], [s.label for s in samples],
                      [s.source_id for s in samples], classes, objects.mask_threshold, f"folder {objects.path}")


def _in_range(items: list, objects: ObjectsSection, where: str) -> list:
    """``objects.start``-``objects.stop`` of ``items`` (a stop past the end is an error, never clipped)."""
    stop = len(items) if objects.stop is None else objects.stop
    if stop > len(items):
        raise ValueError(f"objects.stop {stop} is past the {len(items)} objects of {where}; set objects.stop: null")
    return items[objects.start:stop]


def _dataset_pool(objects: ObjectsSection) -> ObjectPool:
    """A sip dataset of generated objects (``sip synth``), read through :mod:`sip.data.bank`'s readers."""
    from sip.data.bank import dataset_root, is_dataset, read_metadata, read_run_info
    from sip.data.images import load_image

    root = dataset_root(objects.path)
    if not is_dataset(root):
        raise FileNotFoundError(f"objects.path {objects.path} is not a sip dataset (no train/metadata.jsonl); "
                                "write one with `sip synth` or use objects.kind: folder")
    rows = [r for r in read_metadata(root) if "file_name" in r and "label" in r]
    classes = list(objects.classes or read_run_info(root).get("label_folders") or
                   dict.fromkeys(r["label"] for r in rows))
    index = {name: c for c, name in enumerate(classes)}
    rows = [r for r in _in_range(rows, objects, f"sip dataset {root}") if r["label"] in index]
    images = [np.asarray(load_image(root / "train" / r["file_name"])) for r in rows]
    return ObjectPool(images, [index[r["label"]] for r in rows], [r["file_name"] for r in rows], classes,
                      objects.mask_threshold, f"sip dataset {root}")


# ----------------------------------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------------------------------

def _background(kind: str, size: int, top: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "black":
        return np.zeros((size, size, 3), np.uint8)
    level = rng.uniform(0, top)
    if kind == "flat":
        return np.full((size, size, 3), round(level), np.uint8)
    if kind == "noise":
        noise = rng.normal(level / 2, max(top / 6, 1e-3), (size, size, 1))
        return np.repeat(np.clip(noise, 0, top), 3, axis=2).astype(np.uint8)
    ramp = np.linspace(0, level, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, level, size)[:, None, None]
    return np.broadcast_to(ramp, (size, size, 3)).round().astype(np.uint8).copy()


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _resized(pixels: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The crop scaled so its longer side is ``side`` (aspect kept); the mask follows (bilinear, then > 1/2)."""
    h, w = mask.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR)) > 127
    return out, m


def place_objects(pool: ObjectPool, scenes: SceneSection, index: int) -> tuple[np.ndarray, str, list[dict[str, Any]]]:
    """Scene ``index``, drawn from ``(scenes.seed, index)`` alone: the canvas (H×W×3 uint8), its background
    kind and the placed objects (``label``, ``source``, ``rect`` = placement ``(x, y, w, h)``, ``visible`` =
    the object's scene-sized mask minus what later objects hide)."""
    rng = np.random.default_rng(stable_seed("scene", scenes.seed, index))
    kind = scenes.background if scenes.background != "mix" else BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    canvas = _background(kind, scenes.size, scenes.background_max, rng)
    placed: list[dict[str, Any]] = []
    lo, hi = scenes.object_size
    for _ in range(int(rng.integers(scenes.min_objects, scenes.max_objects + 1))):
        for _attempt in range(scenes.tries):
            c = int(rng.integers(len(pool.classes)))  # DIODE: categories uniform over the classes
            i = pool.by_class[c][int(rng.integers(len(pool.by_class[c])))]
            side = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            pixels, mask = _resized(*pool.crop(i), side)
            h, w = mask.shape
            x, y = int(rng.integers(0, scenes.size - w + 1)), int(rng.integers(0, scenes.size - h + 1))
            full = np.zeros((scenes.size, scenes.size), bool)
            full[y:y + h, x:x + w] = mask
            if not mask.any() or any(_iou((x, y, w, h), p["rect"]) > scenes.max_overlap for p in placed):
                continue
            if any((p["visible"] & ~full).sum() < scenes.min_visible * p["visible"].sum() for p in placed):
                continue
            canvas[y:y + h, x:x + w][mask] = pixels[mask]
            for p in placed:
                p["visible"] &= ~full
            placed.append({"label": c, "source": pool.ids[i], "rect": (x, y, w, h), "visible": full})
            break
    return canvas, kind, placed


def compose_scene(pool: ObjectPool, scenes: SceneSection, index: int) -> tuple[Image.Image, dict[str, Any]]:
    """Scene ``index`` as an image and its record, whose ``objects`` hold each object's class, COCO box
    ``[x, y, w, h]`` tight to its visible mask, area (visible pixels) and source (:func:`place_objects`)."""
    canvas, kind, placed = place_objects(pool, scenes, index)
    objects = [{"category": pool.classes[p["label"]], "category_id": p["label"] + 1,
                "bbox": list(tight_box(p["visible"])), "area": int(p["visible"].sum()), "source": p["source"]}
               for p in placed]
    record = {"scene": index, "width": scenes.size, "height": scenes.size, "background": kind, "objects": objects}
    return Image.fromarray(canvas), record


__all__ = ["BACKGROUNDS", "ObjectPool", "ObjectsSection", "SceneSection", "compose_scene", "load_object_pool", "place_objects",
           "object_mask", "tight_box"]
