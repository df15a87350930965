"""Scene sets as detection training and evaluation data: a checked COCO file and its images, items with
boxes in pixels (x1, y1, x2, y2) and COCO category ids as labels, and the batch collation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sip.detect.coco import ANNOTATIONS, load_coco


class SceneImages:
    """The scenes of a COCO folder (``sip scenes`` output, or any folder with ``annotations.json`` whose
    ``file_name`` s are relative to it), checked by :func:`sip.detect.coco.load_coco`.

    Args:
        folder (str | Path): the dataset folder (or its ``annotations.json``).
        classes (list[str], optional): the run's class list; the file's categories must be these, ids 1..C.
        key (str): the recipe key naming the folder, for error messages.
    """

    def __init__(self, folder: str | Path, classes: list[str] | None = None, key: str = "data"):
        path = Path(folder)
        self.root = path.parent if path.is_file() else path
        try:
            self.coco = load_coco(path, classes)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{key}: {e}") from e
        self.classes = [c["name"] for c in sorted(self.coco["categories"], key=lambda c: c["id"])]
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self.image_ids = [im["id"] for im in self.images]
        self.boxes: dict[int, list[dict[str, Any]]] = {i: [] for i in self.image_ids}
        for a in self.coco["annotations"]:
            self.boxes[a["image_id"]].append(a)
        sizes = {(im["width"], im["height"]) for im in self.images}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2 or len(set(next(iter(sizes)))) != 1:
            raise ValueError(f"{key}: {self.root / ANNOTATIONS} holds images of sizes {sorted(sizes)[:4]}; sip's "
                             "detectors take one square scene size per set (write scenes with one scenes.size)")
        self.size = next(iter(sizes))[0]

    def __len__(self) -> int:
        return len(self.images)

    def item(self, index: int, hflip: bool = False) -> dict[str, Any]:
        """Scene ``index``: image tensor (3×S×S in [0, 1]), boxes (N×4, xyxy px), labels (COCO ids), image id."""
        from sip.data.images import load_image

        im = self.images[index]
        pixels = np.asarray(load_image(self.root / im["file_name"]), dtype=np.float32) / 255.0
        boxes = torch.tensor([a["bbox"] for a in self.boxes[im["id"]]], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        if hflip:
            image = image.flip(-1)
            boxes[:, [0, 2]] = self.size - boxes[:, [2, 0]]
        labels = torch.tensor([a["category_id"] for a in self.boxes[im["id"]]], dtype=torch.int64)
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": im["id"]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)

    def __repr__(self) -> str:
        return f"SceneImages({self.root}, {len(self)} scenes of {self.size} px, {len(self.classes)} classes)"


class SceneSets:
    """Several scene sets trained on as one (``data.train`` then each of ``data.train_extra``: real scenes beside
    sip's): the same classes and scene size required; scene ``i`` is read from the set it falls in."""

    def __init__(self, parts: list[SceneImages], keys: list[str]):
        first = parts[0]
        for part, key in zip(parts[1:], keys[1:]):
            if part.classes != first.classes or part.size != first.size:
                raise ValueError(f"{key}: {len(part.classes)} classes at {part.size} px ({part.classes[:3]}...), "
                                 f"{keys[0]}'s are {len(first.classes)} at {first.size} px: write every training set "
                                 "with the same classes and scenes.size")
        self.parts, self.classes, self.size = parts, first.classes, first.size
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def item(self, index: int, hflip: bool = False) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"scene {index} of {len(self)}")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[k].item(index - int(self.offsets[k]), hflip)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)

    def __repr__(self) -> str:
        return " + ".join(repr(p) for p in self.parts)


def scene_item_maker(hflip: float):
    """``make_item`` for :class:`sip.train.inputs.EpochView`: the scene, flipped with probability ``hflip``
    (drawn from the item's seeded rng, so a resumed run replays it)."""

    def make_item(scenes: SceneImages, index: int, rng: random.Random) -> dict[str, Any]:
        return scenes.item(index, hflip=rng.random() < hflip)

    return make_item


def collate_scenes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: stacked images (one scene size), and per-scene lists of boxes, labels and image ids."""
    return {"image": torch.stack([it["image"] for it in items]), "boxes": [it["boxes"] for it in items],
            "labels": [it["labels"] for it in items], "image_id": [it["image_id"] for it in items]}


__all__ = ["SceneImages", "SceneSets", "collate_scenes", "scene_item_maker"]
