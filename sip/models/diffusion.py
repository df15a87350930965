"""Diffusion models from a hub id or a local folder: diffusers pipelines, tiny VAEs, LoRAs, schedulers, and
the offline CLIP tokenizer that backs sip's shipped model.

Stages never load models themselves; they take what these functions return. Every loader accepts a
hub id *or* a folder and, when neither can be found, says which folder was looked for and how to get
the weights on a machine with network.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import torch

from sip.runtime import resolve_device, resolve_dtype

# The model this project trains and ships (see sip/models/fmnist-tiny-sd/README.md).
SHIPPED_MODELS_DIR = Path(__file__).parent
DEFAULT_SD_MODEL = str(SHIPPED_MODELS_DIR / "fmnist-tiny-sd")


def looks_like_path(name: str) -> bool:
    """A model name is a path when it starts like one or exists; else it is a hub id (``org/name``)."""
    return name.startswith((".", "/", "~")) or os.path.sep in name.strip("/").split("/", 2)[-1] or Path(name).exists()


# a hub id that works for each kind of model a key takes, named in the hints (sip ships only a Stable Diffusion model)
MODEL_EXAMPLES = {"Stable Diffusion model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                  "captioner": "Salesforce/blip-image-captioning-base", "CLIP model": "openai/clip-vit-base-patch32",
                  "tiny VAE": "madebyollin/taesd", "LoRA": "latent-consistency/lcm-lora-sdv1-5"}


def _example(what: str) -> str:
    """How to get a model of kind ``what``: a hub id of that kind, and the shipped folder for Stable Diffusion."""
    hub = next((v for k, v in MODEL_EXAMPLES.items() if what.startswith(k)), "<org>/<name>")
    shipped = f", or the shipped {DEFAULT_SD_MODEL}" if what.startswith("Stable Diffusion") else ""
    return f"a hub id such as {hub} (`huggingface-cli download {hub} --local-dir DIR` on a machine with network){shipped}"


def check_model_source(name: str, what: str = "model") -> str:
    """Fail early for a model folder that does not exist, or a hub id while offline with no cache.

    Returns the name (expanded when a path) to hand to ``from_pretrained``.
    """
    path = Path(name).expanduser()
    if path.exists():
        check_pipeline_folder(path, what)
        return str(path)
    if looks_like_path(name) or name.count("/") > 1:
        raise FileNotFoundError(f"{what} folder {path} does not exist. Pass a folder written by save_pretrained, or "
                                f"{_example(what)}.")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(name, local_files_only=True)
        except Exception as e:
            raise FileNotFoundError(
                f"{what} {name!r} is a hub id, but HF_HUB_OFFLINE is set and it is not in the local cache. "
                f"Download it on a machine with network (`huggingface-cli download {name}`), or pass a local "
                f"folder" + (f"; the shipped default is {DEFAULT_SD_MODEL}." if what.startswith("Stable") else ".")
            ) from e
    return name


def check_pipeline_folder(path: Path, what: str = "model") -> None:
    """A diffusers pipeline folder (``model_index.json``) must hold every component it lists; a Stable Diffusion
    model must be a pipeline, other models (captioner, CLIP) a single model's folder (``config.json``).

    Raises:
        FileNotFoundError: naming the folder, the missing component(s) and how to get a whole model.
    """
    index = path / "model_index.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} is a file, not a model folder; pass a folder written by "
                                f"save_pretrained, or {_example(what)}")
    if not index.is_file():
        if (path / "config.json").is_file() and not what.startswith("Stable Diffusion"):
            return  # a single model (a captioner, a CLIP model), not a pipeline
        found = "only config.json (a single model, not a pipeline)" if (path / "config.json").is_file() else \
            "no model_index.json (nor config.json)"
        raise FileNotFoundError(f"{what} folder {path} has {found}: it is not a diffusers pipeline. Pass a folder "
                                f"written by save_pretrained, or {_example(what)}.")
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{what} folder {path}: {index} is unreadable ({e}); re-download the model") from e
    missing = [k for k, v in components.items()
               if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None
               and not (path / k).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{what} folder {path} is incomplete: missing {', '.join(f'{m}/' for m in missing)} (listed in "
            f"model_index.json). Copy or download the whole model (`huggingface-cli download <id> --local-dir "
            f"{path}` on a machine with network), or pass {_example(what)}.")


# --------------------------------------------------------------------------------------------------
# Offline CLIP tokenizer
# --------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte → printable-unicode table (same as GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(save_dir: str | Path, num_merges: int | None = None, model_max_length: int = 77) -> Path:
    """Write a ``CLIPTokenizer`` (vocab.json, merges.txt, configs) from the CLIP BPE vocabulary that
    ships inside ``open_clip_torch``; no hub access needed.

    Args:
        save_dir (str | Path): folder to write (loadable with ``CLIPTokenizer.from_pretrained``).
        num_merges (int, optional): keep only the first N BPE merges (a smaller vocabulary for a small
            text encoder; words outside it split into more pieces, nothing is lost). Defaults to all
            48,894 merges (vocabulary 49,408, the one of OpenAI's CLIP).
        model_max_length (int, optional): the tokenizer's length limit. Defaults to 77.
    """
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    if num_merges is not None:
        merges = merges[:num_merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")
    (save_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}), encoding="utf-8")
    (save_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "errors": "replace"}), encoding="utf-8")
    return save_dir


def offline_clip_tokenizer(save_dir: str | Path, num_merges: int | None = None, model_max_length: int = 77):
    """Write (see :func:`write_clip_tokenizer`) and load a ``transformers.CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(save_dir, num_merges, model_max_length)
    return CLIPTokenizer.from_pretrained(str(save_dir))


# --------------------------------------------------------------------------------------------------
# Diffusion pipelines
# --------------------------------------------------------------------------------------------------

def load_diffusion_pipeline(name: str = DEFAULT_SD_MODEL, mode: str = "img2img", dtype: str = "float32",
                            device: str = "auto", scheduler: str | None = None) -> Any:
    """Load any Stable Diffusion family checkpoint (SD 1.x/2.x, SDXL, SD-Turbo, or sip's shipped
    model) through diffusers' auto pipelines.

    Args:
        name (str): hub id or folder in diffusers' ``save_pretrained`` layout. Defaults to the shipped model.
        mode ("img2img" | "txt2img"): which auto pipeline. Defaults to "img2img".
        dtype (str): weights dtype ("float32", "bfloat16", "float16"). Defaults to "float32": the
            generator's bf16 *autocast* (``precision: auto`` on CUDA and AMX CPUs) gets the speed and
            keeps fp32 weights; bf16/fp16 weights also halve memory on a GPU.
        device (str): "auto", "cpu", "cuda", "cuda:1" … Defaults to "auto".
        scheduler (str, optional): a diffusers scheduler class name (e.g. "DDIMScheduler",
            "EulerDiscreteScheduler", "DPMSolverMultistepScheduler") built from the checkpoint's
            scheduler config. Defaults to the checkpoint's own.
    """
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    if mode not in ("img2img", "txt2img"):
        raise ValueError(f"mode must be 'img2img' or 'txt2img', got {mode!r}")
    sched_cls = resolve_scheduler(scheduler) if scheduler else None
    source = check_model_source(name, "Stable Diffusion model (generate.model)")
    auto = AutoPipelineForImage2Image if mode == "img2img" else AutoPipelineForText2Image
    pipe = auto.from_pretrained(source, **{_dtype_kwarg(): resolve_dtype(dtype)})
    if sched_cls is not None:
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


@torch.no_grad()
def check_decoder_fits(vae: Any, decoder_vae: Any) -> None:
    """A replacement decoder must take the VAE's latents and give images of the VAE's size."""
    channels = int(vae.config.latent_channels)
    if int(decoder_vae.config.latent_channels) != channels:
        raise ValueError(f"tiny_vae takes {decoder_vae.config.latent_channels}-channel latents but the model's VAE "
                         f"makes {channels}-channel ones; use the tiny VAE trained for this model family "
                         f"(madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL)")
    param = next(decoder_vae.parameters())
    z = torch.zeros(1, channels, 2, 2, device=param.device, dtype=param.dtype)
    scales = [int(m.decode(z.to(next(m.parameters()).dtype)).sample.shape[-1]) // 2 for m in (vae, decoder_vae)]
    if scales[0] != scales[1]:
        raise ValueError(f"tiny_vae upsamples latents {scales[1]}x but the model's VAE {scales[0]}x; use the tiny "
                         f"VAE trained for this model family")


def has_guidance_embedding(unet: Any) -> bool:
    """A UNet that takes the guidance scale as an input (LCM checkpoints: ``time_cond_proj_dim``)."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


def runs_cfg(unet: Any, guidance_scale: float) -> bool:
    """Whether a pipeline runs classifier-free guidance (a second, unconditional UNet branch) at this scale.

    Not when the scale is <= 1, nor for a UNet that takes the scale as an input (LCM checkpoints: a guidance
    embedding, ``time_cond_proj_dim``): diffusers feeds it the scale and runs one branch.
    """
    return guidance_scale > 1 and not has_guidance_embedding(unet)


def few_step_advice(pipe: Any, steps: int, guidance_scale: float, cache_interval: int = 1) -> str | None:
    """A hint when a few-step model (LCMScheduler; guidance baked into its UNet) is run like a 30-step one."""
    if type(pipe.scheduler).__name__ != "LCMScheduler":
        return None
    if cache_interval > 1:  # measured: LCM 8 steps + DeepCache 2 preserved 64.5% of labels vs 94.2% without
        return ("generate.cache_interval > 1 with a few-step LCMScheduler model: with 1-8 steps no step's features "
                "are close enough to the next one's to reuse (it costs ~30 points of label preservation on the "
                "shipped model); set generate.cache_interval: 1")
    baked = not has_guidance_embedding(pipe.unet)
    if steps > 8 or (baked and guidance_scale > 1):
        return (f"{type(pipe.scheduler).__name__} samples in 1-8 steps"
                + (" with guidance_scale 1 (this UNet has its guidance baked in)" if baked else "")
                + f"; got steps={steps}, guidance_scale={guidance_scale}: set generate.steps: 4"
                + (", generate.guidance_scale: 1" if baked else ""))
    return None


def lora_source(name: str) -> tuple[str, dict[str, Any]]:
    """Where ``generate.lora`` points: ``(source, kwargs)`` for ``load_lora_weights``, checked before any model loads.

    Args:
        name (str): a hub id, a folder holding one ``*.safetensors`` LoRA file, or that file.

    Raises:
        FileNotFoundError: the path does not exist, or a folder holds no or several ``.safetensors`` files.
        ValueError: the file is not a safetensors file, or holds no LoRA weights.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"generate.lora: folder {path} holds {len(files)} .safetensors files, not one; pass "
                                    f"the LoRA file itself (generate.lora: {path}/<name>.safetensors)")
        path = files[0]
    if path.is_file():
        _check_lora_file(path)
        return str(path.parent), {"weight_name": path.name}
    if looks_like_path(name) or name.count("/") > 1:
        raise FileNotFoundError(f"generate.lora: {path} does not exist; pass a .safetensors LoRA file, a folder holding "
                                f"one, or a hub id such as latent-consistency/lcm-lora-sdv1-5")
    return check_model_source(name, "LoRA (generate.lora)"), {}


def _check_lora_file(path: Path) -> None:
    """A LoRA file is a safetensors file whose tensor names say LoRA (``lora_A`` / ``lora_down`` / ``lora.up`` …)."""
    from safetensors import SafetensorError, safe_open

    need = ("generate.lora takes a LoRA in safetensors format (diffusers' save_lora_weights, or a kohya / "
            "A1111 .safetensors LoRA), e.g. latent-consistency/lcm-lora-sdv1-5")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"generate.lora: {path} is not a safetensors file ({e}); {need}") from e
    if not any("lora" in k.lower() for k in keys):
        raise ValueError(f"generate.lora: {path} holds {len(keys)} tensors, none of them LoRA weights (names with "
                         f"lora_A / lora_down …): it is a model's weights, not a LoRA; {need}")


