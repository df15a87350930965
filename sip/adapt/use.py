"""Using what ``sip adapt`` wrote: the base model's identity, the check that an adapter fits the model it is used
with, and loading it into a diffusers pipeline (textual-inversion tokens, a LoRA, or the fine-tuned pipeline).

This is the augmentation side's door into :mod:`sip.adapt`: it imports no training code. Every file it loads is one
diffusers' own loaders read (``load_textual_inversion``, ``load_lora_weights``, ``from_pretrained``), so an adapter
also works with no sip code at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sip.ids import file_sha256
from sip.models.diffusion import (DEFAULT_SD_MODEL, check_generation_paths, load_diffusion_pipeline, load_lora,
                                  load_tiny_vae)

ADAPT_RUN = "run.json"
ADAPT_KIND = "sip-adapt"
METHODS = ("textual_inversion", "lora", "finetune")
EMBEDDINGS_DIR = "embeddings"  # embeddings/<label>/learned_embeds.safetensors, one per class
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name
PIPELINE_DIR = "pipeline"  # finetune: the whole pipeline, save_pretrained layout
PER_CLASS_DIR = "per_class"  # lora.per_class: per_class/<index>-<label>/pytorch_lora_weights.safetensors
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def base_identity(model: str) -> dict[str, Any]:
    """What a model is: a folder's resolved path and a SHA-256 over its weight files, or a hub id.

    The hash covers every weight file's relative path and content, so a copy of the model elsewhere is the same
    base and a retrained model in the same folder is not.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return {"model": model, "hub": True}
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for p in files:
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return {"model": str(path.resolve()), "weights_sha256": h.hexdigest(), "weight_files": len(files)}


def same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two identities name the same model: equal weight hashes for folders, equal ids for hub models."""
    if a.get("weights_sha256") or b.get("weights_sha256"):
        return a.get("weights_sha256") == b.get("weights_sha256")
    return a.get("model") == b.get("model")


def read_adapt_run(folder: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of a ``sip adapt`` folder, or None when the folder holds none."""
    path = Path(folder).expanduser() / ADAPT_RUN
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); rerun `sip adapt` into a fresh folder") from e
    if not isinstance(info, dict) or info.get("kind") != ADAPT_KIND:
        kind = info.get("kind") if isinstance(info, dict) else None
        raise ValueError(f"{path} was not written by `sip adapt` (kind {kind!r}); pass the output folder of "
                         "`sip adapt RECIPE -o OUT`")
    return info


@dataclass(frozen=True)
class Adapter:
    """A finished ``sip adapt`` output folder, checked against the model it is used with.

    Attributes:
        folder: the output folder.
        method: "textual_inversion", "lora" or "finetune".
        tokens: each class's learned token (textual inversion; empty otherwise).
        info: the folder's run.json.
    """

    folder: Path
    method: str
    tokens: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def per_class(self) -> dict[str, str]:
        """One LoRA per class (``lora.per_class``): each class's folder, relative to ``folder``; else {}."""
        return dict(self.info.get("per_class") or {})

    @property
    def model(self) -> str | None:
        """The model to load instead of the base (finetune: the saved pipeline), else None."""
        return str(self.folder / PIPELINE_DIR) if self.method == "finetune" else None

    def load_into(self, pipe: Any) -> dict[str, str]:
        """Load the learned tokens or the LoRA into ``pipe`` in place; returns each class's token (may be empty)."""
        if self.method == "textual_inversion":
            for label, token in self.tokens.items():
                pipe.load_textual_inversion(str(embedding_folder(self.folder, label)), token=token)
        elif self.method == "lora":
            try:
                import peft  # noqa: F401  (diffusers loads LoRAs through peft)
            except ImportError as e:
                raise ImportError("generate.adapter holds a LoRA, which needs peft: pip install 'sip[lora]'") from e
            if self.per_class:  # one adapter per class, switched per batch (sip.augment.jobs.batch_generator)
                for (label, rel), name in zip(self.per_class.items(), class_adapter_names(self.per_class)):
                    pipe.load_lora_weights(str(self.folder / rel), weight_name=LORA_FILE, adapter_name=name)
                return dict(self.tokens)
            pipe.load_lora_weights(str(self.folder), weight_name=LORA_FILE)
            pipe.fuse_lora(lora_scale=1.0)
            pipe.unload_lora_weights()  # fused: no cost per step; the adapter layers go
        return dict(self.tokens)


