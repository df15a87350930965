"""sip.data.sources: image folder and HF dataset from disk; open_source and SourceConfig; bad inputs."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sip.config import ConfigError, load_config
from sip.data.sources import (
    DEBIAN_FASHION_MNIST,
    FashionMNISTSource,
    HFDatasetSource,
    ImageFolderSource,
    Sample,
    SourceConfig,
    open_source,
)

HAS_DEBIAN_FMNIST = (DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAS_DEBIAN_FMNIST, reason="apt-get install dataset-fashion-mnist")



# --------------------------------------------------------------------------------------------------
# ImageFolderSource
# --------------------------------------------------------------------------------------------------

def test_image_folder_reads_every_good_file(image_folder, caplog):
    source = ImageFolderSource(image_folder.root)
    assert source.classes == list(image_folder.classes)
    assert len(source) == len(image_folder.good) + len(image_folder.corrupt)
    with caplog.at_level(logging.WARNING, logger="sip.data.sources"):
        samples = list(source)
    assert all(isinstance(s, Sample) for s in samples)
    assert sorted(s.source_id for s in samples) == sorted(image_folder.good)
    for s in samples:
        label_name, _, size = image_folder.good[s.source_id]
        assert s.image.mode == "RGB"
        assert s.image.size == size
        assert s.label_name == label_name
        assert source.classes[s.label] == label_name
    # the corrupt file is reported by path, with a reason, and did not stop the iteration
    assert [Path(k.path) for k in source.skipped] == [image_folder.root / rel for rel in image_folder.corrupt]
    assert "cannot read image" in source.skipped[0].reason
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    bird_after_broken = [s for s in samples if s.label_name == "bird"]
    assert len(bird_after_broken) == 2
    # the text file is ignored, not reported as a failure
    assert source.ignored == [str(image_folder.root / rel) for rel in image_folder.non_images]


def test_image_folder_transparency_becomes_white(image_folder):
    samples = {s.source_id: s for s in ImageFolderSource(image_folder.root)}
    rgba = np.asarray(samples["cat/rgba_64x48.png"].image)
    assert tuple(rgba[0, 0]) == (255, 255, 255)  # alpha ramp starts fully transparent
    palette = np.asarray(samples["cat/palette_transparent.png"].image)
    with Image.open(image_folder.root / "cat/palette_transparent.png") as im:
        index = np.asarray(im)
    assert (palette[index == 0] == 255).all()


def test_image_folder_iterates_again_without_duplicating_skips(image_folder):
    source = ImageFolderSource(image_folder.root)
    first = [s.source_id for s in source]
    second = [s.source_id for s in source]
    assert first == second
    assert len(source.skipped) == len(image_folder.corrupt)


def test_image_folder_with_fixed_classes(image_folder):
    source = ImageFolderSource(image_folder.root, classes=["dog", "cat", "horse"])
    samples = list(source)
    assert {s.label_name for s in samples} == {"dog", "cat"}
    assert all(source.classes[s.label] == s.label_name for s in samples)
    assert {s.label for s in samples if s.label_name == "dog"} == {0}


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=rf"input folder {missing} does not exist"):
        ImageFolderSource(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"no images found in {empty}"):
        ImageFolderSource(empty)
    (empty / "cat").mkdir()
    (empty / "cat" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"no images found in {empty}"):
        ImageFolderSource(empty)


def test_image_folder_on_real_photos(photo_folder):
    samples = list(ImageFolderSource(photo_folder))
    assert [s.label_name for s in samples] == ["cat", "china", "coffee", "flower", "person", "rocket"]
    assert all(s.image.mode == "RGB" and max(s.image.size) == 128 for s in samples)


# --------------------------------------------------------------------------------------------------
# HFDatasetSource
# --------------------------------------------------------------------------------------------------

def _hf_dataset(n_per_class: int = 3, names=("shoe", "shirt")):
    import datasets

    rng = np.random.default_rng(0)
    images, labels = [], []
    for label in range(len(names)):
        for i in range(n_per_class):
            arr = rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)
            image = Image.fromarray(arr)
            images.append(image.convert("RGBA") if i == 1 else image.convert("L") if i == 2 else image)
            labels.append(label)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=list(names)))
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_hf_dataset_from_disk(tmp_path):
    ds = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "ds"))
    source = HFDatasetSource(tmp_path / "ds")
    assert source.classes == ["shoe", "shirt"] and len(source) == 6
    samples = list(source)
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1]
    assert [s.label_name for s in samples] == ["shoe"] * 3 + ["shirt"] * 3
    assert [s.source_id for s in samples] == [f"train/{i}" for i in range(6)]
    assert all(s.image.mode == "RGB" for s in samples)
    assert [s.image.size for s in samples[:3]] == [(10, 12), (10, 13), (10, 14)]
    assert np.array_equal(np.asarray(samples[0].image), np.asarray(ds[0]["image"]))
    assert source.skipped == []


def test_hf_dataset_dict_splits_and_errors(tmp_path):
    import datasets

    dd = datasets.DatasetDict(train=_hf_dataset(), test=_hf_dataset(1))
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(HFDatasetSource(tmp_path / "dd", split="test")) == 2
    assert next(iter(HFDatasetSource(tmp_path / "dd", split="test"))).source_id == "test/0"
    with pytest.raises(ValueError, match=r"no split 'validation'; splits: train, test"):
        HFDatasetSource(tmp_path / "dd", split="validation")
    with pytest.raises(ValueError, match=r"no column 'img'; columns: image, label"):
        HFDatasetSource(tmp_path / "dd", image_column="img")
    with pytest.raises(ValueError, match=r"no column 'class'; columns: image, label"):
        HFDatasetSource(tmp_path / "dd", label_column="class")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        HFDatasetSource(tmp_path / "nope")


def test_hf_dataset_int_labels_and_corrupt_row(tmp_path, caplog):
    import datasets

    good = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good, "PNG")
    features = datasets.Features(picture=datasets.Image(), y=datasets.Value("int64"))
    ds = datasets.Dataset.from_dict({
        "picture": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"garbage", "path": None},
                    {"bytes": good.getvalue(), "path": None}],
        "y": [0, 2, 2],
    }, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    source = HFDatasetSource(tmp_path / "ds", image_column="picture", label_column="y")
    assert source.classes == ["0", "1", "2"]
    with caplog.at_level(logging.WARNING, logger="sip.data.sources"):
        samples = list(source)
    got = [(s.source_id, s.label, s.label_name) for s in samples]
    assert got == [("train/0", 0, "0"), ("train/2", 2, "2")]
    assert [k.path for k in source.skipped] == [f"{tmp_path / 'ds'}:train/1"]
    assert "cannot decode image" in source.skipped[0].reason


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------

def test_open_source_folder_with_shots(image_folder):
    config = SourceConfig(kind="folder", path=str(image_folder.root), shots=1, seed=0)
    source = open_source(config)
    assert isinstance(source, ImageFolderSource) and len(source) == 3
    assert sorted(label for _, label in source.files) == [0, 1, 2]
    again = open_source(config)
    assert source.files == again.files
    picks = {tuple(open_source(dataclasses.replace(config, seed=s)).files) for s in range(8)}
    assert len(picks) > 1  # the seed chooses
    samples = list(source)
    assert len(samples) + len(source.skipped) == 3
    with pytest.raises(ValueError, match="fewer than shots=5"):
        open_source(SourceConfig(kind="folder", path=str(image_folder.root), shots=5))


def test_open_source_folder_with_classes(image_folder):
    source = open_source(SourceConfig(kind="folder", path=str(image_folder.root), classes=["cat"]))
    assert {s.label_name for s in source} == {"cat"}


def test_open_source_hf_with_shots_keeps_stable_ids(tmp_path):
    _hf_dataset(n_per_class=4).save_to_disk(str(tmp_path / "ds"))
    full = {s.source_id: s for s in HFDatasetSource(tmp_path / "ds")}
    source = open_source(SourceConfig(kind="hf", path=str(tmp_path / "ds"), shots=2, seed=3))
    samples = list(source)
    assert sorted(s.label for s in samples) == [0, 0, 1, 1]
    for s in samples:  # the id names the same row as in the whole dataset
        assert s.label == full[s.source_id].label
        assert s.image.tobytes() == full[s.source_id].image.tobytes()
    assert {s.source_id for s in samples} != {"train/0", "train/1", "train/2", "train/3"}


@needs_fmnist
def test_open_source_fashion_mnist():
    source = open_source(SourceConfig(shots=1, seed=0))
    assert isinstance(source, FashionMNISTSource) and len(source) == 10
    assert all(int(s.source_id.rsplit("/", 1)[1]) >= 50000 for s in source)  # default pool: disjoint
    assert next(iter(source)).image.size == (32, 32)
    test = open_source(SourceConfig(split="test", shots=1, seed=0, size=None))
    assert all(s.source_id.startswith("fmnist/test/") for s in test)
    assert next(iter(test)).image.size == (28, 28)


def test_source_config_validation(tmp_path):
    with pytest.raises(ValueError, match="source kind 'folder' needs a path"):
        SourceConfig(kind="folder")
    with pytest.raises(ValueError, match="shots must be positive or null, got 0"):
        SourceConfig(shots=0)
    recipe = tmp_path / "source.yaml"
    recipe.write_text("kind: hf\nsplit: test\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"needs a path.* in {recipe}"):
        load_config(SourceConfig, recipe)
    recipe.write_text("kind: csv\n", encoding="utf-8")
    expected = rf"kind: must be one of 'fashion-mnist', 'folder', 'hf', got 'csv' in {recipe}"
    with pytest.raises(ConfigError, match=expected):
        load_config(SourceConfig, recipe)


# --------------------------------------------------------------------------------------------------
# Issue 16: the bad-input corpus (scripts/bad_inputs.py builds it; here without the diffusion run)
# --------------------------------------------------------------------------------------------------

def _bad_inputs_module():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / "bad_inputs.py"
    spec = importlib.util.spec_from_file_location("bad_inputs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_bad_input_corpus_every_file_read_or_named_with_reason(tmp_path, caplog):
    import json

    cases = _bad_inputs_module().build_corpus(tmp_path / "in", tmp_path / "outside")
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(tmp_path / "in")
        samples = list(source)
    ids = {s.source_id for s in samples}
    skipped = {s.path: s.reason for s in source.skipped}
    for case in cases:
        if case.expect == "read":
            assert case.shown in ids, f"{case.name}: {case.shown} not read; skipped: {skipped}"
        elif case.expect == "skip":
            matches = [r for p, r in skipped.items() if p.endswith(case.shown)]
            assert matches and all(r for r in matches), f"{case.name}: {case.shown} not in skipped"
            assert case.shown in caplog.text
        else:
            assert case.shown in caplog.text, f"{case.name}: {case.shown} not logged"
    for s in samples:
        assert s.image.mode == "RGB" and s.image.size[0] >= 1
        json.dumps({"source": s.source_id, "label": s.label_name}, ensure_ascii=False).encode("utf-8")
    assert "secret.png" not in {Path(s.source_id).name for s in samples}
    by_id = {s.source_id: s for s in samples}
    assert np.all(np.asarray(by_id["c/deep16.png"].image) == 78)
    assert np.asarray(by_id["c/anim.gif"].image)[0, 0, 0] == 30  # first frame
    assert set(source.source_ids()) >= ids


def test_decompression_bomb_is_skipped_naming_the_file(tmp_path, caplog):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "ok.png")
    Image.new("1", (20000, 20000), 1).save(tmp_path / "c" / "bomb.png")
    source = ImageFolderSource(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert [s.source_id for s in source] == ["c/ok.png"]
    [skip] = source.skipped
    assert skip.path.endswith("c/bomb.png") and "decompression bomb" in skip.reason
    assert "bomb.png" in caplog.text


def test_non_utf8_file_name_is_read_with_a_utf8_id(tmp_path):
    import json
    import os

    os.makedirs(os.path.join(os.fsencode(tmp_path), b"c"))
    Image.new("RGB", (8, 8), (10, 20, 30)).save(os.path.join(os.fsencode(tmp_path), b"c", b"caf\xe9.png"))
    source = ImageFolderSource(tmp_path)
    [sample] = list(source)
    assert sample.source_id == "c/caf\\xe9.png"
    assert list(source.source_ids()) == [sample.source_id]
    json.dumps({"source": sample.source_id}, ensure_ascii=False).encode("utf-8")  # no lone surrogates


def test_empty_and_hidden_class_folders_are_logged(tmp_path, caplog):
    for name in ("cat", "empty", "..evil", ".git"):
        (tmp_path / name).mkdir()
    for name in ("cat", "..evil", ".git"):
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(tmp_path)
    assert source.classes == ["cat", "empty"]
    assert "empty" in caplog.text and "..evil" in caplog.text and ".git" in caplog.text


def test_every_skipped_file_is_listed(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "ok.png")
    for i in range(6):
        (tmp_path / "c" / f"bad{i}.png").write_bytes(b"not an image")
    source = ImageFolderSource(tmp_path)
    assert len(list(source)) == 1
    assert sorted(Path(s.path).name for s in source.skipped) == [f"bad{i}.png" for i in range(6)]


def test_symlink_outside_the_input_is_refused(tmp_path):
    (tmp_path / "in" / "c").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "c" / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "secret.png")
    (tmp_path / "in" / "c" / "inside.png").symlink_to("ok.png")
    (tmp_path / "in" / "c" / "outside.png").symlink_to(tmp_path / "out" / "secret.png")
    (tmp_path / "in" / "d").symlink_to(tmp_path / "out", target_is_directory=True)
    source = ImageFolderSource(tmp_path / "in")
    assert source.classes == ["c"]
    assert [s.source_id for s in source] == ["c/inside.png", "c/ok.png"]
    reasons = {Path(s.path).name: s.reason for s in source.skipped}
    assert set(reasons) == {"outside.png", "d"} and all("outside the input folder" in r for r in reasons.values())


# --------------------------------------------------------------------------------------------------
# Issue 26 (finding 4): every source key is read by the kinds it names, or refused
# --------------------------------------------------------------------------------------------------

@needs_fmnist
def test_fashion_mnist_start_is_honoured_on_the_test_split():
    """start was forced to 0 off the train split: start 100 on test read test images 0-199."""
    source = open_source(SourceConfig(split="test", start=100, stop=200))
    ids = list(source.source_ids())
    assert ids[0] == "fmnist/test/100" and ids[-1] == "fmnist/test/199" and len(ids) == 100
    assert SourceConfig(split="test").start == 0 and SourceConfig().start == 50000  # null: per split
    assert load_config(SourceConfig, None, ["split=test", "start=null"]).start == 0
    with pytest.raises(ValueError, match=r"pool \[50000, 10000\) is not inside \[0, 10000\) of the test split"):
        open_source(SourceConfig(split="test", start=50000))


def test_folder_start_and_stop_select_files_in_sorted_order(image_folder):
    whole = list(open_source(SourceConfig(kind="folder", path=str(image_folder.root))).source_ids())
    part = open_source(SourceConfig(kind="folder", path=str(image_folder.root), start=1, stop=3))
    assert list(part.source_ids()) == whole[1:3]
    with pytest.raises(ValueError, match=rf"start 1, stop 99: not inside the {len(whole)} images of folder"):
        open_source(SourceConfig(kind="folder", path=str(image_folder.root), start=1, stop=99))


def test_hf_start_and_stop_select_rows_and_keep_their_ids(tmp_path):
    _hf_dataset(n_per_class=4).save_to_disk(str(tmp_path / "ds"))
    source = open_source(SourceConfig(kind="hf", path=str(tmp_path / "ds"), start=2, stop=6))
    assert list(source.source_ids()) == [f"train/{i}" for i in range(2, 6)]
    shots = open_source(SourceConfig(kind="hf", path=str(tmp_path / "ds"), start=2, stop=6, shots=1))
    assert {int(s.rsplit("/", 1)[1]) for s in shots.source_ids()} <= set(range(2, 6))
    with pytest.raises(ValueError, match="is a single Dataset with no splits; split 'test' cannot be read"):
        open_source(SourceConfig(kind="hf", path=str(tmp_path / "ds"), split="test"))


@pytest.mark.parametrize("overrides, message", [
    (["kind=folder", "path=IN", "split=test"], "an image folder has no splits; point path at the split's own folder"),
    (["kind=folder", "path=IN", "size=64"], "size resizes Fashion-MNIST only"),
    (["kind=folder", "path=IN", "image_column=img"], "image_column names a column of an HF dataset"),
    (["kind=hf", "path=IN", "size=28"], "size resizes Fashion-MNIST only"),
    (["kind=hf", "path=IN", "classes=[a]"], "an HF dataset's come from its label column"),
    (["path=IN"], "path 'IN' is read by kinds folder and hf"),
    (["classes=[a]"], "Fashion-MNIST has its ten"),
    (["split=validation"], "split of Fashion-MNIST must be 'train' or 'test'"),
    (["label_column=y"], "label_column names a column of an HF dataset"),
    (["size=0"], "size must be at least 8"),
    (["start=-1"], "0 <= start < stop"),
    (["start=10", "stop=10"], "0 <= start < stop"),
    (["seed=-1"], "seed must be >= 0"),
])
def test_a_key_the_source_kind_does_not_read_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SourceConfig, None, overrides)


def test_cli_input_replaces_the_recipes_fashion_mnist_range(image_folder):
    """``sip augment pipelines/fmnist_augment.yaml --input DIR``: the recipe's start 50000 named Fashion-MNIST
    images; it does not carry over to the folder (where it would now be refused)."""
    from sip.augment.run import AugmentRecipe
    from sip.cli import _input_overrides

    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "fmnist_augment.yaml"
    cfg = load_config(AugmentRecipe, recipe, _input_overrides(image_folder.root) + ["source.shots=1"])
    assert (cfg.source.kind, cfg.source.start, cfg.source.stop) == ("folder", 0, None)
    assert len(open_source(cfg.source)) == len(open_source(cfg.source).classes)
    cfg = load_config(AugmentRecipe, recipe, _input_overrides(image_folder.root) + ["source.start=1"])
    assert cfg.source.start == 1
