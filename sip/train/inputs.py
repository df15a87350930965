"""What a run is built from: the model a recipe names, the label space, the training and evaluation
images, their preprocessing (the model's own timm data config) and the per-epoch view of the data."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from sip.data.images import ImageSource
from sip.data.mixing import MixedImages, RealImages, SyntheticImages
from sip.data.sources import SourceConfig, open_source
from sip.ids import stable_seed
from sip.models.checkpoints import load_checkpoint_file, load_weights
from sip.models.classifiers import create_model
from sip.models.kdeformer import kdeformer_config
from sip.models.kdeformer_layers import use_kdeformer_in_vit
from sip.train.recipe import DataSection, ModelSection
from sip.train.views import ReplayableCrop, seed_item_rngs

# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------

def model_create_kwargs(section: ModelSection, num_classes: int, img_size: int | None) -> dict[str, Any]:
    """The keyword arguments ``timm.create_model`` gets for ``section`` (saved with the weights)."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": section.in_chans}
    # Only models whose timm config says they take a fixed input size (ViT, DeiT, ...) get data.img_size;
    # convolutional ones (ResNet, RedNet) work at any size and would reject the argument.
    cfg = timm.models.get_pretrained_cfg(section.name)
    if section.img_size is not None:
        kwargs["img_size"] = section.img_size
    elif img_size is not None and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = img_size
    if section.patch_size is not None:
        kwargs["patch_size"] = section.patch_size
    if section.drop_rate:
        kwargs["drop_rate"] = section.drop_rate
    if section.drop_path_rate:
        kwargs["drop_path_rate"] = section.drop_path_rate
    kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in section.kwargs.items()})
    return kwargs


def build_model(section: ModelSection, num_classes: int, img_size: int | None) -> tuple[nn.Module, dict[str, Any]]:
    """Create the model a :class:`ModelSection` describes, loading ``section.checkpoint`` if set.

    Returns:
        (model, create_kwargs): the kwargs rebuild the same architecture (they go into the saved metadata).
    """
    if section.num_classes is not None and section.num_classes != num_classes:
        raise ValueError(f"model.num_classes is {section.num_classes} but the data has {num_classes} classes")
    kwargs = model_create_kwargs(section, num_classes, img_size)
    model = create_model(section.name, kwargs, section.pretrained)
    if section.checkpoint:
        state, _meta = load_checkpoint_file(section.checkpoint)
        load_weights(model, state, section.checkpoint)
    if (kde := kdeformer_config(section.attention, section.kdeformer, "model")) is not None:
        if not use_kdeformer_in_vit(model, kde):  # same weights: the swap changes the forward only
            raise ValueError(f"model.attention: kdeformer but {section.name!r} has no attention layer to swap "
                             f"(timm Attention or sip's Locality Self-Attention); use a ViT / DeiT or "
                             f"model.attention: exact")
    return model, kwargs




# ----------------------------------------------------------------------------------------------------
# 2. Data
# ----------------------------------------------------------------------------------------------------

def class_names(data: DataSection) -> list[str]:
    """The label space: the test set's classes (the real training set must agree)."""
    eval_classes = list(open_source(data.eval).classes)
    if data.real is not None:
        real_classes = list(open_source(data.real).classes)
        if real_classes != eval_classes:
            raise ValueError(f"training classes {real_classes} differ from evaluation classes {eval_classes}")
    return eval_classes


def _same_pool(a: SourceConfig, b: SourceConfig) -> bool:
    """Whether two sources read the same images (so their ids can be compared)."""
    return (a.kind, a.path, a.split) == (b.kind, b.path, b.split)


