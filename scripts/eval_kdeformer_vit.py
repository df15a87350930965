"""A sip-trained ViT evaluated with exact and with KDEformer attention, side by side in one run (issue 15).

Loads a run folder's model (``model.safetensors`` and its metadata: timm name, kwargs, preprocessing),
evaluates the run's held-out set (``data.eval`` of its ``config.yaml``) once with exact attention and
once per KDEformer budget ``S/b`` (S keys sampled per query block, LSH blocks of b), swapped into every
attention layer of the model (timm ``Attention`` and sip's Locality Self-Attention, same weights), and
prints top-1, its drop against exact attention, how often the predictions agree, the relative difference
of the logits and the time. The estimator needs ``S + b`` below the token count; sip's 28-px students
have 50 tokens, so small budgets (e.g. ``16/8``) are the in-model check of how its error turns into
accuracy; a model with >= 1k tokens is the issue's setting.

    python scripts/eval_kdeformer_vit.py runs/student_vit_sip --budgets 16/8 24/16 --threads 1
    python scripts/eval_kdeformer_vit.py runs/student_vit_sip --samples 2000   # a fixed test subset

The last line is one JSON object of headline figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sip.config import from_dict, read_yaml  # noqa: E402
from sip.models.checkpoints import load_classifier  # noqa: E402
from sip.models.kdeformer import KDEformerConfig  # noqa: E402
from sip.models.kdeformer_layers import use_kdeformer_in_vit  # noqa: E402
from sip.train.inputs import TransformedImages, build_test_images, build_transforms  # noqa: E402
from sip.train.loop import merge_heads  # noqa: E402
from sip.train.recipe import DataSection  # noqa: E402


def parse_budget(text: str) -> tuple[int, int]:
    try:
        samples, block = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not S/b (e.g. 16/8)") from None
    return samples, block


def token_count(model: torch.nn.Module) -> int:
    """Tokens the model's attention sees: patches plus class / distillation tokens."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(patch_embed, "num_patches"):
        raise ValueError(f"{type(model).__name__} has no patch embedding: not a ViT")
    return int(patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))


@torch.no_grad()
def predict(model: torch.nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Logits and labels over ``batches`` and the seconds the forward passes took."""
    logits, labels, seconds = [], [], 0.0
    for batch in batches:
        t = time.perf_counter()
        logits.append(merge_heads(model(batch["image"])).float())
        seconds += time.perf_counter() - t
        labels.append(batch["label"])
    return torch.cat(logits), torch.cat(labels), seconds


def compare(model: torch.nn.Module, batches, budgets: list[tuple[int, int]], seed: int = 0,
            sampling: tuple[str, ...] = ("stratified",)) -> list[dict]:
    """Exact attention, then each KDEformer budget (× each ``sampling`` way: ``stratified`` or ``iid`` draws)
    on a copy of ``model`` with the same weights."""
    exact, labels, t_exact = predict(model, batches)
    top1 = lambda logits: 100.0 * (logits.argmax(1) == labels).float().mean().item()  # noqa: E731
    rows = [{"attention": "exact", "top1": top1(exact), "drop": 0.0, "agree": 100.0, "logit_rel_diff": 0.0,
             "seconds": t_exact}]
    for (samples, block), way in ((budget, way) for budget in budgets for way in sampling):
        kde_model = copy.deepcopy(model)
        cfg = KDEformerConfig(num_samples=samples, block_size=block, min_tokens=0, seed=seed,
                              stratified=way == "stratified")
        if not use_kdeformer_in_vit(kde_model, cfg):
            raise ValueError("the model has no attention layer KDEformer can replace")
        approx, _, t_kde = predict(kde_model, batches)
        name = f"kdeformer S={samples} b={block}" + (" iid" if way == "iid" else "")
        rows.append({"attention": name, "top1": top1(approx),
                     "drop": top1(exact) - top1(approx),
                     "agree": 100.0 * (approx.argmax(1) == exact.argmax(1)).float().mean().item(),
                     "logit_rel_diff": ((approx - exact).norm() / exact.norm()).item(), "seconds": t_kde})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a sip train / distill run folder (or its model.safetensors)")
    parser.add_argument("--budgets", nargs="+", type=parse_budget, default=[(16, 8), (24, 16)],
                        help="KDEformer budgets S/b (default: 16/8 24/16)")
    parser.add_argument("--samples", type=int, default=0, help="evaluate the first N held-out images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="KDEformer's hashing and sampling seed")
    parser.add_argument("--sampling", nargs="+", choices=["stratified", "iid"], default=["stratified"],
                        help="how the S keys are drawn (kdeformer.stratified); both = one row each")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = args.run if args.run.is_dir() else args.run.parent
    config_path = run / "config.yaml"
    if not config_path.is_file():
        sys.exit(f"{config_path} not found: pass a run folder written by `sip train` or `sip distill`")
    model, meta = load_classifier(args.run)
    tokens = token_count(model)
    for samples, block in args.budgets:
        if samples + block >= tokens:
            sys.exit(f"budget {samples}/{block} covers all {tokens} tokens (KDEformer would be exact attention); "
                     f"pick S + b < {tokens}")
    data = from_dict(DataSection, read_yaml(config_path).get("data", {}), source=str(config_path), prefix="data")
    images = build_test_images(data)
    _, eval_tf = build_transforms(meta["input_config"], data)
    picked = range(min(args.samples, len(images))) if args.samples else None
    dataset = TransformedImages(images, eval_tf, picked)
    # decoded and transformed once: every way (exact, each budget) runs on the same tensors
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size))
    print(f"{run}: {meta['timm_name']}, {tokens} tokens, {len(dataset)} held-out images, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    rows = compare(model, batches, args.budgets, args.seed, tuple(args.sampling))
    for r in rows:
        print(f"{r['attention']:28s} top-1 {r['top1']:6.2f}  drop {r['drop']:+5.2f}  agree {r['agree']:6.2f}%  "
              f"logit diff {r['logit_rel_diff']:.3f}  {r['seconds']:6.1f} s")
    print(json.dumps({"run": str(run), "model": meta["timm_name"], "tokens": tokens, "images": len(dataset),
                      "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                               for r in rows]}))


if __name__ == "__main__":
    main()
