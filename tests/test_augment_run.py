"""sip.augment.run and sip.augment.loop: the fixed batch grid on resume, which faults a batch may
absorb, and the checks made before any model loads."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.loop import batch_grid
from sip.augment.run import AugmentRecipe, SynthRecipe, run_augment, run_synth
from sip.data.bank import DatasetWriter, read_metadata
from sip.data.sources import SourceConfig
from sip.models.diffusion import load_diffusion_pipeline

GEN = {"steps": 4, "per_image": 3, "batch_size": 4, "strength": 0.5, "device": "cpu", "batch_invariant": False}


def recipe(folder, out, **generate):
    return AugmentRecipe(source=SourceConfig(kind="folder", path=str(folder)),
                         generate=GenerateConfig(**{**GEN, **generate}), output=str(out), progress=False, chunk=4)


@pytest.fixture(scope="module")
def make_generator(tiny_sd_img2img):
    def make(**generate):
        return DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**{**GEN, **generate}), model_id="tiny")
    return make


def digests(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "train").rglob("*.png"))}


class Abort(Exception):
    pass


def abort_after(monkeypatch, n: int) -> None:
    real = DatasetWriter.write
    count = {"n": 0}

    def write(self, *args, **kwargs):
        if count["n"] == n:
            raise Abort(f"injected after {n} writes")
        count["n"] += 1
        return real(self, *args, **kwargs)
    monkeypatch.setattr(DatasetWriter, "write", write)


@pytest.mark.parametrize("n", [3, 6])
def test_resumed_augment_is_byte_identical_to_an_uninterrupted_run(image_folder, tmp_path, make_generator,
                                                                   monkeypatch, n, fixed_captioner):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    run_augment(recipe(image_folder, clean), make_generator(), fixed_captioner)
    with monkeypatch.context() as m:
        abort_after(m, n)  # stops inside a batch of 4 (3 variants per source: batches straddle sources)
        with pytest.raises(Abort):
            run_augment(recipe(image_folder, resumed), make_generator(), fixed_captioner)
    assert len(read_metadata(resumed)) == n
    again = run_augment(recipe(image_folder, resumed), make_generator(), fixed_captioner)
    assert again.skipped == n and again.written == len(digests(clean)) - n
    assert digests(resumed) == digests(clean)


def test_resumed_synth_is_byte_identical_to_an_uninterrupted_run(tmp_path, make_generator, monkeypatch):
    def synth(out):
        return SynthRecipe(classes=["cat", "dog"], generate=GenerateConfig(**{**GEN, "per_class": 5}),
                           output=str(out), progress=False)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    run_synth(synth(clean), make_generator(per_class=5))
    with monkeypatch.context() as m:
        abort_after(m, 5)
        with pytest.raises(Abort):
            run_synth(synth(resumed), make_generator(per_class=5))
    run_synth(synth(resumed), make_generator(per_class=5))
    assert digests(resumed) == digests(clean) and len(digests(clean)) == 10


def test_batch_grid_is_the_item_order_cut_in_batches():
    assert batch_grid(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="batch_size"):
        batch_grid([1], 0)


def test_a_programming_error_in_a_batch_propagates(image_folder, tmp_path, make_generator, monkeypatch, fixed_captioner):
    generator = make_generator()
    monkeypatch.setattr(generator, "img2img", lambda images, prompts, seeds, negative="":
                        DiffusionGenerator.img2img(generator, images, prompts[:-1], seeds, negative))
    with pytest.raises(ValueError, match="must align"):
        run_augment(recipe(image_folder, tmp_path / "out"), generator, fixed_captioner)


def test_out_of_memory_is_counted_per_image_and_the_run_goes_on(image_folder, tmp_path, make_generator,
                                                                 monkeypatch, fixed_captioner):
    generator = make_generator()

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    monkeypatch.setattr(generator, "img2img", oom)
    summary = run_augment(recipe(image_folder, tmp_path / "out"), generator, fixed_captioner)
    assert summary.written == 0 and summary.failed >= 3 * len(image_folder.good)
    assert "OutOfMemoryError" in summary.line()


def fail_if_models_load(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")
    monkeypatch.setattr(DiffusionGenerator, "from_config", boom)


def test_output_that_is_a_file_is_refused_before_any_model_loads(image_folder, tmp_path, monkeypatch, fixed_captioner):
    fail_if_models_load(monkeypatch)
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"taken.*is a file.*--output"):
        run_augment(recipe(image_folder, target), captioner=fixed_captioner)
    with pytest.raises(NotADirectoryError, match="is a file"):
        run_synth(SynthRecipe(classes=["a"], output=str(target / "sub"), progress=False))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_is_refused_before_any_model_loads(image_folder, tmp_path, monkeypatch, fixed_captioner):
    fail_if_models_load(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"ro is not writable.*--output"):
            run_augment(recipe(image_folder, ro / "out"), captioner=fixed_captioner)
    finally:
        ro.chmod(0o700)


def test_model_folder_without_unet_names_the_folder_and_the_missing_part(tiny_sd_dir, tmp_path):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match=r"model.*incomplete: missing unet/.*download"):
        load_diffusion_pipeline(str(broken), device="cpu")
    json.loads((broken / "model_index.json").read_text())  # untouched


def test_photos_given_the_fashion_mnist_model_warn_once_and_name_the_model_flag(tmp_path, tiny_sd_img2img, caplog, fixed_captioner):
    import numpy as np
    from PIL import Image

    from sip.models.diffusion import DEFAULT_SD_MODEL

    photos = tmp_path / "photos" / "cat"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (300, 280, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    generator = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**{**GEN, "per_image": 1}),
                                   model_id=DEFAULT_SD_MODEL)  # the shipped model's card: Fashion-MNIST
    with caplog.at_level("WARNING", logger="sip.augment.run"):
        summary = run_augment(recipe(photos.parent, tmp_path / "out", per_image=1), generator, fixed_captioner)
    assert len(summary.warnings) == 1
    assert "300 px" in summary.warnings[0] and "colour" in summary.warnings[0] and "--model" in summary.warnings[0]
    assert sum("look unlike" in r.message for r in caplog.records) == 1


def test_sources_like_the_training_data_give_no_warning(image_folder, tmp_path, make_generator, fixed_captioner):
    summary = run_augment(recipe(image_folder, tmp_path / "out", per_image=1), make_generator(per_image=1),
                          fixed_captioner)
    assert summary.warnings == []


def test_the_summary_names_every_unreadable_source_with_its_reason(image_folder, tmp_path, make_generator,
                                                                    fixed_captioner):
    bad_dir = tmp_path / "in"
    shutil.copytree(image_folder.root, bad_dir)
    cls = next(p for p in sorted(bad_dir.iterdir()) if p.is_dir())
    names = [f"broken{i}.png" for i in range(6)]
    for name in names:
        (cls / name).write_bytes(b"not an image")
    summary = run_augment(recipe(bad_dir, tmp_path / "out", per_image=1), make_generator(per_image=1),
                          fixed_captioner)
    line = summary.line()
    assert len(summary.unreadable) >= 6 and f"{len(summary.unreadable)} unreadable sources" in line
    for name in names:
        assert name in line
    assert all(": " in entry for entry in summary.unreadable)  # each with its reason