def open_splits(data: DataSection) -> tuple[ImageSource | None, ImageSource | None]:
    """The real training images and the validation split (:class:`~sip.train.recipe.ValSection`), disjoint.

    Carved from ``data.real``'s pool: ``data.val.size`` images drawn by ``data.val.seed`` among the pool's images
    that are not shots (with ``shots`` null they leave the training set). A separate ``data.val.source`` is read
    as given (``size`` draws from it). Either way the validation images must not be test images.

    Returns:
        (real training source or None, validation source or None).

    Raises:
        ValueError: the pool has fewer free images than ``data.val.size``, or validation and test images overlap.
    """
    val = data.val
    if val is None:
        return (open_source(data.real) if data.real is not None else None), None
    rng = np.random.default_rng(stable_seed("val", val.seed))
    if val.source is not None:
        real = open_source(data.real) if data.real is not None else None
        pool, free, where = open_source(val.source), None, "data.val.source"
    else:
        real = None
        pool, where = open_source(replace(data.real, shots=None)), "data.real's pool"
        free = list(range(len(pool)))
        if data.real.shots is not None:
            real = open_source(data.real)
            shots = set(real.source_ids())
            free = [i for i, sid in enumerate(pool.source_ids()) if sid not in shots]
    free = list(range(len(pool))) if free is None else free
    size = len(free) if val.size is None else val.size
    if size > len(free):
        raise ValueError(f"data.val.size is {size} but {where} has only {len(free)} images to draw from (after the "
                         f"training shots); lower data.val.size or widen the pool")
    pick = sorted(int(free[i]) for i in rng.permutation(len(free))[:size])
    if real is None:  # no shots: the whole pool trained, now without the validation images
        taken = set(pick)
        real = pool.subset([i for i in range(len(pool)) if i not in taken])
    held = pool.subset(pick)
    if _same_pool(val.source or data.real, data.eval):
        overlap = set(held.source_ids()) & set(open_source(data.eval).source_ids())
        if overlap:
            raise ValueError(f"the validation split and the test set (data.eval) share {len(overlap)} images (e.g. "
                             f"{sorted(overlap)[:3]}); draw them from different pools (data.eval.start / stop, "
                             "another split, or data.val.source)")
    return real, held


def build_train_images(data: DataSection, classes: Sequence[str], seed: int) -> MixedImages:
    """Real (without the validation split), synthetic or mixed training images, per ``data``."""
    source, _ = open_splits(data)
    real = RealImages(source) if source is not None else None
    synthetic = SyntheticImages(data.synthetic, classes) if data.synthetic else None
    if real is not None and list(real.classes) != list(classes):
        raise ValueError(f"training classes {real.classes} differ from {list(classes)}")
    return MixedImages(real, synthetic, data.mix, seed=seed)


def build_val_images(data: DataSection, classes: Sequence[str]) -> RealImages | None:
    """The validation split (``data.val``), or None when the recipe has none."""
    _, source = open_splits(data)
    if source is None:
        return None
    if list(source.classes) != list(classes):
        raise ValueError(f"validation classes {list(source.classes)} (data.val) differ from {list(classes)}")
    return RealImages(source)


def build_test_images(data: DataSection) -> RealImages:
    """The test set (``data.eval``): read once, at the end of a finished run."""
    return RealImages(open_source(data.eval))


