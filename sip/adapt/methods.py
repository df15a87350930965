"""What ``sip adapt`` trains, per method: the trainable parameters, how prompts are encoded with them, their
checkpoint state, and the final files in the layouts diffusers' own loaders read.

- :class:`TextualInversion` (Gal et al., ICLR 2023): ``k`` new input-embedding vectors per class token; the model
  stays frozen. Saved as ``embeddings/<label>/learned_embeds.safetensors`` (``pipe.load_textual_inversion``).
- :class:`Lora` (Hu et al., ICLR 2022; DataDream, ECCV 2024): peft ``LoraConfig`` adapters on the UNet's attention
  (and the text encoder's). Saved with ``save_lora_weights`` (``pipe.load_lora_weights(OUT)``).
- :class:`Finetune` (DreamBooth-style, Ruiz et al., CVPR 2023, without prior preservation): the whole UNet, and with
  ``finetune.text_encoder`` the whole text encoder. Saved as a whole pipeline (``from_pretrained(OUT/pipeline)``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sip.adapt.recipe import AdaptRecipe, FinetuneSettings, LoraSettings, TextualInversionConfig
from sip.adapt.use import LORA_FILE, PIPELINE_DIR, embedding_folder

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class Method:
    """The common shape: ``params()`` (and ``param_groups(lr)`` for the optimiser), ``encode(input_ids)``, ``names``
    (what ``{label}`` becomes), ``trained`` (what learns, for run.json and the model card), ``state()`` /
    ``load_state()`` for checkpoints, ``save(folder)`` for the final files."""

    name = ""

    def __init__(self, pipe: Any, classes: list[str]):
        self.pipe, self.classes = pipe, classes
        self.names: dict[str, str] = {c: c for c in classes}
        self.trained: list[str] = []

    def params(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups, each with its peak ``lr`` (the loop scales each by the schedule)."""
        return [{"params": self.params(), "lr": lr}]

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's hidden states for ``input_ids``, through the trainable parameters."""
        return self.pipe.text_encoder(input_ids)[0]

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        raise NotImplementedError


def _default_token(label: str) -> str:
    return "<sip-" + (re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "class") + ">"


def check_new_tokens(tokenizer: Any, tokens: dict[str, str], vectors: int) -> list[str]:
    """Every token (and its ``_1`` … ``_{k-1}`` extensions) must be new to the tokenizer and to each other.

    Raises:
        ValueError: naming the token that collides and the fix.
    """
    vocab = tokenizer.get_vocab()
    added = [t if i == 0 else f"{t}_{i}" for t in tokens.values() for i in range(vectors)]
    for label, token in tokens.items():
        word = token.lower()
        if token in vocab or f"{word}</w>" in vocab or word in vocab:
            raise ValueError(f"textual_inversion.tokens[{label!r}]: {token!r} is already a word of the model's "
                             f"tokenizer; learning it would overwrite that word. Pick a new one, e.g. "
                             f"{_default_token(label)!r}")
    if len(set(added)) != len(added):
        raise ValueError(f"textual_inversion.tokens: two classes share a token ({sorted(tokens.values())}); give "
                         "each class its own")
    return added


