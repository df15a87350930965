"""Train any timm classifier on real images, sip's synthetic images, or a mix of both.

``run_training(recipe, run_dir)`` reads top to bottom: 1. check the recipe and the run folder,
2. build the data, 3. build the model (timm registry; unknown names list close matches), 4. build
preprocessing from the model's own timm data config, 5. optimiser and schedule (AdamW, linear warm-up
then cosine), 6. resume from the last checkpoint if there is one, 7. the epoch loop (progress bar,
top-1/top-5 evaluation, metrics as JSON lines, safetensors checkpoints), 8. save the final model.

The loop itself (:func:`fit`) is shared with distillation (``sip.distill``), which only swaps the loss.
Runs are deterministic: the order of each epoch, every item's augmentation and every step's dropout are
seeded from ``(run.seed, epoch, position)`` and ``(run.seed, step)``, so a run resumed from a checkpoint
ends with the same weights as an uninterrupted one (on the same machine and thread count).

Run folder::

    config.yaml          the resolved recipe
    metrics.jsonl        one JSON line per epoch (train loss/accuracy, eval top-1/top-5, lr, time)
    checkpoint/          model.safetensors + state.pt (optimizer, scheduler, counters) of the last save
    model.safetensors    final weights; its metadata names the timm model, its kwargs, the classes and the
                         preprocessing, so ``sip.distill.teachers`` can rebuild it without the recipe
    final_metrics.json   what run_training returns
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch import nn

from sip.config import ConfigError, from_dict, save_config, to_dict
from sip.data.mixing import MixConfig, MixedImages, RealImages, SyntheticImages
from sip.data.sources import SourceConfig, open_source
from sip.ids import stable_seed
from sip.models.classifiers import check_model_name, create_model, register_sip_models  # noqa: F401
from sip.runtime import cpu_has_amx, large_input, resolve_device, resolve_precision  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
METADATA_KEY = "sip"


# ----------------------------------------------------------------------------------------------------
# 1. The recipe
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSourceConfig(SourceConfig):
    """A :class:`~sip.data.sources.SourceConfig` whose defaults point at a held-out split (Fashion-MNIST's
    official 10k test set), so that overriding one key (``data.eval.shots=...``) keeps evaluating on it."""

    split: str = "test"
    start: int = 0


@dataclass(frozen=True)
class DataSection:
    """Which images, how they are mixed and preprocessed, and how they are batched."""

    real: SourceConfig | None = field(default_factory=SourceConfig)  # real images (default: the F-MNIST pool 50000+); null = none
    synthetic: str | None = None  # a sip dataset folder (DIR/train/metadata.jsonl); null = real only
    mix: MixConfig = field(default_factory=MixConfig)  # how real and synthetic share an epoch
    eval: EvalSourceConfig = field(default_factory=EvalSourceConfig)  # held-out set; its classes are the label space
    img_size: int | None = 32  # network input size; null = the model's own (224 for most timm models)
    crop_pct: float | None = None  # eval resize-then-center-crop; null = 1.0 when img_size is set (no border loss)
    scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area range; ImageNet's 0.08 is too harsh at 28 px
    ratio: tuple[float, float] = (0.75, 1.3333333)  # RandomResizedCrop aspect range
    hflip: float = 0.5  # horizontal flip probability (clothes, animals: fine; digits, text: set 0)
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter; 0 for grey images
    auto_augment: str | None = None  # a timm policy string such as "rand-m9-mstd0.5"; costs CPU time per image
    re_prob: float = 0.0  # random erasing probability
    interpolation: str | None = None  # resize filter; null = the model's
    mean: tuple[float, float, float] | None = None  # normalisation; null = the model's own
    std: tuple[float, float, float] | None = None
    batch_size: int = 128  # per process; the last partial batch of an epoch is dropped
    eval_batch_size: int = 512  # inference only: larger is faster until memory runs out
    num_workers: int = 0  # DataLoader workers; 0 decodes in the training process (best on 1-2 cores)
    repeat: int = 1  # passes over the training set per epoch: few-shot sets are too small for one epoch

    def __post_init__(self):
        if self.real is None and self.synthetic is None:
            raise ValueError("data needs real images (data.real), synthetic images (data.synthetic), or both")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "re_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size", "repeat"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError(f"img_size must be at least 8, got {self.img_size}")


@dataclass(frozen=True)
class ModelSection:
    """A timm model by name and the arguments handed to ``timm.create_model``."""

    name: str = "vit_tiny_patch16_224"  # any timm name (timm.list_models()), or sip_rednet_tiny / sip_civt_tiny
    num_classes: int | None = None  # null = the data's class count; a different number is an error
    in_chans: int = 3  # sip images are RGB (grey sources are converted)
    img_size: int | None = None  # for fixed-size models (ViT, DeiT); null = data.img_size
    patch_size: int | None = None  # ViT/DeiT patch; 4 suits 28-32 px images (7×7 or 8×8 tokens)
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth: regularises deep ViTs, slows small ones down
    pretrained: bool = False  # timm's pretrained weights (needs the hub or its cache)
    checkpoint: str | None = None  # start from these weights: a sip run folder or a .safetensors file
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other create_model argument (embed_dim, depth, ...)

    def __post_init__(self):
        if self.num_classes is not None and self.num_classes <= 0:
            raise ValueError(f"num_classes must be positive or null, got {self.num_classes}")
        reserved = {"num_classes", "in_chans", "img_size", "patch_size", "drop_rate", "drop_path_rate", "pretrained"}
        clash = sorted(reserved & set(self.kwargs))
        if clash:
            raise ValueError(f"set {', '.join(clash)} as model.<key>, not inside model.kwargs")


@dataclass(frozen=True)
class OptimSection:
    """AdamW with a linear warm-up followed by a cosine decay, stepped every batch."""

    epochs: int = 10  # passes over the (repeated) training set
    lr: float = 1e-3  # peak learning rate after warm-up; ViTs from scratch like 5e-4 to 2e-3 at batch 128
    weight_decay: float = 0.05  # decoupled decay (AdamW); biases, norms and tokens are exempt
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moments
    warmup_epochs: float = 1.0  # linear warm-up from 0: keeps early ViT updates stable
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    label_smoothing: float = 0.0  # 0.1 is the usual ViT/DeiT setting; 0 keeps plain cross-entropy
    grad_clip: float | None = None  # max gradient norm; null = no clipping

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_epochs must be >= 0 and min_lr_ratio in [0, 1]")


@dataclass(frozen=True)
class RunSection:
    """Seeds, device, precision, evaluation and checkpoint cadence."""

    seed: int = 0  # seeds the model init, epoch order, augmentation and dropout
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda"
    # auto: bf16 on CUDA; on AMX CPUs for inputs >= 112 px (smaller ones train faster in fp32); else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = 1  # evaluate every N epochs (the last epoch always)
    eval_max_samples: int | None = 1000  # per-epoch evaluation on a fixed subset (null = all); the final one is full
    checkpoint_every_steps: int = 0  # also checkpoint inside an epoch every N steps; 0 = at epoch ends only
    resume: bool = True  # continue from run_dir/checkpoint when present; false starts over
    progress: bool = True  # tqdm progress bar
    threads: int | None = None  # torch CPU threads; null = torch's default

    def __post_init__(self):
        if self.eval_every <= 0:
            raise ValueError(f"eval_every must be positive, got {self.eval_every}")
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}")


@dataclass(frozen=True)
class TrainRecipe:
    """One supervised training run (``sip train``)."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)


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
    return model, kwargs


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` with an error that says which keys or shapes disagree."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                        for k in wrong[:5]))
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(f"weights in {where} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# Checkpoint files: safetensors (or weights_only torch.load), never arbitrary pickles
# ----------------------------------------------------------------------------------------------------

def save_model_file(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write the model's weights as safetensors with sip metadata (JSON under the key ``sip``), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run folder → its ``model.safetensors`` (or the last ``checkpoint/``); a file is returned as is."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / MODEL_FILE, path / CHECKPOINT_DIR / MODEL_FILE):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{path} holds no {MODEL_FILE} (nor {CHECKPOINT_DIR}/{MODEL_FILE}); "
                                "is it a finished sip train / sip distill run folder?")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load weights safely: safetensors, or a ``torch.load(weights_only=True)``-loadable state dict.

    Returns:
        (state_dict, sip metadata or {}).

    Raises:
        ValueError: the file is neither safetensors nor loadable with ``weights_only=True`` (it may hold
            pickled code), or it is not a flat mapping of tensors.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = resolve_checkpoint_path(path)
    with path.open("rb") as f:
        head = f.read(8)
    looks_safetensors = len(head) == 8 and 0 < int.from_bytes(head, "little") < 100_000_000
    if path.suffix == ".safetensors" or looks_safetensors:
        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
            return state, (json.loads(raw) if raw else {})
        except (SafetensorError, OSError, ValueError) as e:
            if path.suffix == ".safetensors":
                raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a safetensors file and cannot be loaded with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). sip refuses pickled checkpoints, which can "
            "run code. Where you trust the file, convert it once: "
            "`safetensors.torch.save_file(torch.load(p, weights_only=False)['state_dict'], 'model.safetensors')`"
        ) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return dict(obj), {}


# ----------------------------------------------------------------------------------------------------
# 2. Data
# ----------------------------------------------------------------------------------------------------

def class_names(data: DataSection) -> list[str]:
    """The label space: the eval set's classes (the real training set must agree)."""
    eval_classes = list(open_source(data.eval).classes)
    if data.real is not None:
        real_classes = list(open_source(data.real).classes)
        if real_classes != eval_classes:
            raise ValueError(f"training classes {real_classes} differ from evaluation classes {eval_classes}")
    return eval_classes


def build_train_images(data: DataSection, classes: Sequence[str], seed: int) -> MixedImages:
    """Real, synthetic or mixed training images, per ``data``."""
    real = RealImages(open_source(data.real)) if data.real is not None else None
    synthetic = SyntheticImages(data.synthetic, classes) if data.synthetic else None
    if real is not None and list(real.classes) != list(classes):
        raise ValueError(f"training classes {real.classes} differ from {list(classes)}")
    return MixedImages(real, synthetic, data.mix, seed=seed)


def build_eval_images(data: DataSection) -> RealImages:
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


def build_transforms(input_config: dict[str, Any], data: DataSection) -> tuple[Callable, Callable]:
    """timm's training and evaluation transforms for ``input_config`` and the data section's augmentation."""
    from timm.data import create_transform

    common = {"input_size": tuple(input_config["input_size"]), "interpolation": input_config["interpolation"],
                  "mean": tuple(input_config["mean"]), "std": tuple(input_config["std"])}
    train = create_transform(is_training=True, scale=tuple(data.scale), ratio=tuple(data.ratio), hflip=data.hflip,
                             color_jitter=data.color_jitter or None, auto_augment=data.auto_augment,
                             re_prob=data.re_prob, **common)
    evaluate = create_transform(is_training=False, crop_pct=input_config["crop_pct"],
                                crop_mode=input_config.get("crop_mode"), **common)
    return train, evaluate


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (what torchvision/timm transforms and dropout use)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochView(torch.utils.data.Dataset):
    """A shuffled, repeated, per-process view of one epoch of ``images``, with seeded items.

    Item ``k`` of epoch ``e`` is ``make_item(images, index, rng)`` with Python/NumPy/torch global RNGs
    (and ``rng``) seeded from ``(seed, e, k)``: the same item gets the same augmentation on every run,
    with any number of DataLoader workers, and after a resume in the middle of the epoch.

    Args:
        images: a dataset with ``__len__`` (and optionally ``set_epoch``).
        make_item (Callable): ``(images, index, rng: random.Random) -> dict`` of tensors / numbers.
        seed (int): run seed.
        repeat (int, optional): passes over ``images`` per epoch. Defaults to 1.
        rank, world (int, optional): this process's share (``order[rank::world]``). Defaults to 0, 1.
    """

    def __init__(self, images: Any, make_item: Callable, seed: int, repeat: int = 1, rank: int = 0, world: int = 1):
        self.images, self.make_item, self.seed = images, make_item, seed
        self.repeat, self.rank, self.world = repeat, rank, world
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Plan ``epoch``; ``start`` skips the first items (a resume inside the epoch)."""
        if hasattr(self.images, "set_epoch"):
            self.images.set_epoch(epoch)
        rng = np.random.default_rng(stable_seed("order", self.seed, epoch))
        n = len(self.images)
        order = np.concatenate([rng.permutation(n) for _ in range(self.repeat)])
        self.order = order[self.rank :: self.world]
        self.epoch, self.start = epoch, start

    @property
    def epoch_length(self) -> int:
        return len(self.order)

    def __len__(self) -> int:
        return len(self.order) - self.start

    def __getitem__(self, k: int) -> dict[str, Any]:
        k += self.start
        s = stable_seed("item", self.seed, self.epoch, self.rank, k)
        seed_everything(s)
        return self.make_item(self.images, int(self.order[k]), random.Random(s))


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


# ----------------------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------------------

def make_accelerator(run: RunSection, img_size: int | None = None):
    """An ``accelerate.Accelerator`` for ``run.device`` / ``run.precision`` (multi-process under
    ``accelerate launch``). ``img_size``: the model's input size; ``precision: auto`` on an AMX CPU takes
    bf16 only from ``sip.runtime.AMX_MIN_IMG_SIZE`` up (smaller inputs train faster in fp32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device, large_input(img_size))
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    state = AcceleratorState._shared_state
    if state and PartialState().num_processes == 1 and (
            state.get("_mixed_precision") != mixed or PartialState().device.type != device.type):
        # Several runs in one single-process Python session (a notebook, the test suite) may ask for
        # different precisions; accelerate keeps one global state, so start it afresh for this run.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")


# ----------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW; biases, norm weights and the model's ``no_weight_decay()`` parameters are not decayed."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, optim.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, steps_per_epoch: int):
    """Per-step linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    total = max(optim.epochs * steps_per_epoch, 1)
    warmup = min(round(optim.warmup_epochs * steps_per_epoch), total - 1)
    floor = optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def merge_heads(out: Any) -> torch.Tensor:
    """A distilled model's tuple of head outputs (class + distillation tokens) → their mean."""
    if isinstance(out, (tuple, list)):
        return torch.stack([o.float() for o in out]).mean(0)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, accelerator, progress: bool = False,
             desc: str = "eval") -> dict[str, float]:
    """Top-1, top-5 (top-k for k = min(5, classes)) accuracy in % and mean cross-entropy over ``loader``."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x = batch["image"].to(accelerator.device)
        y = batch["label"].to(accelerator.device)
        with accelerator.autocast():
            logits = merge_heads(model(x)).float()
        logits, y = accelerator.gather_for_metrics((logits, y))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        total += len(y)
    model.train(was_training)
    total = max(total, 1)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total}


# ----------------------------------------------------------------------------------------------------
# The loop shared by training and distillation
# ----------------------------------------------------------------------------------------------------

StepFn = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, Any, torch.Tensor | None]]

# keys that may change between an interrupted run and its resume (they do not change the result)
_RESUME_FREE_KEYS = {"run.resume", "run.progress", "run.threads", "run.device", "data.num_workers",
                     "data.eval_batch_size", "run.eval_every", "run.eval_max_samples", "run.checkpoint_every_steps"}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _resume_view(recipe: Any, saved: Path | None = None) -> dict[str, Any]:
    """The flat settings that decide a run's outputs: of ``recipe``, or of the recipe saved at ``saved``.

    A saved config is read back into the current recipe class, so a key added since it was written takes
    its default (a newer sip can resume an older run); keys the current class no longer has are dropped.
    A recipe with ``output_settings()`` (e.g. :class:`sip.distill.run.DistillRecipe`) resolves its unset
    fields to the values actually used, so "unset" and "set to the default" compare equal.
    """
    if saved is not None:
        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        known = _flatten(json.loads(json.dumps(to_dict(recipe))))
        try:
            recipe = from_dict(type(recipe), data, source=str(saved))
        except ConfigError:  # a key this sip no longer knows: keep the keys both know, fill the rest
            recipe = from_dict(type(recipe), _prune(data, known), source=str(saved))
    view = recipe.output_settings() if hasattr(recipe, "output_settings") else to_dict(recipe)
    return _flatten(json.loads(json.dumps(view)))


def _prune(data: Any, known: dict[str, Any], prefix: str = "") -> Any:
    """``data`` without the keys (dotted, as in ``known``) the current recipe class does not have."""
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in known or any(name.startswith(key + ".") for name in known):
            out[k] = _prune(v, known, key)
    return out


def prepare_run_dir(recipe: Any, run_dir: str | Path) -> tuple[Path, bool]:
    """Create ``run_dir``, check a resumed run has the same recipe, and write the resolved config.

    Returns:
        (run_dir, resuming): ``resuming`` is True when a checkpoint will be continued.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    has_checkpoint = (run_dir / CHECKPOINT_DIR / "state.pt").is_file()
    resume = recipe.run.resume and has_checkpoint
    saved = run_dir / "config.yaml"
    if resume and saved.is_file():
        old, new = _resume_view(recipe, saved), _resume_view(recipe)
        changed = sorted(k for k in set(old) | set(new)
                         if k not in _RESUME_FREE_KEYS and old.get(k) != new.get(k))
        if changed:
            raise ConfigError(
                f"{run_dir} holds a checkpoint of a run with a different recipe (changed: {', '.join(changed[:8])}). "
                "Use a new run folder, restore the recipe, or set run.resume=false to start over.")
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, process 0 owns the folder
        return run_dir, resume
    if not resume:  # a fresh run: nothing of an earlier one may leak into this one's files
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        for name in ("metrics.jsonl", MODEL_FILE, "final_metrics.json"):
            (run_dir / name).unlink(missing_ok=True)
    save_config(recipe, saved)
    return run_dir, resume


@dataclass
class FitResult:
    """What :func:`fit` returns: the final evaluation and the run's counters."""

    metrics: dict[str, Any]
    model: nn.Module


def _save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, meta: dict, counters: dict) -> None:
    tmp = run_dir / (CHECKPOINT_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model_file(model, tmp / MODEL_FILE, meta)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "counters": {k: torch.tensor(v, dtype=torch.float64) for k, v in counters.items()}},
               tmp / "state.pt")
    final = run_dir / CHECKPOINT_DIR
    old = run_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    if old.exists():
        shutil.rmtree(old)


def _load_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler) -> dict[str, float]:
    folder = run_dir / CHECKPOINT_DIR
    state, _ = load_checkpoint_file(folder / MODEL_FILE)
    load_weights(model, state, str(folder / MODEL_FILE))
    try:
        blob = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{folder / 'state.pt'} cannot be loaded with torch.load(weights_only=True): {e}") from e
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return {k: float(v) for k, v in blob["counters"].items()}


def _rewrite_metrics(path: Path, upto_epoch: int) -> None:
    """Keep only the metric lines of epochs a resumed run has already completed."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
             if ln.strip() and json.loads(ln).get("epoch", 0) <= upto_epoch]
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")


def fit(*, model: nn.Module, train_view: EpochView, eval_images: Any, eval_transform: Callable, step_fn: StepFn,
        optim: OptimSection, run: RunSection, data: DataSection, run_dir: Path, accelerator, model_meta: dict,
        resume: bool, desc: str = "train", modules_to_device: Sequence[nn.Module] = ()) -> FitResult:
    """The epoch loop: train with ``step_fn``, evaluate, log, checkpoint, resume; returns final metrics.

    Args:
        model (nn.Module): the network being trained (not yet prepared by accelerate).
        train_view (EpochView): the training items.
        eval_images: ``(image, label)`` dataset for evaluation.
        eval_transform (Callable): image → tensor for evaluation.
        step_fn (StepFn): ``(model, batch) -> (loss, logits for train accuracy, labels or None)``; runs
            inside the accelerator's autocast.
        optim, run, data: recipe sections.
        run_dir (Path): output folder (already prepared by :func:`prepare_run_dir`).
        accelerator: from :func:`make_accelerator`.
        model_meta (dict): saved in the weights' metadata (timm name, kwargs, classes, input config).
        resume (bool): continue from ``run_dir/checkpoint``.
        desc (str, optional): progress-bar label. Defaults to "train".
        modules_to_device (Sequence[nn.Module], optional): extra modules (teachers) to move to the device.
    """
    from tqdm.auto import tqdm

    bs = data.batch_size
    n_epoch = train_view.epoch_length
    drop_last = n_epoch >= bs
    steps_per_epoch = n_epoch // bs if drop_last else 1
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    counters = {"epoch": 0.0, "step_in_epoch": 0.0, "global_step": 0.0, "best_top1": -1.0, "best_epoch": 0.0,
                "train_time_s": 0.0, "train_images": 0.0}
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        counters.update(_load_checkpoint(run_dir, model, optimizer, scheduler))
        _rewrite_metrics(metrics_path, int(counters["epoch"]))
        logger.info("resuming %s at epoch %d step %d", run_dir, counters["epoch"], counters["global_step"])
    model, optimizer = accelerator.prepare(model, optimizer)
    for m in modules_to_device:
        m.to(accelerator.device)

    eval_full = TransformedImages(eval_images, eval_transform)
    eval_subset = eval_full
    if run.eval_max_samples and run.eval_max_samples < len(eval_images):
        pick = np.sort(np.random.default_rng(0).permutation(len(eval_images))[: run.eval_max_samples])
        eval_subset = TransformedImages(eval_images, eval_transform, pick)

    def eval_loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=data.eval_batch_size, shuffle=False,
                                           num_workers=data.num_workers)

    progress = run.progress and accelerator.is_main_process
    last_eval: dict[str, float] = {}
    start_epoch = int(counters["epoch"])
    for epoch in range(start_epoch, optim.epochs):
        # 7a. one epoch of training
        skip = int(counters["step_in_epoch"]) * bs
        train_view.set_epoch(epoch, start=skip)
        loader = torch.utils.data.DataLoader(train_view, batch_size=bs, shuffle=False, drop_last=drop_last,
                                             num_workers=data.num_workers)
        model.train()
        loss_sum = correct = seen = labelled = 0.0
        nonfinite = 0
        t0 = t_mark = time.perf_counter()
        seen_mark = 0.0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{optim.epochs}", leave=False, disable=not progress)
        for batch in bar:
            torch.manual_seed(stable_seed("step", run.seed, int(counters["global_step"])))
            with accelerator.autocast():
                loss, logits, labels = step_fn(model, batch)
            accelerator.backward(loss)
            loss_value = loss.item()  # once per step: each .item() waits for the device
            # the norm is needed anyway for clipping; a non-finite one means a bad step: skip it, as fp16's
            # GradScaler does. Seen here: torch 2.14's bf16 (AMX) conv weight-gradient is sometimes NaN for a
            # stride-2 3x3 conv over a 1x1 map (tiny inputs in deep ResNets); one such step ruins the weights.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf"))
            if torch.isfinite(torch.as_tensor(grad_norm)):
                optimizer.step()
            else:
                nonfinite += 1
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n = batch["image"].shape[0]
            loss_sum += loss_value * n if math.isfinite(loss_value) else 0.0
            seen += n
            if labels is not None:
                correct += (merge_heads(logits).argmax(1) == labels).sum().item()
                labelled += n
            counters["global_step"] += 1
            counters["step_in_epoch"] += 1
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if (run.checkpoint_every_steps and counters["global_step"] % run.checkpoint_every_steps == 0
                    and counters["step_in_epoch"] < steps_per_epoch):
                counters["train_time_s"] += time.perf_counter() - t_mark
                counters["train_images"] += seen - seen_mark
                if accelerator.is_main_process:
                    _save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler,
                                     {**model_meta, "epoch": epoch}, counters)
                t_mark, seen_mark = time.perf_counter(), seen
        epoch_time = time.perf_counter() - t0
        if nonfinite:
            steps_done = int(counters["step_in_epoch"]) - skip // bs
            logger.warning("epoch %d: %d of %d steps had non-finite gradients and were skipped",
                           epoch + 1, nonfinite, steps_done)
            if nonfinite == steps_done:
                raise FloatingPointError(
                    f"every step of epoch {epoch + 1} had non-finite gradients (precision "
                    f"{accelerator.mixed_precision}); lower optim.lr, set optim.grad_clip, or rerun with "
                    f"--set run.precision=fp32. The last checkpoint in {run_dir} is untouched.")
        counters["train_time_s"] += time.perf_counter() - t_mark
        counters["train_images"] += seen - seen_mark
        counters["epoch"] = epoch + 1
        counters["step_in_epoch"] = 0

        # 7b. evaluation, metrics line, checkpoint
        line: dict[str, Any] = {"epoch": epoch + 1, "step": int(counters["global_step"]),
                                "lr": scheduler.get_last_lr()[0], "train_loss": loss_sum / max(seen, 1),
                                "epoch_time_s": round(epoch_time, 3), "nonfinite_steps": nonfinite,
                                "train_images_per_s": round(seen / max(epoch_time, 1e-9), 2)}
        if labelled:
            line["train_top1"] = 100.0 * correct / labelled
        is_last = epoch + 1 == optim.epochs
        if is_last or (epoch + 1) % run.eval_every == 0:
            result = evaluate(model, eval_loader(eval_full if is_last else eval_subset), accelerator, progress)
            line.update({f"eval_{k}": v for k, v in result.items()})
            last_eval = result
            if result["top1"] > counters["best_top1"]:
                counters["best_top1"], counters["best_epoch"] = result["top1"], epoch + 1
        if accelerator.is_main_process:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            _save_checkpoint(run_dir, accelerator.unwrap_model(model), optimizer, scheduler,
                             {**model_meta, "epoch": epoch + 1}, counters)
        if progress:
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}
            tqdm.write(f"[{desc}] " + json.dumps(shown))

    # 8. final weights and metrics
    unwrapped = accelerator.unwrap_model(model)
    if not last_eval:  # resumed after the last epoch had finished: evaluate the saved weights
        last_eval = evaluate(model, eval_loader(eval_full), accelerator, progress)
    n_params = sum(p.numel() for p in unwrapped.parameters())
    metrics = {"top1": last_eval["top1"], "top5": last_eval["top5"], "eval_loss": last_eval["loss"],
               "best_top1": max(counters["best_top1"], last_eval["top1"]),
               "best_epoch": int(counters["best_epoch"]) or optim.epochs, "epochs": optim.epochs,
               "steps": int(counters["global_step"]), "train_time_s": round(counters["train_time_s"], 2),
               "train_images_per_s": round(counters["train_images"] / max(counters["train_time_s"], 1e-9), 2),
               "num_params": n_params, "eval_samples": len(eval_images), "run_dir": str(run_dir)}
    if accelerator.is_main_process:
        save_model_file(unwrapped, run_dir / MODEL_FILE, {**model_meta, "epoch": optim.epochs, "metrics": metrics})
        (run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return FitResult(metrics, unwrapped)


def model_metadata(name: str, create_kwargs: dict[str, Any], classes: Sequence[str],
                   input_config: dict[str, Any]) -> dict[str, Any]:
    """What a saved model needs to be rebuilt and fed: timm name, kwargs, class names, preprocessing."""
    from sip import __version__

    return {"format": "sip-model", "sip_version": __version__, "timm_name": name,
            "create_kwargs": json.loads(json.dumps(create_kwargs, default=list)),
            "num_classes": len(classes), "classes": list(classes), "input_config": input_config}


# ----------------------------------------------------------------------------------------------------
# sip train
# ----------------------------------------------------------------------------------------------------

def run_training(recipe: TrainRecipe, run_dir: str | Path) -> dict[str, Any]:
    """Train ``recipe.model`` on ``recipe.data``; write everything under ``run_dir``.

    Args:
        recipe (TrainRecipe): the resolved recipe.
        run_dir (str | Path): output folder; a checkpoint there is resumed (``run.resume``).

    Returns:
        dict: final metrics (``top1``, ``top5``, ``eval_loss``, ``best_top1``, ``steps``, timings, ...).
    """
    # 1. check the recipe and the run folder (fail before any data or model is built)
    check_model_name(recipe.model.name)
    run_dir, resume = prepare_run_dir(recipe, run_dir)
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    accelerator = make_accelerator(recipe.run, recipe.data.img_size)

    # 2. data: the label space comes from the evaluation set
    classes = class_names(recipe.data)
    train_images = build_train_images(recipe.data, classes, recipe.run.seed)
    eval_images = build_eval_images(recipe.data)

    # 3. model (seeded init)
    seed_everything(recipe.run.seed)
    model, create_kwargs = build_model(recipe.model, len(classes), recipe.data.img_size)

    # 4. preprocessing from the model's timm data config
    input_config = resolve_input_config(model, recipe.data)
    train_tf, eval_tf = build_transforms(input_config, recipe.data)

    def make_item(images, index, rng):
        image, label = images[index]
        return {"image": train_tf(image), "label": label}

    view = EpochView(train_images, make_item, recipe.run.seed, recipe.data.repeat,
                     accelerator.process_index, accelerator.num_processes)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.optim.label_smoothing)

    def step_fn(model, batch):
        x = batch["image"].to(accelerator.device, non_blocking=True)
        y = batch["label"].to(accelerator.device, non_blocking=True)
        logits = merge_heads(model(x))
        return criterion(logits.float(), y), logits, y

    # 5.-8. optimiser, schedule, resume, loop, final save
    meta = model_metadata(recipe.model.name, create_kwargs, classes, input_config)
    logger.info("training %s (%d classes) on %s", recipe.model.name, len(classes), train_images)
    result = fit(model=model, train_view=view, eval_images=eval_images, eval_transform=eval_tf, step_fn=step_fn,
                 optim=recipe.optim, run=recipe.run, data=recipe.data, run_dir=run_dir, accelerator=accelerator,
                 model_meta=meta, resume=resume, desc=recipe.model.name)
    return result.metrics


__all__ = [
    "DataSection",
    "EpochView",
    "ModelSection",
    "OptimSection",
    "RunSection",
    "TrainRecipe",
    "build_model",
    "build_transforms",
    "check_model_name",
    "create_model",
    "evaluate",
    "fit",
    "load_checkpoint_file",
    "make_accelerator",
    "resolve_input_config",
    "resolve_precision",
    "run_training",
    "save_model_file",
]
