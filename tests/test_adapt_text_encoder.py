"""sip adapt's finetune.text_encoder (issue 28): the text encoder trains with the UNet only when asked, in its own
parameter group at finetune.text_encoder_lr; the saved pipeline carries it for diffusers alone; a killed run resumes
to the same weights and optimiser state; other methods refuse the key."""

from __future__ import annotations

import json
import pytest
import torch

from sip.adapt.loop import CHECKPOINT_FILE, load_checkpoint
from sip.adapt.recipe import AdaptRecipe, FinetuneSettings, ValidationConfig
from sip.adapt.run import run_adapt
from sip.config import ConfigError, load_config
from test_adapt import _recipe, _shots

TEXT = FinetuneSettings(text_encoder=True, text_encoder_lr=5e-3)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return _shots(tmp_path_factory.mktemp("shots") / "train")


@pytest.fixture(scope="module")
def finetuned(tiny_sd_dir, shots, tmp_path_factory):
    """Two finished 4-step finetune runs: the text encoder frozen ("frozen") and trained ("text")."""
    root = tmp_path_factory.mktemp("finetuned")
    for name, settings in (("frozen", FinetuneSettings()), ("text", TEXT)):
        run_adapt(_recipe("finetune", tiny_sd_dir, shots, root / name, finetune=settings,
                          validation=ValidationConfig(every=0)))
    return {"frozen": root / "frozen", "text": root / "text"}


def _pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)  # diffusers alone, no sip


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_changes_only_when_the_key_is_on(finetuned, tiny_sd_dir):
    base = _pipeline(tiny_sd_dir)
    frozen, text = (_pipeline(finetuned[k] / "pipeline") for k in ("frozen", "text"))
    assert _same(frozen.text_encoder.state_dict(), base.text_encoder.state_dict())
    assert not _same(text.text_encoder.state_dict(), base.text_encoder.state_dict())
    for tuned in (frozen, text):  # the UNet trains either way
        assert not _same(tuned.unet.state_dict(), base.unet.state_dict())
    state, *_ = load_checkpoint(finetuned["frozen"] / CHECKPOINT_FILE)
    assert not any(k.startswith("text_encoder.") for k in state)  # the frozen run's checkpoint is the UNet alone


def test_saved_pipeline_carries_the_tuned_text_encoder(finetuned):
    state, optim, step, _ = load_checkpoint(finetuned["text"] / CHECKPOINT_FILE)
    pipe = _pipeline(finetuned["text"] / "pipeline")
    text = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    unet = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
    assert step == 4 and _same(pipe.text_encoder.state_dict(), text) and _same(pipe.unet.state_dict(), unet)
    # its own parameter group, at text_encoder_lr under the same schedule as lr
    unet_group, text_group = optim["param_groups"]
    assert text_group["lr"] / unet_group["lr"] == pytest.approx(TEXT.text_encoder_lr / 1e-3)
    assert len(text_group["params"]) == len(list(pipe.text_encoder.parameters()))
    info = json.loads((finetuned["text"] / "run.json").read_text())
    assert info["trained"] == ["unet", "text_encoder"] and info["config"]["finetune"]["text_encoder"] is True
    assert json.loads((finetuned["frozen"] / "run.json").read_text())["trained"] == ["unet"]
    assert "Trained: unet, text_encoder." in (finetuned["text"] / "README.md").read_text()
    # the tuned encoder conditions differently from the base's: the same prompt, other hidden states
    ids = pipe.tokenizer(["a photo of a red"], return_tensors="pt").input_ids
    base = _pipeline(finetuned["frozen"] / "pipeline").text_encoder
    with torch.no_grad():
        assert not torch.equal(pipe.text_encoder(ids)[0], base(ids)[0])


def test_resume_after_a_kill_gives_the_uninterrupted_weights(finetuned, tiny_sd_dir, shots, tmp_path):
    whole = load_checkpoint(finetuned["text"] / CHECKPOINT_FILE)
    cut = _recipe("finetune", tiny_sd_dir, shots, tmp_path / "cut", finetune=TEXT, validation=ValidationConfig(every=0))

    def kill_at_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt(cut, on_step=kill_at_3)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)[2] == 2
    run_adapt(cut)
    state, optim, step, info = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    assert step == 4 and _same(state, whole[0]) and info["losses"] == whole[3]["losses"]
    assert optim["param_groups"] == whole[1]["param_groups"]
    for i, moments in whole[1]["state"].items():  # AdamW's moments of every parameter, text encoder's included
        assert all(torch.equal(optim["state"][i][k], v) if isinstance(v, torch.Tensor) else optim["state"][i][k] == v
                   for k, v in moments.items())
    assert _same(_pipeline(tmp_path / "cut" / "pipeline").text_encoder.state_dict(),
                 _pipeline(finetuned["text"] / "pipeline").text_encoder.state_dict())


@pytest.mark.parametrize("override, message", [
    (["method=lora", "finetune.text_encoder=true"],
     "the finetune section .* is read by method finetune only; method is lora: remove it or set method: finetune "
     r"\(a LoRA on the text encoder is lora.text_encoder\)"),
    (["method=textual_inversion", "finetune.text_encoder=true"], "read by method finetune only; method is textual"),
    (["method=finetune", "finetune.text_encoder_lr=0.001"],
     "finetune.text_encoder_lr is read only when finetune.text_encoder is true"),
    (["method=finetune", "finetune.text_encoder=true", "finetune.text_encoder_lr=-1"],
     "finetune.text_encoder_lr must be a finite number > 0"),
])
def test_key_is_refused_where_it_does_not_apply(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(AdaptRecipe, None, override)


def test_resume_with_the_key_flipped_is_refused(finetuned, tiny_sd_dir, shots, tmp_path):
    import shutil

    out = shutil.copytree(finetuned["frozen"], tmp_path / "frozen")
    with pytest.raises(ValueError, match="keys finetune differ"):
        run_adapt(_recipe("finetune", tiny_sd_dir, shots, out, finetune=TEXT, validation=ValidationConfig(every=0)))
