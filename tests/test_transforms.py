"""SIPAugment: both Compose APIs, p=0 / p=1, matching by content hash (grey 28 px Fashion-MNIST against a
32 px bank, torchvision loaders against sip's), misses counted and falling back, DataLoader workers
(shared counters, seeded reproducible choices), pickling, and online generation + caching."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import make_image_folder
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import AugmentRecipe, run_augment
from sip.data.bank import read_metadata
from sip.data.sources import DEBIAN_FASHION_MNIST, IMAGE_EXTENSIONS, SourceConfig, load_image
from sip.ids import image_hash
from sip.transforms import SIPAugment, source_key


class FixedCaptioner:
    """A captioner with a fixed answer (real captioners are tested in test_caption.py)."""

    identity = "fixed:v1"

    def __call__(self, images):
        return ["a small picture" for _ in images]


def readable(path: str) -> bool:
    """The fixture folder's decodable images (not its corrupt PNG or its text file)."""
    return path.lower().endswith(IMAGE_EXTENSIONS) and not path.endswith("broken.png")


def as_list(batch):
    """DataLoader collate that keeps PIL images (module level: picklable for worker processes)."""
    return batch


@pytest.fixture(scope="module")
def generator(tiny_sd_img2img):
    config = GenerateConfig(steps=2, per_image=2, batch_size=8, strength=0.5, device="cpu", batch_invariant=True)
    return DiffusionGenerator(tiny_sd_img2img, config, model_id="tiny")


def augment(source: SourceConfig, out: Path, generator) -> Path:
    recipe = AugmentRecipe(source=source, generate=generator.config, output=str(out), progress=False, chunk=16)
    summary = run_augment(recipe, generator, FixedCaptioner())
    assert summary.written > 0
    return out


@pytest.fixture(scope="module")
def varied(tmp_path_factory, generator):
    """(image folder with RGBA / palette / 16-bit / CMYK … files, its sip bank)."""
    folder = make_image_folder(tmp_path_factory.mktemp("varied"))
    bank = augment(SourceConfig(kind="folder", path=str(folder.root)), tmp_path_factory.mktemp("bank") / "aug",
                   generator)
    return folder, bank


@pytest.fixture(scope="module")
def photo_bank(photo_folder, tmp_path_factory, generator):
    return augment(SourceConfig(kind="folder", path=str(photo_folder)), tmp_path_factory.mktemp("pbank") / "aug",
                   generator)


def matched_variants(bank: Path, image: Image.Image) -> list[bytes]:
    """The bytes SIPAugment may return for ``image``: each of its variants at the input's size and mode."""
    key = source_key(image)
    out = []
    for row in read_metadata(bank):
        if row["source_hash"] == key:
            v = load_image(bank / "train" / row["file_name"]).resize(image.size, Image.BICUBIC).convert(image.mode)
            out.append(v.tobytes())
    return out


# --------------------------------------------------------------------------------------------------
# Compose APIs, p, repr
# --------------------------------------------------------------------------------------------------