def load_lora(pipe: Any, name: str, scale: float = 1.0) -> Any:
    """Load LoRA weights (an LCM-LoRA, a style LoRA) into ``pipe`` and fuse them at ``scale``, in place.

    Fused, a LoRA costs nothing per step. ``name``: a hub id (``latent-consistency/lcm-lora-sdv1-5``), a folder
    holding one ``*.safetensors`` LoRA file (diffusers' ``save_lora_weights`` layout), or that file
    (see :func:`lora_source`).
    """
    try:
        import peft  # noqa: F401  (diffusers loads LoRAs through peft)
    except ImportError as e:
        raise ImportError("generate.lora needs peft: pip install 'sip[lora]'") from e
    source, kwargs = lora_source(name)
    pipe.load_lora_weights(source, **kwargs)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    return pipe


TINY_VAE_HINT = ("generate.tiny_vae takes an AutoencoderTiny (TAESD family): a hub id such as madebyollin/taesd "
                 "(SD 1.x/2.x) or madebyollin/taesdxl (SDXL), or a folder of one (`huggingface-cli download "
                 "madebyollin/taesd --local-dir taesd` on a machine with network); sip's shipped models have no tiny "
                 "VAE (their own decoder is already small): leave generate.tiny_vae null for them")


def tiny_vae_source(name: str) -> tuple[str, dict[str, Any]]:
    """Where ``generate.tiny_vae`` points: ``(source, kwargs)`` for ``AutoencoderTiny.from_pretrained``, checked
    before any model loads. A pipeline folder is accepted when its ``vae/`` is an ``AutoencoderTiny``.

    Raises:
        FileNotFoundError: the path does not exist, or holds no model config.
        ValueError: the folder holds another kind of model (a full VAE, a whole pipeline with one).
    """
    path = Path(name).expanduser()
    if not path.exists():
        if looks_like_path(name) or name.count("/") > 1:
            raise FileNotFoundError(f"generate.tiny_vae: tiny VAE folder {path} does not exist; {TINY_VAE_HINT}")
        return check_model_source(name, "tiny VAE (generate.tiny_vae)"), {}
    if not path.is_dir():
        raise ValueError(f"generate.tiny_vae: {path} is a file, not a model folder; {TINY_VAE_HINT}")
    kwargs: dict[str, Any] = {}
    config = path / "config.json"
    if (path / "model_index.json").is_file():  # a whole pipeline: its vae/ may be a tiny one
        config, kwargs = path / "vae" / "config.json", {"subfolder": "vae"}
    try:
        kind = json.loads(config.read_text()).get("_class_name")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"generate.tiny_vae: {config} does not exist: {path} is not a diffusers model "
                                f"folder; {TINY_VAE_HINT}") from e
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"generate.tiny_vae: {config} is unreadable ({e}); {TINY_VAE_HINT}") from e
    if kind != "AutoencoderTiny":
        what = f"a pipeline whose vae/ is an {kind}" if kwargs else f"an {kind}"
        raise ValueError(f"generate.tiny_vae: {path} holds {what}, not an AutoencoderTiny; {TINY_VAE_HINT}")
    return str(path), kwargs


