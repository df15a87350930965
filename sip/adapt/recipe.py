"""The ``sip adapt`` recipe: which model learns the user's classes, from which shots, by which method.

A section per stage (``textual_inversion``, ``lora``, ``finetune``, ``validation``); a method's section set while
another method runs is an error, never ignored.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

from sip.adapt.use import METHODS
from sip.data.sources import SourceConfig
from sip.models.diffusion import DEFAULT_SD_MODEL
from sip.runtime import check_device


@dataclass(frozen=True)
class TextualInversionConfig:
    """Textual inversion (Gal et al., "An Image is Worth One Word", ICLR 2023): a new token per class whose
    ``vectors`` input embeddings are learned; the model is frozen.

    Attributes:
        vectors: embedding vectors per token (k): more vectors hold more detail, at more risk of overfitting.
        tokens: each class's token, e.g. {"Bag": "<my-bag>"}; a class not named gets ``<sip-LABEL>``. A token the
            tokenizer already knows is refused (it would overwrite a word).
        init_word: the word whose embedding starts every vector; null: the class's own name (its tokens' mean).
    """

    vectors: int = 1
    tokens: dict[str, str] = field(default_factory=dict)
    init_word: str | None = None

    def __post_init__(self):
        if self.vectors < 1:
            raise ValueError(f"textual_inversion.vectors must be >= 1, got {self.vectors}")
        for label, token in self.tokens.items():
            if not token or any(c.isspace() for c in token):
                raise ValueError(f"textual_inversion.tokens[{label!r}] must be one word with no spaces, got {token!r}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA (Hu et al., ICLR 2022) through peft on the UNet's attention projections (DataDream, ECCV 2024, also
    adapts the text encoder's).

    Attributes:
        rank: the low rank r of each update; higher adapts more, with more parameters.
        alpha: the update's scale numerator (scale alpha / r); null: alpha = r.
        text_encoder: also a LoRA on the text encoder's attention (q, k, v, out projections).
        target_modules: the UNet's module names that get a LoRA.
        per_class: one LoRA per class, each trained on its class's shots alone for ``steps`` steps (DataDream's
            per-class setting); generation switches to each class's LoRA for its images. False: one for the dataset.
    """

    rank: int = 4
    alpha: float | None = None
    text_encoder: bool = False
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    per_class: bool = False

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a positive finite number or null, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module (e.g. to_q, to_k, to_v, to_out.0)")
        if self.per_class and self.text_encoder:
            raise ValueError("lora.per_class with lora.text_encoder: generation switches UNet LoRAs per batch but encodes "
                             "prompts once; per-class text-encoder LoRAs are not supported: set one of them false")


@dataclass(frozen=True)
class FinetuneSettings:
    """Full fine-tuning (DreamBooth, Ruiz et al., CVPR 2023, without prior preservation): the UNet, and with
    ``text_encoder`` the text encoder too (DreamBooth's ``--train_text_encoder``).

    Attributes:
        text_encoder: also train the whole text encoder. A frozen encoder that never read the user's class names
            (e.g. digits to a Fashion-MNIST model) gives the UNet near-identical conditioning for every class, so
            the UNet cannot learn which class to draw; training it lets the prompts move apart. The saved pipeline
            then carries the tuned encoder.
        text_encoder_lr: the text encoder's peak learning rate (same warm-up and cosine as ``lr``); null: ``lr``.
            A small encoder next to a large UNet often wants more than the UNet's small ``lr``.
    """

    text_encoder: bool = False
    text_encoder_lr: float | None = None

    def __post_init__(self):
        lr = self.text_encoder_lr
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"finetune.text_encoder_lr must be a finite number > 0 or null, got {lr}")
        if lr is not None and not self.text_encoder:
            raise ValueError("finetune.text_encoder_lr is read only when finetune.text_encoder is true: set "
                             "finetune.text_encoder: true or remove finetune.text_encoder_lr")


@dataclass(frozen=True)
class PriorConfig:
    """Prior preservation (DreamBooth, Ruiz et al., CVPR 2023): before training, the base model draws ``per_prompt``
    txt2img images of each of ``prompts`` (what it must keep drawing, e.g. the classes it already knows); every step
    adds ``weight`` times the denoising loss of a batch of them, so adapting to the user's classes does not
    overwrite the others. Off while ``per_prompt`` is 0. For lora and finetune (textual inversion leaves the model
    as it is).

    Attributes:
        prompts: the prompts whose images the model must keep.
        per_prompt: the base model's images per prompt (made once, kept in ``OUT/prior.safetensors``).
        weight: the prior term's weight (DreamBooth's lambda).
        guidance_scale, steps, seed: how those images are drawn.
    """

    prompts: list[str] = field(default_factory=list)
    per_prompt: int = 0
    weight: float = 1.0
    guidance_scale: float = 4.0
    steps: int = 20
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.per_prompt > 0

    def __post_init__(self):
        if self.per_prompt < 0 or self.steps < 1:
            raise ValueError(f"prior.per_prompt must be >= 0 and prior.steps >= 1, got {self.per_prompt}, {self.steps}")
        for key in ("weight", "guidance_scale"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"prior.{key} must be a finite number > 0, got {value}")
        if self.active and not self.prompts:
            raise ValueError("prior.per_prompt > 0 but prior.prompts is empty: list the prompts whose images the model "
                             "must keep (e.g. [\"a photo of a coat\", ...])")
        set_keys = [f.name for f in fields(self) if f.name != "per_prompt" and getattr(self, f.name) != (
            f.default_factory() if f.default is MISSING else f.default)]
        if not self.active and set_keys:
            raise ValueError(f"prior.{set_keys[0]} is read only when prior.per_prompt > 0 (images per prompt): set "
                             "prior.per_prompt, or remove the prior section")


