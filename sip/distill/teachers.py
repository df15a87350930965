"""Teachers: frozen classifiers built from sip checkpoints or timm names, with a verifiable identity.

A teacher's *identity* (name, where it came from, a SHA-256 of its weights, class count and names) is
recorded in every logits store and compared when the store is used, so logits of one teacher are never
silently used as another's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sip.models.checkpoints import load_checkpoint_file, load_weights, resolve_checkpoint_path
from sip.models.classifiers import check_model_name, create_model
from sip.train.inputs import resolve_input_config
from sip.train.recipe import DataSection


@dataclass(frozen=True)
class TeacherSection:
    """One teacher of a distillation or logits recipe."""

    checkpoint: str | None = None  # a sip run folder or .safetensors (architecture read from its metadata)
    name: str | None = None  # a timm name: with pretrained: true, or for a checkpoint without sip metadata
    pretrained: bool = False  # timm's pretrained weights for `name` (needs the hub or its cache)
    kwargs: dict[str, Any] = field(default_factory=dict)  # create_model arguments for `name` (num_classes, img_size...)
    weight: float = 1.0  # this teacher's share in multi-teacher losses (normalised over teachers)

    def __post_init__(self):
        if not self.checkpoint and not self.name:
            raise ValueError("a teacher needs a checkpoint (sip run folder / .safetensors) or a timm name")
        if self.name and not self.checkpoint and not self.pretrained:
            raise ValueError(f"teacher {self.name!r} would have random weights: give it a checkpoint or "
                             "set pretrained: true")
        if self.weight < 0:
            raise ValueError(f"teacher weight must be >= 0, got {self.weight}")
        if self.name and not self.name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
            try:  # said at load time, not when the teachers are built after the data
                check_model_name(self.name)
            except ValueError as e:
                raise ValueError(f"name must be a timm or sip model name: {e}") from None


@dataclass
class Teacher:
    """A frozen teacher ready for inference.

    Attributes:
        model (nn.Module): in eval mode, gradients off.
        identity (dict): name, source, weights_sha256, num_classes, classes (None when unknown).
        input_config (dict): timm data config of its inputs (input_size, mean, std, interpolation, crop_pct).
        weight (float): share in multi-teacher losses.
    """

    model: nn.Module
    identity: dict[str, Any]
    input_config: dict[str, Any]
    weight: float = 1.0

    @property
    def num_classes(self) -> int:
        return int(self.identity["num_classes"])

    def input_key(self) -> str:
        """Teachers with equal keys take the same input tensor (one preprocessing for both)."""
        c = self.input_config
        return json.dumps([c["input_size"], c["interpolation"], c["mean"], c["std"]])


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes, in sorted order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_teacher(section: TeacherSection, data: DataSection | None = None) -> Teacher:
    """Load one teacher.

    Args:
        section (TeacherSection): checkpoint and/or timm name.
        data (DataSection, optional): the run's data section; it sets the input size and normalisation
            of a teacher that has no sip metadata (a timm name). Defaults to None (the model's own).

    Raises:
        ValueError: unknown timm name, unsafe or unreadable checkpoint, weights that do not fit.
    """
    meta: dict[str, Any] = {}
    state = None
    source = section.name
    if section.checkpoint:
        path = resolve_checkpoint_path(section.checkpoint)
        state, meta = load_checkpoint_file(path)
        source = str(path)
    if meta.get("timm_name") and not section.name:
        name, kwargs = meta["timm_name"], dict(meta.get("create_kwargs", {}))
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        kwargs.update(section.kwargs)
        model = create_model(name, kwargs)
    else:
        if not section.name:
            raise ValueError(f"{section.checkpoint} has no sip metadata naming its architecture; "
                             "set the teacher's timm name (teachers[i].name) and kwargs")
        name = section.name
        model = create_model(name, dict(section.kwargs), pretrained=section.pretrained and state is None)
    if state is not None:
        load_weights(model, state, source)
    model.eval().requires_grad_(False)
    if meta.get("input_config"):
        input_config = dict(meta["input_config"])
    elif data is not None:
        input_config = resolve_input_config(model, data)
    else:
        from timm.data import resolve_data_config

        input_config = {k: list(v) if isinstance(v, tuple) else v for k, v in resolve_data_config(model=model).items()}
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"teacher {name} has no num_classes attribute (not a timm classifier?)")
    identity = {"name": name, "source": source, "weights_sha256": weights_sha256(model),
                "num_classes": int(num_classes), "classes": meta.get("classes")}
    return Teacher(model, identity, input_config, section.weight)


def build_teachers(sections: Sequence[TeacherSection], data: DataSection | None = None) -> list[Teacher]:
    return [build_teacher(s, data) for s in sections]


def check_teacher_classes(teachers: Sequence[Teacher], classes: Sequence[str]) -> None:
    """Every teacher must predict exactly the data's classes (same count; same names when it knows them)."""
    for i, t in enumerate(teachers):
        if t.num_classes != len(classes):
            raise ValueError(f"teacher {i} ({t.identity['name']}, {t.identity['source']}) predicts {t.num_classes} "
                             f"classes but the data has {len(classes)}: {list(classes)}")
        if t.identity.get("classes") and list(t.identity["classes"]) != list(classes):
            raise ValueError(f"teacher {i} ({t.identity['source']}) was trained on classes {t.identity['classes']}, "
                             f"not the data's {list(classes)} (same count, different names or order)")


def describe(teacher: Teacher) -> str:
    i = teacher.identity
    return f"{i['name']} ({Path(str(i['source'])).name}, sha256 {i['weights_sha256'][:12]})"
