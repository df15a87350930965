"""Prior preservation in sip adapt (sip.adapt.prior): the base model's own images of the prompts to keep are made
once, kept in the run folder, replayed every step (the model keeps denoising them better than the same fine-tuning
without them), and a resumed run reads them back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sip.adapt.recipe import AdaptRecipe, PriorConfig, ValidationConfig
from sip.adapt.run import run_adapt

from test_adapt import _recipe, _shots

pytest.importorskip("peft")
PRIOR = PriorConfig(prompts=["a photo of a green", "a photo of a square"], per_prompt=2, steps=3)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return _shots(tmp_path_factory.mktemp("shots") / "train")


def _prior_error(pipe_dir: Path, latents: torch.Tensor, prompts: list[str]) -> float:
    """The UNet's noise-prediction MSE on the prior latents with their prompts, at fixed timesteps and noise."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), safety_checker=None)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    z = latents * pipe.vae.config.scaling_factor
    noise = torch.randn(z.shape, generator=g)
    t = torch.linspace(100, 900, len(z)).long()
    ids = pipe.tokenizer([prompts[i // 2] for i in range(len(z))], padding="max_length", return_tensors="pt",
                         max_length=pipe.tokenizer.model_max_length, truncation=True).input_ids
    with torch.no_grad():
        pred = pipe.unet(sched.add_noise(z, noise, t), t, pipe.text_encoder(ids)[0]).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


def test_prior_images_are_made_once_replayed_and_keep_the_prompts_drawn_as_the_base_draws(tiny_sd_dir, shots,
                                                                                         tmp_path):
    from safetensors.torch import load_file

    from sip.adapt.loop import CHECKPOINT_FILE, load_checkpoint

    base = dict(steps=6, lr=3e-3, validation=ValidationConfig(every=0), checkpoint_every=3)
    with_prior = _recipe("finetune", tiny_sd_dir, shots, tmp_path / "prior", prior=PRIOR, **base)
    without = _recipe("finetune", tiny_sd_dir, shots, tmp_path / "plain", **base)
    run_adapt(with_prior)
    run_adapt(without)
    latents = load_file(str(tmp_path / "prior" / "prior.safetensors"))["latents"]
    assert latents.shape == (4, 4, 16, 16) and not (tmp_path / "plain" / "prior.safetensors").exists()
    card = (tmp_path / "prior" / "README.md").read_text()
    assert "## Prior preservation (weight 1.0)" in card and '- "a photo of a square"' in card
    # the same recipe draws the same prior images (seeded per prompt)
    again = _recipe("finetune", tiny_sd_dir, shots, tmp_path / "again", prior=PRIOR, **{**base, "steps": 1})
    run_adapt(again)
    assert torch.equal(load_file(str(tmp_path / "again" / "prior.safetensors"))["latents"], latents)

    # what the prior term does: the fine-tuned model still denoises the base model's own images of the prompts to
    # keep (its objective on them), better than the same fine-tuning on the shots alone
    kept = _prior_error(tmp_path / "prior" / "pipeline", latents, PRIOR.prompts)
    drifted = _prior_error(tmp_path / "plain" / "pipeline", latents, PRIOR.prompts)
    assert kept < drifted, (kept, drifted)

    # a killed run resumes with the prior file it made (not drawn again) and ends where the whole run ends
    cut = replace(with_prior, output=str(tmp_path / "cut"))

    def kill_at_4(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt(cut, on_step=kill_at_4)
    made = (tmp_path / "cut" / "prior.safetensors").stat().st_mtime_ns
    run_adapt(cut)
    assert (tmp_path / "cut" / "prior.safetensors").stat().st_mtime_ns == made
    a, _, _, _ = load_checkpoint(tmp_path / "prior" / CHECKPOINT_FILE)
    b, _, _, _ = load_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, match", [
    ({"prompts": ["a cat"], "per_prompt": 0}, "prior.prompts is read only when prior.per_prompt > 0"),
    ({"per_prompt": 2}, "prior.prompts is empty"),
    ({"prompts": ["a cat"], "per_prompt": 1, "weight": float("nan")}, "prior.weight must be"),
    ({"method": "textual_inversion"}, "textual inversion trains no model weight"),
])
def test_bad_prior_sections_are_refused(kwargs, match):
    method = kwargs.pop("method", "lora")
    with pytest.raises(ValueError, match=match):
        AdaptRecipe(method=method, prior=PriorConfig(**kwargs) if kwargs else PRIOR)
