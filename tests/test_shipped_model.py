"""The embedded default: sip's own Stable Diffusion, shipped in the repository."""

from pathlib import Path

import numpy as np
import torch

from sip.data.sources import FashionMNISTSource
from sip.models.diffusion import DEFAULT_SD_MODEL


def test_the_shipped_model_is_small_and_in_diffusers_layout():
    folder = Path(DEFAULT_SD_MODEL)
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json", "README.md"):
        assert (folder / part).is_file(), part
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt")), "weights must be safetensors"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_loads_offline_through_diffusers_own_classes_and_runs_img2img():
    from diffusers import AutoPipelineForImage2Image, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(DEFAULT_SD_MODEL)
    auto = AutoPipelineForImage2Image.from_pretrained(DEFAULT_SD_MODEL)
    assert type(auto).__name__ == "StableDiffusionImg2ImgPipeline"
    pipe.set_progress_bar_config(disable=True)
    source = FashionMNISTSource("test", shots=1, seed=0, size=32).sample(0).image
    out = pipe("a photo of a t-shirt", image=source, strength=0.5, num_inference_steps=2, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()
    # a real image goes in, an image comes out that still resembles it (not noise): the VAE works
    src = np.asarray(source, dtype=np.float32) / 255.0
    assert np.abs(out - src).mean() < 0.25


def test_the_shipped_few_step_model_shares_the_teachers_parts_and_redraws_in_four_steps():
    from diffusers import AutoPipelineForImage2Image

    from sip.models.diffusion import SHIPPED_MODELS_DIR

    folder, teacher = SHIPPED_MODELS_DIR / "fmnist-tiny-lcm", Path(DEFAULT_SD_MODEL)
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (folder / part).read_bytes() == (teacher / part).read_bytes(), part
    assert (folder / "unet/diffusion_pytorch_model.safetensors").read_bytes() != \
        (teacher / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    pipe = AutoPipelineForImage2Image.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    pipe.set_progress_bar_config(disable=True)
    source = FashionMNISTSource("test", shots=1, seed=0, size=32).sample(0).image
    out = pipe("a photo of a t-shirt", image=source, strength=0.5, num_inference_steps=4, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()
    assert np.abs(out - np.asarray(source, dtype=np.float32) / 255.0).mean() < 0.25
