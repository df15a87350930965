"""``SIPAugment``: the sip bank read at training time, one image at a time, as a torchvision transform.

With probability ``p`` an image is replaced by one of its own sip variants. Variants are found by the
content hash ``sip augment`` records for every source image (``source_hash`` in
``train/metadata.jsonl``), so the transform works with any dataset class that yields the same pictures
— torchvision's ``FashionMNIST`` or ``ImageFolder``, a Hugging Face dataset, your own — with no index
plumbing between the dataset and the bank::

    from torchvision.transforms import v2
    from sip.transforms import SIPAugment

    train_tf = v2.Compose([SIPAugment("runs/aug", p=0.5), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    train_set = torchvision.datasets.FashionMNIST(root, train=True, transform=train_tf)

**Matching what sip read.** sip hashes the RGB image as its source produced it:
``image_hash(to_rgb(image))`` (EXIF orientation applied, transparency composited on white, 16-bit grey
scaled to 8 bits), and for Fashion-MNIST after the bicubic 28 → 32 resize the shipped model works at.
The transform applies the same normalisation before hashing: :func:`source_key` = ``to_rgb``, then a
bicubic resize to ``resize_to`` × ``resize_to`` when the image is another size. ``resize_to="auto"``
(default) takes it from the bank's ``run.json`` (``config.source.size`` of a Fashion-MNIST run, else
no resize), so torchvision's grey 28×28 ``FashionMNIST`` images match a bank written from
``source.kind: fashion-mnist, size: 32``. For image folders, torchvision's default loader
(``Image.open(f).convert("RGB")``) matches for RGB, grey, palette and CMYK files; it drops alpha
instead of compositing it, so pass ``loader=sip.data.sources.load_image`` to ``ImageFolder`` when the
folder holds transparent, 16-bit or EXIF-rotated images. Anything else: pass ``key=`` (a callable
image → hash string) that reproduces how your images were read.

**What comes out.** A variant is resized and converted back to the input's size and mode
(``match_input=True``), so a grey 28×28 input gives a grey 28×28 output and batches still collate.

**Misses never stop an epoch.** An image with no variant (or an unreadable variant file) is counted in
``misses`` and returned unchanged. ``hits``/``misses`` live in shared memory, one slot per DataLoader
worker, so the main process reads totals over all workers after (or during) an epoch.

**Cost.** A lookup hashes the image's pixels (SHA-256, as recorded) and reads a dict loaded once per
process; a Fashion-MNIST bank also gets aliases keyed by the grey 28×28 originals, so torchvision's
images are found without the RGB copy and resize. ``scripts/bench_transform.py`` measures it against
decoding a PNG of the bank (here: 13 µs vs 126 µs for Fashion-MNIST, 0.69 ms vs 3.3 ms for 256 px
photos, where SHA-256 of the 196 KB of pixels is the cost).

**Randomness.** The swap decision and the variant choice are drawn from torch's RNG, like every
torchvision random transform. DataLoader seeds it in each worker (``base_seed + worker_id``, a new base
seed each epoch), so workers never repeat each other's draws, and
``DataLoader(generator=torch.Generator().manual_seed(s))`` (or ``torch.manual_seed(s)`` with
``num_workers=0``) reproduces every choice.

**Online mode.** Pass a :class:`~sip.augment.generate.DiffusionGenerator` (plus optionally a captioner and a
:class:`~sip.augment.prompts.PromptBuilder`) and a ``cache_dir``: on a miss the image is captioned, its SIP
prompts are built from its label, ``generator.config.per_image`` variants are generated (seeded by
the image's hash, so the same image always gives the same variants) and written with
:class:`~sip.data.bank.DatasetWriter` in the usual layout — the cache is itself a sip dataset, readable by
``SIPAugment``, ``sip report`` and ``sip.export``, and usable as synthetic data by ``sip train``. The
label comes from the target when the transform is called as a joint transform, ``t(image, target)``
(as ``v2.Compose`` passes two inputs on, e.g. from a dataset wrapper), else from ``label_fn(image)``;
with neither, a miss is only counted. A CUDA generator needs ``num_workers=0`` (or the "spawn" start method): CUDA does not survive
``fork``.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sip.data.bank import METADATA, dataset_root
from sip.data.sources import load_image, to_rgb
from sip.data.variant_index import VariantIndex, bank_resize, source_key

__all__ = ["SIPAugment", "source_key"]

logger = logging.getLogger(__name__)

COUNTERS = ("hits", "misses", "generated", "errors")
# Counter rows: row 0 is the main process, row 1 + k DataLoader worker k (modulo, beyond 63 workers
# two workers share a row and a count may be lost to a race; totals stay close).
_COUNTER_ROWS = 64
# Output modes the input's mode is restored to; any other mode gets the RGB variant.
_MATCHABLE_MODES = ("RGB", "L", "RGBA")


class SIPAugment:
    """With probability ``p``, replace an image by one of its sip variants (PIL in → PIL out).

    Args:
        bank (str | Path | Sequence, optional): one or more datasets written by ``sip augment`` (the
            folder holding ``train/metadata.jsonl``); read-only. Defaults to None (online cache only).
        p (float, optional): probability of replacing an image, in [0, 1]. Defaults to 0.5 (SIP swaps
            each real image for a variant about half the time).
        key (Callable[[Image], str], optional): image → hash, replacing :func:`source_key` for
            datasets that read images differently from sip. Defaults to None.
        resize_to (int | "auto" | None, optional): size the image is resized to (bicubic) before
            hashing; "auto" reads it from the banks' ``run.json``. Defaults to "auto".
        match_input (bool, optional): give the variant the input's size and mode. Defaults to True.
        generator (DiffusionGenerator, optional): enables online mode (generate on a miss).
        captioner (Captioner, optional): online mode: captions the image for its prompt; None builds
            label-only prompts. Defaults to None.
        prompt_builder (PromptBuilder, optional): online mode; defaults to SIP's templates counted
            with the generator's tokenizer.
        classes (Sequence[str], optional): online mode: label names in target-index order (needed to
            write the cache and to read integer targets).
        label_fn (Callable[[Image], str | int], optional): online mode: the label of an image when
            the transform is called without a target. Defaults to None.
        cache_dir (str | Path, optional): online mode: where generated variants are written (a sip
            dataset; created). Required with ``generator``.

    Raises:
        ValueError: ``p`` outside [0, 1], online mode without ``cache_dir`` / ``classes``, no bank at
            all, or banks that disagree on ``resize_to``.
        FileNotFoundError: a bank folder without ``train/metadata.jsonl``.
    """

    def __init__(self, bank: str | Path | Sequence[str | Path] | None = None, p: float = 0.5, *,
                 key: Callable[[Image.Image], str] | None = None, resize_to: int | str | None = "auto",
                 match_input: bool = True, generator: Any | None = None, captioner: Any | None = None,
                 prompt_builder: Any | None = None, classes: Sequence[str] | None = None,
                 label_fn: Callable[[Image.Image], str | int] | None = None,
                 cache_dir: str | Path | None = None):
        # 1. check inputs (cheap: nothing is loaded until the first lookup in each process)
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        banks = [] if bank is None else [bank] if isinstance(bank, (str, os.PathLike)) else list(bank)
        self.banks = [dataset_root(b) for b in banks]
        for root in self.banks:
            if not (root / "train" / METADATA).is_file() and not list((root / "train").glob("metadata.shard-*.jsonl")):
                raise FileNotFoundError(f"{root} is not a sip dataset: {root / 'train' / METADATA} does not exist "
                                        "(write one with `sip augment`)")
        if generator is not None:
            if cache_dir is None:
                raise ValueError("online mode (generator=...) needs cache_dir= to write the generated variants to")
            if not classes:
                raise ValueError("online mode needs classes=[...]: the label names, in target-index order")
        elif cache_dir is not None and not (Path(cache_dir) / "train" / METADATA).is_file():
            raise FileNotFoundError(f"cache_dir {cache_dir} holds no sip dataset and no generator was given to fill it")
        if not self.banks and cache_dir is None:
            raise ValueError("SIPAugment needs a bank (a `sip augment` output folder) or generator= and cache_dir=")
        self.p = float(p)
        self.key = key
        self.match_input = match_input
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.generator, self.captioner, self.prompt_builder = generator, captioner, prompt_builder
        self.classes = list(classes) if classes else None
        self.label_fn = label_fn
        # 2. the hashing normalisation
        if resize_to == "auto":
            found = {s for s in (bank_resize(r) for r in self.banks + ([self.cache_dir] if self.cache_dir else []))}
            if len(found) > 1:
                raise ValueError(f"the banks were hashed at different sizes {sorted(found, key=str)}; pass resize_to=")
            resize_to = found.pop() if found else None
        if resize_to is not None and (not isinstance(resize_to, int) or resize_to <= 0):
            raise ValueError(f"resize_to must be a positive int, 'auto' or None, got {resize_to!r}")
        self.resize_to = resize_to
        # 3. per-process state, rebuilt lazily after fork / unpickling
        self.counts = torch.zeros((_COUNTER_ROWS, len(COUNTERS)), dtype=torch.int64).share_memory_()
        self._counts_view = None
        self.index = VariantIndex(self.banks, self.cache_dir, key, resize_to)
        self._default_builder = None
        # 4. online mode: the cache's writer is made here, once, so run.json exists before workers fork
        self.writer = self._make_writer() if generator is not None else None

    # ------------------------------------------------------------------------------------------------
    # counters
    # ------------------------------------------------------------------------------------------------
    @property
    def hits(self) -> int:
        """Images replaced by a variant (all processes)."""
        return int(self.counts[:, 0].sum())

    @property
    def misses(self) -> int:
        """Lookups that returned the original image: no variant, or an error reading / generating one."""
        return int(self.counts[:, 1].sum())

    @property
    def generated(self) -> int:
        """Online mode: images for which variants were generated and cached."""
        return int(self.counts[:, 2].sum())

    @property
    def errors(self) -> int:
        """Misses caused by an error (unreadable variant file, failed generation); logged once each."""
        return int(self.counts[:, 3].sum())

    def stats(self) -> dict[str, int]:
        return {name: int(self.counts[:, i].sum()) for i, name in enumerate(COUNTERS)}

    def reset_counters(self) -> None:
        self.counts.zero_()

    def _count(self, name: str) -> None:
        if self._counts_view is None:  # a numpy view of the shared memory: ~50x cheaper to bump than a tensor
            self._counts_view = self.counts.numpy()
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id % (_COUNTER_ROWS - 1)
        self._counts_view[row, COUNTERS.index(name)] += 1

    # ------------------------------------------------------------------------------------------------
    # the index: source hash -> variant files, loaded on first use in each process
    # ------------------------------------------------------------------------------------------------
    def key_of(self, image: Image.Image) -> str:
        """The hash this transform looks ``image`` up by."""
        return self.index.key_of(image)

    @property
    def _index(self) -> dict[str, list[str]] | None:
        return self.index.loaded

    @property
    def _aliases(self) -> bool:
        return self.index.aliases

    def _load_index(self) -> dict[str, list[str]]:
        return self.index.load()

    def _read_cache_tail(self) -> int:
        return self.index.read_cache_tail(self.writer.done.add if self.writer is not None else None)

    def _find(self, image: Image.Image) -> tuple[str | None, list[str] | None]:
        return self.index.find(image)

    def variants(self, image: Image.Image) -> list[str]:
        """Paths of the variants of ``image`` in the banks (sorted; empty on a miss). No counting, no RNG."""
        return list(self._find(image)[1] or ())

    # ------------------------------------------------------------------------------------------------
    # the transform
    # ------------------------------------------------------------------------------------------------
    def __call__(self, image: Any, *rest: Any) -> Any:
        """Return ``image`` or one of its variants; with extra inputs (``(image, target)`` from
        ``v2.Compose`` or a dataset's ``transforms=``), return them unchanged after the image."""
        if not rest and isinstance(image, tuple) and image and isinstance(image[0], Image.Image):
            return self(*image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"SIPAugment takes a PIL image (put it before ToTensor / ToImage), got {type(image).__name__}")
        out = self._augment(image, rest[0] if rest else None)
        return (out, *rest) if rest else out

    def _augment(self, image: Image.Image, target: Any) -> Image.Image:
        if self.p <= 0.0 or (self.p < 1.0 and float(torch.rand(())) >= self.p):
            return image
        try:
            key, files = self._find(image)
        except Exception as e:  # a user's key function or an odd image: never stop the epoch
            self._error(f"cannot hash the image ({type(e).__name__}: {e})")
            return image
        if not files and self.cache_dir is not None:
            self._read_cache_tail()  # another worker may have generated it meanwhile
            files = self._index.get(key)
        if not files and self.generator is not None:
            files = self._generate(image, key, target)
        if not files:
            self._count("misses")
            return image
        path = files[int(torch.randint(len(files), ()))] if len(files) > 1 else files[0]
        try:
            variant = load_image(path)
        except ValueError as e:
            self._error(f"unreadable variant {path}: {e}")
            return image
        self._count("hits")
        return self._match(variant, image) if self.match_input else variant

    def _error(self, message: str) -> None:
        self._count("errors")
        self._count("misses")
        logger.warning("SIPAugment: %s; the original image is used", message)

    @staticmethod
    def _match(variant: Image.Image, original: Image.Image) -> Image.Image:
        if variant.size != original.size:
            variant = variant.resize(original.size, Image.BICUBIC)
        if original.mode != variant.mode and original.mode in _MATCHABLE_MODES:
            variant = variant.convert(original.mode)
        return variant

    # ------------------------------------------------------------------------------------------------
    # online mode
    # ------------------------------------------------------------------------------------------------
    def _make_writer(self):
        from sip.augment.loop import run_info
        from sip.config import to_dict
        from sip.data.bank import DatasetWriter

        gen = self.generator
        builder = self._builder()
        config = {"kind": "online", "source": {"kind": "transform"}, "resize_to": self.resize_to,
                  "generate": to_dict(gen.config), "prompt": to_dict(builder.config),
                  "captioner": getattr(self.captioner, "identity", None)}
        return DatasetWriter(self.cache_dir, run_info(config, gen, mode="img2img (SIPAugment online)"), self.classes)

    def _builder(self):
        if self.prompt_builder is not None:
            return self.prompt_builder
        if self._default_builder is None:
            from sip.augment.prompts import PromptBuilder, PromptConfig

            config = PromptConfig(max_tokens=min(77, self.generator.max_prompt_tokens))
            self._default_builder = PromptBuilder.for_tokenizer(config, self.generator.pipe.tokenizer)
        return self._default_builder

    def _label(self, image: Image.Image, target: Any) -> str | None:
        label = target if target is not None else (self.label_fn(image) if self.label_fn is not None else None)
        if isinstance(label, torch.Tensor) and label.numel() == 1:
            label = label.item()
        if isinstance(label, numbers.Integral) and 0 <= int(label) < len(self.classes):
            return self.classes[int(label)]
        if isinstance(label, str) and label in self.classes:
            return label
        return None

    def _generate(self, image: Image.Image, key: str, target: Any) -> list[str]:
        """Caption → SIP prompts → img2img → write to the cache; returns the new variant files."""
        from sip.augment.loop import Job, generate_and_write, variant_record
        from sip.augment.run import RunSummary
        from sip.ids import image_seed, variant_id

        label = self._label(image, target)
        if label is None:
            return []  # no label, no SIP prompt: counted as a miss by the caller
        gen, builder = self.generator, self._builder()
        cfg = gen.config
        source_id = f"hash:{key}"
        try:
            rgb = to_rgb(image)
            if self.resize_to and rgb.size != (self.resize_to, self.resize_to):
                rgb = rgb.resize((self.resize_to, self.resize_to), Image.BICUBIC)
            caption = self.captioner([rgb])[0] if self.captioner is not None else None
            prompts = [builder(label, caption, v) for v in range(cfg.per_image)]
            seeds = [image_seed(cfg.seed, source_id, v) for v in range(cfg.per_image)]
            negative = builder.config.negative_prompt
            jobs = [Job(variant_id(source_id, v), label, prompt, seed,
                        variant_record(source=source_id, source_hash=key, variant=v, caption=caption, prompt=prompt,
                                       negative_prompt=negative, strength=cfg.strength, seed=seed,
                                       settings=gen.settings()))
                    for v, (prompt, seed) in enumerate(zip(prompts, seeds))]
            summary = RunSummary(str(self.cache_dir))
            generate_and_write([jobs], lambda batch: gen.img2img([rgb] * len(batch), [j.prompt for j in batch],
                                                                 [j.seed for j in batch], negative),
                               self.writer, None, summary)
            if summary.failed:
                raise RuntimeError("; ".join(summary.reasons))
        except Exception as e:  # out of memory, a captioner's error …: count, say why, keep training
            self._count("errors")
            logger.warning("SIPAugment: generating variants failed (%s: %s); the original image is used",
                           type(e).__name__, e)
            return []
        self._count("generated")
        self._read_cache_tail()
        return self._index.get(key, [])

    # ------------------------------------------------------------------------------------------------
    # pickling and repr
    # ------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_default_builder=None, _counts_view=None)
        return state

    def __repr__(self) -> str:
        banks = [str(b) for b in self.banks]
        parts = [f"p={self.p}"]
        if banks:
            parts.append(f"bank={banks[0]!r}" if len(banks) == 1 else f"bank={banks!r}")
        if self.resize_to:
            parts.append(f"resize_to={self.resize_to}")
        if self.key is not None:
            parts.append(f"key={getattr(self.key, '__name__', type(self.key).__name__)}")
        if not self.match_input:
            parts.append("match_input=False")
        if self.generator is not None:
            parts.append(f"online={self.generator.model_id!r}")
        if self.cache_dir is not None:
            parts.append(f"cache_dir={str(self.cache_dir)!r}")
        return f"{type(self).__name__}({', '.join(parts)})"
