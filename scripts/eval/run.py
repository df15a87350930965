"""Measure a small Stable Diffusion (default: sip's shipped Fashion-MNIST model) with a judge classifier.

    python -m scripts.eval                      # full mode (tens of minutes on 2 CPU cores)
    python -m scripts.eval --quick              # about a minute: tiny counts, one seed
    python -m scripts.eval --model /tmp/sd --out-json /tmp/eval.json --threads 1
    python -m scripts.eval --sections txt2img,img2img --set txt2img_per_class=20

Every generated image goes through sip's own code path: ``sip.augment.prompts.PromptBuilder`` (Fashion-MNIST
readable names, the tokenizer's budget) → ``sip.augment.generate.DiffusionGenerator`` (img2img / txt2img, batched
on ``sip.augment.loop``'s batch grid by its ``generate_and_write``, one seed per image from ``sip.ids.image_seed``
exactly as ``sip augment`` / ``sip synth`` derive it).

Sections:
  judge     a small CNN trained on real Fashion-MNIST train images 0-49,999 (the generator's own split)
            at 32×32 (bicubic 28 → 32, as ``FashionMNISTSource(size=32)``), grey; its accuracy on the
            official 10k test set. Cached under ``--judge-cache`` keyed by its settings.
  vae       judge accuracy on VAE reconstructions (encode → posterior mean → decode) of test images,
            against the same test images unchanged.
  txt2img   class fidelity: images per class from label-only prompts ("a photo of a coat") at guidance
            3 and 5; share the judge assigns to the prompted class, per class and mean.
  img2img   label preservation on test images at strength 0.3/0.5/0.7/0.9 with the true label (prompt:
            label + caption of the offline ``imagenet-topk`` captioner at 96 px, or ``--prompts label``);
            diversity of the variants (pixel L1 to the source; judge-feature cosine distance between
            variants of one source and to the source); steering: a wrong label at strength 0.9, share
            judged as that wrong (target) label. Steering reuses the seeds of the 0.9 preservation run,
            so the two differ only in the label.
  fewshot   the data-scarce experiment: a small CNN trained on 10 real images per class drawn from train
            images 50,000-59,999 (disjoint from the generator's), tested on the 10k test set, per arm:
            none | cropflip | randaug (real images only, no / standard / RandAugment augmentation) |
            img2img (+ sip variants of the real images) | txt2img (+ data-free synthetic) | both |
            real (+ as many extra real images as img2img adds, from the same pool, disjoint from the
            shots: the upper bound). Extra-data arms train with the crop+flip augmentation on the union
            of real and extra images, for the same number of steps as every other arm.

Output: a table, a JSON file (``--out-json``) and, as the last line of stdout, that JSON on one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sip.runtime import describe_device
from sip.models.diffusion import DEFAULT_SD_MODEL, load_diffusion_pipeline, looks_like_path

from .classifier import classify
from .config import PROMPTS, QUICK, SECTIONS, EvalConfig, build_config
from .data import fashion_mnist_32, subset
from .fewshot import run_fewshot
from .generation import Captions, SipGeneration
from .judge import load_or_train_judge
from .measures import per_class_share, share
from .report import folder_mb, format_table, no_nan
from .sections import TestSet, img2img_section, txt2img_section, vae_section


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_SD_MODEL, help="Stable Diffusion folder (save_pretrained layout)")
    p.add_argument("--quick", action="store_true", help="tiny counts, one seed: about a minute")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma list of {', '.join(SECTIONS)} (the judge always runs)")
    p.add_argument("--out-json", default=".cache/eval_tiny_sd.json")
    p.add_argument("--judge-cache", default=".cache/judge", help="folder of cached judge weights")
    p.add_argument("--caption-cache", default=".cache/eval_tiny_sd_captions.jsonl",
                   help="caption cache file ('' disables)")
    p.add_argument("--prompts", choices=list(PROMPTS), default=None,
                   help="img2img prompts: label + caption (SIP, default), label only, or caption only")
    p.add_argument("--guidance", default=None, help="txt2img guidance scales, comma list (default 3,5)")
    p.add_argument("--seeds", type=int, default=None, help="few-shot draws (default 3, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30, quick 10)")
    p.add_argument("--batch-size", type=int, default=None, help="images per pipeline call")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto …")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any EvalConfig field (e.g. --set fewshot_steps=300)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Quick counts, then the flags, then ``--set`` overrides."""
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    flags = {"prompts": args.prompts, "fewshot_seeds": args.seeds, "steps": args.steps,
             "batch_size": args.batch_size, "seed": args.seed, "precision": args.precision}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.guidance:
        values["txt2img_guidance"] = [float(g) for g in args.guidance.split(",") if g]
    return build_config(values, args.set)


