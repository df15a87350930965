"""Teacher (and student) guidance of the sampler: generation steered toward what a classifier calls the
intended class, and optionally toward where a student disagrees with its teacher.

Classifier guidance (Dhariwal & Nichol, 2021) as data-free KD uses it (DiffDFKD, Qi et al., 2025): at the
chosen denoising steps the clean latent is predicted from the noise prediction,
``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, decoded with the VAE (differentiably), fitted to the
classifier's own input config (size, channels, mean/std), and the loss

    L = scale * CE(teacher(x0), y) - student_scale * KL(teacher(x0) || student(x0))

is differentiated with respect to ``x0`` alone (no backward pass through the UNet: the cost is one VAE
decode and one classifier forward/backward per guided step). The step then runs with ``x0 - dL/dx0`` and the
noise prediction that agrees with it and with ``x_t``; the second term seeks images the student has not
learned yet (adversarial / contrastive data-free KD: DFAD, Fang et al., 2019; CMI, Fang et al., 2021).

The classifiers are passed in, like the filter's: this module loads them from sip checkpoints through
:mod:`sip.models.checkpoints` and never imports training code. Loss terms are summed over images, so an
image's gradient does not depend on the others of its batch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class GuideConfig:
    """The ``guide:`` section of ``sip synth`` / ``sip augment`` recipes.

    Attributes:
        teacher: a sip run folder or ``.safetensors`` of the classifier that guides (``--teacher RUN``); it also
            labels inter-class variants (``interclass:``). null: no guidance.
        student: a sip run folder of the student being taught (``--student RUN``); used by ``student_scale``.
        scale: weight of the teacher's cross-entropy for the intended class; 0 samples exactly as unguided.
            Higher pulls images toward what the teacher calls the class, at some cost in variety.
        student_scale: weight of the teacher-student disagreement KL(teacher || student) that guidance
            increases (images the student has not learned yet); needs ``student``. 0: off.
        steps: [start, end) fraction of the denoising steps a call runs that are guided; late steps change
            details, early ones the layout.
        every: guide every k-th step of that window (fewer guided steps: cheaper).
    """

    teacher: str | None = None
    student: str | None = None
    scale: float = 0.0
    student_scale: float = 0.0
    steps: list[float] = field(default_factory=lambda: [0.0, 1.0])
    every: int = 1

    def __post_init__(self):
        for name in ("scale", "student_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"guide.{name} must be a finite number >= 0, got {value}")
        if len(self.steps) != 2 or not 0.0 <= self.steps[0] < self.steps[1] <= 1.0:
            raise ValueError(f"guide.steps is [start, end) with 0 <= start < end <= 1, got {list(self.steps)}")
        if self.every < 1:
            raise ValueError(f"guide.every must be a positive integer, got {self.every}")
        if (self.scale > 0 or self.student_scale > 0) and not self.teacher:
            raise ValueError("guide.scale / guide.student_scale need guide.teacher (a sip run folder: --teacher RUN)")
        if self.student_scale > 0 and not self.student:
            raise ValueError("guide.student_scale > 0 needs guide.student (a sip run folder: --student RUN)")
        if self.student and self.student_scale == 0:
            raise ValueError(f"guide.student is {self.student} but guide.student_scale is 0, so it would be loaded "
                             "and never used; set guide.student_scale > 0 or drop guide.student")

    @property
    def active(self) -> bool:
        """Whether sampling is guided at all (a zero scale keeps the unguided sampler, byte for byte)."""
        return bool(self.teacher) and (self.scale > 0 or self.student_scale > 0)


# --------------------------------------------------------------------------------------------------
# Checks before any model loads: the checkpoints' headers only
# --------------------------------------------------------------------------------------------------

def classifier_meta(checkpoint: str | Path, role: str) -> dict[str, Any]:
    """The sip metadata of a classifier checkpoint, read from its safetensors header (no weights loaded).

    Raises:
        FileNotFoundError: no checkpoint there (with the command that makes one).
        ValueError: not a safetensors file with sip metadata (timm name, classes, input config).
    """
    from safetensors import SafetensorError, safe_open

    from sip.models.checkpoints import METADATA_KEY, resolve_checkpoint_path

    try:
        path = resolve_checkpoint_path(checkpoint)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"guide.{role}: {e}. Train it first (e.g. `sip train pipelines/fmnist_teacher.yaml "
                                f"-o runs/fmnist_teacher`) or point --{role} at a sip run folder") from e
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"guide.{role}: {path} is not a readable safetensors file: {e}") from e
    meta = json.loads(raw) if raw else {}
    missing = [k for k in ("timm_name", "classes", "input_config") if not meta.get(k)]
    if missing:
        raise ValueError(f"guide.{role}: {path} records no {', '.join(missing)}; guidance needs a classifier "
                         "saved by `sip train` / `sip distill` (its class names and preprocessing)")
    return {**meta, "path": str(path)}


def recipe_architecture(checkpoint: str | Path) -> str | None:
    """The timm name the run folder's own recipe (``config.yaml``) trained: ``student.name`` or ``model.name``."""
    import yaml

    folder = Path(checkpoint).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    saved = folder / "config.yaml"
    if not saved.is_file():
        return None
    data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    for section in ("student", "model"):
        if isinstance(data.get(section), dict) and data[section].get("name"):
            return str(data[section]["name"])
    return None