def embedding_folder(out: str | Path, label: str) -> Path:
    """Where the learned embedding of ``label`` lives (``learned_embeds.safetensors`` inside)."""
    from sip.ids import sanitize_label

    return Path(out) / EMBEDDINGS_DIR / sanitize_label(label)


def check_adapter(folder: str | Path, model: str, key: str = "generate.adapter") -> Adapter:
    """A ``sip adapt`` output folder that fits ``model``, checked before any model loads.

    Raises:
        FileNotFoundError: the folder, its run.json or a weight file it lists does not exist.
        ValueError: not a finished ``sip adapt`` folder, or made for another base model.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{key}: {path} does not exist; pass the output folder of `sip adapt RECIPE -o OUT`")
    info = read_adapt_run(path)
    if info is None:
        raise FileNotFoundError(f"{key}: {path} holds no {ADAPT_RUN}: it is not a `sip adapt` output folder")
    if not info.get("finished"):
        raise ValueError(f"{key}: {path} is an unfinished `sip adapt` run (step {info.get('step', 0)} of "
                         f"{info.get('steps')}); rerun the same `sip adapt` command to finish it")
    method = info.get("method")
    if method not in METHODS:
        raise ValueError(f"{key}: {path}/{ADAPT_RUN} names method {method!r}, not one of {', '.join(METHODS)}")
    base, here = info.get("base") or {}, base_identity(model)
    if not same_base(base, here):
        raise ValueError(f"{key}: {path} was adapted from {base.get('model')} (weights {base.get('weights_sha256')}) "
                         f"but generate.model is {here['model']} (weights {here.get('weights_sha256')}); an adapter "
                         f"only fits its own base model: set generate.model to {base.get('model')}, or run `sip "
                         f"adapt --model {model}`")
    needed = {"textual_inversion": [embedding_folder(path, lb) / "learned_embeds.safetensors"
                                    for lb in info.get("tokens", {})],
              "lora": [path / rel / LORA_FILE for rel in (info.get("per_class") or {"": ""}).values()],
              "finetune": [path / PIPELINE_DIR / "model_index.json"]}[method]
    if missing := [str(p) for p in needed if not p.is_file()]:
        raise FileNotFoundError(f"{key}: {path} is missing {', '.join(missing)}; rerun `sip adapt` into it")
    return Adapter(path, method, dict(info.get("tokens", {})), info)


def adapter_tokens(folder: str | Path | None) -> dict[str, str]:
    """Each class's learned token in a ``sip adapt`` folder (textual inversion), for the prompt builder; else {}."""
    info = read_adapt_run(folder) if folder else None
    return dict(info.get("tokens") or {}) if info and info.get("method") == "textual_inversion" else {}


def class_adapter_names(per_class: dict[str, str]) -> list[str]:
    """The peft adapter name of each class's LoRA, in ``per_class`` order."""
    return [f"sip_class_{i}" for i in range(len(per_class))]


def class_adapters(folder: str | Path | None) -> dict[str, str]:
    """Each class's adapter name in a per-class LoRA ``sip adapt`` folder (what the generator switches to for a
    batch of that class), else {}."""
    info = read_adapt_run(folder) if folder else None
    per_class = dict((info or {}).get("per_class") or {})
    return dict(zip(per_class, class_adapter_names(per_class)))


def load_generation_models(config: Any) -> tuple[Any, Any]:
    """The img2img pipeline a :class:`~sip.augment.generate.GenerateConfig` names, with its ``adapter`` loaded and
    its ``lora`` fused, and its ``tiny_vae`` (or None).

    Paths (``lora``, ``tiny_vae``, ``adapter`` and the adapter's base) are checked before any model loads.
    """
    check_generation_paths(config.lora, config.tiny_vae)
    adapter = check_adapter(config.adapter, config.model or DEFAULT_SD_MODEL) if config.adapter else None
    model = (adapter.model if adapter else None) or config.model
    pipe = load_diffusion_pipeline(model, "img2img", config.dtype, config.device, config.scheduler)
    if adapter:
        adapter.load_into(pipe)
    if config.lora:
        load_lora(pipe, config.lora, config.lora_scale)
    tiny = load_tiny_vae(config.tiny_vae, config.dtype, config.device) if config.tiny_vae else None
    return pipe, tiny