class TextualInversion(Method):
    """New tokens per class, ``k`` learned vectors each, initialised from ``init_word`` (or the class name)."""

    name = "textual_inversion"

    def __init__(self, pipe: Any, classes: list[str], config: TextualInversionConfig):
        super().__init__(pipe, classes)
        unknown = sorted(set(config.tokens) - set(classes))
        if unknown:
            raise ValueError(f"textual_inversion.tokens names {unknown}, not classes of the source ({classes})")
        self.k = config.vectors
        self.tokens = {c: config.tokens.get(c) or _default_token(c) for c in classes}
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        added = check_new_tokens(tokenizer, self.tokens, self.k)
        self.first = len(tokenizer)
        tokenizer.add_tokens(added)
        ids = tokenizer.convert_tokens_to_ids(added)
        if ids != list(range(self.first, self.first + len(added))):
            raise ValueError(f"the tokenizer gave the new tokens ids {ids[:4]}…, not consecutive from {self.first}")
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set below
        weight = encoder.get_input_embeddings().weight
        self.frozen = weight[: self.first].detach().clone()
        init = [self._init_vector(config.init_word or c) for c in classes]
        self.vectors = nn.Parameter(torch.stack([v for v in init for _ in range(self.k)]))
        self.names = {c: " ".join(added[i * self.k:(i + 1) * self.k]) for i, c in enumerate(classes)}
        self._key = next(n for n, p in encoder.named_parameters() if p is weight)
        encoder.requires_grad_(False)
        self.trained = ["text_encoder: the new tokens' input embeddings"]

    def _init_vector(self, word: str) -> torch.Tensor:
        ids = self.pipe.tokenizer(word, add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if i < self.first] or [self.pipe.tokenizer.eos_token_id]
        return self.frozen[ids].mean(0)

    def params(self) -> list[nn.Parameter]:
        return [self.vectors]

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.frozen, self.vectors.to(self.frozen.dtype)])
        return torch.func.functional_call(self.pipe.text_encoder, {self._key: weight}, (input_ids,))[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.vectors.detach()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state["vectors"].shape != self.vectors.shape:
            raise ValueError(f"checkpoint vectors {tuple(state['vectors'].shape)} do not fit "
                             f"{tuple(self.vectors.shape)} (classes × textual_inversion.vectors)")
        with torch.no_grad():
            self.vectors.copy_(state["vectors"])

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        for i, c in enumerate(self.classes):
            path = embedding_folder(folder, c) / "learned_embeds.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = self.vectors.detach()[i * self.k:(i + 1) * self.k].cpu().contiguous()
            save_file({self.tokens[c]: rows}, str(path))  # diffusers' format: {token: (k, dim)}


class Lora(Method):
    """peft LoRA adapters on the UNet's attention (and, when asked, the text encoder's)."""

    name = "lora"

    def __init__(self, pipe: Any, classes: list[str], config: LoraSettings, names: dict[str, str]):
        try:
            from peft import LoraConfig
        except ImportError as e:
            raise ImportError("method lora needs peft: pip install 'sip[lora]'") from e
        super().__init__(pipe, classes)
        self.names = {c: names.get(c, c) for c in classes}
        alpha = config.alpha or config.rank
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.unet_config = LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                      target_modules=list(config.target_modules))
        try:
            pipe.unet.add_adapter(self.unet_config)
        except ValueError as e:
            raise ValueError(f"lora.target_modules {config.target_modules}: {e}") from e
        self.text_encoder = config.text_encoder
        self.trained = ["unet: LoRA"] + (["text_encoder: LoRA"] if self.text_encoder else [])
        if self.text_encoder:
            self.text_config = LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                          target_modules=TEXT_ENCODER_TARGETS)
            try:
                pipe.text_encoder.add_adapter(self.text_config)
            except ValueError as e:  # transformers 5 adapts its models only with a newer peft than diffusers needs
                import peft

                raise ValueError(f"lora.text_encoder: the text encoder cannot take a LoRA here ({e}; peft "
                                 f"{peft.__version__} is installed): pip install -U peft, or set lora.text_encoder: "
                                 f"false") from e

    def _modules(self) -> dict[str, nn.Module]:
        return {"unet": self.pipe.unet, **({"text_encoder": self.pipe.text_encoder} if self.text_encoder else {})}

    def params(self) -> list[nn.Parameter]:
        return [p for m in self._modules().values() for p in m.parameters() if p.requires_grad]

    def state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {f"{name}.{k}": v.detach() for name, m in self._modules().items()
                for k, v in get_peft_model_state_dict(m).items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        for name, m in self._modules().items():
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            result = set_peft_model_state_dict(m, part)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint LoRA weights do not fit the {name}: {result.unexpected_keys[:3]}")

    def save(self, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m))
                  for name, m in self._modules().items()}
        meta = {"unet_lora_adapter_metadata": self.unet_config.to_dict()}
        if self.text_encoder:
            meta["text_encoder_lora_adapter_metadata"] = self.text_config.to_dict()
        StableDiffusionPipeline.save_lora_weights(str(folder), weight_name=LORA_FILE, safe_serialization=True,
                                                  **layers, **meta)


class Finetune(Method):
    """The whole UNet trained, and with ``finetune.text_encoder`` the whole text encoder (in its own parameter group,
    at ``finetune.text_encoder_lr``); the VAE stays frozen.

    Checkpoint state: the UNet's state dict under its own keys and, when it trains, the text encoder's under
    ``text_encoder.`` (a UNet has no module of that name).
    """

    name = "finetune"
    TEXT = "text_encoder."

    def __init__(self, pipe: Any, classes: list[str], config: FinetuneSettings, names: dict[str, str]):
        super().__init__(pipe, classes)
        self.names = {c: names.get(c, c) for c in classes}
        self.text_encoder, self.text_encoder_lr = config.text_encoder, config.text_encoder_lr
        pipe.text_encoder.requires_grad_(self.text_encoder)
        pipe.unet.requires_grad_(True)
        self.trained = ["unet"] + (["text_encoder"] if self.text_encoder else [])

    def params(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups(0.0) for p in group["params"]]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        groups = [{"params": list(self.pipe.unet.parameters()), "lr": lr}]
        if self.text_encoder:
            groups.append({"params": list(self.pipe.text_encoder.parameters()), "lr": self.text_encoder_lr or lr})
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in self.pipe.unet.state_dict().items()}
        if self.text_encoder:
            state.update({self.TEXT + k: v.detach() for k, v in self.pipe.text_encoder.state_dict().items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        from sip.models.checkpoints import load_weights

        text = {k[len(self.TEXT):]: v for k, v in state.items() if k.startswith(self.TEXT)}
        if text and not self.text_encoder:
            raise ValueError("the adapt checkpoint holds a trained text encoder but finetune.text_encoder is false")
        load_weights(self.pipe.unet, {k: v for k, v in state.items() if not k.startswith(self.TEXT)},
                     "the adapt checkpoint (UNet)")
        if self.text_encoder:
            load_weights(self.pipe.text_encoder, text, "the adapt checkpoint (text encoder)")

    def save(self, folder: Path) -> None:
        self.pipe.save_pretrained(str(folder / PIPELINE_DIR), safe_serialization=True)  # the tuned text encoder too


def build_method(recipe: AdaptRecipe, pipe: Any, classes: list[str]) -> Method:
    """The recipe's method over ``pipe`` (modified in place: new tokens, LoRA layers, trainable UNet)."""
    if recipe.method == "textual_inversion":
        return TextualInversion(pipe, classes, recipe.textual_inversion)
    if recipe.method == "lora":
        return Lora(pipe, classes, recipe.lora, recipe.label_names)
    return Finetune(pipe, classes, recipe.finetune, recipe.label_names)


def publish(method: Method, out: Path) -> None:
    """Write the final files into a temp folder, then move each into ``out`` (never half a file in ``out``)."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    method.save(tmp)
    for entry in tmp.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    tmp.rmdir()