def check_guide(config: GuideConfig, labels: Sequence[str]) -> None:
    """Refuse a guide that cannot work, before any model loads.

    The teacher must name every label of the dataset among its classes; the student must predict the
    teacher's classes in the same order and be the architecture its own recipe names.

    Raises:
        ValueError: with the key, the file and what to change.
    """
    if not config.teacher:
        return
    teacher = classifier_meta(config.teacher, "teacher")
    unknown = [lab for lab in dict.fromkeys(labels) if lab not in teacher["classes"]]
    if unknown:
        raise ValueError(f"guide.teacher {teacher['path']} predicts {teacher['classes']} but the dataset's labels "
                         f"{unknown} are not among them; guide with a teacher trained on these classes")
    if not config.student:
        return
    student = classifier_meta(config.student, "student")
    if list(student["classes"]) != list(teacher["classes"]):
        raise ValueError(f"guide.student {student['path']} predicts {student['classes']} but the teacher predicts "
                         f"{teacher['classes']}; the student must share the teacher's classes, in order")
    expected = recipe_architecture(config.student)
    if expected is not None and expected != student["timm_name"]:
        raise ValueError(f"guide.student {student['path']} is a {student['timm_name']} but its recipe "
                         f"({Path(student['path']).parent / 'config.yaml'}) names {expected}; point --student at "
                         "the run folder of the student this recipe trains")


# --------------------------------------------------------------------------------------------------
# Classifiers on decoded images
# --------------------------------------------------------------------------------------------------

