"""KDEformer vs exact attention, side by side in one run (issue 15).

Attention alone at 1k, 4k and 16k tokens (head dim 64): wall time of torch's
``scaled_dot_product_attention`` against :func:`sip.models.kdeformer.kdeformer_attention` at two
budgets, and the error of the output, on two kinds of inputs:

- ``peaked``: queries near keys (a few large scores per row, as in trained transformers), and
- ``diffuse``: i.i.d. Gaussian q, k, v (every row of the attention matrix nearly uniform: the output
  averages ~N values, so its norm shrinks like 1/√N and *relative* error grows like √(N / samples);
  the paper's guarantee is relative to ‖D⁻¹A‖·‖V‖, printed as ``err/‖A‖‖V‖``).

Ways: ``blocks`` is sip's default (each block of LSH-sorted queries draws its own keys, stratified along the
LSH-sorted keys: ``kdeformer.stratified``), ``iid`` the same with independent draws, ``shared`` the first
version's one sample set for all queries. How much stratifying gains depends on how similar LSH-neighbouring
keys and values are: little on these i.i.d. inputs, much in a trained ViT (the 1,025-token ViT's logits 12% →
6% from exact at S = 512: ``scripts/eval_kdeformer_vit.py --sampling stratified iid``).

Errors: relative Frobenius ‖Ô−O‖_F / ‖O‖_F, relative spectral ‖Ô−O‖₂ / ‖O‖₂ (worst head), and the
spectral error over ‖V‖₂ (the paper bounds ‖Ô−O‖₂ by ε‖D⁻¹A‖₂‖V‖₂; ‖D⁻¹A‖₂ is not formed at 16k).
With ``--unet`` it also times one SD 1.5-architecture UNet forward with
KDEformer in the self-attention of the high-resolution blocks vs exact (random weights).

    python scripts/bench_attention.py            # full: 1k, 4k, 16k
    python scripts/bench_attention.py --quick    # 1k, 4k only, fewer repeats

The last line is one JSON object of headline figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sip.models.kdeformer import KDEformerConfig, kdeformer_attention  # noqa: E402


def make_inputs(kind: str, n: int, d: int = 64, heads: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "diffuse":
        return tuple(torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    # each query is a noisy copy of one key: its score there is ~‖k‖²/√d = √d = 8, elsewhere ~N(0, 1)
    k = torch.randn(1, heads, n, d, generator=g)
    q = k[:, :, torch.randperm(n, generator=g)] + 0.3 * torch.randn(1, heads, n, d, generator=g)
    return q, k, torch.randn(1, heads, n, d, generator=g)


KINDS = ("peaked", "diffuse")


def timed_together(fns: list, repeats: int) -> tuple[list[float], list[torch.Tensor]]:
    """Best wall time of each function, the repeats interleaved (exact, way 1, way 2, …, exact, …) so a
    slow spell of this shared VM hits every way alike; and each function's output."""
    outs = [fn() for fn in fns]  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best, outs


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    (best,), (out,) = timed_together([fn], repeats)
    return best, out