def test_classic_and_v2_compose_take_pil_and_return_a_variant(photo_folder, photo_bank):
    dataset = torchvision.datasets.ImageFolder(str(photo_folder))
    aug = SIPAugment(photo_bank, p=1.0)
    classic = T.Compose([aug, T.ToTensor()])
    modern = v2.Compose([aug, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    for image, target in dataset:
        out = aug(image)
        assert isinstance(out, Image.Image) and out.size == image.size and out.mode == image.mode
        assert out.tobytes() in matched_variants(photo_bank, image)
        assert out.tobytes() != image.tobytes()
        assert classic(image).shape == (3, image.height, image.width)
        tensor, same_target = modern(image, target)  # joint call: the target passes through
        assert tensor.shape == (3, image.height, image.width) and same_target == target
    assert aug.hits == 3 * len(dataset) and aug.misses == 0
    assert repr(aug) == f"SIPAugment(p=1.0, bank={str(photo_bank)!r})"
    assert "SIPAugment(p=1.0, bank=" in repr(classic) and "SIPAugment(p=1.0, bank=" in repr(modern)


def test_p0_returns_the_input_untouched_and_looks_nothing_up(photo_folder, photo_bank):
    aug = SIPAugment(photo_bank, p=0.0)
    for image, _ in torchvision.datasets.ImageFolder(str(photo_folder)):
        assert aug(image) is image
    assert aug.stats() == {"hits": 0, "misses": 0, "generated": 0, "errors": 0}
    assert aug._index is None  # never even loaded


def test_bad_arguments_fail_at_construction(tmp_path, photo_bank):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        SIPAugment(photo_bank, p=1.5)
    with pytest.raises(FileNotFoundError, match="is not a sip dataset"):
        SIPAugment(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs a bank"):
        SIPAugment()
    with pytest.raises(TypeError, match="before ToTensor"):
        SIPAugment(photo_bank, p=1.0)(torch.zeros(3, 8, 8))


# --------------------------------------------------------------------------------------------------
# matching by content hash
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist_case(tmp_path_factory, generator):
    """A bank from 1 test image per class (sip reads them as 32 px RGB) and torchvision's FashionMNIST
    over the same idx files (it yields grey 28×28 'L' images)."""
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    bank = augment(SourceConfig(kind="fashion-mnist", split="test", shots=1, size=32),
                   tmp_path_factory.mktemp("fbank") / "aug", generator)
    raw = tmp_path_factory.mktemp("tv") / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):  # torchvision wants them unpacked
        with gzip.open(gz) as src, (raw / gz.stem).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    tv = torchvision.datasets.FashionMNIST(str(raw.parent.parent), train=False)
    indices = sorted(int(r["source"].rsplit("/", 1)[1]) for r in read_metadata(bank) if r["variant"] == 0)
    return bank, tv, indices


def test_grey_28px_fashion_mnist_finds_its_variants_in_a_32px_bank(fmnist_case):
    bank, tv, indices = fmnist_case
    assert len(indices) == 10
    aug = SIPAugment(bank, p=1.0)
    assert aug.resize_to == 32  # read from the bank's run.json
    hashes = {r["source"]: r["source_hash"] for r in read_metadata(bank)}
    for i in indices:
        image, _ = tv[i]
        assert image.mode == "L" and image.size == (28, 28)
        assert source_key(image, 32) == hashes[f"fmnist/test/{i}"]
        out = aug(image)
        assert out.mode == "L" and out.size == (28, 28) and out.tobytes() != image.tobytes()
    assert aug.hits == 10 and aug.misses == 0
    assert aug._aliases  # found by the hash of the 784 grey bytes, no RGB copy, no resize
    normalised = SIPAugment(bank, p=1.0, key=lambda im: source_key(im, 32))  # a custom key: no alias
    assert [normalised.variants(tv[i][0]) for i in indices] == [aug.variants(tv[i][0]) for i in indices]
    assert not normalised._aliases


def test_source_key_fast_path_gives_the_reference_hash(tmp_path):
    from sip.data.sources import load_fashion_mnist_arrays, to_rgb

    try:
        greys = load_fashion_mnist_arrays("train", download=False)[0][::600]
    except FileNotFoundError:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    for array in greys:  # L and RGB without EXIF orientation take the fast path
        grey = Image.fromarray(array, mode="L")
        assert source_key(grey, 32) == image_hash(to_rgb(grey).resize((32, 32), Image.BICUBIC))
        assert source_key(grey) == image_hash(to_rgb(grey))
        rgb = Image.merge("RGB", [grey, grey.transpose(Image.FLIP_LEFT_RIGHT), grey.transpose(Image.ROTATE_90)])
        assert source_key(rgb, 32) == image_hash(to_rgb(rgb).resize((32, 32), Image.BICUBIC))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(greys[0]).crop((0, 0, 28, 14)).convert("RGB").save(tmp_path / "r.jpg", exif=exif)
    with Image.open(tmp_path / "r.jpg") as rotated:
        rotated.load()
        assert rotated.size == (28, 14) and to_rgb(rotated).size == (14, 28)
        assert source_key(rotated) == image_hash(to_rgb(rotated))  # the reference path: rotated as sip reads it


def test_without_the_resize_nothing_matches_and_every_image_comes_back_unchanged(fmnist_case):
    bank, tv, indices = fmnist_case
    aug = SIPAugment(bank, p=1.0, resize_to=None)
    for i in indices:
        image, _ = tv[i]
        assert aug(image) is image
    assert aug.hits == 0 and aug.misses == 10
    assert not aug._aliases  # the aliases are checked against this transform's normalisation


def test_torchvision_loader_misses_exactly_the_images_it_reads_differently(varied):
    folder, bank = varied
    # torchvision's loader drops alpha (sip composites it on white) and clips 16-bit grey (sip scales it)
    read_differently = {"cat/rgba_64x48.png", "cat/palette_transparent.png", "dog/rgba.webp", "bird/deep_16bit.png"}
    default = torchvision.datasets.ImageFolder(str(folder.root), is_valid_file=readable)
    aug = SIPAugment(bank, p=1.0)
    for (path, _), (image, _) in zip(default.samples, default):
        rel = Path(path).relative_to(folder.root).as_posix()
        out = aug(image)
        assert (out is image) == (rel in read_differently), rel
    assert aug.misses == len(read_differently) and aug.hits == len(default) - len(read_differently)
    assert aug.errors == 0

    sip_loader = torchvision.datasets.ImageFolder(str(folder.root), loader=load_image,
                                                  is_valid_file=readable)
    aug = SIPAugment(bank, p=1.0)
    assert all(aug(image) is not image for image, _ in sip_loader)
    assert aug.hits == len(sip_loader) and aug.misses == 0


def test_a_custom_key_replaces_the_normalisation(varied):
    folder, bank = varied
    rows = read_metadata(bank)
    by_name = {r["source"]: r["source_hash"] for r in rows}
    # e.g. a dataset that yields images keyed by file name: look the hash up from the metadata
    aug = SIPAugment(bank, p=1.0, key=lambda im: by_name[im.info["rel"]])
    image = Image.open(folder.root / "cat/rgba_64x48.png")
    image.load()
    image = image.convert("RGB")  # torchvision's way: would miss with the default key
    image.info["rel"] = "cat/rgba_64x48.png"
    assert aug(image) is not image and aug.hits == 1
    assert "key=<lambda>" in repr(aug)


def test_unreadable_or_deleted_variants_fall_back_and_are_counted(varied, tmp_path):
    folder, bank = varied
    broken = tmp_path / "bank"
    shutil.copytree(bank, broken)
    rows = read_metadata(broken)
    victim = rows[0]["source"]
    for r in rows:
        if r["source"] == victim:
            (broken / "train" / r["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    aug = SIPAugment(broken, p=1.0)
    image = load_image(folder.root / victim)
    assert aug(image) is image
    assert aug.misses == 1 and aug.errors == 1 and aug.hits == 0
    unknown = Image.fromarray(np.full((20, 20, 3), 7, dtype=np.uint8))
    assert aug(unknown) is unknown
    assert aug.misses == 2 and aug.errors == 1


# --------------------------------------------------------------------------------------------------
# DataLoader workers, seeding, pickling
# --------------------------------------------------------------------------------------------------

class Augmented(torch.utils.data.Dataset):
    """Each item: the hash of the (possibly replaced) image, and whether it was replaced."""

    def __init__(self, images, aug):
        self.images, self.aug = images, aug

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        out = self.aug(self.images[i])
        return image_hash(out), out is not self.images[i]


def choices(dataset, seed: int, epochs: int = 2) -> list[list[tuple[str, bool]]]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=as_list,
                                         generator=torch.Generator().manual_seed(seed))
    return [[item for batch in loader for item in batch] for _ in range(epochs)]


def test_workers_share_counters_and_a_seeded_loader_reproduces_every_choice(varied):
    folder, bank = varied
    images = [image for image, _ in torchvision.datasets.ImageFolder(
        str(folder.root), loader=load_image, is_valid_file=readable)] * 2
    aug = SIPAugment(bank, p=0.5)
    dataset = Augmented(images, aug)

    first = choices(dataset, seed=0)
    swapped = sum(replaced for epoch in first for _, replaced in epoch)
    assert 0 < swapped < 2 * len(images)  # p=0.5 over 40 draws
    assert aug.hits == swapped and aug.misses == 0  # counted in the workers, read in the main process
    assert (aug.counts[1:3].sum(dim=1) > 0).all() and aug.counts[0].sum() == 0  # both workers, not main
    assert aug._index is None  # loaded in each worker, never in the main process

    assert choices(dataset, seed=0) == first  # same loader seed: same swaps, same variants
    assert first[0] != first[1]  # a new epoch draws anew
    assert choices(dataset, seed=1) != first
    # both variants of an image get chosen over the epochs (the choice is random, not fixed)
    picked = {h for epoch in first + choices(dataset, seed=1) for h, replaced in epoch if replaced}
    assert len(picked) > len(images) // 2


def test_main_process_choices_follow_torch_manual_seed(varied):
    folder, bank = varied
    images = [load_image(folder.root / rel) for rel in sorted(folder.good)]
    aug = SIPAugment(bank, p=0.5)

    def run():
        return [image_hash(aug(im)) for im in images * 3]

    torch.manual_seed(5)
    a = run()
    torch.manual_seed(5)
    assert run() == a
    torch.manual_seed(6)
    assert run() != a


def test_pickled_copy_drops_the_loaded_index_and_still_works(photo_folder, photo_bank):
    aug = SIPAugment(photo_bank, p=1.0)
    image, _ = torchvision.datasets.ImageFolder(str(photo_folder))[0]
    aug(image)
    assert aug._index is not None
    copy = pickle.loads(pickle.dumps(aug))
    assert copy._index is None and repr(copy) == repr(aug)
    assert copy(image).tobytes() in matched_variants(photo_bank, image)
    assert copy._index is not None


# --------------------------------------------------------------------------------------------------
# online mode
# --------------------------------------------------------------------------------------------------

def online(generator, classes, cache_dir, **kw):
    return SIPAugment(p=1.0, generator=generator, captioner=FixedCaptioner(), classes=classes, cache_dir=cache_dir,
                      **kw)


def test_online_mode_generates_on_a_miss_and_caches_in_the_sip_layout(photo_folder, generator, tmp_path):
    dataset = torchvision.datasets.ImageFolder(str(photo_folder))
    aug = online(generator, dataset.classes, tmp_path / "cache")
    assert (tmp_path / "cache" / "run.json").is_file()  # written at construction, before any worker forks
    for image, target in dataset:
        out, same = aug(image, target)
        assert same == target and out.size == image.size and out is not image
    assert aug.stats() == {"hits": len(dataset), "misses": 0, "generated": len(dataset), "errors": 0}

    rows = read_metadata(tmp_path / "cache")
    assert len(rows) == 2 * len(dataset) == len({r["file_name"] for r in rows})
    hashes = {source_key(image): dataset.classes[t] for image, t in dataset}
    for r in rows:
        assert hashes[r["source_hash"]] == r["label"]
        assert r["prompt"] == f"a photo of a {r['label']}, a small picture"
        assert r["strength"] == 0.5 and (tmp_path / "cache" / "train" / r["file_name"]).is_file()

    for image, target in dataset:  # second epoch: served from the cache, nothing generated
        aug(image, target)
    assert aug.generated == len(dataset) and aug.hits == 2 * len(dataset)

    offline = SIPAugment(tmp_path / "cache", p=1.0)  # the cache is a plain sip bank
    assert all(offline(image) is not image for image, _ in dataset) and offline.hits == len(dataset)

    again = online(generator, dataset.classes, tmp_path / "again")
    for image, target in dataset:
        again(image, target)
    same_bytes = {r["file_name"]: (tmp_path / "cache" / "train" / r["file_name"]).read_bytes() for r in rows}
    assert {r["file_name"]: (tmp_path / "again" / "train" / r["file_name"]).read_bytes()
            for r in read_metadata(tmp_path / "again")} == same_bytes  # seeded by the image's hash


def test_online_mode_without_a_label_counts_a_miss(photo_folder, generator, tmp_path):
    dataset = torchvision.datasets.ImageFolder(str(photo_folder))
    aug = online(generator, dataset.classes, tmp_path / "cache")
    image, target = dataset[0]
    assert aug(image) is image
    assert aug.misses == 1 and aug.generated == 0 and read_metadata(tmp_path / "cache") == []
    labelled = online(generator, dataset.classes, tmp_path / "cache", label_fn=lambda im: target)
    assert labelled(image) is not image and labelled.generated == 1
    with pytest.raises(ValueError, match="needs classes"):
        SIPAugment(p=1.0, generator=generator, cache_dir=tmp_path / "x")


class Joint(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        out, target = self.transform(image, target)
        return image_hash(out), target


def test_online_mode_in_two_workers_writes_each_variant_once(photo_folder, generator, tmp_path):
    dataset = torchvision.datasets.ImageFolder(str(photo_folder))
    aug = online(generator, dataset.classes, tmp_path / "cache")
    loader = torch.utils.data.DataLoader(Joint(dataset, v2.Compose([aug])), batch_size=2, num_workers=2,
                                         collate_fn=as_list)
    first = [item for batch in loader for item in batch]
    assert aug.generated == len(dataset) and aug.hits == len(dataset)
    rows = read_metadata(tmp_path / "cache")
    assert len(rows) == 2 * len(dataset) == len({r["file_name"] for r in rows})
    assert json.loads((tmp_path / "cache" / "run.json").read_text())["config"]["kind"] == "online"
    second = [item for batch in loader for item in batch]  # new workers read the cache from disk
    assert aug.generated == len(dataset) and len(read_metadata(tmp_path / "cache")) == len(rows)
    assert [t for _, t in first] == [t for _, t in second]
