"""Classifier weights on disk: safetensors files whose metadata names the timm model, its kwargs, the
classes and the preprocessing, so a run folder or file rebuilds its model without the recipe."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sip.models.classifiers import create_model

MODEL_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"  # a run folder's last resumable save (weights + optimiser state)
METADATA_KEY = "sip"


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




def model_metadata(name: str, create_kwargs: dict[str, Any], classes: Sequence[str],
                   input_config: dict[str, Any]) -> dict[str, Any]:
    """What a saved model needs to be rebuilt and fed: timm name, kwargs, class names, preprocessing."""
    from sip import __version__

    return {"format": "sip-model", "sip_version": __version__, "timm_name": name,
            "create_kwargs": json.loads(json.dumps(create_kwargs, default=list)),
            "num_classes": len(classes), "classes": list(classes), "input_config": input_config}


def load_classifier(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a sip-trained classifier from its run folder or ``.safetensors`` file, in eval mode.

    The file's metadata names the timm model and its kwargs, so no recipe is needed.

    Returns:
        (model, meta): ``meta`` holds ``timm_name``, ``create_kwargs``, ``classes`` and ``input_config``.

    Raises:
        ValueError: the file has no sip metadata naming its architecture.
    """

    path = resolve_checkpoint_path(checkpoint)
    state, meta = load_checkpoint_file(path)
    if not meta.get("timm_name"):
        raise ValueError(f"{path} has no sip metadata naming its architecture; train it with `sip train`")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(meta.get("create_kwargs", {})).items()}
    model = create_model(meta["timm_name"], kwargs)
    load_weights(model, state, str(path))
    return model.eval().requires_grad_(False), meta


def input_transform(input_config: dict[str, Any]):
    """PIL → normalised tensor for a model's recorded input config (the tail of timm's transforms)."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(),
                               transforms.Normalize(mean=list(input_config["mean"]), std=list(input_config["std"]))])
