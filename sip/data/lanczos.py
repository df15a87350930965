"""Separable Lanczos resizing of tensors (and PIL images), as a torchvision-v2 transform.

The seed paper brings small images to a ViT's input size with Lanczos5; torchvision offers only
nearest / bilinear / bicubic for tensors and PIL only Lanczos-3. :class:`LanczosResize` resamples with
the windowed-sinc kernel of order ``a``::

    L_a(x) = sinc(x) · sinc(x / a)   for |x| < a,   0 otherwise

one axis at a time, as PIL's ``ImagingResample`` does: output pixel ``i`` is centred at
``(i + 0.5) · in / out`` in input coordinates; when shrinking (antialias) the kernel is stretched by
``in / out`` so it low-passes before it samples; the weights of each output pixel are normalised to
sum to 1 and the image edge is handled by truncating the kernel there (as PIL). For ``a = 3`` on
uint8 images this matches PIL's ``Image.LANCZOS`` within rounding (±1 grey level; tested).

Each axis is one small matrix product (``out × in`` weights, cached per size), so it runs on any
device and dtype and batches over leading dimensions.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

LANCZOS_ORDERS = (2, 3, 4, 5)


def lanczos_kernel(x: np.ndarray, order: int) -> np.ndarray:
    """``sinc(x) · sinc(x / order)`` inside ``|x| < order``, 0 outside (numpy's sinc is normalised)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.abs(x) < order, np.sinc(x) * np.sinc(x / order), 0.0)


@lru_cache(maxsize=64)
def _weights(in_size: int, out_size: int, order: int, antialias: bool) -> np.ndarray:
    """The ``(out_size, in_size)`` resampling matrix of one axis (rows sum to 1)."""
    scale = in_size / out_size
    stretch = max(scale, 1.0) if antialias else 1.0
    support = order * stretch
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        k = lanczos_kernel((j - center + 0.5) / stretch, order)
        total = k.sum()
        w[i, lo:hi] = k / total if total != 0 else 0.0
    return w


def check_order(order: int) -> int:
    """Raise a clear ``ValueError`` for a Lanczos order outside {2, 3, 4, 5}."""
    if order not in LANCZOS_ORDERS:
        raise ValueError(f"Lanczos order must be one of {LANCZOS_ORDERS}, got {order!r} "
                         "(lanczos3 is PIL's filter, lanczos5 the seed paper's)")
    return order


def lanczos_resize(image: torch.Tensor, size: int | tuple[int, int], order: int = 5, antialias: bool = True) -> torch.Tensor:
    """Resize ``(..., H, W)`` tensors with a separable Lanczos kernel.

    Args:
        image (torch.Tensor): uint8 (0–255) or floating images, any leading dimensions.
        size (int | tuple[int, int]): output ``(height, width)``, or one int for a square output.
        order (int): the kernel's lobes ``a`` (2–5). Defaults to 5.
        antialias (bool): stretch the kernel when shrinking (low-pass first). Defaults to True.

    Returns:
        torch.Tensor: the resized images, same dtype (uint8 results are rounded and clamped, since
        Lanczos overshoots at edges).
    """
    check_order(order)
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    in_h, in_w = image.shape[-2:]
    work = torch.float64 if image.dtype == torch.float64 else torch.float32
    x = image.to(work)
    is_uint8 = image.dtype == torch.uint8
    # Width first, then height, as PIL; uint8 images are rounded and clamped between the passes as PIL
    # keeps its intermediate image in 8 bits (Lanczos overshoots at edges), which is what matches it.
    if in_w != out_w:
        ww = torch.from_numpy(_weights(in_w, out_w, order, antialias)).to(x.device, work)
        x = x @ ww.T
        if is_uint8:
            x = x.round_().clamp_(0, 255)
    if in_h != out_h:
        wh = torch.from_numpy(_weights(in_h, out_h, order, antialias)).to(x.device, work)
        x = wh @ x
    if is_uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(image.dtype)


class LanczosResize(v2.Transform):
    """torchvision-v2 transform: resize images with a Lanczos kernel of order 2–5.

    Works in ``v2.Compose`` pipelines on tensors, ``tv_tensors.Image`` and PIL images (a PIL image comes
    back as a PIL image).

    Args:
        size (int | tuple[int, int]): output ``(height, width)`` or one side for a square.
        order (int): 3 (PIL's Lanczos) or 5 (the seed paper's), or 2 / 4. Defaults to 5.
        antialias (bool): low-pass when shrinking. Defaults to True.
    """

    def __init__(self, size: int | tuple[int, int], order: int = 5, antialias: bool = True):
        super().__init__()
        self.size = size
        self.order = check_order(order)
        self.antialias = antialias

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, Image.Image):
            if inpt.mode not in ("L", "RGB", "RGBA"):
                inpt = inpt.convert("RGB")
            out = lanczos_resize(TF.pil_to_tensor(inpt), self.size, self.order, self.antialias)
            return TF.to_pil_image(out, mode=inpt.mode)
        if isinstance(inpt, torch.Tensor) and inpt.ndim >= 2:
            out = lanczos_resize(inpt.as_subclass(torch.Tensor), self.size, self.order, self.antialias)
            return out.as_subclass(type(inpt)) if type(inpt) is not torch.Tensor else out
        return inpt

    def extra_repr(self) -> str:
        return f"size={self.size}, order={self.order}, antialias={self.antialias}"


def parse_interpolation(name: str) -> tuple[str, int | None]:
    """``"lanczos5"`` → ``("lanczos", 5)``; ``"bicubic"`` → ``("bicubic", None)``.

    Raises:
        ValueError: ``lanczosN`` with N outside {2, 3, 4, 5}.
    """
    text = str(name).lower()
    if text.startswith("lanczos"):
        digits = text[len("lanczos"):]
        order = int(digits) if digits.isdigit() else (3 if digits == "" else -1)
        if order not in LANCZOS_ORDERS:
            raise ValueError(f"interpolation {name!r}: the Lanczos order must be one of {LANCZOS_ORDERS} "
                             "(e.g. lanczos3, lanczos5)")
        return "lanczos", order
    return text, None


__all__ = ["LANCZOS_ORDERS", "LanczosResize", "check_order", "lanczos_kernel", "lanczos_resize", "parse_interpolation"]
