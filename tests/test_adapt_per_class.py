"""One LoRA per class (sip adapt lora.per_class, DataDream's per-class setting): each class's LoRA learns from its
class's shots alone, diffusers loads each folder, a killed run resumes class by class, and sip synth draws each
class's images under that class's own LoRA."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sip.adapt.recipe import LoraSettings, ValidationConfig
from sip.adapt.run import run_adapt

from test_adapt import _plain, _recipe, _shots

pytest.importorskip("peft")
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return _shots(tmp_path_factory.mktemp("shots") / "train")  # classes blue, red (3 shots each)


def _recipe_pc(sd, shots, out, **kw):
    return _recipe("lora", sd, shots, out, lora=LoraSettings(rank=2, per_class=True),
                   validation=ValidationConfig(every=0), **kw)


@pytest.fixture(scope="module")
def per_class(tiny_sd_dir, shots, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pc") / "run"
    run_adapt(_recipe_pc(tiny_sd_dir, shots, out))
    return out


def test_each_class_gets_its_own_lora_from_its_own_shots(per_class, tiny_sd_dir, shots, tmp_path):
    from safetensors.torch import load_file

    info = json.loads((per_class / "run.json").read_text())
    assert info["finished"] and info["per_class"] == {"blue": "per_class/000-blue", "red": "per_class/001-red"}
    assert sorted(info["losses_by_class"]) == ["blue", "red"] and all(len(v) == 4 for v in info["losses_by_class"].values())
    weights = {c: load_file(str(per_class / rel / LORA_FILE)) for c, rel in info["per_class"].items()}
    assert sorted(weights["blue"]) == sorted(weights["red"])
    assert any(not torch.equal(weights["blue"][k], weights["red"][k]) for k in weights["blue"])
    # a class's LoRA learns from its own shots alone: other shots for blue leave red's LoRA as it was
    other = tmp_path / "other-blue"
    for f in sorted(shots.rglob("*.png")):
        (other / f.parent.name).mkdir(parents=True, exist_ok=True)
        (other / f.parent.name / f.name).write_bytes(f.read_bytes())
    Image.new("RGB", (32, 32), (0, 0, 90)).save(other / "blue" / "0.png")
    run_adapt(_recipe_pc(tiny_sd_dir, other, tmp_path / "run2"))
    again = {c: load_file(str(tmp_path / "run2" / rel / LORA_FILE)) for c, rel in info["per_class"].items()}
    assert all(torch.equal(again["red"][k], weights["red"][k]) for k in weights["red"])
    assert any(not torch.equal(again["blue"][k], weights["blue"][k]) for k in weights["blue"])
    assert "per_class/001-red" in (per_class / "README.md").read_text()
    # diffusers reads each class's folder and it changes the images
    base = _draw_blue(_plain(tiny_sd_dir))
    pipe = _plain(tiny_sd_dir)
    pipe.load_lora_weights(str(per_class / "per_class/000-blue"), weight_name=LORA_FILE)
    assert not np.array_equal(_draw_blue(pipe), base)


def _draw_blue(pipe) -> np.ndarray:
    return pipe("a photo of a blue", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_a_killed_per_class_run_resumes_class_by_class(tiny_sd_dir, shots, per_class, tmp_path):
    from sip.adapt.loop import CHECKPOINT_FILE, load_checkpoint

    cut = _recipe_pc(tiny_sd_dir, shots, tmp_path / "cut")
    seen: list[int] = []

    def kill_in_class_2(step, loss):
        seen.append(step)
        if len(seen) == 7:  # class 1 finished (4 steps), class 2 at step 3 (checkpoint at 2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt(cut, on_step=kill_in_class_2)
    info = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert not info["finished"] and info["per_class"] == {"blue": "per_class/000-blue"}
    assert info["class_in_progress"] == "red" and info["step"] == 2
    seen.clear()
    run_adapt(cut, on_step=lambda step, loss: seen.append(step))
    assert seen == [3, 4]  # blue is not trained again; red resumes from its checkpoint
    whole = json.loads((per_class / "run.json").read_text())["losses_by_class"]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["losses_by_class"] == whole
    for rel in ("per_class/000-blue", "per_class/001-red"):
        a, _, _, _ = load_checkpoint(per_class / rel / CHECKPOINT_FILE)
        b, _, _, _ = load_checkpoint(tmp_path / "cut" / rel / CHECKPOINT_FILE)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_synth_draws_each_class_under_its_own_lora(per_class, tiny_sd_dir, tmp_path):
    from sip.augment.run import SynthRecipe, run_synth
    from sip.config import load_config

    def synth(out, *extra):
        recipe = load_config(SynthRecipe, None, [f"output={out}", "classes=[blue, red]", f"generate.model={tiny_sd_dir}",
                                                 "generate.steps=2", "generate.per_class=2", "generate.device=cpu",
                                                 "generate.batch_size=4", "progress=false", *extra])
        assert run_synth(recipe).written == 4
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "train").rglob("*.png"))}

    both = synth(tmp_path / "both", f"generate.adapter={per_class}")
    plain = synth(tmp_path / "plain")
    assert all(both[k] != plain[k] for k in both)
    # a batch holding both classes draws each image as a batch of its class alone would (its own LoRA, its own seed)
    alone = synth(tmp_path / "alone", f"generate.adapter={per_class}", "generate.batch_size=1")
    assert alone == both
    with pytest.raises(ValueError, match="holds one LoRA per class"):
        synth(tmp_path / "mix", f"generate.adapter={per_class}", "latent_mix.mode=cutmix", "latent_mix.per_class=1")


def test_per_class_with_a_text_encoder_lora_is_refused():
    with pytest.raises(ValueError, match="lora.per_class with lora.text_encoder"):
        LoraSettings(per_class=True, text_encoder=True)
