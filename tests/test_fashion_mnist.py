"""sip.data.fashion_mnist: idx files, where they are looked for, the source, select_shots."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import sip.data.fashion_mnist
from sip.data.sources import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FashionMNISTSource,
    select_shots,
)

HAS_DEBIAN_FMNIST = (DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAS_DEBIAN_FMNIST, reason="apt-get install dataset-fashion-mnist")



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
    monkeypatch.setattr(sip.data.fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(sip.data.fashion_mnist.Path, "home", lambda: tmp_path / "home")
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