@dataclass(frozen=True)
class ValidationConfig:
    """The validation grid: txt2img of every class from the current weights, every ``every`` steps.

    Attributes:
        every: steps between grids (0: only at the end).
        per_class: images per class in a grid (one row per class).
        steps: denoising steps per image.
        guidance_scale: classifier-free guidance of the grid's images.
        seed: the grid's seed (the same noise at every step, so grids compare).
    """

    every: int = 100
    per_class: int = 4
    steps: int = 20
    guidance_scale: float = 4.0
    seed: int = 0

    def __post_init__(self):
        if self.every < 0 or self.per_class < 1 or self.steps < 1:
            raise ValueError(f"validation: every must be >= 0, per_class and steps >= 1; got every {self.every}, "
                             f"per_class {self.per_class}, steps {self.steps}")


@dataclass(frozen=True)
class AdaptRecipe:
    """``sip adapt``: teach a Stable Diffusion model the user's labelled few shots.

    Attributes:
        method: "textual_inversion" (a token per class), "lora" (one LoRA for the dataset) or "finetune" (the
            whole UNet, and the text encoder with ``finetune.text_encoder``, DreamBooth-style without prior
            preservation; saves a whole pipeline).
        model: the base model, a folder or hub id (default: the shipped model).
        source: the shots, as ``sip augment`` reads them (``--input`` / ``source:``).
        template: the training prompt; ``{label}`` is the class's token (textual inversion) or name.
        label_names: readable names for raw labels in ``template`` (lora, finetune), as ``prompt.label_names``.
        steps: optimiser steps.
        batch_size: images per step.
        lr: peak learning rate (after ``warmup_steps`` of linear warm-up, cosine decay to 0 at ``steps``).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay (0 for textual inversion: its vectors would shrink toward 0).
        max_grad_norm: gradient clipping norm (0: none).
        seed: every step's batch, noise and timesteps derive from it and the step (a resumed run draws the same).
        checkpoint_every: steps between resumable checkpoints (the last step always saves).
        device: "auto", "cpu", "cuda", ...
        output: the output folder (``-o``); rerunning into it resumes.
        progress: show a progress bar.
        textual_inversion, lora, finetune, prior, validation: the sections above.
    """

    method: Literal["textual_inversion", "lora", "finetune"] = "lora"
    model: str = DEFAULT_SD_MODEL
    source: SourceConfig = field(default_factory=SourceConfig)
    template: str = "a photo of a {label}"
    label_names: dict[str, str] = field(default_factory=dict)
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"
    output: str = "runs/adapt"
    progress: bool = True
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    prior: PriorConfig = field(default_factory=PriorConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value}")
        check_device(self.device, "device")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} (steps {self.steps})")
        if "{label}" not in self.template:
            raise ValueError(f"template must contain {{label}}, got {self.template!r}")
        if self.method != "textual_inversion" and self.textual_inversion != TextualInversionConfig():
            raise ValueError(f"the textual_inversion section is read by method textual_inversion only; method is "
                             f"{self.method}: remove it or set method: textual_inversion")
        if self.method != "lora" and self.lora != LoraSettings():
            raise ValueError(f"the lora section is read by method lora only; method is {self.method}: remove it or "
                             f"set method: lora")
        if self.method != "finetune" and self.finetune != FinetuneSettings():
            hint = " (a LoRA on the text encoder is lora.text_encoder)" if self.method == "lora" else ""
            raise ValueError(f"the finetune section (finetune.text_encoder, finetune.text_encoder_lr) is read by "
                             f"method finetune only; method is {self.method}: remove it or set method: finetune{hint}")
        if self.method == "textual_inversion" and self.prior.active:
            raise ValueError("prior (prior preservation) keeps what the model draws while it trains; textual inversion "
                             "trains no model weight: remove the prior section or use method lora / finetune")
        if self.method == "textual_inversion" and self.label_names:
            raise ValueError("label_names names classes in the prompt of lora / finetune; textual inversion puts each "
                             "class's token there: remove label_names (or name tokens in textual_inversion.tokens)")
