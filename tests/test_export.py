"""Export of a written sip dataset to Hugging Face datasets: features, round trip through save_to_disk /
load_from_disk (self-contained: the original folder can go), label order, clear errors."""

from __future__ import annotations

import json
import shutil

import datasets
import numpy as np
import pytest
from PIL import Image

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import AugmentRecipe, run_augment
from sip.data.bank import read_metadata
from sip.data.sources import HFDatasetSource, SourceConfig
from sip.export import export_dataset


class FixedCaptioner:
    identity = "fixed:v1"

    def __call__(self, images):
        return [f"picture {i}" for i in range(len(images))]


@pytest.fixture(scope="module")
def bank(photo_folder, tiny_sd_img2img, tmp_path_factory):
    config = GenerateConfig(steps=2, per_image=2, batch_size=8, device="cpu", strength=0.6)
    out = tmp_path_factory.mktemp("export") / "aug"
    recipe = AugmentRecipe(source=SourceConfig(kind="folder", path=str(photo_folder)), generate=config,
                           output=str(out), progress=False)
    run_augment(recipe, DiffusionGenerator(tiny_sd_img2img, config, model_id="tiny"), FixedCaptioner())
    return out


def test_round_trip_keeps_every_image_and_field(bank, tmp_path):
    copy = tmp_path / "aug"
    shutil.copytree(bank, copy)
    exported = export_dataset(copy, tmp_path / "hf")
    meta = {r["file_name"]: r for r in read_metadata(copy)}
    pixels = {name: np.asarray(Image.open(copy / "train" / name)) for name in meta}
    shutil.rmtree(copy)  # the saved export is self-contained

    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    assert isinstance(loaded, datasets.DatasetDict) and list(loaded) == ["train"]
    train = loaded["train"]
    assert len(train) == len(meta) == 12 and len(exported["train"]) == 12
    f = train.features
    assert isinstance(f["image"], datasets.Image) and isinstance(f["label"], datasets.ClassLabel)
    assert f["label"].names == sorted(["cat", "coffee", "person", "rocket", "china", "flower"])  # the source's order
    assert (f["caption"].dtype, f["prompt"].dtype, f["source"].dtype) == ("string",) * 3
    assert (f["seed"].dtype, f["strength"].dtype) == ("int64", "float64")
    for row in train:
        m = meta[row["file_name"]]
        assert f["label"].int2str(row["label"]) == m["label"]
        for key in ("caption", "prompt", "source", "seed", "strength", "source_hash", "variant", "model"):
            assert row[key] == m[key], key
        assert row["strength"] == 0.6 and row["caption"].startswith("picture ")
        assert np.array_equal(np.asarray(row["image"]), pixels[row["file_name"]])
    assert json.loads(train.info.description)["model"] == "tiny"


def test_export_reads_back_as_a_sip_source(bank, tmp_path):
    export_dataset(bank, tmp_path / "hf")
    source = HFDatasetSource(tmp_path / "hf", split="train")
    samples = list(source)
    assert len(samples) == 12 and source.classes == export_dataset(bank)["train"].features["label"].names
    assert all(s.image.size == (32, 32) and s.image.mode == "RGB" for s in samples)


def test_in_memory_export_and_class_order_from_run_json(tmp_path):
    from sip.data.bank import DatasetWriter

    out = tmp_path / "synth"
    writer = DatasetWriter(out, {"config": {}}, ["Trouser", "T-shirt/top"])  # declared order, not sorted
    for i, label in enumerate(["T-shirt/top", "Trouser", "T-shirt/top"]):
        writer.write(f"img{i}", Image.new("RGB", (8, 8), (i * 40, 0, 0)), label,
                     {"source": None, "caption": None, "prompt": f"a photo of a {label}", "seed": 2**62 + i,
                      "strength": None})
    ds = export_dataset(out)["train"]
    assert ds.features["label"].names == ["Trouser", "T-shirt/top"]
    assert ds["label"] == [1, 0, 1] and ds["seed"][0] == 2**62 and ds["strength"] == [None] * 3
    assert ds[1]["image"].getpixel((0, 0)) == (40, 0, 0)


def test_missing_images_empty_folders_and_an_existing_destination_are_errors(bank, tmp_path):
    with pytest.raises(FileNotFoundError, match="lists no images"):
        export_dataset(tmp_path)
    export_dataset(bank, tmp_path / "hf")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_dataset(bank, tmp_path / "hf")
    assert len(export_dataset(bank, tmp_path / "hf", overwrite=True)["train"]) == 12
    broken = tmp_path / "broken"
    shutil.copytree(bank, broken)
    victim = read_metadata(broken)[0]["file_name"]
    (broken / "train" / victim).unlink()
    with pytest.raises(FileNotFoundError, match="1 images listed in the metadata are missing"):
        export_dataset(broken)
