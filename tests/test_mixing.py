"""Real + synthetic mixing: label mapping by name, ratios, own-variant swaps, class balance, determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sip.data.mixing import MixConfig, MixedImages, RealImages, SyntheticImages
from sip.data.sources import ImageFolderSource

CLASSES = ["T-shirt/top", "Trouser", "Bag"]


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def real_folder(tmp_path) -> RealImages:
    """An imbalanced real set: 6 T-shirts, 3 trousers, 1 bag (folder names are the class names' safe form)."""
    root = tmp_path / "real"
    counts = {"T-shirt_top": 6, "Trouser": 3, "Bag": 1}
    for folder, n in counts.items():
        for i in range(n):
            _png(root / folder / f"{i}.png", 10 * i)
    source = ImageFolderSource(root, classes=["T-shirt_top", "Trouser", "Bag"])
    real = RealImages(source)
    real.classes = CLASSES  # the real names (as sip's sources report them)
    return real


def write_synthetic(root: Path, rows: list[dict]) -> Path:
    """A sip dataset: ROOT/train/<sanitised label>/<id>.png + ROOT/train/metadata.jsonl."""
    train = root / "train"
    lines = []
    for k, row in enumerate(rows):
        name = f"{row['label'].replace('/', '_')}/{k:05d}.png"
        _png(train / name, row.get("value", 200))
        lines.append(json.dumps({"file_name": name, "label": row["label"], "source": row.get("source"),
                                 "caption": "a photo", "prompt": f"a photo of a {row['label']}", "seed": k,
                                 "strength": 0.5}))
    (train / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def synthetic(tmp_path, real_folder) -> SyntheticImages:
    """Two variants of each real T-shirt and trouser (none for the bag), plus two txt2img bags."""
    rows = []
    for i in range(len(real_folder)):
        label = CLASSES[real_folder.labels[i]]
        if label != "Bag":
            rows += [{"label": label, "source": real_folder.sample_id(i)}] * 2
    rows += [{"label": "Bag", "source": None}] * 2
    return SyntheticImages(write_synthetic(tmp_path / "syn", rows), CLASSES)


def test_synthetic_labels_map_by_name_not_folder(tmp_path):
    root = write_synthetic(tmp_path / "s", [{"label": "T-shirt/top"}, {"label": "Bag"}, {"label": "Trouser"}])
    ds = SyntheticImages(root, CLASSES)
    assert ds.labels.tolist() == [0, 2, 1]
    assert ds.records[0].file_name.startswith("T-shirt_top/")  # the folder is sanitised, the label is not
    image, label = ds[0]
    assert image.mode == "RGB" and label == 0
    assert ds.sample_id(1).startswith("syn:")


def test_unknown_synthetic_label_is_an_error(tmp_path):
    root = write_synthetic(tmp_path / "s", [{"label": "Sneaker"}])
    with pytest.raises(ValueError, match="Sneaker"):
        SyntheticImages(root, CLASSES)


def test_missing_metadata_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        SyntheticImages(tmp_path, CLASSES)


def test_concat_has_every_image_once(real_folder, synthetic):
    mix = MixedImages(real_folder, synthetic, MixConfig(mode="concat"))
    assert len(mix) == len(real_folder) + len(synthetic)
    assert sorted(mix.plan.tolist()) == sorted(list(range(10)) + [-(j + 1) for j in range(len(synthetic))])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_ratio_sets_the_synthetic_share(real_folder, synthetic, ratio):
    mix = MixedImages(real_folder, synthetic, MixConfig(mode="ratio", ratio=ratio), seed=3)
    n_syn = int((mix.plan < 0).sum())
    assert sorted(mix.plan[mix.plan >= 0].tolist()) == list(range(len(real_folder)))  # every real image once
    assert n_syn == round(len(real_folder) * ratio / (1 - ratio))
    assert mix.stats["synthetic"] == n_syn


def test_ratio_with_epoch_size(real_folder, synthetic):
    mix = MixedImages(real_folder, synthetic, MixConfig(mode="ratio", ratio=0.3, epoch_size=40))
    assert len(mix) == 40 and int((mix.plan < 0).sum()) == 12


def test_swap_uses_only_the_image_own_variants(real_folder, synthetic):
    mix = MixedImages(real_folder, synthetic, MixConfig(mode="swap", p=1.0), seed=1)
    assert len(mix) == len(real_folder)
    for k in range(len(mix)):
        code = int(mix.plan[k])
        if code < 0:
            assert synthetic.sources[-code - 1] is not None
    swapped_sources = [synthetic.sources[-c - 1] for c in mix.plan.tolist() if c < 0]
    assert sorted(swapped_sources) == sorted(real_folder.sample_id(i) for i in range(9))  # all but the bag
    assert mix.stats == {"swapped": 9, "no_variant": 1, "real": 1, "synthetic": 9}
    # labels follow the swapped item (a variant keeps its real image's label)
    for k in range(len(mix)):
        assert mix.labels[k] == mix[k][1]


def test_swap_probability_zero_keeps_real(real_folder, synthetic):
    mix = MixedImages(real_folder, synthetic, MixConfig(mode="swap", p=0.0))
    assert (mix.plan >= 0).all()


def test_swap_probability_is_respected_on_average(real_folder, synthetic):
    mix = MixedImages(real_folder, synthetic, MixConfig(mode="swap", p=0.3, epoch_size=3000), seed=0)
    swapped = mix.stats["swapped"] / (mix.stats["swapped"] + mix.stats["real"] - mix.stats.get("no_variant", 0))
    assert 0.26 < swapped < 0.34


def test_swap_without_matching_sources_is_an_error(tmp_path, real_folder):
    syn = SyntheticImages(write_synthetic(tmp_path / "o", [{"label": "Bag", "source": "elsewhere/1.png"}]), CLASSES)
    with pytest.raises(ValueError, match="source"):
        MixedImages(real_folder, syn, MixConfig(mode="swap"))


def test_class_balanced_draws_equal_counts(real_folder, synthetic):
    mix = MixedImages(real_folder, synthetic, MixConfig(mode="ratio", ratio=0.5, class_balanced=True), seed=2)
    real_counts = Counter(real_folder.labels[c] for c in mix.plan.tolist() if c >= 0)
    assert max(real_counts.values()) - min(real_counts.values()) <= 1 and len(real_counts) == 3
    syn_counts = Counter(synthetic.labels[-c - 1] for c in mix.plan.tolist() if c < 0)
    assert max(syn_counts.values()) - min(syn_counts.values()) <= 1 and len(syn_counts) == 3


def test_plans_are_seeded_and_change_per_epoch(real_folder, synthetic):
    cfg = MixConfig(mode="swap", p=0.5)
    a = MixedImages(real_folder, synthetic, cfg, seed=5)
    b = MixedImages(real_folder, synthetic, cfg, seed=5)
    plans = []
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert np.array_equal(a.plan, b.plan)
        plans.append(a.plan.copy())
    assert any(not np.array_equal(plans[0], p) for p in plans[1:])
    c = MixedImages(real_folder, synthetic, cfg, seed=6)
    c.set_epoch(3)
    a.set_epoch(3)
    assert not np.array_equal(a.plan, c.plan)


def test_synthetic_only(synthetic):
    mix = MixedImages(None, synthetic)
    assert len(mix) == len(synthetic) and mix.classes == CLASSES
    with pytest.raises(ValueError, match="needs both"):
        MixedImages(None, synthetic, MixConfig(mode="ratio"))


def test_bad_config_values():
    with pytest.raises(ValueError, match="ratio"):
        MixConfig(ratio=1.5)
    with pytest.raises(ValueError, match="p must"):
        MixConfig(p=-0.1)


def test_several_synthetic_folders_read_as_one(tmp_path):
    a = write_synthetic(tmp_path / "a", [{"label": "Bag", "value": 11}, {"label": "Trouser", "value": 12}])
    b = tmp_path / "b"
    write_synthetic(b, [{"label": "T-shirt/top", "value": 13}])
    (b / "train" / "T-shirt_top" / "00000.png").rename(b / "train" / "T-shirt_top" / "t2i-0.png")
    meta = b / "train" / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("T-shirt_top/00000.png", "T-shirt_top/t2i-0.png"))
    ds = SyntheticImages([a, b], CLASSES)
    assert len(ds) == 3 and ds.labels.tolist() == [2, 1, 0]
    assert [int(np.asarray(ds[i][0])[0, 0, 0]) for i in range(3)] == [11, 12, 13]  # each from its own folder
    # recipes name the folders as a list
    from sip.config import load_config
    from sip.train.recipe import TrainRecipe

    recipe = load_config(TrainRecipe, overrides=[f"data.synthetic=[{a}, {b}]"])
    assert recipe.data.synthetic == [str(a), str(b)]


def test_the_same_folder_twice_is_an_error_naming_both(tmp_path):
    a = write_synthetic(tmp_path / "a", [{"label": "Bag"}])
    with pytest.raises(ValueError, match="listed in both"):
        SyntheticImages([a, a / "train"], CLASSES)
