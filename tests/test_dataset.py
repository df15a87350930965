"""sip.data.sources: image folder, HF dataset from disk and Fashion-MNIST sources; to_rgb; open_source."""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sip.data.sources
from sip.config import ConfigError, load_config
from sip.data.sources import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FashionMNISTSource,
    HFDatasetSource,
    ImageFolderSource,
    Sample,
    SourceConfig,
    load_image,
    open_source,
    select_shots,
    to_rgb,
)

HAS_DEBIAN_FMNIST = (DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAS_DEBIAN_FMNIST, reason="apt-get install dataset-fashion-mnist")


# --------------------------------------------------------------------------------------------------
# to_rgb / load_image
# --------------------------------------------------------------------------------------------------

def _grad(w: int = 6, h: int = 4) -> np.ndarray:
    return np.arange(w * h, dtype=np.uint8).reshape(h, w) * 10


MODES = {
    "RGB": lambda: Image.fromarray(np.dstack([_grad()] * 3)),
    "RGBA": lambda: Image.fromarray(np.dstack([_grad()] * 3 + [np.full((4, 6), 255, np.uint8)])),
    "LA": lambda: Image.fromarray(_grad()).convert("LA"),
    "L": lambda: Image.fromarray(_grad()),
    "1": lambda: Image.fromarray(_grad()).convert("1"),
    "P": lambda: Image.fromarray(np.dstack([_grad()] * 3)).quantize(colors=8),
    "CMYK": lambda: Image.fromarray(np.dstack([_grad()] * 3)).convert("CMYK"),
    "YCbCr": lambda: Image.fromarray(np.dstack([_grad()] * 3)).convert("YCbCr"),
    "I;16": lambda: Image.fromarray(_grad().astype(np.uint16) * 257),
    "I": lambda: Image.fromarray(_grad().astype(np.int32) * 257),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_to_rgb_every_mode(mode):
    image = MODES[mode]()
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (6, 4)
    arr = np.asarray(rgb).astype(int)
    if mode != "1":
        # a grey ramp stays a grey ramp: brightness increases left to right in the top row
        grey = arr[0].mean(axis=-1)
        assert np.all(np.diff(grey) >= 0) and grey[-1] > grey[0] + 20, (mode, grey)


def test_to_rgb_composites_transparency_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[0, 1, 3] = 255  # opaque red-ish
    rgba[1, :, 3] = 128  # half
    out = np.asarray(to_rgb(Image.fromarray(rgba)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 0, 0)
    assert 120 <= out[1, 0, 1] <= 135  # green: half of the white background


def test_to_rgb_palette_transparency_on_white():
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="L").convert("P")
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    out = np.asarray(to_rgb(palette))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (200, 0, 0)


def test_to_rgb_16_bit_full_range():
    deep = Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))
    assert deep.mode == "I;16"
    out = np.asarray(to_rgb(deep))
    assert out[0, 0, 0] == 0 and 120 <= out[0, 1, 0] <= 135 and out[0, 2, 0] == 255
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_to_rgb_applies_exif_orientation(tmp_path):
    image = Image.fromarray(np.dstack([_grad(40, 20)] * 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.mode == "RGB" and loaded.size == (20, 40)


def test_load_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=rf"cannot read image {bad}"):
        load_image(bad)
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=rf"cannot read image {truncated}"):
        load_image(truncated)


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

