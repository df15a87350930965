"""Where and in what precision sip runs: device, dtype, the AMX probe and the precision policy, autocast.

One owner for these decisions, so generation, captioning, training, distillation and the logits store
all pick the same precision on the same machine.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"fp16"`` / ``"fp32"`` … → torch dtype, with a clear error."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}") from None


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def check_device(name: str, key: str) -> None:
    """Refuse a device string torch cannot parse (``"gpu"``, a typo), naming the recipe ``key``: said at load
    time, not when the model is moved. Whether CUDA is present is asked later, where the device is used."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{key} must be auto, cpu, cuda, cuda:N, mps, xpu (any torch device), got {name!r}") from None


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where bf16 matmuls beat fp32.

    Asks torch's own AMX probe: ``torch.backends.cpu.get_cpu_capability()`` reports only the vector
    ISA ("AVX512") on AMX machines, so it cannot tell. Measured on this project's 2-core AMX Xeon
    (``scripts/bench_generate.py`` prints it): 2048² GEMM 213–314 GFLOP/s fp32 vs 380–1,872 GFLOP/s bf16
    (the VM's bf16 throughput varies between runs).
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    return "AMX" in torch.backends.cpu.get_cpu_capability().upper()


# On an AMX CPU bf16 wins only when each matmul / convolution is large; for small ones the casts cost more
# than AMX saves. Measured on this project's 2-core AMX Xeon (torch 2.14.1), bf16 autocast vs fp32:
#   generation: shipped 3 M-param UNet at 8x8 latents 0.79x; SD 1.5-architecture UNet (860 M) several x faster
#   training steps: ResNet-10-T and a 4-block ViT at 28 px 0.74x / 0.66x; ResNet-50 at 32 px 0.96x;
#   ViT-Tiny at 224 px 1.37x
# (scripts/bench_generate.py prints the generation figures). So `auto` on a CPU asks the caller whether the
# work is large: a UNet of at least AMX_MIN_UNET_PARAMS parameters, a classifier input of at least AMX_MIN_IMG_SIZE.
AMX_MIN_UNET_PARAMS = 100_000_000
AMX_MIN_IMG_SIZE = 112


def large_input(img_size: int | None) -> bool:
    """Whether a classifier input is big enough for AMX bf16 to pay (null = the model's own, 224 for most)."""
    return img_size is None or img_size >= AMX_MIN_IMG_SIZE


def resolve_precision(precision: str, device: torch.device, large: bool = True) -> str:
    """``"auto"`` → ``"bf16"`` on CUDA (``"fp16"`` where bf16 is unsupported), ``"bf16"`` on AMX CPUs when
    the work is ``large``, else ``"fp32"``.

    A CPU without AMX runs bf16 matmuls through AVX-512 emulation, slower than fp32 (2–4× measured on an
    AVX-512 Xeon without AMX); with AMX, small operators still lose to the casts (see the figures above).

    Args:
        precision (str): "auto", "fp32", "bf16" or "fp16" (fp16 needs a GPU).
        device (torch.device): where the work runs.
        large (bool, optional): the caller's judgement that its operators are big enough for AMX to pay
            (e.g. ``unet_params >= AMX_MIN_UNET_PARAMS``). Only used for ``auto`` on a CPU. Defaults to True.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and large and cpu_has_amx() else "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision ("fp32" → no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def describe_device(device: torch.device | str) -> str:
    """A device as recorded in run.json: 'cuda (<name>)' or 'cpu (<threads>, <ISA>[+AMX])'."""
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    amx = "+AMX" if cpu_has_amx() else ""
    return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}{amx})"