def check_model(model: str) -> Path | None:
    """The model folder, or None for a hub id; a missing folder says which and how to make it."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                             f"scripts/train_tiny_sd.py --out {path} writes one")
        return path
    if path.exists() or looks_like_path(model):
        raise SystemExit(f"Stable Diffusion folder {path} does not exist. Train it with "
                         f"`python scripts/train_tiny_sd.py --out {path}` (sip's shipped model: "
                         f"`python scripts/train_tiny_sd.py`, which writes {DEFAULT_SD_MODEL}), or pass "
                         f"--model with another folder or a hub id.")
    return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # 1. check inputs before anything heavy
    cfg = config_from_args(args)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    folder = check_model(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    seconds: dict[str, float] = {}
    t_start = time.time()

    # 2. data: Fashion-MNIST at 32×32, grey
    t0 = time.time()
    train_grey, train_labels = fashion_mnist_32("train")
    test_grey, test_labels = fashion_mnist_32("test")
    seconds["data"] = time.time() - t0

    # 3. judge: cached by settings; quick mode takes the full judge when it is cached
    t0 = time.time()
    candidates = [EvalConfig(seed=cfg.seed), cfg] if args.quick else [cfg]
    judge, judge_info = load_or_train_judge(cfg, candidates, Path(args.judge_cache), train_grey, train_labels,
                                            progress)
    judge_idx = subset(test_labels, cfg.judge_test_images, cfg.seed + 3)
    test_pred, test_feats = classify(judge, test_grey[judge_idx])
    test = TestSet(test_grey, test_labels, judge_idx, test_feats)
    judge_accuracy = share(test_pred, test_labels[judge_idx])
    judge_info["test_images"] = len(judge_idx)
    judge_info["per_class"] = per_class_share(test_pred, test_labels[judge_idx])  # how far to trust it, per class
    seconds["judge"] = time.time() - t0
    print(f"judge test accuracy {judge_accuracy:.2%} ({len(judge_idx)} images)", file=sys.stderr)

    # 4. the pipeline, loaded the way a user's checkpoint is
    t0 = time.time()
    pipe = load_diffusion_pipeline(str(folder) if folder else args.model, "img2img", "float32", args.device)
    gen = SipGeneration(pipe, args.model, cfg, progress)
    captions = Captions(cfg.caption_size, Path(args.caption_cache) if args.caption_cache else None)
    seconds["load"] = time.time() - t0

    result: dict[str, Any] = {
        "model": args.model, "model_mb": folder_mb(folder) if folder else None,
        "mode": "quick" if args.quick else "full", "device": describe_device(pipe.device),
        "precision": "bf16 autocast" if gen.generator.bf16 else "fp32",
        "judge_accuracy": judge_accuracy, "judge": judge_info,
        "vae_recon_accuracy": None, "vae": None,
        "txt2img_fidelity": None, "txt2img_per_class": None, "txt2img": None,
        "img2img_preservation": None, "img2img": None, "steering": None, "diversity": None,
        "fewshot": None,
        "prompts": {"caption": "label + caption (imagenet-topk, efficientnet-lite0, 96 px)", "label": "label only",
                    "caption_only": "caption only (imagenet-topk, efficientnet-lite0, 96 px)"}[cfg.prompts],
        "config": dataclasses.asdict(cfg),
    }

    # 5-8. the sections: VAE reconstruction, txt2img fidelity, img2img preservation, the data-scarce experiment
    runs = {"vae": lambda: vae_section(cfg, pipe, judge, test, progress),
            "txt2img": lambda: txt2img_section(cfg, gen, judge),
            "img2img": lambda: img2img_section(cfg, gen, captions, judge, test),
            "fewshot": lambda: {"fewshot": run_fewshot(cfg, gen, captions, train_grey, train_labels, test_grey,
                                                       test_labels, progress)}}
    for name in SECTIONS:
        if name in sections:
            t0 = time.time()
            result.update(runs[name]())
            seconds[name] = time.time() - t0

    # 9. report: table, JSON file, JSON as the last line
    seconds["captions"] = captions.seconds
    seconds["generation"] = gen.seconds
    seconds["total"] = time.time() - t_start
    result["generated_images"] = gen.images
    result["images_per_second"] = gen.images / gen.seconds if gen.seconds else None
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result = no_nan(result)
    print(format_table(result))
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps(result, separators=(",", ":")))
    return result

