"""The models and the img2img work scripts/bench_generate.py runs: the shipped model on Fashion-MNIST sources,
a Stable Diffusion 1.5-architecture pipeline with random weights on real photos; jobs carry sip's prompts and
per-image seeds."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from sip.augment.generate import fit_image
from sip.augment.loop import Job
from sip.augment.prompts import PromptBuilder, PromptConfig
from sip.data.fashion_mnist import FashionMNISTSource
from sip.ids import image_seed, variant_id
from sip.models.diffusion import DEFAULT_SD_MODEL, offline_clip_tokenizer

REPO = Path(__file__).resolve().parents[2]
TRAINING_OUTPUT = REPO / ".cache" / "fmnist-tiny-sd"

# Real photos that ship with scikit-image / scikit-learn (no download), with a caption each.
PHOTOS = [
    ("cat", "skimage:chelsea", "a tabby cat looking to the side"),
    ("coffee", "skimage:coffee", "a cup of coffee on a saucer"),
    ("person", "skimage:astronaut", "an astronaut in a white suit next to a flag"),
    ("rocket", "skimage:rocket", "a rocket on a launch pad"),
    ("building", "sklearn:china.jpg", "a temple with a red roof among trees"),
    ("flower", "sklearn:flower.jpg", "a pink flower in close up"),
]
FMNIST_WORDS = ["plain", "striped", "dark", "light", "long", "short", "wide", "narrow", "soft", "worn"]


def resolve_tiny_model(name: str | None) -> str:
    """``--model``, else the shipped model, else the training script's output folder."""
    if name:
        return name
    if (Path(DEFAULT_SD_MODEL) / "model_index.json").is_file():
        return DEFAULT_SD_MODEL
    if (TRAINING_OUTPUT / "model_index.json").is_file():
        return str(TRAINING_OUTPUT)
    raise SystemExit(f"no shipped model yet: neither {DEFAULT_SD_MODEL} nor {TRAINING_OUTPUT} has a "
                     f"model_index.json (train it with scripts/train_tiny_sd.py, or pass --model FOLDER, "
                     f"or --skip-tiny)")


def sd15_unet():
    """SD 1.5's UNet architecture with random weights: UNet2DConditionModel's defaults are SD 1.5's blocks
    (320/640/1280/1280, 2 layers, 8 heads); SD 1.5 sets sample_size 64 (512 px) and cross-attention 768 (CLIP
    ViT-L/14's width)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()


def random_taesd():
    """An AutoencoderTiny of TAESD's architecture (``madebyollin/taesd``) with seeded random weights: its cost does
    not depend on them."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny().eval()


def build_sd15(work: Path, seed: int = 0):
    """A Stable Diffusion 1.5-architecture img2img pipeline with random weights, built in memory."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = offline_clip_tokenizer(work / "clip-tokenizer")  # full 49,408-token CLIP vocabulary
    torch.manual_seed(seed)
    unet = sd15_unet()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(),
                                          tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_photo(spec: str) -> Image.Image:
    """``"skimage:<name>"`` or ``"sklearn:<file>"`` → that bundled photo as RGB."""
    kind, name = spec.split(":")
    if kind == "skimage":
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name)).convert("RGB")


def source_jobs(key: str, label: str, image: Image.Image, caption: str, per_image: int,
                builder: PromptBuilder) -> list[Job]:
    """``per_image`` variants of one source: sip's prompt for (label, caption) and seed for (``key``, variant)."""
    return [Job(variant_id(key, v), label, builder(label, caption, v), image_seed(0, key, v), {}, payload=image)
            for v in range(per_image)]


def photo_jobs(n_sources: int, per_image: int, size: int, pipe) -> list[Job]:
    builder = PromptBuilder.for_tokenizer(PromptConfig(), pipe.tokenizer)
    jobs: list[Job] = []
    for label, spec, caption in (PHOTOS * (1 + n_sources // len(PHOTOS)))[:n_sources]:
        image = fit_image(load_photo(spec), size, "center-crop")  # both paths get the same size×size pixels
        jobs += source_jobs(f"{spec}/{len(jobs)}", label, image, caption, per_image, builder)
    return jobs


def fmnist_jobs(n_sources: int, per_image: int, size: int, pipe) -> list[Job]:
    builder = PromptBuilder.for_tokenizer(PromptConfig(), pipe.tokenizer)
    source = FashionMNISTSource("train", start=50000, size=size)
    jobs: list[Job] = []
    w = len(FMNIST_WORDS)
    for i in range(n_sources):
        s = source.sample(i)
        caption = f"a {FMNIST_WORDS[i % w]} {FMNIST_WORDS[(i // w) % w]} one"  # distinct per source
        jobs += source_jobs(s.source_id, s.label_name, fit_image(s.image, size, "resize"), caption, per_image,
                            builder)
    return jobs
