"""Scene datasets (issue 29): boxes tight to masks, COCO JSON read by pycocotools and torchvision with no sip
code, resume after an interrupt, sources (Fashion-MNIST, crops folder, sip dataset) and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sip.detect.coco import ANNOTATIONS, SceneRecipe, load_coco, run_scenes, scene_id
from sip.detect.scenes import (
    ObjectsSection,
    SceneSection,
    compose_scene,
    load_object_pool,
    object_mask,
    place_objects,
    tight_box,
)

OBJECTS = ObjectsSection(start=0, stop=300)
SCENES = SceneSection(count=6, size=64, max_objects=5, object_size=(12, 30))


@pytest.fixture(scope="module")
def pool():
    return load_object_pool(OBJECTS)


def _recipe(out: Path, **scenes) -> SceneRecipe:
    return SceneRecipe(output=str(out), objects=OBJECTS, scenes=replace(SCENES, **scenes), progress=False)


def test_boxes_are_tight_to_visible_masks(pool):
    for index in range(8):
        canvas, _kind, placed = place_objects(pool, SCENES, index)
        _image, record = compose_scene(pool, SCENES, index)
        assert len(record["objects"]) == len(placed) >= 1
        for obj, p in zip(record["objects"], placed):
            x, y, w, h = obj["bbox"]
            mask = p["visible"]
            assert mask.any() and obj["area"] == int(mask.sum())
            assert not mask[:, :x].any() and not mask[:, x + w:].any()  # nothing outside the box
            assert not mask[:y].any() and not mask[y + h:].any()
            assert mask[:, x].any() and mask[:, x + w - 1].any() and mask[y].any() and mask[y + h - 1].any()  # tight
            assert obj["category_id"] == p["label"] + 1


def test_boxes_cover_every_object_pixel_on_black(pool):
    """Read back from the pixels alone: on a black background with no overlap, every lit pixel lies in a box
    and each box's four edges touch a lit pixel."""
    scenes = replace(SCENES, background="black", max_overlap=0.0)
    for index in range(5):
        image, record = compose_scene(pool, scenes, index)
        lit = np.asarray(image).max(axis=2) > 0
        covered = np.zeros_like(lit)
        for obj in record["objects"]:
            x, y, w, h = obj["bbox"]
            covered[y:y + h, x:x + w] = True
            box = lit[y:y + h, x:x + w]
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        assert not (lit & ~covered).any()


def test_mask_and_tight_box_helpers():
    pixels = np.zeros((10, 12, 3), np.uint8)
    pixels[2:5, 3:9] = 200
    assert tight_box(object_mask(pixels, 24)) == (3, 2, 6, 3)
    assert tight_box(np.zeros((4, 4), bool)) is None


def test_same_scene_from_seed_alone(pool):
    a, ra = compose_scene(pool, SCENES, 3)
    b, rb = compose_scene(pool, SCENES, 3)
    assert ra == rb and a.tobytes() == b.tobytes()
    assert compose_scene(pool, replace(SCENES, seed=1), 3)[1] != ra


def test_coco_reads_with_pycocotools_and_torchvision(tmp_path):
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    out = tmp_path / "scenes"
    result = run_scenes(_recipe(out))
    assert result["written"] == SCENES.count and (out / "run.json").is_file() and (out / "stats.json").is_file()
    coco = COCO(str(out / ANNOTATIONS))
    assert len(coco.getImgIds()) == SCENES.count and len(coco.getCatIds()) == 10
    assert len(coco.getAnnIds()) == result["stats"]["objects"] > 0
    ds = wrap_dataset_for_transforms_v2(CocoDetection(str(out), str(out / ANNOTATIONS)))
    image, target = ds[0]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert tuple(image.size) == (SCENES.size, SCENES.size)
    expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    assert target["boxes"].tolist() == expected
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["scenes"]["count"] == SCENES.count and info["kind"] == "scenes"