def errors(approx: torch.Tensor, exact: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    diff = approx - exact
    fro = (diff.norm() / exact.norm()).item()
    spec_d = torch.linalg.matrix_norm(diff[0].float(), ord=2)
    spec_o = torch.linalg.matrix_norm(exact[0].float(), ord=2)
    spec_v = torch.linalg.matrix_norm(v[0].float(), ord=2)
    return {"rel_fro": fro, "rel_spec": (spec_d / spec_o).max().item(), "spec_over_V": (spec_d / spec_v).max().item()}


def attention_table(lengths, budgets, repeats: int) -> list[dict]:
    rows = []
    for kind in KINDS:
        for n in lengths:
            q, k, v = make_inputs(kind, n)
            cfgs = [KDEformerConfig(num_samples=samples, block_size=block, min_tokens=0, shared_samples=way == "shared",
                                    stratified=way == "blocks")
                    for samples, block, way in budgets]
            fns = [lambda: F.scaled_dot_product_attention(q, k, v)]
            fns += [lambda cfg=cfg: kdeformer_attention(q, k, v, cfg) for cfg in cfgs]
            times, outs = timed_together(fns, repeats)
            t_exact, exact = times[0], outs[0]
            for (samples, block, way), t_kde, approx in zip(budgets, times[1:], outs[1:]):
                row = {"inputs": kind, "tokens": n, "samples": samples, "block": block, "way": way,
                       "exact_s": t_exact, "kde_s": t_kde, "speedup": t_exact / t_kde, **errors(approx, exact, v)}
                rows.append(row)
                print(f"{kind:10s} N={n:6d} S={samples:5d} b={block:4d} {way:6s}  "
                      f"exact {t_exact * 1e3:8.1f} ms  "
                      f"kde {t_kde * 1e3:8.1f} ms  ×{row['speedup']:5.2f}  rel_fro {row['rel_fro']:.3f}  "
                      f"rel_spec {row['rel_spec']:.3f}  err/‖V‖ {row['spec_over_V']:.4f}", flush=True)
    return rows


def profile_kde(n: int, samples: int, block: int) -> None:
    q, k, v = make_inputs("peaked", n)
    cfg = KDEformerConfig(num_samples=samples, block_size=block, min_tokens=0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        kdeformer_attention(q, k, v, cfg)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def unet_step(px: int, config: KDEformerConfig | None, repeats: int) -> float:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=px // 8, cross_attention_dim=768, attention_head_dim=8).eval()
    if config is not None:
        from sip.models.kdeformer_layers import use_kdeformer_in_unet

        use_kdeformer_in_unet(unet, config)
    x = torch.randn(1, 4, px // 8, px // 8)
    text = torch.randn(1, 77, 768)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t, out = timed(lambda: unet(x, 500, encoder_hidden_states=text).sample, repeats)
    unet_step.last = out.float()
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k and 4k tokens only, one repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--unet", type=int, default=0, help="also time an SD 1.5-architecture UNet step at this px")
    parser.add_argument("--profile", action="store_true", help="profile the estimator at the longest length")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384]
    # (samples, block, way): the default — per-block, stratified draws — at three budgets; per-block independent
    # draws (iid) at two; and the first version's one shared sample set (same cost, larger spectral error)
    budgets = [(256, 128, "blocks"), (384, 128, "blocks"), (512, 128, "blocks"), (256, 128, "iid"), (512, 128, "iid"),
               (256, 128, "shared")]
    rows = attention_table(lengths, budgets, 1 if args.quick else 5)
    if args.profile:
        profile_kde(lengths[-1], *budgets[0][:2])
    summary = {"threads": torch.get_num_threads()}
    longest = [r for r in rows if r["tokens"] == lengths[-1]]
    for r in longest:
        key = f"{r['inputs']}_N{r['tokens']}_S{r['samples']}{'' if r['way'] == 'blocks' else '_' + r['way']}"
        summary[key] = {k: round(r[k], 4) for k in ("speedup", "rel_fro", "rel_spec", "spec_over_V")}
    for kind in KINDS:  # the target: >= 4x at the longest length with error <= 0.1 (sip's default way)
        ok = [r for r in longest if r["inputs"] == kind and r["way"] == "blocks" and r["spec_over_V"] <= 0.1]
        best = max(ok, key=lambda r: r["speedup"]) if ok else None
        met = best is not None and best["speedup"] >= 4
        print(f"target {kind} N={lengths[-1]}: >= 4x with err/‖V‖ <= 0.1: "
              + (f"fastest such budget S={best['samples']} ×{best['speedup']:.2f} ({'met' if met else 'missed'})"
                 if best else "no budget reaches err/‖V‖ <= 0.1 (missed)"))
        summary[f"target_{kind}"] = {"met": met, "samples": best and best["samples"],
                                     "speedup": best and round(best["speedup"], 3)}
    cross = [r["tokens"] for r in rows if r["inputs"] == "peaked" and r["samples"] == budgets[0][0]
             and r["way"] == "blocks" and r["speedup"] > 1]
    summary["crossover_tokens_at_S256"] = min(cross) if cross else None
    if args.unet:
        cfg = KDEformerConfig(num_samples=256, block_size=128, min_tokens=2048)
        t_exact = unet_step(args.unet, None, 1)
        exact = unet_step.last
        t_kde = unet_step(args.unet, cfg, 1)
        diff = ((unet_step.last - exact).norm() / exact.norm()).item()
        print(f"UNet {args.unet}px step: exact {t_exact:.2f} s, KDEformer (>= 2048 tokens) {t_kde:.2f} s, "
              f"×{t_exact / t_kde:.2f}, output rel diff {diff:.3f}")
        summary["unet"] = {"px": args.unet, "exact_s": round(t_exact, 3), "kde_s": round(t_kde, 3),
                           "speedup": round(t_exact / t_kde, 3), "rel_diff": round(diff, 4)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
