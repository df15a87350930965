"""Optional filter: drop generated variants that no longer show their label.

Two built-in kinds in :data:`FILTERS` (users register their own):

- ``"classifier"``: a teacher classifier's probability of the source label; kept when ≥ threshold.
- ``"clip"``: CLIP image–prompt score, 100 · cos(image, text) as in CLIPScore (Hessel et al., 2021);
  kept when ≥ threshold.

Each returns one ``(keep, scores)`` per image; the scores go into the metadata whether the image is
kept or not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from sip.registry import Registry
from sip.runtime import check_device


@dataclass(frozen=True)
class FilterConfig:
    """Filter settings.

    Attributes:
        kind: "none", "classifier" or "clip" (or a name you registered in ``FILTERS``).
        model: classifier: a sip training run folder / checkpoint or a timm name; clip: hub id or folder.
        threshold: classifier: minimum probability of the source label (0-1); clip: minimum score
            (0-100). Higher keeps fewer, more faithful images.
        batch_size: images per forward pass.
        device: "auto", "cpu", "cuda" …
    """

    kind: str = "none"
    model: str | None = None
    threshold: float = 0.5
    batch_size: int = 64
    device: str = "auto"

    def __post_init__(self):
        if self.kind != "none" and not self.model:
            raise ValueError(f"filter kind {self.kind!r} needs filter.model (a classifier run folder or CLIP id)")
        if self.kind == "classifier" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"classifier filter threshold is a probability in [0, 1], got {self.threshold}")
        if self.kind == "clip" and not -100.0 <= self.threshold <= 100.0:  # 100 · cosine: outside keeps all or none
            raise ValueError(f"filter.threshold for kind 'clip' is a CLIP score (100 · cosine) in [-100, 100], got "
                             f"{self.threshold}; CLIPScore's usual cut-offs are 20-30 (the default 0.5 is the "
                             f"classifier's probability)")
        if self.batch_size <= 0:
            raise ValueError(f"filter.batch_size must be positive, got {self.batch_size}")
        if self.kind != "none" and self.kind not in FILTERS:  # said at load time, not after generation began
            raise ValueError(f"filter.kind must be none or one of {', '.join(FILTERS.names())} (or a filter you "
                             f"registered in FILTERS), got {self.kind!r}")
        unread = [k for k in ("model", "threshold", "batch_size")  # device: set per process by the launcher
                  if self.kind == "none" and getattr(self, k) != getattr(FilterConfig, k)]
        if unread:  # no filter runs: its settings would be ignored
            raise ValueError(f"filter.{unread[0]} is set but filter.kind is 'none' (no filter runs): set filter.kind "
                             f"(classifier or clip) or remove {', '.join('filter.' + k for k in unread)}")
        check_device(self.device, "filter.device")


class ImageFilter(Protocol):
    """Images + their labels and prompts → one (keep, scores) per image."""

    def __call__(self, images: Sequence[Image.Image], labels: Sequence[str],
                 prompts: Sequence[str]) -> list[tuple[bool, dict[str, Any]]]: ...


FILTERS: Registry[Callable[[FilterConfig], ImageFilter]] = Registry("filter")


class ClassifierFilter:
    """Keep a variant when a classifier still gives its source label probability ≥ threshold.

    Args:
        model (torch.nn.Module): classifier returning logits over ``class_names``.
        class_names (Sequence[str]): label of each logit.
        transform (Callable[[Image], Tensor]): the classifier's preprocessing of one PIL image.
        threshold (float, optional): Defaults to 0.5.
        batch_size (int, optional): Defaults to 64.
    """

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], transform: Callable[[Image.Image], torch.Tensor],
                 threshold: float = 0.5, batch_size: int = 64):
        self.model, self.class_names, self.transform = model.eval(), list(class_names), transform
        self.index = {name: i for i, name in enumerate(self.class_names)}
        self.threshold, self.batch_size = threshold, batch_size

    @classmethod
    def from_config(cls, config: FilterConfig) -> ClassifierFilter:
        """Load a sip-trained classifier (run folder or .safetensors) with its class names and its own
        preprocessing (input size, mean/std recorded at training time)."""
        from torchvision import transforms

        from sip.models.checkpoints import input_transform, load_classifier
        from sip.runtime import resolve_device

        model, meta = load_classifier(config.model)
        classes = meta.get("classes")
        if not classes:
            raise ValueError(f"{config.model} records no class names; train it with `sip train` so the filter "
                             "can match labels to logits")
        input_config = meta.get("input_config") or {}
        if not input_config.get("input_size"):
            raise ValueError(f"{config.model} records no input config (input size, mean, std); train it with "
                             "`sip train`")
        size = list(input_config["input_size"])[-2:]
        transform = transforms.Compose([transforms.Resize(size), input_transform(input_config)])
        return cls(model.to(resolve_device(config.device)), classes, transform, config.threshold, config.batch_size)

    @torch.inference_mode()
    def __call__(self, images, labels, prompts=None):
        for label in set(labels):
            if label not in self.index:
                raise ValueError(f"the filter's classifier does not know label {label!r}; it knows {self.class_names}")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.transform(im) for im in images[start : start + self.batch_size]]).to(device)
            probs = self.model(batch).float().softmax(-1).cpu()
            for p, label in zip(probs, labels[start : start + self.batch_size]):
                prob = float(p[self.index[label]])
                pred = self.class_names[int(p.argmax())]
                out.append((prob >= self.threshold, {"classifier_prob": round(prob, 4), "classifier_pred": pred}))
        return out


class CLIPFilter:
    """Keep a variant when its CLIP image–prompt score (100·cosine) is ≥ threshold.

    Args:
        model: ``transformers.CLIPModel``.
        processor: its ``CLIPProcessor``.
        threshold (float, optional): Defaults to 20.
        batch_size (int, optional): Defaults to 64.
    """

    def __init__(self, model, processor, threshold: float = 20.0, batch_size: int = 64):
        self.model, self.processor, self.threshold, self.batch_size = model.eval(), processor, threshold, batch_size

    @classmethod
    def from_config(cls, config: FilterConfig) -> CLIPFilter:
        from transformers import CLIPModel, CLIPProcessor

        from sip.models.diffusion import check_model_source
        from sip.runtime import resolve_device

        source = check_model_source(config.model, "CLIP model")
        model = CLIPModel.from_pretrained(source).to(resolve_device(config.device))
        return cls(model, CLIPProcessor.from_pretrained(source), config.threshold, config.batch_size)

    @torch.inference_mode()
    def __call__(self, images, labels, prompts):
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            ims, texts = list(images[start : start + self.batch_size]), list(prompts[start : start + self.batch_size])
            inputs = self.processor(text=texts, images=ims, return_tensors="pt", padding=True, truncation=True).to(device)
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            score = 100.0 * torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            out += [(float(s) >= self.threshold, {"clip_score": round(float(s), 3)}) for s in score.cpu()]
        return out


FILTERS.register("classifier", ClassifierFilter.from_config)
FILTERS.register("clip", CLIPFilter.from_config)


def build_filter(config: FilterConfig) -> ImageFilter | None:
    """The filter ``config.kind`` names, or None for "none"."""
    if config.kind == "none":
        return None
    return FILTERS.get(config.kind)(config)


def keep_all(n: int) -> list[tuple[bool, dict[str, Any]]]:
    return [(True, {}) for _ in range(n)]


def pixel_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference in [0, 1] (a cheap diversity measure)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB").resize(a.size), dtype=np.float32)
    return float(np.abs(x - y).mean() / 255.0)