class GuideClassifier(nn.Module):
    """A frozen classifier fed decoded images in [-1, 1] through its own preprocessing.

    Args:
        model (nn.Module): returns logits over ``classes``.
        classes (Sequence[str]): the label of each logit.
        input_config (dict): its timm input config (``input_size`` (C, H, W), ``mean``, ``std``).
        source (str, optional): where it came from (recorded in metadata). Defaults to "".
    """

    def __init__(self, model: nn.Module, classes: Sequence[str], input_config: dict[str, Any], source: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.classes, self.source = list(classes), source
        self.input_size = tuple(int(v) for v in input_config["input_size"])
        self.register_buffer("mean", torch.tensor(input_config["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(input_config["std"], dtype=torch.float32).view(1, -1, 1, 1))

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: torch.device | str = "cpu") -> GuideClassifier:
        """Load a sip-trained classifier (run folder or ``.safetensors``) with its classes and preprocessing."""
        from sip.models.checkpoints import load_classifier

        model, meta = load_classifier(checkpoint)
        return cls(model, meta["classes"], meta["input_config"], str(checkpoint)).to(device)

    def index(self, labels: Sequence[str]) -> torch.Tensor:
        """Logit index of each label (every label must be one of ``classes``)."""
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise ValueError(f"the guiding classifier {self.source} does not know labels {unknown}; it knows "
                             f"{self.classes}")
        return torch.tensor([self.classes.index(lab) for lab in labels])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of images in [-1, 1], (N, 3, H, W), resized and normalised for the model."""
        x = (images.float() / 2 + 0.5).clamp(0, 1)
        channels, size = self.input_size[0], self.input_size[-2:]
        if tuple(x.shape[-2:]) != size:
            x = nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        if channels == 1 and x.shape[1] == 3:  # PIL's convert("L") weights
            x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return self.model((x - self.mean) / self.std).float()

    @torch.inference_mode()
    def predict(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Softmax probabilities (N, classes) of PIL images, on the CPU."""
        import numpy as np

        out = []
        device = self.mean.device
        for start in range(0, len(images), batch_size):
            arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images[start : start + batch_size]]
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device) / 127.5 - 1
            out.append(self(x).softmax(-1).cpu())
        return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# The guided scheduler step
# --------------------------------------------------------------------------------------------------

class ClassifierGuidance:
    """Teacher (and student) guidance, ready to attach to a pipeline's scheduler for one call.

    Args:
        config (GuideConfig): scales and the guided window.
        teacher (GuideClassifier): the classifier whose cross-entropy for the intended class is lowered.
        student (GuideClassifier, optional): the student whose disagreement with the teacher is raised.
    """

    def __init__(self, config: GuideConfig, teacher: GuideClassifier, student: GuideClassifier | None = None):
        if config.student_scale > 0 and student is None:
            raise ValueError("guide.student_scale > 0 needs a student classifier")
        if student is not None and student.classes != teacher.classes:
            raise ValueError(f"the student predicts {student.classes} but the teacher {teacher.classes}")
        self.config, self.teacher, self.student = config, teacher, student

    @classmethod
    def from_config(cls, config: GuideConfig, device: torch.device | str = "cpu") -> ClassifierGuidance | None:
        """Load the teacher (and student) ``config`` names; None when it guides nothing."""
        if not config.active:
            return None
        teacher = GuideClassifier.from_checkpoint(config.teacher, device)
        student = GuideClassifier.from_checkpoint(config.student, device) if config.student else None
        return cls(config, teacher, student)

    def record(self) -> dict[str, Any]:
        """What an image's metadata line says of its guidance."""
        c = self.config
        out = {"teacher": self.teacher.source, "scale": c.scale, "steps": list(c.steps), "every": c.every}
        if self.student is not None:
            out.update(student=self.student.source, student_scale=c.student_scale)
        return {"guide": out}

    def toward(self, labels: Sequence[str]) -> TargetedGuidance:
        """This guidance aimed at one intended class per image."""
        return TargetedGuidance(self, self.teacher.index(labels))

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``scale * CE(teacher, y) - student_scale * KL(teacher || student)``, summed over images."""
        logits = self.teacher(images)
        loss = self.config.scale * nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="sum")
        if self.student is not None and self.config.student_scale > 0:
            log_t, log_s = logits.log_softmax(-1), self.student(images).log_softmax(-1)
            kl = (log_t.exp() * (log_t - log_s)).sum()
            loss = loss - self.config.student_scale * kl
        return loss


@dataclass(frozen=True)
class TargetedGuidance:
    """:class:`ClassifierGuidance` with one intended class per image of a call (slices like a list)."""

    guidance: ClassifierGuidance
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: slice) -> TargetedGuidance:
        return TargetedGuidance(self.guidance, self.targets[index])

    def guided_steps(self, n_run: int) -> set[int]:
        """Indices (0 = the first step a call runs) of the guided steps among ``n_run``."""
        c = self.guidance.config
        first, end = math.floor(c.steps[0] * n_run), math.ceil(c.steps[1] * n_run)
        return set(range(first, min(end, n_run), c.every))

    @contextlib.contextmanager
    def attach(self, pipe: Any) -> Iterator[None]:
        """Guide every ``pipe`` call inside the block (the scheduler's ``step`` wrapped, then restored)."""
        scheduler = pipe.scheduler
        check_guidable(scheduler)
        original = scheduler.step
        state: dict[str, Any] = {}

        @functools.wraps(original)  # the pipeline inspects step's signature (eta, generator)
        def step(model_output, timestep, sample, *args, **kwargs):
            if not state:  # the first step of this call: where it starts in the schedule
                start = int((scheduler.timesteps == timestep).nonzero()[0, 0]) if timestep in scheduler.timesteps else 0
                state.update(i=0, guided=self.guided_steps(len(scheduler.timesteps) - start))
            if state["i"] in state["guided"]:
                model_output = guided_output(self, pipe.vae, scheduler, model_output, timestep, sample)
            state["i"] += 1
            return original(model_output, timestep, sample, *args, **kwargs)

        scheduler.step = step
        try:
            yield
        finally:
            del scheduler.step


def check_guidable(scheduler: Any) -> None:
    """Guidance needs a variance-preserving scheduler (DDIM, DDPM, PNDM, LCM, DPM-Solver ...): ``x_t`` is
    ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]``."""
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if (getattr(scheduler, "alphas_cumprod", None) is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0
            or kind not in ("epsilon", "v_prediction", "sample")):
        raise ValueError(f"guide: {type(scheduler).__name__} (prediction {kind}) is not a variance-preserving "
                         "scheduler; set generate.scheduler: DDIMScheduler (or DDPM / PNDM / DPMSolverMultistep)")


def guided_output(guide: TargetedGuidance, vae: Any, scheduler: Any, model_output: torch.Tensor,
                  timestep: Any, sample: torch.Tensor) -> torch.Tensor:
    """The model output of one guided step: the clean latent moved by ``-dL/dx0``, in the model's parametrisation.

    Args:
        guide (TargetedGuidance): the loss and one target per image.
        vae: decodes ``x0 / scaling_factor`` to images in [-1, 1].
        scheduler: a variance-preserving diffusers scheduler (``alphas_cumprod``, ``config.prediction_type``).
        model_output (torch.Tensor): the (classifier-free guided) UNet output at ``timestep``.
        timestep: the current timestep.
        sample (torch.Tensor): ``x_t``.
    """
    kind = scheduler.config.prediction_type
    a = scheduler.alphas_cumprod[int(timestep)].to(device=sample.device, dtype=torch.float32)
    x_t, out = sample.float(), model_output.float()
    if kind == "epsilon":
        x0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
    else:
        x0 = out
    with torch.inference_mode(False), torch.enable_grad():
        x = x0.clone().requires_grad_(True)  # a normal tensor (the pipeline runs in inference mode)
        decoded = vae.decode((x / vae.config.scaling_factor).to(vae.dtype)).sample
        (grad,) = torch.autograd.grad(guide.guidance.loss(decoded, guide.targets), x)
    x0 = x0 - grad
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    if kind == "epsilon":
        new = eps
    elif kind == "v_prediction":
        new = a.sqrt() * eps - (1 - a).sqrt() * x0
    else:
        new = x0
    return new.to(model_output.dtype)


def guiding(pipe: Any, guide: TargetedGuidance | None):
    """The context a generator call runs in: guided when ``guide`` is given and has a non-zero scale."""
    if guide is None or not guide.guidance.config.active:
        return contextlib.nullcontext()
    return guide.attach(pipe)
