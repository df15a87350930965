"""sip report: the HTML and every PNG it shows exist and are valid; sources are re-read as sip read them
(Fashion-MNIST ids and folder paths, checked by content hash); captions, prompts, curves and the
accuracy table are on the page; missing pieces are left out with a note."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import AugmentRecipe, run_augment
from sip.data.bank import read_metadata
from sip.data.sources import DEBIAN_FASHION_MNIST, SourceConfig
from sip.ids import image_hash
from sip.report.page import write_report


class FixedCaptioner:
    identity = "fixed:v1"

    def __call__(self, images):
        return ["a small picture" for _ in images]


def metrics_lines(gain: float) -> list[str]:
    """Lines as sip train writes them (eval every 2nd epoch), plus what a tolerant reader must survive."""
    lines = []
    for epoch in range(1, 7):
        row = {"epoch": epoch, "step": 10 * epoch, "lr": 0.001, "train_loss": 2.0 / epoch, "train_top1": 40 + 5 * epoch,
               "note": "text is skipped", "flag": True, "extra": {"val_acc": 0.5 + epoch / 20},
               "epoch_time_s": 3.0 + epoch, "nonfinite_steps": 0}
        if epoch % 2 == 0:
            row.update(eval_top1=50 + 4 * epoch + gain, eval_top5=95.0, eval_loss=1.0 / epoch)
        lines.append(json.dumps(row))
    return lines + ['{"epoch": 7, "train_lo']  # a torn last line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_sd_img2img, photo_folder):
    """A demo-like run folder: RUN/augmented (Fashion-MNIST), RUN/photos (a folder source),
    RUN/train/<name>/metrics.jsonl for two runs, RUN/results.json."""
    run = tmp_path_factory.mktemp("report") / "run"
    config = GenerateConfig(steps=2, per_image=2, batch_size=10, device="cpu")
    generator = DiffusionGenerator(tiny_sd_img2img, config, model_id="tiny")
    sources = {"photos": SourceConfig(kind="folder", path=str(photo_folder))}
    if (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        sources["augmented"] = SourceConfig(kind="fashion-mnist", split="test", shots=1, size=32)
    for name, source in sources.items():
        run_augment(AugmentRecipe(source=source, generate=config, output=str(run / name), progress=False),
                    generator, FixedCaptioner())
    for name, gain in (("real_only", 0.0), ("real_plus_sip", 3.0)):
        (run / "train" / name).mkdir(parents=True)
        (run / "train" / name / "metrics.jsonl").write_text("\n".join(metrics_lines(gain)) + "\n")
    (run / "results.json").write_text(json.dumps({"runs": [
        {"name": "student, real only", "top1": 74.125, "top5": 97.2},
        {"name": "student, real + sip", "top1": 78.5, "top5": 98.0, "kd": "hinton"}]}))
    return run


def referenced(page: str) -> list[str]:
    return re.findall(r"<img[^>]* src='([^']+)'", page)


def assert_consistent(report: Path) -> str:
    """Every image the page shows exists and is a valid PNG, and every PNG written is shown."""
    page = report.read_text(encoding="utf-8")
    shown = referenced(page)
    assert shown and all(not s.startswith(("/", "http")) for s in shown)  # relative: the folder is self-contained
    for src in shown:
        with Image.open(report.parent / src) as im:
            im.verify()
            assert im.format == "PNG"
    written = {p.relative_to(report.parent).as_posix() for p in report.parent.rglob("*.png")}
    assert written == set(shown)
    return page


def test_report_shows_grids_curves_and_the_accuracy_table(run_dir):
    report = write_report(run_dir)
    assert report == run_dir / "report" / "report.html"
    page = assert_consistent(report)
    names = {p.name for p in report.parent.glob("*.png")}
    assert {"grid-photos.png", "curves.png"} <= names
    for name in names:
        with Image.open(report.parent / name) as im:
            assert im.width >= 300 and im.height >= 200  # a figure, not an empty canvas
    # captions and prompts under the images
    for row in read_metadata(run_dir / "photos"):
        assert html.escape(row["prompt"]) in page
    assert page.count("a small picture") >= 6
    # curves: every numeric series (nested flattened), nothing that is not a number
    series = re.search(r"Series: ([^<]*)\.</p>", page).group(1).split(", ")
    assert series[0] == "eval_top1" and set(series[:3]) == {"eval_top1", "extra.val_acc", "train_top1"}  # accuracy first
    assert {"train_loss", "eval_loss", "eval_top5", "lr", "extra.val_acc"} <= set(series)
    assert not {"note", "flag", "epoch", "step", "epoch_time_s", "nonfinite_steps"} & set(series)
    assert "<b>real_only</b>" in page and "<b>real_plus_sip</b>" in page
    # the accuracy table, best top-1 marked
    assert "<td>student, real only</td><td>74.12</td><td>97.20</td><td></td>" in page
    assert "<td class='best'>78.50</td>" in page and "<td>hinton</td>" in page
    assert (report.parent / "accuracy.md").read_text().splitlines()[:3] == [
        "| name | top1 | top5 | kd |", "|---|---|---|---|", "| student, real only | 74.12 | 97.20 |  |"]
    assert "missing:" not in page


def test_source_tiles_are_the_images_sip_read(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    tiles = re.findall(r"<img src='([^']+-source\.png)' alt='source'><figcaption><b>[^<]*</b><br>([^<]+)<br>", page)
    hashes = {r["source"]: r["source_hash"] for d in ("photos", "augmented") for r in read_metadata(run_dir / d)}
    expected = 6 + (10 if (run_dir / "augmented").exists() else 0)  # every photo; one image per fashion class
    assert len(tiles) == expected
    for src, source_id in tiles:
        with Image.open(run_dir / "report" / src) as tile:
            assert image_hash(tile.convert("RGB")) == hashes[html.unescape(source_id)], source_id
    if (run_dir / "augmented").exists():
        labels = re.findall(r"<figcaption><b>([^<]*)</b><br>fmnist/test/\d+<br>", page)
        assert labels == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                          "Ankle boot"]  # round-robin over the classes, in class order


def test_fewer_sources_on_a_rerun_leave_no_stale_images(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    write_report(run)
    page = assert_consistent(write_report(run, max_sources=2, max_variants=1))
    assert len(re.findall(r"alt='source'", page)) == 2 * len([d for d in ("photos", "augmented") if (run / d).exists()])


def test_missing_pieces_are_left_out_with_a_note(run_dir, tmp_path):
    only_metrics = tmp_path / "metrics_only"
    shutil.copytree(run_dir / "train", only_metrics / "train")
    page = assert_consistent(write_report(only_metrics))
    assert "No sip dataset found" in page and "No results found" in page and "curves.png" in page
    assert "missing: no sip dataset; no accuracy table" in page

    # no results.json: the table falls back to each run's final_metrics.json
    (only_metrics / "train" / "real_only" / "final_metrics.json").write_text(json.dumps({"top1": 71.0, "steps": 60}))
    page = write_report(only_metrics).read_text()
    assert "<td>real_only</td><td>71.00</td><td>60</td>" in page and "final_metrics.json" in page

    only_data = tmp_path / "data_only"
    shutil.copytree(run_dir / "photos", only_data / "photos")
    page = assert_consistent(write_report(only_data))
    assert "No training metrics found" in page and "No results found" in page and "grid-photos.png" in page

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def test_sources_that_cannot_be_found_are_blank_with_a_note(run_dir, tmp_path):
    moved = tmp_path / "run" / "photos"
    shutil.copytree(run_dir / "photos", moved)
    run_json = json.loads((moved / "run.json").read_text())
    run_json["config"]["source"]["path"] = str(tmp_path / "input-that-was-deleted")
    (moved / "run.json").write_text(json.dumps(run_json))
    page = assert_consistent(write_report(tmp_path / "run"))
    assert page.count("source not found") == 6 and "6 source images of photos not found" in page
    assert len(re.findall(r"alt='variant'", page)) == 12  # the variants are still shown


def test_a_dataset_folder_reported_by_itself_is_named_by_its_folder(run_dir):
    report = write_report(run_dir / "photos")
    page = report.read_text(encoding="utf-8")
    assert "<h3>photos</h3>" in page and "<h3>.</h3>" not in page
    assert (report.parent / "grid-dataset.png").is_file()
