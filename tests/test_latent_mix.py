"""sip.augment.latent_mix: latent CutMix / mixup of two classes before decoding through sip synth — share 0 gives
the unmixed bytes, the mix and its soft label (or the teacher's label) are in the metadata, bad values are refused."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from torch import nn

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.guidance import GuideClassifier
from sip.augment.latent_mix import LatentMixConfig, MixDraw, decode_latents, draw_mix, mix_latents
from sip.augment.run import SynthRecipe, run_synth
from sip.augment.variants import InterclassLabeller, Teaching
from sip.data.bank import read_metadata

CLASSES = ["cat", "dog", "bird"]
GEN = {"steps": 3, "per_class": 1, "batch_size": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def generator(tiny_sd_img2img):
    return DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**GEN), model_id="tiny")


def png(images) -> list[bytes]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def synth(out, batch_size: int = 4, **mix) -> SynthRecipe:
    return SynthRecipe(classes=CLASSES, generate=GenerateConfig(**{**GEN, "batch_size": batch_size}), output=str(out),
                       progress=False, latent_mix=LatentMixConfig(**mix))


def digests(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "train").rglob("*.png"))}


def test_decoding_the_latents_gives_the_pipelines_own_bytes(generator):
    latents = generator.text2img(["a cat", "a dog"], [3, 4], output_type="latent")
    assert png(decode_latents(generator, torch.stack(latents))) == png(generator.text2img(["a cat", "a dog"], [3, 4]))


@pytest.mark.parametrize("mode", ["cutmix", "mixup"])
def test_a_zero_share_gives_the_unmixed_bytes_and_a_positive_one_changes_them(generator, tmp_path, mode):
    # batches of 2: each grid batch holds one plain and one mixed image (class A's image 0 and 1)
    run_synth(synth(tmp_path / "zero", 2, mode=mode, lam=0.0), generator)
    run_synth(synth(tmp_path / "half", 2, mode=mode, lam=0.5), generator)
    rows = {r["file_name"]: r for r in read_metadata(tmp_path / "zero")}
    mixed = [r for r in rows.values() if r.get("latent_mix")]
    assert len(rows) == 3 * 2 and len(mixed) == 3  # per_class 1 plain + 1 mixed per class
    # each mixed image at share 0 is A's own txt2img image at its seed (drawn alone, as in its batch)
    plain = [im for r in mixed for im in generator.text2img([r["prompt"]], [r["seed"]])]
    files = [(tmp_path / "zero" / "train" / r["file_name"]).read_bytes() for r in mixed]
    assert [hashlib.sha256(b).digest() for b in files] == [hashlib.sha256(b).digest() for b in png(plain)]
    # plain images are the same in both runs; mixed ones differ at share 0.5
    zero, half = digests(tmp_path / "zero"), digests(tmp_path / "half")
    names = {r["file_name"].split("/")[-1]: bool(r.get("latent_mix")) for r in rows.values()}
    assert all((zero[n] != half[n]) == is_mixed for n, is_mixed in names.items())


def test_mixed_images_record_the_mix_and_its_soft_label(generator, tmp_path):
    run_synth(synth(tmp_path / "out", mode="cutmix", alpha=0.7, per_class=2), generator)
    rows = read_metadata(tmp_path / "out")
    mixed = [r for r in rows if r.get("latent_mix")]
    assert len(rows) == 3 * 3 and len(mixed) == 3 * 2
    for r in mixed:
        m, a = r["latent_mix"], r["source_label"]
        assert m["mode"] == "cutmix" and m["partner"] in CLASSES and m["partner"] != a
        top, left, bh, bw = m["box"]
        assert m["lam"] == round(bh * bw / 16**2, 4)  # the box's exact share of the 16x16 latent
        assert r["soft_label"] == {a: round(1 - m["lam"], 4), m["partner"]: m["lam"]}
        assert r["label"] == (m["partner"] if m["lam"] > 0.5 else a)
        assert m["partner_prompt"] != r["prompt"] and m["partner"] in m["partner_prompt"]
    # drawn from (seed, class, k) alone: a second run writes the same bytes
    run_synth(synth(tmp_path / "again", mode="cutmix", alpha=0.7, per_class=2), generator)
    assert digests(tmp_path / "again") == digests(tmp_path / "out")


def test_with_a_teacher_mixed_images_take_its_label(generator, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 3))
    with torch.no_grad():
        net[-1].weight.mul_(30)
    teacher = GuideClassifier(net, CLASSES, {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3}, "t")
    run_synth(synth(tmp_path / "out", mode="mixup", lam=0.5), generator,
              teaching=Teaching(None, None, InterclassLabeller(teacher)))
    from PIL import Image

    mixed = [r for r in read_metadata(tmp_path / "out") if r.get("latent_mix")]
    images = [Image.open(tmp_path / "out" / "train" / r["file_name"]).convert("RGB") for r in mixed]
    assert [r["label"] for r in mixed] == [CLASSES[i] for i in teacher.predict(images).argmax(-1).tolist()]
    assert all(r["label_by"] == "teacher" and abs(sum(r["soft_label"].values()) - 1) < 1e-2 for r in mixed)


def test_mix_latents_cutmix_pastes_the_box_and_mixup_blends():
    a, b = torch.zeros(4, 8, 8), torch.ones(4, 8, 8)
    cut = mix_latents(a, b, MixDraw("dog", 1, 0.25, (2, 3, 4, 4)))
    assert cut.sum() == 4 * 16 and cut[:, 2:6, 3:7].eq(1).all()
    assert mix_latents(a, b, MixDraw("dog", 1, 0.3, None)).allclose(torch.full((4, 8, 8), 0.3))
    assert mix_latents(a, b, MixDraw("dog", 1, 0.0, None)) is a


def test_the_draw_is_a_function_of_seed_class_and_index():
    cfg = LatentMixConfig(mode="cutmix", alpha=0.5)
    first = draw_mix(cfg, CLASSES, "cat", 3, 0, (16, 16))
    assert draw_mix(cfg, CLASSES, "cat", 3, 0, (16, 16)) == first
    assert {draw_mix(cfg, CLASSES, "cat", k, 0, (16, 16)) for k in range(8)} != {first}
    assert all(draw_mix(cfg, CLASSES, "cat", k, 0, (16, 16)).partner != "cat" for k in range(20))


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "blend"}, "latent_mix.mode must be one of cutmix, mixup"),
    ({"mode": "mixup", "alpha": 0.0}, "latent_mix.alpha must be a finite number > 0"),
    ({"mode": "mixup", "alpha": float("nan")}, "latent_mix.alpha must be a finite number > 0"),
    ({"mode": "cutmix", "per_class": 0}, "latent_mix.per_class must be >= 1"),
    ({"mode": "cutmix", "lam": 1.5}, r"latent_mix.lam must be in \[0, 1\]"),
    ({"mode": "cutmix", "lam": 0.5, "alpha": 2.0}, "set one of them"),
    ({"lam": 0.5}, "latent_mix.mode is null"),
])
def test_bad_latent_mix_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentMixConfig(**kwargs)


def test_latent_mix_needs_two_classes_and_the_local_engine(generator, tmp_path):
    with pytest.raises(ValueError, match="at least two classes"):
        run_synth(SynthRecipe(classes=["cat"], generate=GenerateConfig(**GEN), output=str(tmp_path / "o"),
                              progress=False, latent_mix=LatentMixConfig(mode="mixup")), generator)
    with pytest.raises(ValueError, match="engine ray does not draw them"):
        SynthRecipe(classes=CLASSES, engine="ray", latent_mix=LatentMixConfig(mode="mixup"))


def test_the_recipe_key_reaches_the_run(tmp_path):
    from sip.config import load_config

    path = tmp_path / "r.yaml"
    path.write_text("classes: [cat, dog]\nlatent_mix: {mode: cutmix, alpha: 0.4, per_class: 3}\n")
    cfg = load_config(SynthRecipe, path, [])
    assert cfg.latent_mix == LatentMixConfig(mode="cutmix", alpha=0.4, per_class=3)
    from sip.augment.jobs import synth_grid

    assert sum(len(b) for b in synth_grid(["cat", "dog"], cfg)) == 2 * (cfg.generate.per_class + 3)
