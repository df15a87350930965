"""SIP prompt builder: join an image's class label with its caption.

Following SIP / SGID (Li et al., "Semantic-Guided Generative Image Augmentation Method with Diffusion
Models for Image Classification", AAAI 2024), the label fixes *what* the image shows and the caption
carries *how* this particular image looks, so img2img keeps the class while the details vary. The
builder is deterministic: the same label, caption and variant index give the same prompt.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

PROMPT_PARTS = ("label+caption", "label", "caption")


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are built.

    Attributes:
        template: prompt when the caption does not mention the label; the label is inserted here.
        template_with_label: prompt when the caption already mentions the label (no repeat).
        template_no_caption: prompt for txt2img or an empty caption.
        label_names: readable names for raw labels (e.g. "T-shirt/top" → "t-shirt"); raw label kept
            when missing.
        synonyms: extra names per raw label; variant i uses name i mod (1 + len(synonyms)), so several
            variants of one image see several phrasings.
        negative_prompt: used for classifier-free guidance by every variant (shared, encoded once).
        max_tokens: token budget of the text encoder (77 for CLIP). The caption is cut word by word
            to fit; the label never is.
        parts: what a prompt is made of: "label+caption" (SIP: the label joined with the caption),
            "label" (``template_no_caption`` for every image: the label alone, as DA-Fusion-style
            class prompts) or "caption" (``template_with_label`` with the caption alone, no label
            inserted). The last two exist for the SIP ablation; an empty caption falls back to the label.
    """

    template: str = "a photo of a {label}, {caption}"
    template_with_label: str = "a photo of {caption}"
    template_no_caption: str = "a photo of a {label}"
    label_names: dict[str, str] = field(default_factory=dict)
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    negative_prompt: str = ""
    max_tokens: int = 77
    parts: str = "label+caption"

    def __post_init__(self):
        if self.parts not in PROMPT_PARTS:
            raise ValueError(f"prompt.parts must be one of {', '.join(PROMPT_PARTS)}, got {self.parts!r}")
        for name in ("template", "template_no_caption"):
            if "{label}" not in getattr(self, name):
                raise ValueError(f"prompt.{name} must contain {{label}}, got {getattr(self, name)!r}")
        for name in ("template", "template_with_label"):
            if "{caption}" not in getattr(self, name):
                raise ValueError(f"prompt.{name} must contain {{caption}}, got {getattr(self, name)!r}")
        for name in ("template", "template_with_label", "template_no_caption"):
            fields = {f for _, f, _, _ in string.Formatter().parse(getattr(self, name)) if f}
            if fields - {"label", "caption"}:
                raise ValueError(f"prompt.{name} may only use {{label}} and {{caption}}, got {sorted(fields)}")
        if self.max_tokens < 4:
            raise ValueError(f"prompt.max_tokens must be at least 4, got {self.max_tokens}")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def mentions(caption: str, name: str) -> bool:
    """True when every word of ``name`` appears, in order and adjacent, in ``caption`` (case-insensitive)."""
    cw, nw = _words(caption), _words(name)
    if not nw:
        return False
    return any(cw[i : i + len(nw)] == nw for i in range(len(cw) - len(nw) + 1))


def readable_name(label: str, config: PromptConfig, variant: int = 0) -> str:
    """The name of ``label`` used in prompts: readable name or a synonym picked by ``variant``."""
    names = [config.label_names.get(label, label)] + list(config.synonyms.get(label, []))
    return names[variant % len(names)]


class PromptBuilder:
    """Build SIP prompts from (label, caption), within the text encoder's token budget.

    Args:
        config (PromptConfig): templates, names and budget.
        count_tokens (Callable[[str], int], optional): tokens a prompt takes *including* the begin/end
            tokens (e.g. from the pipeline's tokenizer). Defaults to a word count + 2, which
            under-counts sub-word splits: pass the real tokenizer's counter when you have one.
        label_tokens (dict[str, str], optional): a learned token per raw label (``sip adapt``'s textual
            inversion, :mod:`sip.adapt.use`), put in the prompt in place of the label's name. Defaults to none.
    """

    def __init__(self, config: PromptConfig = PromptConfig(), count_tokens: Callable[[str], int] | None = None,
                 label_tokens: dict[str, str] | None = None):
        self.config = config
        self.count_tokens = count_tokens or (lambda text: len(text.split()) + 2)
        self.label_tokens = dict(label_tokens or {})

    @classmethod
    def for_tokenizer(cls, config: PromptConfig, tokenizer,
                      label_tokens: dict[str, str] | None = None) -> PromptBuilder:
        """A builder that counts tokens with a transformers tokenizer (e.g. ``pipe.tokenizer``)."""
        return cls(config, lambda text: len(tokenizer(text, truncation=False)["input_ids"]), label_tokens)

    def __call__(self, label: str, caption: str | None = None, variant: int = 0) -> str:
        """Return the prompt for one image (or, with no caption, for txt2img of ``label``)."""
        cfg = self.config
        name = self.label_tokens.get(label) or readable_name(label, cfg, variant)
        caption = (caption or "").strip().rstrip(".")
        if not caption or cfg.parts == "label":
            return cfg.template_no_caption.format(label=name)
        all_names = [cfg.label_names.get(label, label), label, *cfg.synonyms.get(label, [])]
        if cfg.parts == "caption":
            all_names = []  # never insert the label, whatever the caption says
        template = cfg.template_with_label if any(mentions(caption, n) for n in all_names) else cfg.template
        if cfg.parts == "caption":
            template = cfg.template_with_label
        words = caption.split()
        while True:
            prompt = template.format(label=name, caption=" ".join(words)).strip().rstrip(",").strip()
            if self.count_tokens(prompt) <= cfg.max_tokens or not words:
                break
            words.pop()  # cut the caption from its end; never the label
            if template == cfg.template_with_label and not any(mentions(" ".join(words), n) for n in all_names):
                template = cfg.template  # the cut removed the label's mention: insert the label instead
        if not words:
            prompt = cfg.template_no_caption.format(label=name)
        return prompt