def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    """Nothing to be found: empty $SIP_FASHION_MNIST_DIR, no Debian folder, an empty home."""
    empty = tmp_path / "fmnist-empty"
    empty.mkdir()
    monkeypatch.setenv("SIP_FASHION_MNIST_DIR", str(empty))
    monkeypatch.setattr(sip.data.sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(sip.data.sources.Path, "home", lambda: tmp_path / "home")
    return empty


def test_fashion_mnist_missing_says_how_to_get_it(no_fashion_mnist):
    with pytest.raises(FileNotFoundError) as info:
        FashionMNISTSource(download=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(no_fashion_mnist) in message and "SIP_FASHION_MNIST_DIR" in message


def test_fashion_mnist_download_without_network_says_how_to_get_it(no_fashion_mnist):
    # pytest-socket blocks the download at once; the error must still say what to do
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*download failed"), \
            pytest.warns(UserWarning, match="socket"):
        FashionMNISTSource("test", download=True)


def test_fashion_mnist_from_custom_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress=False)
    monkeypatch.setenv("SIP_FASHION_MNIST_DIR", str(tmp_path))
    source = FashionMNISTSource("test", download=False)  # also after the Debian files were read before
    assert len(source) == 20
    samples = list(source)
    assert np.array_equal(np.asarray(samples[3].image)[..., 0], images[3])
    assert [s.label for s in samples] == labels.tolist()
    assert samples[3].source_id == "fmnist/test/3"


def test_fashion_mnist_bad_idx_file(tmp_path, monkeypatch):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04" + bytes(16))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2), compress=False)
    monkeypatch.setenv("SIP_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte is not an unsigned-byte idx file"):
        FashionMNISTSource("test", download=False)


@needs_fmnist
def test_fashion_mnist_full_splits():
    train, test = FashionMNISTSource("train"), FashionMNISTSource("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.classes == list(FASHION_MNIST_CLASSES) and len(train.classes) == 10
    s = train.sample(0)
    assert s.image.mode == "RGB" and s.image.size == (28, 28)
    assert s.source_id == "fmnist/train/0" and s.label_name == FASHION_MNIST_CLASSES[s.label]
    assert s.label == 9  # the first training image is an ankle boot


@needs_fmnist
def test_fashion_mnist_shots_seed_and_pool():
    a = FashionMNISTSource("train", shots=3, seed=1, start=50000, size=32)
    assert len(a) == 30
    samples = list(a)
    assert sorted(s.label for s in samples) == sorted(list(range(10)) * 3)
    assert all(s.image.size == (32, 32) and s.image.mode == "RGB" for s in samples)
    assert all(s.label_name == FASHION_MNIST_CLASSES[s.label] for s in samples)
    indices = [int(s.source_id.rsplit("/", 1)[1]) for s in samples]
    assert all(50000 <= i < 60000 for i in indices)
    assert indices == sorted(indices)
    # same seed → same images (bytes); another seed → another selection
    b = FashionMNISTSource("train", shots=3, seed=1, start=50000, size=32)
    assert [s.source_id for s in b] == [s.source_id for s in samples]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(b, samples))
    c = FashionMNISTSource("train", shots=3, seed=2, start=50000, size=32)
    assert [s.source_id for s in c] != [s.source_id for s in samples]
    d = FashionMNISTSource("train", shots=2, seed=0, start=100, stop=400)
    assert all(100 <= int(s.source_id.rsplit("/", 1)[1]) < 400 for s in d)
    assert d.sample(0).image.size == (28, 28)


@needs_fmnist
@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val"), "split must be 'train' or 'test'"),
    (dict(start=500, stop=100), r"pool \[500, 100\)"),
    (dict(start=0, stop=70000), r"pool \[0, 70000\) is not inside \[0, 60000\)"),
    (dict(shots=50, start=0, stop=100), "fewer than shots=50"),
])
def test_fashion_mnist_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FashionMNISTSource(**kwargs)


def test_select_shots():
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2])
    chosen = select_shots(labels, 2, seed=0)
    assert len(chosen) == 6 and list(chosen) == sorted(chosen)
    assert sorted(labels[chosen].tolist()) == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(chosen, select_shots(labels, 2, seed=0))
    assert set(select_shots(labels, 1, seed=3, pool=[1, 2, 3, 6])) <= {1, 2, 3, 6}
    with pytest.raises(ValueError, match="class 2 has 2 images in the pool, fewer than shots=3"):
        select_shots(labels, 3, seed=0)
    with pytest.raises(ValueError, match="shots must be positive"):
        select_shots(labels, 0, seed=0)


# --------------------------------------------------------------------------------------------------
# SourceConfig / open_source
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