def resolve_input_config(model: nn.Module, data: DataSection) -> dict[str, Any]:
    """The model's timm data config (input size, mean/std, interpolation, crop), with sip's small-image
    override: ``data.img_size`` replaces the model's input size and the eval crop then keeps the whole
    image (crop_pct 1.0)."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {"in_chans": getattr(model, "in_chans", 3)}
    size = data.img_size
    if size is None:
        grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
        size = int(grid[0]) if grid is not None else None
    if size is not None:
        args["input_size"] = (args["in_chans"], size, size)
    if data.crop_pct is not None:
        args["crop_pct"] = data.crop_pct
    elif data.img_size is not None:
        args["crop_pct"] = 1.0
    for key in ("interpolation", "mean", "std"):
        if getattr(data, key) is not None:
            args[key] = getattr(data, key)
    cfg = resolve_data_config(args=args, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _lanczos_transforms(input_config: dict[str, Any], data: DataSection) -> tuple[Callable, Callable]:
    """Training (crop + flip [+ erasing]) and evaluation (whole image) transforms resizing with Lanczos."""
    from torchvision.transforms import v2

    from sip.data.lanczos import LanczosResize, parse_interpolation
    from sip.models.checkpoints import input_transform

    if data.color_jitter or data.auto_augment:
        raise ValueError(f"data.interpolation {data.interpolation!r} works with crops, flips and random erasing; "
                         "set data.color_jitter: 0 and data.auto_augment: null, or use bicubic")
    size = int(input_config["input_size"][-1])
    _, order = parse_interpolation(input_config["interpolation"])
    tail = input_transform(input_config)
    train = [ReplayableCrop(size, data.scale, data.ratio, data.hflip, input_config["interpolation"]), tail]
    if data.re_prob:
        train.append(v2.RandomErasing(p=data.re_prob, value=0))
    return v2.Compose(train), v2.Compose([LanczosResize(size, order), tail])


def build_transforms(input_config: dict[str, Any], data: DataSection) -> tuple[Callable, Callable]:
    """timm's training and evaluation transforms for ``input_config`` and the data section's augmentation
    (sip's own for ``lanczos2``–``lanczos5`` interpolation, which timm does not have)."""
    from timm.data import create_transform

    if str(input_config["interpolation"]).startswith("lanczos"):
        return _lanczos_transforms(input_config, data)
    common = {"input_size": tuple(input_config["input_size"]), "interpolation": input_config["interpolation"],
                  "mean": tuple(input_config["mean"]), "std": tuple(input_config["std"])}
    train = create_transform(is_training=True, scale=tuple(data.scale), ratio=tuple(data.ratio), hflip=data.hflip,
                             color_jitter=data.color_jitter or None, auto_augment=data.auto_augment,
                             re_prob=data.re_prob, **common)
    evaluate = create_transform(is_training=False, crop_pct=input_config["crop_pct"],
                                crop_mode=input_config.get("crop_mode"), **common)
    return train, evaluate


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators, accelerators' included (what torchvision/timm
    transforms and dropout use); ``torch.manual_seed`` reseeds the CPU generator with the same number."""
    seed_item_rngs(seed)
    torch.manual_seed(seed)


class EpochView(torch.utils.data.Dataset):
    """A shuffled, repeated, per-process view of one epoch of ``images``, with seeded items.

    Item ``g`` of epoch ``e`` (its position in the epoch's global order) is ``make_item(images, index, rng)``
    with Python/NumPy/torch global RNGs (and ``rng``) seeded from ``(seed, e, g)``: the same item gets the same
    augmentation on every run, with any number of DataLoader workers, any number of processes, and after a
    resume in the middle of the epoch, even under another process count. Process ``rank`` of ``world`` takes
    positions ``start + rank``, ``start + rank + world``, …; with several processes the epoch's tail is cut to
    a multiple of ``world`` (every rank takes the same number of steps, as ``DistributedSampler(drop_last=True)``).

    Args:
        images: a dataset with ``__len__`` (and optionally ``set_epoch``).
        make_item (Callable): ``(images, index, rng: random.Random) -> dict`` of tensors / numbers.
        seed (int): run seed.
        repeat (int, optional): passes over ``images`` per epoch. Defaults to 1.
        rank, world (int, optional): this process's share. Defaults to 0, 1.
    """

    def __init__(self, images: Any, make_item: Callable, seed: int, repeat: int = 1, rank: int = 0, world: int = 1):
        self.images, self.make_item, self.seed = images, make_item, seed
        self.repeat, self.rank, self.world = repeat, rank, world
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Plan ``epoch``; ``start``: how many items of the epoch's global order all processes together have
        already taken (a resume inside the epoch, possibly under another process count)."""
        if hasattr(self.images, "set_epoch"):
            self.images.set_epoch(epoch)
        rng = np.random.default_rng(stable_seed("order", self.seed, epoch))
        n = len(self.images)
        self.global_order = np.concatenate([rng.permutation(n) for _ in range(self.repeat)])
        self.epoch = epoch
        rest = max(len(self.global_order) - start, 0) // self.world
        self.positions = start + self.rank + self.world * np.arange(rest)

    @property
    def epoch_length(self) -> int:
        """Items this process takes in a whole epoch."""
        return len(self.global_order) // self.world

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> dict[str, Any]:
        g = int(self.positions[k])
        # the 0 stands where the rank stood when items were numbered per process: one-process runs keep
        # their augmentation streams
        s = stable_seed("item", self.seed, self.epoch, 0, g)
        seed_item_rngs(s)
        return self.make_item(self.images, int(self.global_order[g]), random.Random(s))


class TransformedImages(torch.utils.data.Dataset):
    """``(image, label)`` items → ``{"image": transform(image), "label": label}`` (evaluation)."""

    def __init__(self, images: Any, transform: Callable, indices: Sequence[int] | None = None):
        self.images, self.transform = images, transform
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        image, label = self.images[self.indices[k]]
        return {"image": self.transform(image), "label": label}
