"""What the benchmarks measure about the machine and the networks: matmul peak, CPU flags, time spent inside
named modules (forward hooks), FLOPs per sample of a Stable Diffusion pipeline's networks."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from functools import partial

import torch


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> float:
    """Best GFLOP/s of an n×n by n×n matmul in ``dtype`` over ``reps`` runs (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class Peaks(dict):
    """This CPU's fp32 and bf16 matmul peak in GFLOP/s (n×n GEMMs), measured at the start and again after each
    section's runs; the higher (less disturbed) measurement counts."""

    def __init__(self, n: int, quick: bool):
        super().__init__()
        self.n, self.quick = n, quick
        self.update(self.measure())

    def measure(self) -> dict[str, float]:
        q = self.quick
        return {"fp32": matmul_peak(torch.float32, self.n, 3 if q else 5),
                "bf16": matmul_peak(torch.bfloat16, self.n, 2 if q else 3)}

    def refresh(self, label: str) -> None:
        again = self.measure()
        print(f"matmul peak re-measured after the {label} runs: fp32 {again['fp32']:.1f}, bf16 "
              f"{again['bf16']:.1f} GFLOP/s; the fractions below use the higher of all measurements")
        for k in again:
            self[k] = max(self[k], again[k])


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    keep = [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512_vnni", "avx512f", "avx2"))]
    return " ".join(sorted(keep)) or "none of avx2/avx512/amx"


class StageTimer:
    """Wall time spent inside named modules, measured with forward pre/post hooks (CPU ops are
    synchronous, so wall time between the hooks is the module's time), plus samples per module (the first
    argument's batch size) and calls. The one stage timer of sip's benchmarks (bench_generate, bench_caption)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.seconds: dict[str, float] = defaultdict(float)
        self.samples: Counter = Counter()
        self.calls: Counter = Counter()
        self._t0: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(partial(self._pre, name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(partial(self._post, name)))

    def _pre(self, name, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        self.samples[name] += int(x.shape[0]) if hasattr(x, "shape") else 0
        self._t0[name] = time.perf_counter()

    def _post(self, name, module, args, output):
        self.seconds[name] += time.perf_counter() - self._t0.pop(name)
        self.calls[name] += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def networks(pipe) -> dict[str, torch.nn.Module]:
    return {"unet": pipe.unet, "vae_decoder": pipe.vae.decoder, "vae_encoder": pipe.vae.encoder,
            "text_encoder": pipe.text_encoder}


def count_flops(pipe, size: int) -> dict[str, int]:
    """FLOPs per sample of each network at generation size ``size`` (FlopCounterMode; the UNet's with
    :func:`unet_flops`, attention included)."""
    from torch.utils.flop_counter import FlopCounterMode

    vae, text = pipe.vae, pipe.text_encoder
    f = int(pipe.vae_scale_factor)
    length = int(pipe.tokenizer.model_max_length)
    out = {"unet": unet_flops(pipe.unet, size // f, length)}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            vae.decoder(torch.randn(1, vae.config.latent_channels, size // f, size // f))
        out["vae_decoder"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.encoder(torch.randn(1, 3, size, size))
        out["vae_encoder"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            text(torch.zeros(1, length, dtype=torch.long))
        out["text_encoder"] = fc.get_total_flops()
    return out


def unet_flops(unet, side: int, length: int = 77) -> int:
    """FLOPs of one UNet sample on ``side``×``side`` latents (FlopCounterMode), attention counted with diffusers'
    classic ``AttnProcessor`` (explicit bmm/baddbmm, which the counter knows); the CPU SDPA kernel the runs use does
    the same arithmetic but is not registered with the counter. The UNet's processors are restored."""
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    latent = torch.randn(1, unet.config.in_channels, side, side)
    context = torch.randn(1, length, unet.config.cross_attention_dim)
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            unet(latent, torch.tensor([500]), encoder_hidden_states=context)
    finally:
        unet.set_attn_processor(saved)
    return fc.get_total_flops()
