"""The SIP flow end to end on the tiny fixture model: determinism, resume after SIGKILL, shards,
filter, bad input, and that the output loads without sip."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sip.augment.filter import ClassifierFilter
from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import AugmentRecipe, SynthRecipe, run_augment, run_synth
from sip.config import ConfigError, load_config
from sip.data.bank import label_folders, read_metadata
from sip.data.sources import SourceConfig
from sip.ids import sanitize_label
from conftest import build_tiny_taesd


def recipe(folder, out, **generate):
    gen = {"steps": 4, "per_image": 2, "batch_size": 4, "strength": 0.5, "device": "cpu", **generate}
    return AugmentRecipe(source=SourceConfig(kind="folder", path=str(folder)), generate=GenerateConfig(**gen),
                         output=str(out), progress=False, chunk=4)


@pytest.fixture(scope="module")
def generator_factory(tiny_sd_img2img):
    def make(**generate):
        gen = {"steps": 4, "per_image": 2, "batch_size": 4, "strength": 0.5, "device": "cpu", **generate}
        return DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**gen), model_id="tiny")
    return make


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "train").rglob("*.png"))}


def rows(out: Path) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "created"} for r in read_metadata(out)),
                  key=lambda r: r["file_name"])


def test_writes_the_documented_layout(image_folder, tmp_path, generator_factory, fixed_captioner):
    out = tmp_path / "out"
    summary = run_augment(recipe(image_folder, out), generator_factory(), fixed_captioner)
    n_good = len(image_folder.good)
    assert summary.written == 2 * n_good and summary.failed == 1  # the corrupt file, named
    assert "broken.png" in summary.line()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["generate"]["strength"] == 0.5 and run["model"] == "tiny"
    meta = read_metadata(out)
    assert len(meta) == 2 * n_good
    keys = {"file_name", "label", "source", "caption", "prompt", "strength", "guidance_scale", "steps", "seed",
            "model", "scores", "created", "source_hash"}
    assert all(keys <= set(r) for r in meta)
    for r in meta:
        assert (out / "train" / r["file_name"]).is_file()
        assert r["source"] in image_folder.good
        assert r["prompt"].startswith(f"a photo of a {r['label']}")
        with Image.open(out / "train" / r["file_name"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert not list(out.rglob("*.tmp"))


def test_batch_invariant_mode_gives_the_same_bytes_whatever_the_batch_size(image_folder, tmp_path,
                                                                           generator_factory, fixed_captioner):
    a, b = tmp_path / "a", tmp_path / "b"
    run_augment(recipe(image_folder, a, batch_size=1, batch_invariant=True),
                generator_factory(batch_size=1, batch_invariant=True), fixed_captioner)
    run_augment(recipe(image_folder, b, batch_size=5, batch_invariant=True),
                generator_factory(batch_size=5, batch_invariant=True), fixed_captioner)
    assert files(a) == files(b)
    assert rows(a) == rows(b)


def test_batched_mode_differs_by_at_most_float_rounding_across_batch_sizes(image_folder, tmp_path,
                                                                            generator_factory, fixed_captioner):
    import numpy as np

    a, b = tmp_path / "a", tmp_path / "b"
    run_augment(recipe(image_folder, a, batch_size=1), generator_factory(batch_size=1), fixed_captioner)
    run_augment(recipe(image_folder, b, batch_size=5), generator_factory(batch_size=5), fixed_captioner)
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys() and rows(a) == rows(b)  # same seeds, prompts, ids
    diffs = [np.abs(np.asarray(Image.open(a / k), dtype=int) - np.asarray(Image.open(b / k), dtype=int)) for k in fa]
    assert max(d.max() for d in diffs) <= 1
    assert sum((d > 0).sum() for d in diffs) <= 0.001 * sum(d.size for d in diffs)


def test_same_bytes_on_a_rerun_in_another_order(image_folder, tmp_path, generator_factory, fixed_captioner):
    a, b = tmp_path / "a", tmp_path / "b"
    run_augment(recipe(image_folder, a, batch_size=3), generator_factory(batch_size=3), fixed_captioner)
    run_augment(recipe(image_folder, b, batch_size=3), generator_factory(batch_size=3), fixed_captioner)
    assert files(a) == files(b)


def test_rerun_skips_finished_work(image_folder, tmp_path, generator_factory, fixed_captioner):
    out = tmp_path / "out"
    run_augment(recipe(image_folder, out), generator_factory(), fixed_captioner)
    before = files(out)
    again = run_augment(recipe(image_folder, out), generator_factory(), fixed_captioner)
    assert again.written == 0 and again.skipped == len(before)
    assert files(out) == before and len(read_metadata(out)) == len(before)


def test_other_config_in_the_same_folder_is_refused_and_nothing_changes(image_folder, tmp_path, generator_factory, fixed_captioner):
    out = tmp_path / "out"
    run_augment(recipe(image_folder, out), generator_factory(), fixed_captioner)
    before, meta = files(out), (out / "train" / "metadata.jsonl").read_bytes()
    with pytest.raises(ValueError, match="different config"):
        run_augment(recipe(image_folder, out, strength=0.9), generator_factory(strength=0.9), fixed_captioner)
    assert files(out) == before and (out / "train" / "metadata.jsonl").read_bytes() == meta


def test_shards_together_equal_one_run(image_folder, tmp_path, generator_factory, fixed_captioner):
    from dataclasses import replace

    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    exact = {"batch_invariant": True}
    run_augment(recipe(image_folder, whole, **exact), generator_factory(**exact), fixed_captioner)
    s1 = run_augment(replace(recipe(image_folder, sharded, **exact), shard="1/2"), generator_factory(**exact),
                     fixed_captioner)
    assert not s1.complete and not (sharded / "train" / "metadata.jsonl").exists()
    s2 = run_augment(replace(recipe(image_folder, sharded, **exact), shard="2/2"), generator_factory(**exact),
                     fixed_captioner)
    assert s2.complete and s1.written > 0 and s2.written > 0
    assert files(whole) == files(sharded)
    assert rows(whole) == rows(sharded)
    assert not list((sharded / "train").glob("metadata.shard-*"))


def test_filter_drops_variants_and_keeps_scores(image_folder, tmp_path, generator_factory, make_tiny_classifier, fixed_captioner):
    import torch
    import torchvision.transforms.v2 as T

    classes = list(image_folder.classes)
    model = make_tiny_classifier("test_resnet", num_classes=len(classes))
    transform = T.Compose([T.PILToTensor(), T.ToDtype(torch.float32, scale=True)])
    out_all, out_none = tmp_path / "all", tmp_path / "none"
    keep = ClassifierFilter(model, classes, transform, threshold=0.0)
    s = run_augment(recipe(image_folder, out_all), generator_factory(), fixed_captioner, keep)
    assert s.filtered == 0
    assert all(0.0 <= r["scores"]["classifier_prob"] <= 1.0 for r in read_metadata(out_all))
    drop = ClassifierFilter(model, classes, transform, threshold=1.0)
    s = run_augment(recipe(image_folder, out_none), generator_factory(), fixed_captioner, drop)
    assert s.written == 0 and s.filtered == 2 * len(image_folder.good)
    rejected = [json.loads(line) for line in (out_none / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == s.filtered and all("classifier_prob" in r["scores"] for r in rejected)
    # rejected ids count as done: a rerun does not regenerate them
    again = run_augment(recipe(image_folder, out_none), generator_factory(), fixed_captioner, drop)
    assert again.filtered == 0 and again.skipped == s.filtered


def test_output_loads_in_datasets_and_torchvision(image_folder, tmp_path, generator_factory, fixed_captioner):
    import datasets
    from torchvision.datasets import ImageFolder

    out = tmp_path / "out"
    run_augment(recipe(image_folder, out), generator_factory(), fixed_captioner)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 2 * len(image_folder.good)
    assert {"image", "caption", "prompt", "seed", "source"} <= set(ds.column_names)
    assert ds[0]["image"].size == (32, 32)
    tv = ImageFolder(str(out / "train"))
    assert len(tv) == len(ds) and tv.classes == sorted(image_folder.classes)


def test_txt2img_synth(tmp_path, generator_factory):
    out = tmp_path / "synth"
    cfg = SynthRecipe(classes=["T-shirt/top", "../../etc", "Bag"], output=str(out), progress=False,
                      generate=GenerateConfig(steps=3, per_class=3, batch_size=4, device="cpu"))
    summary = run_synth(cfg, generator_factory(per_class=3))
    assert summary.written == 9
    meta = read_metadata(out)
    assert {r["label"] for r in meta} == {"T-shirt/top", "../../etc", "Bag"}
    assert all(r["source"] is None and r["prompt"].startswith("a photo of a") for r in meta)
    # label names never escape the output folder
    for p in out.rglob("*.png"):
        assert p.resolve().is_relative_to((out / "train").resolve())
    again = run_synth(cfg, generator_factory(per_class=3))
    assert again.written == 0 and again.skipped == 9


def test_sanitised_labels_are_distinct_and_safe():
    assert sanitize_label("T-shirt/top") == "T-shirt_top"
    for bad in ["..", ".", "", "/", "con", "../../x", "a\x00b", "ünïcode"]:
        name = sanitize_label(bad)
        assert name and "/" not in name and name not in (".", "..")
    folders = label_folders(["a/b", "a_b", "A_B"])
    assert len(set(f.lower() for f in folders.values())) == 3


# ---------------------------------------------------------------------------------------------------
# resume after SIGKILL
# ---------------------------------------------------------------------------------------------------

WORKER = """
import sys, time
import torch
torch.set_num_threads(1)  # as the test process (conftest): same kernels, same bytes
from sip.augment.run import AugmentRecipe, run_augment
from sip.data.sources import SourceConfig
from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.models.diffusion import load_diffusion_pipeline

