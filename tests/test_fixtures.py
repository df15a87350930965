"""The shared fixtures themselves: offline, seeded, loadable through the public APIs, and as described."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import torch
from conftest import PHOTOS, TINY_TIMM_MODELS, build_tiny_sd
from PIL import Image


def test_environment_is_offline():
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[name] == "1"
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    # pytest-socket: a network attempt fails at once instead of hanging.
    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)socket"), pytest.warns(UserWarning, match="socket"):
        socket.create_connection(("huggingface.co", 443), timeout=30)
    assert time.monotonic() - start < 5


def test_tiny_sd_loads_with_diffusers_auto_pipeline(tiny_sd_dir):
    from diffusers import AutoPipelineForImage2Image, StableDiffusionImg2ImgPipeline

    assert (tiny_sd_dir / "model_index.json").is_file()
    assert (tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_sd_dir / "text_encoder" / "model.safetensors").is_file()
    pipe = AutoPipelineForImage2Image.from_pretrained(str(tiny_sd_dir))
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    assert pipe.vae_scale_factor == 2
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000


def test_tiny_sd_build_is_seeded(tiny_sd_dir, tmp_path):
    from safetensors.torch import load_file

    again = build_tiny_sd(tmp_path / "again")
    for part, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        a = load_file(tiny_sd_dir / part / f"{file}.safetensors")
        b = load_file(again / part / f"{file}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_tiny_sd_img2img_is_fast_and_seeded(tiny_sd_img2img):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    def run(seed):
        out = tiny_sd_img2img(prompt="a photo of a cat", image=image, strength=0.75, num_inference_steps=2,
                              guidance_scale=7.5, generator=torch.Generator().manual_seed(seed))
        return np.asarray(out.images[0])

    run(0)  # warm-up
    start = time.monotonic()
    first = run(0)
    assert time.monotonic() - start < 2.0  # ~0.1 s here; the bound leaves room for a loaded machine
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, run(0))
    assert not np.array_equal(first, run(1))


def test_tiny_sd_txt2img_default_size(tiny_sd_txt2img):
    out = tiny_sd_txt2img(prompt=["a cat", "a dog"], num_inference_steps=2,
                          generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]


def test_tiny_blip_loads_offline_and_captions(tiny_blip_dir, tiny_blip, photo_folder):
    from transformers import AutoProcessor, BlipForConditionalGeneration, BlipImageProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_blip_dir))
    assert isinstance(processor.image_processor, BlipImageProcessor)
    model = BlipForConditionalGeneration.from_pretrained(str(tiny_blip_dir)).eval()
    image = Image.open(photo_folder / "cat" / "chelsea.png").convert("RGB")
    inputs = processor(images=[image, image.transpose(Image.FLIP_LEFT_RIGHT)], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    ids = model.generate(**inputs, max_new_tokens=6)
    assert ids.dtype == torch.long and ids.shape[0] == 2
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    assert all(isinstance(c, str) for c in captions)
    assert "[DEC]" not in " ".join(captions)
    words = set(" ".join(captions).split())
    assert words <= set(processor.tokenizer.get_vocab())
    # the session-scoped loaded pair is the same model
    again = tiny_blip.model.generate(**inputs, max_new_tokens=6)
    assert torch.equal(ids, again)
    # a text prompt (conditional captioning) is accepted too
    prompted = processor(images=image, text="a photo of", return_tensors="pt")
    out = processor.batch_decode(model.generate(**prompted, max_new_tokens=3), skip_special_tokens=True)
    assert out[0].startswith("a photo of")


def test_tiny_blip_tokenizer_round_trip(tiny_blip):
    tok = tiny_blip.processor.tokenizer
    ids = tok("A photo of the cats")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of the cats"
    assert tok.convert_ids_to_tokens(tok("zebra")["input_ids"][1]) == "[UNK]"


@pytest.mark.parametrize("name", TINY_TIMM_MODELS)
def test_tiny_classifiers(make_tiny_classifier, name):
    model = make_tiny_classifier(name, num_classes=7)
    assert not model.training
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7)
    with torch.no_grad():
        assert torch.equal(y, make_tiny_classifier(name, num_classes=7)(x))  # seeded
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_tiny_classifier_default(tiny_classifier):
    assert tiny_classifier.num_classes == 10
    assert tiny_classifier.pretrained_cfg["architecture"] == "test_resnet"


def test_image_folder_contents(image_folder):
    root = image_folder.root
    assert os.fspath(image_folder) == str(root)
    assert sorted(p.name for p in root.iterdir()) == list(image_folder.classes)
    modes = {mode for _, mode, _ in image_folder.good.values()}
    assert {"RGB", "RGBA", "P", "L", "CMYK", "I;16"} <= modes
    suffixes = {p.rsplit(".", 1)[-1].lower() for p in image_folder.good}
    assert {"png", "jpg", "jpeg", "webp"} <= suffixes
    for rel, (label, mode, size) in image_folder.good.items():
        with Image.open(root / rel) as im:
            im.load()
            assert im.size == size, rel
            assert rel.startswith(label + "/")
    for rel in image_folder.corrupt:
        with pytest.raises((OSError, SyntaxError)):
            with Image.open(root / rel) as im:
                im.load()
    assert all((root / rel).is_file() for rel in image_folder.non_images)


def test_photo_folder(photo_folder):
    files = sorted(p.relative_to(photo_folder).as_posix() for p in photo_folder.rglob("*") if p.is_file())
    assert files == sorted(f"{label}/{name}" for label, (_, name) in PHOTOS.items())
    with Image.open(photo_folder / "cat" / "chelsea.png") as im:
        assert im.mode == "RGB" and max(im.size) == 128 and im.size[1] < 128
