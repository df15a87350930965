"""sip.models: offline CLIP tokenizer, diffusion pipeline loading, scheduler lookup, model-source errors,
and the real EfficientNet-Lite0 ImageNet weights."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sip.models.classifiers import imagenet_class_names, load_efficientnet_lite0
from sip.models.diffusion import (
    check_model_source,
    load_diffusion_pipeline,
    offline_clip_tokenizer,
    resolve_scheduler,
    write_clip_tokenizer,
)
from sip.runtime import resolve_device, resolve_dtype
from conftest import build_tiny_taesd

# --------------------------------------------------------------------------------------------------
# Offline CLIP tokenizer
# --------------------------------------------------------------------------------------------------

def test_offline_clip_tokenizer_full_vocabulary(tmp_path):
    tok = offline_clip_tokenizer(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).is_file()
    assert len(tok) == 49408  # OpenAI CLIP's vocabulary
    assert tok.model_max_length == 77
    ids = tok("a photo of a sneaker")["input_ids"]
    assert ids[0] == tok.bos_token_id == 49406 and ids[-1] == tok.eos_token_id == 49407
    assert len(ids) == 7  # every word is a single token in the full vocabulary
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a photo of a sneaker"
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_offline_clip_tokenizer_small_vocabulary(tmp_path):
    tok = offline_clip_tokenizer(tmp_path / "tok", num_merges=1000)
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    assert len(tok) == len(vocab) == 512 + 1000 + 2
    merges = (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1001
    text = "A Photo of a Sneaker, 2 Ankle-Boots!"
    ids = tok(text)["input_ids"]
    assert max(ids) < len(tok)
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a photo of a sneaker , 2 ankle - boots !"
    # the tokenizer that diffusers' pipelines use: padded / truncated to 77
    batch = tok(["a photo of a sneaker", "word " * 200], padding="max_length", truncation=True,
                max_length=tok.model_max_length, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 77)
    assert batch["input_ids"][1, -1] == tok.eos_token_id


def test_write_clip_tokenizer_custom_length(tmp_path):
    write_clip_tokenizer(tmp_path / "tok", num_merges=10, model_max_length=16)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.model_max_length == 16 and len(tok) == 512 + 10 + 2


# --------------------------------------------------------------------------------------------------
# Diffusion pipelines
# --------------------------------------------------------------------------------------------------

def test_load_diffusion_pipeline_img2img(tiny_sd_dir):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    pipe = load_diffusion_pipeline(str(tiny_sd_dir), mode="img2img", device="cpu")
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = pipe(prompt=["a cat", "a dog"], image=[image, image], strength=0.5, num_inference_steps=4,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]


def test_load_diffusion_pipeline_txt2img_with_scheduler(tiny_sd_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = load_diffusion_pipeline(str(tiny_sd_dir), mode="txt2img", device="cpu",
                                   scheduler="EulerDiscreteScheduler")
    assert type(pipe) is StableDiffusionPipeline
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # built from the checkpoint's config
    out = pipe(prompt="a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_load_diffusion_pipeline_bf16(tiny_sd_dir):
    pipe = load_diffusion_pipeline(str(tiny_sd_dir), mode="txt2img", device="cpu", dtype="bf16")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16


def test_load_diffusion_pipeline_bad_mode_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'img2img' or 'txt2img', got 'inpaint'"):
        load_diffusion_pipeline(str(tmp_path / "missing"), mode="inpaint")


def test_unknown_scheduler_lists_close_matches(tiny_sd_dir):
    close_match = r"unknown scheduler 'DDIMSchedular'\. Did you mean DDIMScheduler"
    with pytest.raises(ValueError, match=close_match) as e:
        load_diffusion_pipeline(str(tiny_sd_dir), scheduler="DDIMSchedular")
    assert "EulerDiscreteScheduler" in str(e.value)  # the full list follows
    no_close_match = r"unknown scheduler 'euler'\.(?! Did you mean) Valid: .*EulerDiscreteScheduler"
    with pytest.raises(ValueError, match=no_close_match):
        resolve_scheduler("euler")
    with pytest.raises(ValueError, match="unknown scheduler 'SchedulerMixin'"):
        resolve_scheduler("SchedulerMixin")
    from diffusers import DPMSolverMultistepScheduler

    assert resolve_scheduler("DPMSolverMultistepScheduler") is DPMSolverMultistepScheduler


def test_missing_model_folder_names_the_folder(tmp_path):
    missing = tmp_path / "models" / "my-sd"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        load_diffusion_pipeline(str(missing))
    assert f"folder {missing} does not exist" in str(info.value)
    assert "huggingface-cli download" in str(info.value)
    assert time.monotonic() - start < 5
    with pytest.raises(FileNotFoundError, match="folder .*does/not/exist does not exist"):
        check_model_source("./does/not/exist")


def test_hub_id_offline_without_cache_fails_fast():
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        load_diffusion_pipeline("sip-tests/no-such-model", mode="img2img")
    message = str(info.value)
    assert "'sip-tests/no-such-model' is a hub id" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download sip-tests/no-such-model" in message
    assert time.monotonic() - start < 10


def test_check_model_source_returns_existing_folder(tiny_sd_dir, monkeypatch):
    assert check_model_source(str(tiny_sd_dir)) == str(tiny_sd_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_model_source("org/name") == "org/name"  # online: left to from_pretrained


def test_resolve_dtype_and_device():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'half'; choose one of"):
        resolve_dtype("half")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
            resolve_device("cuda:0")


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0, real ImageNet weights
# --------------------------------------------------------------------------------------------------

def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[281] == "tabby" and names[285] == "Egyptian cat"


def test_efficientnet_lite0_recognises_a_cat():
    import skimage.data

    model = load_efficientnet_lite0()
    assert not model.training
    image = Image.fromarray(skimage.data.chelsea()).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    x = (x - 0.498) / 0.502
    with torch.no_grad():
        logits = model(x[None])
    assert logits.shape == (1, 1000)
    names = imagenet_class_names()
    top5 = [names[i] for i in logits[0].topk(5).indices]
    cats = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert cats & set(top5), top5
    assert names[int(logits[0].argmax())] in cats


@pytest.mark.parametrize("amx", [True, False])
def test_precision_auto_follows_torchs_amx_probe_in_every_stage(amx, monkeypatch, tiny_sd_img2img, tiny_classifier):
    """On AMX CPUs torch reports the capability "AVX512" (no "AMX"): every stage must ask the AMX probe."""
    from sip.augment.caption import ImageNetTopKCaptioner
    from sip.augment.generate import DiffusionGenerator, GenerateConfig
    from sip.models.classifiers import imagenet_class_names
    from sip.runtime import cpu_has_amx, resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    cpu = torch.device("cpu")
    want = "bf16" if amx else "fp32"
    assert cpu_has_amx() is amx and resolve_precision("auto", cpu) == want
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be auto, fp32, bf16 or fp16, got 'half'"):
        resolve_precision("half", cpu)
    assert resolve_precision("auto", cpu, large=False) == "fp32"  # small operators: fp32 even with AMX
    # a tiny UNet (far below AMX_MIN_UNET_PARAMS) stays fp32 under auto; bf16 when asked for
    assert DiffusionGenerator(tiny_sd_img2img, GenerateConfig(device="cpu"), model_id="tiny").bf16 is False
    assert DiffusionGenerator(tiny_sd_img2img, GenerateConfig(device="cpu", precision="bf16"), model_id="tiny").bf16
    names = imagenet_class_names()
    big = ImageNetTopKCaptioner(tiny_classifier, names, image_size=224, precision="auto")
    assert big.precision == want and big.identity.endswith(":bf16") is amx
    assert ImageNetTopKCaptioner(tiny_classifier, names, image_size=64, precision="auto").precision == "fp32"


# --------------------------------------------------------------------------------------------------
# LoRA and tiny-VAE paths (issue 31, finding 2): the key, what it needs, before the model loads
# --------------------------------------------------------------------------------------------------

def _generator_with(tmp_path, **paths):
    """Build a generator whose Stable Diffusion folder does not exist: a path error raised here came first."""
    from sip.augment.generate import DiffusionGenerator, GenerateConfig

    return DiffusionGenerator.from_config(GenerateConfig(model=str(tmp_path / "no-model"), device="cpu", **paths))


def test_a_lora_that_is_not_safetensors_names_the_key_before_the_model_loads(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a LoRA\n")
    with pytest.raises(ValueError, match=r"generate.lora: .*notes.txt is not a safetensors file.*takes a LoRA in "
                                         r"safetensors format"):
        _generator_with(tmp_path, lora=str(text))
    fake = tmp_path / "fake.safetensors"  # the right suffix, other bytes
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="generate.lora: .*fake.safetensors is not a safetensors file"):
        _generator_with(tmp_path, lora=str(fake))


def test_a_model_weights_file_is_not_taken_for_a_lora(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2), "conv_in.bias": torch.zeros(2)}, str(weights))
    with pytest.raises(ValueError, match="holds 2 tensors, none of them LoRA weights"):
        _generator_with(tmp_path, lora=str(weights))
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a", "b"):
        save_file({"lora_A.weight": torch.zeros(2, 2)}, str(folder / f"{name}.safetensors"))
    with pytest.raises(FileNotFoundError, match="generate.lora: folder .*two holds 2 .safetensors files, not one"):
        _generator_with(tmp_path, lora=str(folder))


def test_the_shipped_model_as_tiny_vae_is_refused_with_a_hint_that_works(tmp_path):
    """sip's own hint named the shipped pipeline, which AutoencoderTiny cannot load (OSError: no config.json)."""
    from sip.models.diffusion import DEFAULT_SD_MODEL

    with pytest.raises(ValueError) as info:
        _generator_with(tmp_path, tiny_vae=DEFAULT_SD_MODEL)
    message = str(info.value)
    assert message.startswith(f"generate.tiny_vae: {DEFAULT_SD_MODEL} holds a pipeline whose vae/ is an "
                              "AutoencoderKL, not an AutoencoderTiny")
    assert "madebyollin/taesd" in message and "leave generate.tiny_vae null" in message
    with pytest.raises(FileNotFoundError) as info:
        _generator_with(tmp_path, tiny_vae=str(tmp_path / "taesd"))
    assert "generate.tiny_vae: tiny VAE folder" in str(info.value) and DEFAULT_SD_MODEL not in str(info.value)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(ValueError, match="generate.tiny_vae: .*notes.txt is a file, not a model folder"):
        _generator_with(tmp_path, tiny_vae=str(notes))
    with pytest.raises(ValueError, match="holds an AutoencoderKL, not an AutoencoderTiny"):
        _generator_with(tmp_path, tiny_vae=f"{DEFAULT_SD_MODEL}/vae")


def test_a_pipeline_folder_whose_vae_is_tiny_is_a_tiny_vae(tmp_path):
    from sip.models.diffusion import load_tiny_vae

    tiny = build_tiny_taesd()
    tiny.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderTiny"]}))
    loaded = load_tiny_vae(str(tmp_path / "pipe"), device="cpu")
    assert type(loaded).__name__ == "AutoencoderTiny"
    assert torch.equal(loaded.decoder.layers[0].weight, tiny.decoder.layers[0].weight)


def test_model_hints_name_a_model_of_the_kind_asked_for(tmp_path):
    from sip.models.diffusion import DEFAULT_SD_MODEL

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="only config.json .a single model, not a pipeline."):
        load_diffusion_pipeline(str(tmp_path / "unet"))  # was a traceback from diffusers
    with pytest.raises(FileNotFoundError) as info:
        check_model_source(str(tmp_path / "blip"), "captioner")
    assert "Salesforce/blip-image-captioning-base" in str(info.value) and DEFAULT_SD_MODEL not in str(info.value)