class FixedCaptioner:
    identity = "fixed:v1"
    def __call__(self, images):
        return ["a small picture" for _ in images]

folder, out, model, slow = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
gen_cfg = GenerateConfig(steps=4, per_image=2, batch_size=1, strength=0.5, device="cpu")
pipe = load_diffusion_pipeline(model, "img2img", device="cpu")
gen = DiffusionGenerator(pipe, gen_cfg, model_id="tiny")
if slow:  # give the test time to kill us between images
    inner = gen.img2img
    def slow_img2img(*a, **k):
        time.sleep(0.3)
        return inner(*a, **k)
    gen.img2img = slow_img2img
recipe = AugmentRecipe(source=SourceConfig(kind="folder", path=folder), generate=gen_cfg, output=out,
                       progress=False, chunk=4)
print(run_augment(recipe, gen, FixedCaptioner()).line(), flush=True)
"""


def test_resume_after_sigkill_has_no_duplicate_missing_or_torn_image(image_folder, tmp_path, tiny_sd_dir,
                                                                       generator_factory, fixed_captioner):
    ref = tmp_path / "ref"
    run_augment(recipe(image_folder, ref, batch_size=1), generator_factory(batch_size=1), fixed_captioner)
    out = tmp_path / "killed"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(image_folder), str(out), str(tiny_sd_dir), "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    meta = out / "train" / "metadata.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if meta.is_file() and len(meta.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_metadata(out))
    assert 3 <= partial < len(files(ref)), "the kill must land mid-run"
    done = subprocess.run([sys.executable, str(script), str(image_folder), str(out), str(tiny_sd_dir), "0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert files(out) == files(ref)
    names = [r["file_name"] for r in read_metadata(out)]
    assert len(names) == len(set(names)) == len(files(ref))
    assert not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------
# bad input stops before any work, with a message saying what to change
# ---------------------------------------------------------------------------------------------------

def test_empty_input_folder(tmp_path, fixed_captioner):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found in .*empty"):
        run_augment(recipe(tmp_path / "empty", tmp_path / "out"), generator=None, captioner=fixed_captioner)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("generate.strength=1.7", "strength must be in \\(0, 1\\], got 1.7"),
    ("generate.strength=0", "strength must be in \\(0, 1\\]"),
    ("generate.per_image=0", "per_image must be a positive integer"),
    ("generate.steps=-1", "steps must be a positive integer"),
    ("generate.scheduler=DDIMSchedular", "unknown scheduler 'DDIMSchedular'.*DDIMScheduler"),
    ("shard=3/2", "--shard takes i/n"),
])
def test_bad_values_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(AugmentRecipe, None, [override])


def test_missing_model_folder_names_it_and_how_to_get_it(image_folder, tmp_path, fixed_captioner):
    cfg = AugmentRecipe(source=SourceConfig(kind="folder", path=str(image_folder)), output=str(tmp_path / "o"),
                        generate=GenerateConfig(model=str(tmp_path / "no-such-model"), device="cpu"), progress=False)
    with pytest.raises(FileNotFoundError, match="no-such-model.*(huggingface-cli download|hub id)"):
        run_augment(cfg, captioner=fixed_captioner)
    assert not (tmp_path / "o").exists()


def test_cli_augment_end_to_end(image_folder, tmp_path, tiny_sd_dir):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "sip", "augment", "--input", str(image_folder), "--output", str(out),
           "--model", str(tiny_sd_dir), "--per-image", "1", "--steps", "3", "--strength", "0.6",
           "--set", "caption.image_size=64", "--set", "generate.device=cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert f"written {len(image_folder.good)}" in res.stdout and "broken.png" in res.stdout
    assert (out / "config.yaml").is_file()
    captions = {r["caption"] for r in read_metadata(out)}
    assert all(c for c in captions)  # the offline ImageNet captioner described every image
    bad = subprocess.run(cmd[:-4] + ["--strength", "1.7"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "strength must be in (0, 1], got 1.7" in bad.stderr


def test_fast_path_matches_the_plain_diffusers_call(image_folder, tiny_sd_img2img, generator_factory):
    """sip encodes each source and prompt once; the images are the pipeline's own (up to rounding)."""
    import numpy as np
    import torch

    from sip.augment.generate import fit_image
    from sip.data.sources import ImageFolderSource

    gen = generator_factory(batch_size=4, guidance_scale=3.0, precision="fp32")  # the plain call runs fp32
    assert gen._fast
    sources = [s.image for s in ImageFolderSource(image_folder)][:3]
    images = [sources[0], sources[0], sources[1], sources[2]]  # two variants of the first source
    prompts = ["a photo of a cat", "a photo of a cat, striped", "a bird", "a dog"]
    seeds = [11, 12, 13, 14]
    ours = gen.img2img(images, prompts, seeds, negative_prompt="blurry")
    theirs = tiny_sd_img2img(prompt=prompts, image=[fit_image(im, 32, "resize") for im in images], strength=0.5,
                             num_inference_steps=4, guidance_scale=3.0, negative_prompt=["blurry"] * 4,
                             generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pil").images
    for a, b in zip(ours, theirs):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert np.asarray(ours[0]).tobytes() != np.asarray(ours[1]).tobytes()  # variants differ


def test_tiny_vae_decodes_while_the_full_vae_still_encodes(image_folder, tiny_sd_img2img, tmp_path):
    import numpy as np

    from sip.augment.generate import DiffusionGenerator
    from sip.data.sources import ImageFolderSource

    sources = [s.image for s in ImageFolderSource(image_folder)][:2]
    config = GenerateConfig(steps=4, strength=0.5, device="cpu", precision="fp32", tiny_vae="unused-here")
    full = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(steps=4, strength=0.5, device="cpu", precision="fp32"))
    taesd = build_tiny_taesd(blocks=2)  # 2x, as the fixture's VAE
    fast = DiffusionGenerator(tiny_sd_img2img, config, tiny_vae=taesd)
    assert tiny_sd_img2img.vae is not taesd and fast.pipe.vae is taesd  # the caller's pipeline is untouched
    assert fast.encoder_vae is tiny_sd_img2img.vae and fast.txt2img.vae is taesd
    a = full.img2img(sources, ["a cat", "a dog"], [1, 2])
    b = fast.img2img(sources, ["a cat", "a dog"], [1, 2])
    assert [im.size for im in b] == [im.size for im in a] == [(32, 32)] * 2
    assert np.asarray(a[0]).tobytes() != np.asarray(b[0]).tobytes()  # another decoder, other pixels
    assert fast.img2img(sources, ["a cat", "a dog"], [1, 2])[1].tobytes() == b[1].tobytes()  # still seeded
    assert [im.size for im in fast.text2img(["a cat"], [3])] == [(32, 32)]
    with pytest.raises(ValueError, match="tiny_vae upsamples latents 8x but the model's VAE 2x"):
        DiffusionGenerator(tiny_sd_img2img, config, tiny_vae=build_tiny_taesd(blocks=4))
    with pytest.raises(ValueError, match="takes 16-channel latents but the model's VAE makes 4-channel"):
        DiffusionGenerator(tiny_sd_img2img, config, tiny_vae=build_tiny_taesd(blocks=2, latent_channels=16))