def load_tiny_vae(name: str, dtype: str = "float32", device: str = "auto") -> Any:
    """An ``AutoencoderTiny`` (TAESD family) from a hub id or folder, e.g. ``madebyollin/taesd`` (see
    :func:`tiny_vae_source`)."""
    from diffusers import AutoencoderTiny

    source, kwargs = tiny_vae_source(name)
    return AutoencoderTiny.from_pretrained(source, **kwargs, **{_dtype_kwarg(): resolve_dtype(dtype)}).to(
        resolve_device(device))


def check_generation_paths(lora: str | None, tiny_vae: str | None) -> None:
    """Check ``generate.lora`` and ``generate.tiny_vae`` before the Stable Diffusion model loads (raises as
    :func:`lora_source` and :func:`tiny_vae_source`)."""
    if lora:
        lora_source(lora)
    if tiny_vae:
        tiny_vae_source(tiny_vae)


def _dtype_kwarg() -> str:
    """Newer diffusers take ``dtype`` and deprecate ``torch_dtype``; older ones know only ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def resolve_scheduler(name: str):
    """A diffusers scheduler class by name; an unknown name lists the valid ones."""
    import diffusers

    valid = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and n != "SchedulerMixin"
                   and hasattr(getattr(diffusers, n), "from_config"))
    if name not in valid:
        import difflib

        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown scheduler {name!r}.{hint} Valid: {', '.join(valid)}")
    return getattr(diffusers, name)
