"""The ``sip train`` recipe: data, model, optimiser and run sections, each a frozen dataclass whose
defaults carry why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sip.data.mixing import MixConfig
from sip.data.sources import SourceConfig
from sip.models.classifiers import check_model_name
from sip.models.kdeformer import kdeformer_config
from sip.runtime import check_device

# ----------------------------------------------------------------------------------------------------
# 1. The recipe
# ----------------------------------------------------------------------------------------------------

# resize filters every transform sip builds takes (timm's PIL names; lanczos = sip's Lanczos, orders 2-5)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class EvalSourceConfig(SourceConfig):
    """A :class:`~sip.data.sources.SourceConfig` whose defaults point at a held-out split (Fashion-MNIST's
    official 10k test set), so that overriding one key (``data.eval.shots=...``) keeps evaluating on it."""

    split: str = "test"
    start: int = 0


@dataclass(frozen=True)
class ValSection:
    """The validation split: read every epoch and for every choice (best epoch, restarts, settings), so that the
    test set (``data.eval``) is read once, at the end of a finished run.

    By default it is drawn from the real training pool (``data.real`` without ``shots``): ``size`` images chosen
    by ``seed`` among those that are not training shots. With ``shots`` null the whole pool trains, so the drawn
    images leave the training set. ``source`` takes a separate labelled set instead (a folder of
    ``<label>/<image>``, an HF dataset, or another Fashion-MNIST range); ``size`` then draws from it (null = all).
    """

    size: int | None = 1000  # validation images; 1,000 gives top-1 to about ±1.5 points (95 %)
    seed: int = 0  # which images are drawn
    source: SourceConfig | None = None  # a separate labelled set; null = carve from data.real's pool

    def __post_init__(self):
        if self.size is not None and self.size <= 0:
            raise ValueError(f"data.val.size must be positive or null, got {self.size}")
        if self.size is None and self.source is None:
            raise ValueError("data.val.size is null but there is no data.val.source: a split carved from the "
                             "training pool needs a size (e.g. 1000); or set data.val: null for no validation")


@dataclass(frozen=True)
class DataSection:
    """Which images, how they are mixed and preprocessed, and how they are batched."""

    real: SourceConfig | None = field(default_factory=SourceConfig)  # real images (default: the F-MNIST pool 50000+); null = none
    # a sip dataset folder (DIR/train/metadata.jsonl) or a list of them read as one; null = real only
    synthetic: str | list[str] | None = None
    mix: MixConfig = field(default_factory=MixConfig)  # how real and synthetic share an epoch
    # the test set (read once, at the end); its classes are the label space
    eval: EvalSourceConfig = field(default_factory=EvalSourceConfig)
    # validation split (per-epoch evaluation, every choice); null = none: no per-epoch evaluation at all
    val: ValSection | None = field(default_factory=ValSection)
    img_size: int | None = 32  # network input size; null = the model's own (224 for most timm models)
    crop_pct: float | None = None  # eval resize-then-center-crop; null = 1.0 when img_size is set (no border loss)
    scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area range; ImageNet's 0.08 is too harsh at 28 px
    ratio: tuple[float, float] = (0.75, 1.3333333)  # RandomResizedCrop aspect range
    hflip: float = 0.5  # horizontal flip probability (clothes, animals: fine; digits, text: set 0)
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter; 0 for grey images
    auto_augment: str | None = None  # a timm policy string such as "rand-m9-mstd0.5"; costs CPU time per image
    re_prob: float = 0.0  # random erasing probability
    # resize filter: bicubic, bilinear, ... or lanczos2-5 (sip's separable Lanczos; the seed paper resizes
    # small images to a ViT's input with lanczos5); null = the model's own
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None  # normalisation; null = the model's own
    std: tuple[float, float, float] | None = None
    batch_size: int = 128  # per process; the last partial batch of an epoch is dropped
    eval_batch_size: int = 512  # inference only: larger is faster until memory runs out
    num_workers: int = 0  # DataLoader workers; 0 decodes in the training process (best on 1-2 cores)
    repeat: int = 1  # passes over the training set per epoch: few-shot sets are too small for one epoch
    # learn a synthetic image's metadata soft_label (inter-class / latent-mix share, a teacher's probabilities) as
    # its cross-entropy target instead of its one-hot label (sip.train.soft_labels); false: the label only
    soft_labels: bool = False

    def __post_init__(self):
        if self.real is None and self.synthetic is None:
            raise ValueError("data needs real images (data.real), synthetic images (data.synthetic), or both")
        if self.soft_labels and self.synthetic is None:
            raise ValueError("data.soft_labels is true but data.synthetic is null: soft labels come from a sip "
                             "dataset's metadata; set data.synthetic or data.soft_labels: false")
        if self.val is not None and self.val.source is None and self.real is None:
            raise ValueError("data.val is carved from data.real's pool, but data.real is null (data-free): give a "
                             "labelled set as data.val.source (e.g. {kind: fashion-mnist, split: train, start: "
                             "50000}) or set data.val: null (no validation, no per-epoch evaluation)")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "re_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {self.color_jitter}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1] or null, got {self.crop_pct}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive (inputs are divided by it), got {self.std}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        for name in ("batch_size", "eval_batch_size", "repeat"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError(f"img_size must be at least 8, got {self.img_size}")
        if self.interpolation is not None:
            from sip.data.lanczos import parse_interpolation

            kind, _ = parse_interpolation(self.interpolation)  # lanczosN with N outside {2, 3, 4, 5}: a clear error
            if kind not in INTERPOLATIONS:  # timm would fail deep in a transform, or (empty) take the model's own
                raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)} or lanczos2-lanczos5 (or "
                                 f"null for the model's own), got {self.interpolation!r}")


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
    attention: str = "exact"  # or kdeformer: KDEformer's estimate in every timm Attention layer (long sequences)
    kdeformer: dict[str, Any] = field(default_factory=dict)  # its num_samples, block_size, n_hashes, seed, min_tokens

    def __post_init__(self):
        if not self.name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):  # timm's hub / folder ids load as given
            try:  # an unknown name is said at load time, with the closest known names
                check_model_name(self.name)
            except ValueError as e:
                raise ValueError(f"name must be a timm or sip model name: {e}") from None
        kdeformer_config(self.attention, self.kdeformer, "model")
        if self.num_classes is not None and self.num_classes <= 0:
            raise ValueError(f"num_classes must be positive or null, got {self.num_classes}")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
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
        if self.weight_decay < 0 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"weight_decay must be >= 0 and betas in [0, 1), got {self.weight_decay}, {self.betas}")
        if self.grad_clip is not None and self.grad_clip <= 0:  # a negative norm would flip the gradients' sign
            raise ValueError(f"grad_clip must be positive or null (no clipping), got {self.grad_clip}")


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
        check_device(self.device, "run.device")
        if self.eval_every <= 0:
            raise ValueError(f"eval_every must be positive, got {self.eval_every}")
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}")
        for name in ("eval_max_samples", "threads"):  # threads 0 ran as torch's default; 0 samples evaluates nothing
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainRecipe:
    """One supervised training run (``sip train``)."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
