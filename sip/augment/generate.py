"""Stable Diffusion img2img (SIP augmentation) and txt2img (data-free synthesis), batched and seeded.

Every image has its own ``torch.Generator`` seeded from (run seed, source id, variant index), so an
image is the same whatever the batch size, order or shard that produced it. The pipeline is any
diffusers Stable Diffusion family checkpoint loaded by :func:`sip.models.diffusion.load_diffusion_pipeline`
(auto pipelines), passed in — the generator never loads models itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from sip.augment.guidance import TargetedGuidance, guiding
from sip.augment.pipeline_setup import prepare_pipeline, supports_fast_path
from sip.augment.token_merge import merge_targets
from sip.augment.unet_cache import check_cacheable, check_speedup_settings, unet_speedups
from sip.adapt.use import class_adapters, load_generation_models
from sip.models.diffusion import DEFAULT_SD_MODEL, check_decoder_fits, few_step_advice, resolve_scheduler, runs_cfg
from sip.models.kdeformer import kdeformer_config
from sip.runtime import AMX_MIN_UNET_PARAMS, autocast, resolve_precision


@dataclass(frozen=True)
class GenerateConfig:
    """How images are generated.

    Attributes:
        model: hub id or folder of a Stable Diffusion family checkpoint (default: the shipped model).
        strength: img2img noise level in (0, 1]: low keeps the source (faithful, little variety),
            high redraws it (variety, risk of losing the label). SIP uses a moderate 0.5.
        guidance_scale: classifier-free guidance; higher follows the prompt more, at some cost in
            diversity and artefacts. <= 1 disables guidance (half the UNet work).
        steps: denoising steps of the full schedule; img2img runs about ``steps * strength`` of them.
        per_image: variants per source image (img2img).
        per_class: images per class (txt2img).
        batch_size: images per pipeline call; larger is faster until memory runs out. Outputs do
            not depend on it.
        scheduler: diffusers scheduler class name (e.g. "DDIMScheduler", "EulerDiscreteScheduler");
            null keeps the checkpoint's own.
        resolution: generation size in pixels (multiple of 8); null uses the model's native size.
        resize: how a source is fitted: "resize" (stretch), "center-crop" (keep aspect, crop), or
            "keep" (keep aspect, round each side to a multiple of 8; one source per batch).
        seed: run seed; every image's seed derives from it, the source id and the variant.
        dtype: weights dtype ("float32", "bfloat16", "float16"): fp16/bf16 halve memory on GPU. On an
            AMX CPU bfloat16 weights ran SD 1.5 at 512 px 1.17x faster than bf16 autocast (no per-call
            casts of fp32 weights; images 0.9 grey levels apart; scripts/bench_generate.py).
        precision: "auto", "fp32", "bf16". auto: bf16 autocast on CUDA, and on AMX CPUs for a UNet of
            >= 100 M parameters (every Stable Diffusion checkpoint: several times faster there, see
            scripts/bench_generate.py); fp32 for small UNets such as the shipped one (bf16 0.79x) and
            on CPUs without AMX (bf16 2-4x slower).
        device: "auto", "cpu", "cuda", "cuda:1" …
        batch_invariant: run the networks one image at a time, so an image's bytes never depend on
            the batch it was in. Batched float kernels (oneDNN, cuBLAS) round differently for
            different batch sizes: without this, the same seed gives the same image up to ±1 grey
            level in a few pixels (measured: ≤ 4 of 30,720 values) when the batch size changes.
        channels_last: NHWC memory format for the UNet and VAE (faster convolutions on some
            hardware; see scripts/bench_generate.py).
        tiny_vae: hub id or folder of an ``AutoencoderTiny`` that decodes the latents instead of the
            checkpoint's VAE (TAESD: ``madebyollin/taesd`` for SD 1.x/2.x, ``madebyollin/taesdxl`` for
            SDXL). The decoder is most of the non-UNet time (scripts/bench_generate.py); TAESD is
            ~100x cheaper than SD's VAE decoder at slightly softer detail. img2img still encodes the
            sources with the full VAE. null: the checkpoint's VAE.
        lora: a LoRA (hub id, folder or ``.safetensors`` file) fused into the model at ``lora_scale``: an LCM-LoRA
            (``latent-consistency/lcm-lora-sdv1-5`` with ``scheduler: LCMScheduler``, 4 steps, guidance 1) or a
            style LoRA. Needs ``pip install 'sip[lora]'`` (peft). null: none.
        adapter: a ``sip adapt`` output (:mod:`sip.adapt.use`): TI tokens in prompts, LoRA or UNet; base checked.
        compile: ``torch.compile`` the UNet on first use, with inductor freezing (weights folded as
            constants, their casts included; prepacked for oneDNN on a CPU). One-off compile time per
            shape (25-85 s for SD 1.5 on 2 CPU cores), then faster steps: SD 1.5 on an AMX CPU 1.08-1.22x
            eager in bf16, not in fp32 (0.87-1.07x; scripts/bench_unet_peak.py --compile); diffusers
            reports ~1.2-1.5x on recent NVIDIA GPUs. Needs a C++ compiler on a CPU: for long jobs.
        cache_interval: DeepCache (:mod:`sip.augment.unet_cache`): the whole UNet every N steps, only its
            shallowest branch between. 1 = off (exact); 2-3 run the shipped model ~1.6-2x faster, images
            moving 1-2 grey levels on average (another seed: ~25).
        token_merge_ratio: ToMe for SD (:mod:`sip.augment.token_merge`): share of tokens merged in the
            highest-resolution self-attentions, [0, 0.75]; 0 = off (exact). Pays on SD-size latents
            (0.75x UNet time at 0.5, SD 1.5 at 256 px), not on the shipped model's 8x8 latents.
        attention: "exact" or "kdeformer": KDEformer's estimate (:mod:`sip.models.kdeformer`) in UNet
            self-attentions of >= ``kdeformer.min_tokens`` tokens; approximate (scripts/bench_attention.py).
        kdeformer: its budget and hashing (num_samples, block_size, n_hashes, seed, min_tokens).
    """

    model: str = DEFAULT_SD_MODEL
    strength: float = 0.5
    guidance_scale: float = 4.0
    steps: int = 30
    per_image: int = 2
    per_class: int = 100
    batch_size: int = 32
    scheduler: str | None = None
    resolution: int | None = None
    resize: Literal["resize", "center-crop", "keep"] = "resize"
    seed: int = 0
    dtype: str = "float32"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    batch_invariant: bool = False
    channels_last: bool = False
    tiny_vae: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    adapter: str | None = None
    compile: bool = False
    cache_interval: int = 1
    token_merge_ratio: float = 0.0
    attention: str = "exact"
    kdeformer: dict | None = None

    def __post_init__(self):
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        for name in ("steps", "per_image", "per_class", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.scheduler is not None:
            resolve_scheduler(self.scheduler)
        if self.dtype not in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        check_speedup_settings(self.cache_interval, self.token_merge_ratio, self.compile)
        kdeformer_config(self.attention, self.kdeformer, "generate")
        if not math.isfinite(self.lora_scale):
            raise ValueError(f"lora_scale must be a finite number, got {self.lora_scale}")


def fit_image(image: Image.Image, size: int | None, mode: str, multiple: int = 8) -> Image.Image:
    """Fit a source to the generation size (see ``GenerateConfig.resize``)."""
    w, h = image.size
    if mode == "keep" or size is None:
        scale = 1.0 if size is None else size / max(w, h)
        nw = max(multiple, round(w * scale / multiple) * multiple)
        nh = max(multiple, round(h * scale / multiple) * multiple)
        return image if (nw, nh) == (w, h) else image.resize((nw, nh), Image.BICUBIC)
    if mode == "center-crop":
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return image.crop((left, top, left + size, top + size))
    return image if (w, h) == (size, size) else image.resize((size, size), Image.BICUBIC)


class DiffusionGenerator:
    """Batched, seeded img2img and txt2img over one diffusers pipeline.

    Args:
        pipe: a diffusers img2img pipeline (``AutoPipelineForImage2Image``); txt2img shares its
            components through ``AutoPipelineForText2Image.from_pipe``.
        config (GenerateConfig): settings.
        model_id (str, optional): recorded in metadata. Defaults to ``config.model``.
    """

    def __init__(self, pipe: Any, config: GenerateConfig, model_id: str | None = None, tiny_vae: Any = None):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

        # the full VAE encodes img2img sources; a tiny VAE, when given, only decodes (the caller's pipeline
        # is left as it was: the swap happens in a pipeline of its own that shares the other components)
        self.encoder_vae = pipe.vae
        if tiny_vae is not None:
            check_decoder_fits(pipe.vae, tiny_vae)
            pipe = AutoPipelineForImage2Image.from_pipe(pipe, vae=tiny_vae)
        self.pipe = pipe
        self.txt2img = AutoPipelineForText2Image.from_pipe(pipe)
        for p in (self.pipe, self.txt2img):
            p.set_progress_bar_config(disable=True)
        self.config = config
        self.model_id = model_id or config.model
        self.device = pipe.device
        self.native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self.size = config.resolution or self.native
        # bf16 autocast (fp32 weights kept) on CUDA, and on AMX CPUs for UNets big enough to gain from it
        # (see sip.runtime.AMX_MIN_UNET_PARAMS); fp16 weights on a GPU come from `dtype`
        unet_params = sum(p.numel() for p in pipe.unet.parameters())
        self.precision = "bf16" if resolve_precision(config.precision, self.device,
                                                      unet_params >= AMX_MIN_UNET_PARAMS) == "bf16" else "fp32"
        self.bf16 = self.precision == "bf16"
        # sip encodes each source and each prompt once where the pipeline can take latents and prompt
        # embeddings (SD 1.x/2.x img2img); others (SDXL: pooled embeddings …) get the plain call
        self._fast = supports_fast_path(pipe)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        # a per-class LoRA adapter (sip adapt lora.per_class): each class's LoRA, switched per batch by use_class
        self.class_adapters = class_adapters(config.adapter)
        # the pipeline's modules are used as given: channels_last / compile are prepare_pipeline's job;
        # feature caching and token merging patch the UNet for the length of each call only (_unet_speedups)
        if config.cache_interval > 1:
            check_cacheable(pipe.unet)
        if advice := few_step_advice(pipe, config.steps, config.guidance_scale, config.cache_interval):
            warnings.warn(advice, stacklevel=2)
        if config.token_merge_ratio > 0 and not merge_targets(pipe.unet)[1]:
            raise ValueError(f"generate.token_merge_ratio > 0 but this {type(pipe.unet).__name__} has no self-attention "
                             f"to merge tokens in; set generate.token_merge_ratio: 0")

    def use_class(self, label: str) -> None:
        """Make ``label``'s own LoRA the active one (per-class adapters only; the UNet is shared by both modes)."""
        if label not in self.class_adapters:
            raise ValueError(f"generate.adapter {self.config.adapter} has a LoRA for {sorted(self.class_adapters)}, "
                             f"not for {label!r}: adapt that class too, or generate only those classes")
        self.pipe.set_adapters([self.class_adapters[label]])

    @classmethod
    def from_config(cls, config: GenerateConfig) -> DiffusionGenerator:
        """Load ``config.model`` (hub id or folder) and build the generator."""
        pipe, tiny = load_generation_models(config)  # lora / tiny_vae / adapter paths checked before the model loads
        return cls(prepare_pipeline(pipe, config), config, tiny_vae=tiny)

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    def _autocast(self):
        return autocast(self.precision, self.device)

    def _unet_speedups(self):
        return unet_speedups(self.pipe.unet, self.config.cache_interval, self.config.token_merge_ratio)

    def _generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        return [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def sampling(self, strength: float | None = None, guidance_scale: float | None = None,
                 steps: int | None = None) -> tuple[float, float, int]:
        """The sampling settings of one call: the arguments given, the config's for the rest (checked)."""
        c = self.config
        strength = c.strength if strength is None else strength
        guidance_scale = c.guidance_scale if guidance_scale is None else guidance_scale
        steps = c.steps if steps is None else steps
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if int(steps) != steps or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        return float(strength), float(guidance_scale), int(steps)

    def settings(self, guidance_scale: float | None = None, steps: int | None = None) -> dict[str, Any]:
        """The per-image settings recorded in metadata (the config's unless a call overrode them)."""
        _, guidance_scale, steps = self.sampling(None, guidance_scale, steps)
        settings = {"guidance_scale": guidance_scale, "steps": steps, "model": self.model_id,
                    "scheduler": type(self.pipe.scheduler).__name__}
        # recorded only when on: lines of runs without them stay as they were
        if self.config.cache_interval > 1:
            settings["cache_interval"] = self.config.cache_interval
        if self.config.token_merge_ratio > 0:
            settings["token_merge_ratio"] = self.config.token_merge_ratio
        if self.config.lora:
            settings.update(lora=self.config.lora, lora_scale=self.config.lora_scale)
        return settings

    @torch.inference_mode()
    def img2img(self, images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int],
                negative_prompt: str = "", *, strength: float | None = None, guidance_scale: float | None = None,
                steps: int | None = None, guide: TargetedGuidance | None = None) -> list[Image.Image]:
        """Redraw each image under its prompt, one seed per image (call with ≤ batch_size images).

        Args:
            images (Sequence[Image.Image]): the sources (the same object repeated: encoded once).
            prompts (Sequence[str]): one prompt per image.
            seeds (Sequence[int]): one seed per image.
            negative_prompt (str): shared negative prompt. Defaults to "".
            strength (float, optional): img2img strength. Defaults to ``config.strength``.
            guidance_scale (float, optional): classifier-free guidance. Defaults to ``config.guidance_scale``.
            steps (int, optional): denoising steps. Defaults to ``config.steps``.
            guide (TargetedGuidance, optional): teacher guidance, one class per image (:mod:`sip.augment.guidance`).
        """
        strength, guidance_scale, steps = self.sampling(strength, guidance_scale, steps)
        kw = {"strength": strength, "guidance_scale": guidance_scale, "steps": steps}
        if int(steps * strength) < 1:  # diffusers would fail deep in the scheduler with a shape error
            raise ValueError(f"img2img runs int(steps × strength) denoising steps: none at steps={steps}, strength="
                             f"{strength}; set generate.steps >= {math.ceil(1 / strength)}")
        # 1. check inputs
        if not (len(images) == len(prompts) == len(seeds)):
            raise ValueError(f"images, prompts and seeds must align, got {len(images)}, {len(prompts)}, {len(seeds)}")
        if not images:
            return []
        if self.config.batch_invariant and len(images) > 1:
            return [im for i in range(len(images))
                    for im in self.img2img(images[i : i + 1], prompts[i : i + 1], seeds[i : i + 1], negative_prompt,
                                           **kw, guide=guide and guide[i : i + 1])]
        # 2. fit sources to the generation size
        fitted = [fit_image(im, self.size, self.config.resize) for im in images]
        generators = self._generators(seeds)
        guided = runs_cfg(self.pipe.unet, guidance_scale)
        negatives = [negative_prompt] * len(prompts) if guided else None
        with self._autocast(), self._unet_speedups(), guiding(self.pipe, guide):
            if not self._fast:
                out = self.pipe(prompt=list(prompts), image=fitted, strength=strength,
                                num_inference_steps=steps, guidance_scale=guidance_scale,
                                negative_prompt=negatives, generator=generators, output_type="pil")
                return list(out.images)
            # 3. encode each distinct source once for all its variants; each variant samples its own
            #    latent with its own generator, exactly as the pipeline would
            latents = self._init_latents(images, fitted, generators)
            # 4. encode each distinct prompt once (the shared negative prompt included)
            prompt_embeds, negative_embeds = self._encode_prompts(list(prompts), negative_prompt, guided)
            # 5. denoise (the pipeline adds the seeded noise and runs the scheduler)
            out = self.pipe(image=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                            strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale,
                            generator=generators, output_type="pil")
        return list(out.images)

    def _init_latents(self, images: Sequence[Image.Image], fitted: Sequence[Image.Image],
                      generators: Sequence[torch.Generator]) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        vae = self.encoder_vae
        order: dict[int, int] = {}
        for im in images:
            order.setdefault(id(im), len(order))
        distinct = {order[id(im)]: f for im, f in zip(images, fitted)}
        pixels = self.pipe.image_processor.preprocess([distinct[i] for i in range(len(distinct))])
        pixels = pixels.to(device=self.device, dtype=vae.dtype)
        dist = vae.encode(pixels).latent_dist
        samples = []
        for im, g in zip(images, generators):
            i = order[id(im)]
            mean, std = dist.mean[i : i + 1], dist.std[i : i + 1]
            samples.append(mean + std * randn_tensor(mean.shape, generator=g, device=mean.device, dtype=mean.dtype))
        return torch.cat(samples) * vae.config.scaling_factor

    def _encode_prompts(self, prompts: list[str], negative_prompt: str, guided: bool):
        missing = list(dict.fromkeys(p for p in prompts + ([negative_prompt] if guided else [])
                                     if p not in self._prompt_cache))
        if len(self._prompt_cache) + len(missing) > 8192:
            self._prompt_cache.clear()
        # batch_invariant: one prompt per text-encoder call, so no embedding depends on its batch
        step = 1 if self.config.batch_invariant else max(1, len(missing))
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            embeds, _ = self.pipe.encode_prompt(chunk, self.device, 1, False)
            self._prompt_cache.update({p: e for p, e in zip(chunk, embeds)})
        prompt_embeds = torch.stack([self._prompt_cache[p] for p in prompts])
        negative = torch.stack([self._prompt_cache[negative_prompt]] * len(prompts)) if guided else None
        return prompt_embeds, negative

    @torch.inference_mode()
    def text2img(self, prompts: Sequence[str], seeds: Sequence[int], negative_prompt: str = "", *,
                 guidance_scale: float | None = None, steps: int | None = None,
                 guide: TargetedGuidance | None = None, output_type: str = "pil") -> list:
        """Generate one image per prompt at the generation size, one seed per image.

        Args:
            prompts (Sequence[str]): one prompt per image.
            seeds (Sequence[int]): one seed per image.
            negative_prompt (str): shared negative prompt. Defaults to "".
            guidance_scale (float, optional): classifier-free guidance. Defaults to ``config.guidance_scale``.
            steps (int, optional): denoising steps. Defaults to ``config.steps``.
            guide (TargetedGuidance, optional): as in :meth:`img2img`.
            output_type (str, optional): "pil", or "latent" for the denoised latents (one tensor per image, not
                decoded: :mod:`sip.augment.latent_mix` mixes two before decoding). Defaults to "pil".
        """
        _, guidance_scale, steps = self.sampling(None, guidance_scale, steps)
        if len(prompts) != len(seeds):
            raise ValueError(f"prompts and seeds must align, got {len(prompts)} and {len(seeds)}")
        if not prompts:
            return []
        if self.config.batch_invariant and len(prompts) > 1:
            return [im for i in range(len(prompts))
                    for im in self.text2img(prompts[i : i + 1], seeds[i : i + 1], negative_prompt, guidance_scale=
                                            guidance_scale, steps=steps, guide=guide and guide[i : i + 1],
                                            output_type=output_type)]
        guided = runs_cfg(self.pipe.unet, guidance_scale)
        with self._autocast(), self._unet_speedups(), guiding(self.txt2img, guide):
            if self._fast:  # each distinct prompt encoded once
                prompt_embeds, negative_embeds = self._encode_prompts(list(prompts), negative_prompt, guided)
                kwargs = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}
            else:
                kwargs = {"prompt": list(prompts), "negative_prompt": [negative_prompt] * len(prompts) if guided else None}
            out = self.txt2img(height=self.size, width=self.size, num_inference_steps=steps,
                               guidance_scale=guidance_scale, generator=self._generators(seeds),
                               output_type=output_type, **kwargs)
        return list(out.images)
