#!/usr/bin/env python
"""How often KDEformer's LSH finds each query's heavy key, on the peaked inputs of scripts/bench_attention.py.

Each query there is a noisy copy of one key (its *heavy* key: score ≈ √d, the rest ≈ N(0, 1)). KDEformer
(:func:`sip.models.kdeformer.kde_attention_parts`) computes exactly only the block of LSH-sorted keys facing the
query's block of LSH-sorted queries; a heavy key outside it is left to sampling. This probe sorts queries and keys
exactly as the estimator does (same projections, same Gray-code order, same blocking) and prints, per token count
and number of hyperplanes:

- ``own block``: share of queries whose heavy key is in the query's own key block (what KDEformer counts exactly);
- ``± 1 block``: within one block of it (what three times the block work would cover);
- ``any of R rounds``: in the own block under at least one of ``--rounds`` independent hashings (R times the
  block work);
- ``heavy mass``: the heavy key's share of its row's softmax mass (mean over queries), i.e. how much of the row
  a miss leaves to sampling.

    python scripts/probe_kdeformer_lsh.py                         # 1k, 4k, 16k tokens; 8 and 16 hyperplanes
    python scripts/probe_kdeformer_lsh.py --tokens 1024 4096      # cheaper

The last line is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_attention import make_inputs  # noqa: E402
from sip.models.kdeformer import KDEformerConfig, _generator, lsh_order  # noqa: E402


def block_of_each(order: torch.Tensor, block: int) -> torch.Tensor:
    """For a permutation ``order`` (…, N) (sorted position -> original index): each original index's block."""
    position = torch.argsort(order, dim=-1)  # original index -> sorted position
    return torch.div(position, block, rounding_mode="floor")


def probe(n: int, n_hashes: int, block_size: int, rounds: int, d: int = 64) -> dict:
    q, k, _ = make_inputs("peaked", n, d)
    heavy, mass = [], []
    for start in range(0, n, 1024):  # score rows a chunk of queries at a time (16k × 16k scores would be 2 GB)
        scores = (q[:, :, start:start + 1024] @ k.transpose(-2, -1)) * d ** -0.5
        heavy.append(scores.argmax(-1))  # each query's heavy key
        mass.append(torch.softmax(scores, -1).gather(-1, heavy[-1].unsqueeze(-1)))
    heavy, mass = torch.cat(heavy, -1), torch.cat(mass, -2).mean().item()
    nb = math.ceil(n / min(block_size, n))
    q_block_size, k_block_size = min(block_size, n), math.ceil(n / nb)  # as kde_attention_parts blocks them
    own_any = torch.zeros_like(heavy, dtype=torch.bool)
    for r in range(rounds):
        config = replace(KDEformerConfig(), n_hashes=n_hashes, block_size=block_size, seed=r)
        proj = torch.randn(d, n_hashes, generator=_generator(config, q.device, "proj"))
        q_block = block_of_each(lsh_order(q, proj), q_block_size)
        k_block = block_of_each(lsh_order(k, proj), k_block_size).gather(-1, heavy)  # block of each query's heavy key
        own = q_block == k_block
        if r == 0:
            first_own, near = own.float().mean().item(), ((q_block - k_block).abs() <= 1).float().mean().item()
        own_any |= own
    return {"tokens": n, "n_hashes": n_hashes, "block_size": block_size, "own_block": round(first_own, 4),
            "within_one_block": round(near, 4), "rounds": rounds, "any_round": round(own_any.float().mean().item(), 4),
            "heavy_mass": round(mass, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--hashes", type=int, nargs="+", default=[8, 16], help="hyperplanes (kdeformer.n_hashes)")
    p.add_argument("--block-size", type=int, default=128, help="kdeformer.block_size")
    p.add_argument("--rounds", type=int, default=3, help="independent hashings for the 'any round' column")
    args = p.parse_args()
    print(f"{'tokens':>6} {'hashes':>6} {'own block':>9} {'± 1 block':>9} {f'any of {args.rounds}':>9} "
          f"{'heavy mass':>10}")
    rows = []
    for n in args.tokens:
        for h in args.hashes:
            r = probe(n, h, args.block_size, args.rounds)
            rows.append(r)
            print(f"{n:>6} {h:>6} {r['own_block']:>9.1%} {r['within_one_block']:>9.1%} {r['any_round']:>9.1%} "
                  f"{r['heavy_mass']:>10.1%}", flush=True)
    print(f"(peaked inputs of scripts/bench_attention.py, head dim 64, 2 heads, block {args.block_size}; heavy mass = "
          f"the heavy key's softmax share of its row)")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
