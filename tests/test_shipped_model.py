"""The embedded default: sip's own Stable Diffusion, shipped in the repository.

img2img at strength 0.5 must redraw *its own* source: each output is compared with its source, with the other
sources (a shuffled pairing), with an all-black image and with the source's constant mean grey. Measured on the
6 test images here (mean |out - src|): teacher 0.023 (black 0.28, shuffled 0.28), few-step model 0.12; an
all-black, constant or shuffled output fails every bound below."""

from pathlib import Path

import numpy as np
import torch

from sip.data.sources import FashionMNISTSource
from sip.models.diffusion import DEFAULT_SD_MODEL

N_SOURCES = 6


def redraw(pipe, steps: int, guidance: float) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, sources) of img2img at strength 0.5 on the first test images, in [0, 1], shape (n, 32, 32, 3)."""
    data = FashionMNISTSource("test", size=32)
    samples = [data.sample(i) for i in range(N_SOURCES)]
    out = pipe([f"a photo of a {s.label_name}" for s in samples], image=[s.image for s in samples], strength=0.5,
               num_inference_steps=steps, guidance_scale=guidance,
               generator=[torch.Generator().manual_seed(i) for i in range(N_SOURCES)], output_type="np").images
    src = np.stack([np.asarray(s.image, dtype=np.float32) / 255.0 for s in samples])
    assert out.shape == (N_SOURCES, 32, 32, 3) and np.isfinite(out).all()
    return out, src


def resemblance(out: np.ndarray, src: np.ndarray) -> dict[str, float]:
    """Mean |d| to the own source, to a shuffled source, of an all-black output; correlation own vs shuffled."""
    shuffled = np.roll(src, 1, axis=0)

    def corr(a, b):
        return float(np.mean([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]))

    return {"own": float(np.abs(out - src).mean()), "shuffled": float(np.abs(out - shuffled).mean()),
            "black": float(np.abs(src).mean()), "corr_own": corr(out, src), "corr_shuffled": corr(out, shuffled)}


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
    # one denoising step at strength 0.5: each output is its own source redrawn (the VAE and UNet work)
    r = resemblance(*redraw(pipe, steps=2, guidance=4.0))
    assert r["own"] < 0.06 and r["own"] < 0.25 * r["black"] and r["own"] < 0.25 * r["shuffled"], r
    assert r["corr_own"] > 0.95 and r["corr_own"] > r["corr_shuffled"] + 0.3, r


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
    # two LCM steps redraw more freely than the teacher's one DDIM step, and still keep each source's shape
    r = resemblance(*redraw(pipe, steps=4, guidance=1.0))
    assert r["own"] < 0.5 * r["black"] and r["own"] < 0.6 * r["shuffled"], r
    assert r["corr_own"] > 0.6 and r["corr_own"] > r["corr_shuffled"] + 0.2, r