def test_resume_after_interrupt_writes_nothing_twice(tmp_path, monkeypatch):
    from sip.data.bank import DatasetWriter, read_metadata

    out = tmp_path / "scenes"
    real_write, calls = DatasetWriter.write, []

    def dying_write(self, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after three scenes
        calls.append(args[0])
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(DatasetWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_scenes(_recipe(out))
    monkeypatch.setattr(DatasetWriter, "write", real_write)
    again = run_scenes(_recipe(out))
    assert (again["written"], again["skipped"]) == (SCENES.count - 3, 3)
    rows = read_metadata(out)
    assert sorted(r["scene"] for r in rows) == list(range(SCENES.count))
    assert len(list((out / "train" / "scenes").glob("*.png"))) == SCENES.count
    coco = load_coco(out)
    assert [im["id"] for im in coco["images"]] == list(range(1, SCENES.count + 1))
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert run_scenes(_recipe(out))["written"] == 0  # a finished folder: nothing redone


def test_other_recipe_in_same_folder_is_refused(tmp_path):
    out = tmp_path / "scenes"
    run_scenes(_recipe(out, count=2))
    with pytest.raises(ValueError, match="scenes.max_objects"):
        run_scenes(_recipe(out, count=2, max_objects=2))


def _crop_folder(root: Path, per_class: int = 3) -> Path:
    from PIL import Image

    from sip.data.fashion_mnist import load_fashion_mnist_arrays

    images, labels = load_fashion_mnist_arrays("train")
    for name, c in (("bag", 8), ("trouser", 1)):
        (root / name).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(images[i]).convert("RGB").save(root / name / f"{k}.png")
    return root


def test_cli_scenes_from_crop_folder(tmp_path):
    from typer.testing import CliRunner

    from sip.cli import app

    crops = _crop_folder(tmp_path / "crops")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["scenes", "pipelines/fmnist_scenes.yaml", "-o", str(out), "--input", str(crops),
                                   "--set", "scenes.count=3", "--set", "scenes.size=64",
                                   "--set", "scenes.object_size=[12,30]", "--set", "progress=false"])
    assert res.exit_code == 0, res.output
    coco = load_coco(out, classes=["bag", "trouser"])
    assert len(coco["images"]) == 3 and (out / "config.yaml").is_file()


def test_objects_from_a_sip_dataset(tmp_path):
    from PIL import Image

    from sip.data.bank import DatasetWriter

    crops = _crop_folder(tmp_path / "crops", per_class=2)
    writer = DatasetWriter(tmp_path / "synth", {"config": {"kind": "synth-test"}}, ["bag", "trouser"])
    for path in sorted(crops.glob("*/*.png")):
        writer.write(f"{path.parent.name}-{path.stem}", Image.open(path).convert("RGB"), path.parent.name, {})
    writer.finish()
    pool = load_object_pool(ObjectsSection(kind="sip-dataset", path=str(tmp_path / "synth"), stop=None))
    assert pool.classes == ["bag", "trouser"] and [len(i) for i in pool.by_class] == [2, 2]
    _image, record = compose_scene(pool, SCENES, 0)
    assert {o["category"] for o in record["objects"]} <= {"bag", "trouser"}


# ----------------------------------------------------------------------------------------------------
# Bad input: each names the file or key
# ----------------------------------------------------------------------------------------------------

def _coco_file(tmp_path: Path, **change) -> Path:
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "bag"}]}
    coco.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    return path


def test_bad_coco_files_are_refused_naming_file(tmp_path):
    assert load_coco(_coco_file(tmp_path))["categories"][0]["name"] == "bag"
    outside = [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [25, 4, 10, 10], "area": 100, "iscrowd": 0}]
    with pytest.raises(ValueError, match=r"bad\.json: annotation 7 box .* outside its 32x32 image"):
        load_coco(_coco_file(tmp_path, annotations=outside))
    with pytest.raises(ValueError, match=r"bad\.json: 'categories' is empty"):
        load_coco(_coco_file(tmp_path, categories=[]))
    with pytest.raises(ValueError, match=r"bad\.json: annotation 7 has category_id 1, not among .*\[3\]"):
        load_coco(_coco_file(tmp_path, categories=[{"id": 3, "name": "bag"}]))
    with pytest.raises(ValueError, match=r"bad\.json: categories \['bag'\] do not match the run's classes"):
        load_coco(_coco_file(tmp_path), classes=["Bag", "Sandal"])


def test_bad_recipe_keys_are_refused():
    with pytest.raises(ValueError, match="objects.classes is an empty list"):
        ObjectsSection(classes=[])
    with pytest.raises(ValueError, match="objects.kind 'folder' needs objects.path"):
        ObjectsSection(kind="folder")
    with pytest.raises(ValueError, match=r"scenes.object_size \[16, 56\] must satisfy .* scenes.size \(32\)"):
        SceneSection(size=32)
    with pytest.raises(ValueError, match="objects.split 'test' is read by kind fashion-mnist only"):
        ObjectsSection(kind="folder", path="x", split="test")


def test_empty_class_in_folder_is_refused(tmp_path):
    crops = _crop_folder(tmp_path / "crops", per_class=1)
    (crops / "ghost").mkdir()
    from PIL import Image

    Image.new("RGB", (28, 28)).save(crops / "ghost" / "0.png")  # all black: no object pixel
    with pytest.raises(ValueError, match=r"no object of class\(es\) \['ghost'\]"):
        load_object_pool(ObjectsSection(kind="folder", path=str(crops), stop=None))


def test_scene_ids_are_stable():
    assert scene_id(12) == "scene-0000012"


def test_objects_shots_are_the_shots_sip_augment_draws():
    """objects.shots with an augment source's pool and seed reads exactly that source's shots: the real objects of a
    few-shot scene set are the images whose sip variants make the sip scenes."""
    from sip.data.sources import SourceConfig, open_source

    source = open_source(SourceConfig(kind="fashion-mnist", shots=3, seed=5, start=50000))
    pool = load_object_pool(ObjectsSection(start=50000, stop=60000, shots=3, shots_seed=5))
    assert pool.ids == [f"train/{i}" for i in source.indices]  # the same 30 Fashion-MNIST images, in order
    assert sorted(np.bincount(pool.labels).tolist()) == [3] * 10
    other = load_object_pool(ObjectsSection(start=50000, stop=60000, shots=3, shots_seed=6))
    assert other.ids != pool.ids