def test_tiny_vae_loads_from_a_folder_and_a_missing_one_is_named(tiny_sd_dir, tmp_path):
    from sip.augment.generate import DiffusionGenerator

    build_tiny_taesd(blocks=2).save_pretrained(tmp_path / "taesd")
    gen = DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), tiny_vae=str(tmp_path / "taesd"),
                                                        device="cpu", steps=2))
    assert type(gen.pipe.vae).__name__ == "AutoencoderTiny"
    with pytest.raises(FileNotFoundError, match="tiny VAE folder .*nope does not exist"):
        DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), tiny_vae=str(tmp_path / "nope")))


def test_compile_key_compiles_the_unet_in_place(tiny_sd_dir):
    """Wiring only (torch.compile is lazy: nothing compiles until the first call); see the slow test below."""
    from sip.augment.generate import DiffusionGenerator

    gen = DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), compile=True, device="cpu"))
    assert gen.pipe.unet._compiled_call_impl is not None and type(gen.pipe.unet).__name__ == "UNet2DConditionModel"
    plain = DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), device="cpu"))
    assert plain.pipe.unet._compiled_call_impl is None


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_images(image_folder, tiny_sd_dir):
    """torch.compile on the CPU (minutes here: inductor builds C++ kernels); run with -m slow."""
    import numpy as np

    from sip.augment.generate import DiffusionGenerator
    from sip.data.sources import ImageFolderSource

    sources = [s.image for s in ImageFolderSource(image_folder)][:2]
    settings = {"model": str(tiny_sd_dir), "device": "cpu", "steps": 4, "precision": "fp32"}
    eager = DiffusionGenerator.from_config(GenerateConfig(**settings)).img2img(sources, ["a", "b"], [1, 2])
    compiled = DiffusionGenerator.from_config(GenerateConfig(**settings, compile=True)).img2img(sources, ["a", "b"],
                                                                                                  [1, 2])
    for a, b in zip(eager, compiled):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
