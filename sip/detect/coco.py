"""A scene dataset on disk: sip's dataset writer underneath, COCO JSON on top.

``run_scenes(recipe)`` writes every scene through :class:`sip.data.bank.DatasetWriter` (so the folder has the
writer's guarantees: atomic images, append-only metadata, resume that skips every finished scene, ``run.json``
provenance, a lock against a second run), then derives the COCO file from the metadata, atomically::

    OUT/run.json                        sip version, resolved recipe, seeds (the writer's)
    OUT/train/scenes/scene-0000000.png  one file per scene
    OUT/train/metadata.jsonl            one line per scene: its objects (category, bbox, area, source), background
    OUT/annotations.json                COCO: images (file_name relative to OUT), annotations, categories
    OUT/stats.json                      objects per scene, box sizes, per-class counts

``pycocotools.coco.COCO("OUT/annotations.json")`` and ``torchvision.datasets.CocoDetection(OUT,
"OUT/annotations.json")`` read it with no sip code. Category ``c`` of the class list has COCO id ``c + 1``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sip.detect.scenes import ObjectsSection, SceneSection, compose_scene, load_object_pool

ANNOTATIONS = "annotations.json"
STATS = "stats.json"
SCENE_LABEL = "scenes"  # the writer's one label folder: train/scenes/


@dataclass(frozen=True)
class SceneRecipe:
    """One scene dataset (``sip scenes``)."""

    output: str | None = None  # the dataset folder (-o OUT)
    objects: ObjectsSection = field(default_factory=ObjectsSection)
    scenes: SceneSection = field(default_factory=SceneSection)
    progress: bool = True  # tqdm progress bar


def scene_id(index: int) -> str:
    return f"scene-{index:07d}"


def run_scenes(recipe: SceneRecipe) -> dict[str, Any]:
    """Write ``recipe.scenes.count`` scenes to ``recipe.output`` (resumable), then its COCO file and stats.

    Returns:
        dict: written / skipped scene counts, the COCO file, and the dataset statistics.
    """
    import sip
    from tqdm.auto import tqdm

    from sip.config import to_dict
    from sip.data.bank import DatasetWriter
    from sip.data.run_lock import hold_output

    # 1. check inputs: an output folder, and the objects (an empty class list fails here, before any write)
    if not recipe.output:
        raise ValueError("sip scenes needs an output folder (-o OUT or output: in the recipe)")
    pool = load_object_pool(recipe.objects)
    info = {"sip_version": sip.__version__, "kind": "scenes", "config": to_dict(recipe),
            "classes": pool.classes}
    with hold_output(recipe.output):
        # 2. the writer: run.json, resume (every scene with a line is skipped)
        writer = DatasetWriter(recipe.output, info, [SCENE_LABEL], defaults=to_dict(SceneRecipe()))
        todo = [i for i in range(recipe.scenes.count) if not writer.is_done(scene_id(i))]
        # 3. compose and write each missing scene (scene i depends on (seed, i) alone)
        for i in tqdm(todo, desc="scenes", disable=not recipe.progress):
            image, record = compose_scene(pool, recipe.scenes, i)
            writer.write(scene_id(i), image, SCENE_LABEL, record)
        writer.finish()
        # 4. the COCO file and the statistics, derived from the metadata (atomic; rewritten on every run)
        coco = write_coco(recipe.output, pool.classes)
    return {"written": writer.summary.written, "skipped": len(range(recipe.scenes.count)) - len(todo),
            "annotations": str(Path(recipe.output) / ANNOTATIONS), "stats": coco["stats"]}


def coco_from_rows(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """The COCO dict of a scene dataset's metadata rows (image ids = scene index + 1, in scene order)."""
    images, annotations = [], []
    for row in sorted(rows, key=lambda r: r["scene"]):
        image_id = row["scene"] + 1
        images.append({"id": image_id, "file_name": f"train/{row['file_name']}", "width": row["width"],
                       "height": row["height"]})
        for obj in row["objects"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": obj["category_id"],
                                "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0})
    categories = [{"id": c + 1, "name": name, "supercategory": "object"} for c, name in enumerate(classes)]
    return {"info": {"description": "sip scene dataset"}, "images": images, "annotations": annotations,
            "categories": categories}


def scene_stats(coco: dict[str, Any]) -> dict[str, Any]:
    """How many objects, what sizes: per-scene object counts, box side (sqrt of w·h) quantiles, class counts."""
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    counts = np.array([per_image.get(im["id"], 0) for im in coco["images"]])
    sides = np.array([np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in coco["annotations"]] or [0.0])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = Counter(names[a["category_id"]] for a in coco["annotations"])
    return {"scenes": len(coco["images"]), "objects": len(coco["annotations"]),
            "objects_per_scene": {"mean": round(float(counts.mean()), 3) if counts.size else 0.0,
                                  "min": int(counts.min()) if counts.size else 0,
                                  "max": int(counts.max()) if counts.size else 0},
            "box_side_px": {q: round(float(np.quantile(sides, p)), 2)
                            for q, p in (("p05", 0.05), ("median", 0.5), ("p95", 0.95))},
            "per_class": {name: per_class.get(name, 0) for name in names.values()}}


def write_coco(out_dir: str | Path, classes: list[str]) -> dict[str, Any]:
    """Write ``annotations.json`` and ``stats.json`` from the dataset's metadata (atomic); returns both."""
    from sip.data.bank import atomic_write, read_metadata

    root = Path(out_dir)
    coco = coco_from_rows([r for r in read_metadata(root) if "scene" in r], classes)
    stats = scene_stats(coco)
    atomic_write(root / ANNOTATIONS, json.dumps(coco).encode("utf-8"), root)
    atomic_write(root / STATS, json.dumps(stats, indent=2).encode("utf-8"), root)
    return {**coco, "stats": stats}


# ----------------------------------------------------------------------------------------------------
# Reading (any COCO file: a sip scene dataset or the user's own), checked
# ----------------------------------------------------------------------------------------------------

def load_coco(path: str | Path, classes: list[str] | None = None) -> dict[str, Any]:
    """A COCO detection file, checked: categories present, every annotation's category and image known,
    every box inside its image with positive size, and (with ``classes``) the category names in that order.

    Raises:
        ValueError: naming the file, the annotation id and what to fix.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ANNOTATIONS
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no COCO file there; write a scene dataset with `sip scenes` or point "
                                "at a COCO annotations JSON") from e
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: key {key!r} missing or not a list (not a COCO detection file)")
    if not coco["categories"]:
        raise ValueError(f"{path}: 'categories' is empty (an empty class list); a detector needs at least one class")
    cat_ids = {c["id"] for c in coco["categories"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for a in coco["annotations"]:
        if a["category_id"] not in cat_ids:
            raise ValueError(f"{path}: annotation {a['id']} has category_id {a['category_id']}, not among the "
                             f"file's categories {sorted(cat_ids)}; fix the category ids of the images' annotations")
        if a["image_id"] not in sizes:
            raise ValueError(f"{path}: annotation {a['id']} names image_id {a['image_id']}, which is not in 'images'")
        x, y, w, h = a["bbox"]
        W, H = sizes[a["image_id"]]
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > W or y + h > H:
            raise ValueError(f"{path}: annotation {a['id']} box [x, y, w, h] = {a['bbox']} is outside its "
                             f"{W}x{H} image {a['image_id']} (or empty); clip or drop it")
    if classes is not None:
        names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        if names != list(classes):
            raise ValueError(f"{path}: categories {names} do not match the run's classes {list(classes)} (same names, "
                             "same ids 1..C): make every scene set from the same objects.classes")
    return coco


__all__ = ["ANNOTATIONS", "STATS", "SceneRecipe", "coco_from_rows", "load_coco", "run_scenes", "scene_stats",
           "write_coco"]
