#!/usr/bin/env python
"""The SIP ablation (the paper's central table) on the shipped model: img2img prompts from the label alone, the
caption alone, and label + caption (SIP), at two strengths, on the same 10-shot draws; each measured by
label preservation and diversity of the variants (``scripts/eval``'s img2img section, independent judge) and by
downstream accuracy (``scripts/eval``'s few-shot classifier on the 10 real shots + their variants, full test
set, 3 draws). Prints a Markdown table and, last, one JSON line.

    python scripts/sip_ablation.py                       # 3 prompts × strengths 0.5 0.7, 3 draws
    python scripts/sip_ablation.py --strengths 0.5 --set fewshot_variants=5

Every configuration is one ``python -m scripts.eval --sections img2img,fewshot`` run, its JSON kept under
``--out``; a kept JSON is reused only when its resolved eval config (and model) equals the requested one, refused
with the differing keys otherwise (``--rerun`` redoes it); the judge is trained once and cached. Gains (variants
over the 10 shots alone, SIP prompts over label-only prompts) are paired by few-shot seed and stated with
:mod:`sip.report.stats` (mean, standard error, t-based 95% interval, p-value).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.finished_runs import differing_keys, flat, reuse_or_refuse  # noqa: E402
from sip.report.stats import paired_comparison  # noqa: E402

PROMPTS = {"label": "label only", "caption_only": "caption only", "caption": "label + caption (SIP)"}


def requested_settings(eval_args: list[str]) -> dict:
    """What ``python -m scripts.eval <eval_args>`` would record as its settings: its resolved config and model."""
    from scripts.eval.run import config_from_args, parse_args

    args = parse_args(eval_args)
    return json.loads(json.dumps({"model": args.model, "config": dataclasses.asdict(config_from_args(args))}))


def run(prompts: str, strength: float, args) -> dict:
    out = args.out / f"{prompts}_s{strength}.json"
    eval_args = ["--sections", "img2img,fewshot", "--prompts", prompts,
                 "--out-json", str(out), "--threads", str(args.threads), "--no-progress",
                 "--set", f"img2img_strengths={strength}", "--set", f"fewshot_strength={strength}",
                 "--set", "fewshot_arms=cropflip,img2img", "--set", f"steer_strength={strength}"]
    for s in args.set:
        eval_args += ["--set", s]
    if out.is_file():
        kept = json.loads(out.read_text())
        saved = {"model": kept.get("model"), "config": kept.get("config")}
        requested = requested_settings(eval_args)
        if reuse_or_refuse(out, differing_keys(saved, requested), args.rerun, flat(saved), flat(requested)):
            return kept
    cmd = [sys.executable, "-m", "scripts.eval", *eval_args]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def print_gains(results: dict[tuple[str, float], dict]) -> dict:
    """Paired by few-shot seed: variants against the 10 shots alone, SIP prompts against label-only prompts."""
    gains = {}
    for (prompts, strength), r in results.items():
        arms = r["fewshot"]["arms"]
        pairs = {f"{prompts}@{strength}: 10 shots + variants - 10 shots alone": (arms["img2img"], arms["cropflip"])}
        if prompts == "caption" and ("label", strength) in results:
            pairs[f"@{strength}: SIP prompts - label-only prompts"] = (
                arms["img2img"], results[("label", strength)]["fewshot"]["arms"]["img2img"])
        for name, (a, b) in pairs.items():
            if len(a["accuracies"]) > 1:
                gain = paired_comparison([100 * x for x in a["accuracies"]], [100 * x for x in b["accuracies"]])
                gains[name] = gain.to_dict(2)
                print(f"{name}, paired by seed: {gain.describe(' pt')}")
    return gains


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--prompts", nargs="+", choices=list(PROMPTS), default=list(PROMPTS))
    p.add_argument("--out", type=Path, default=Path("runs/sip_ablation"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="an eval setting for every run (key=value)")
    p.add_argument("--rerun", action="store_true",
                   help="redo a kept configuration whose saved settings differ from the requested ones")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows, table, results = [], {}, {}
    for strength in args.strengths:
        for prompts in args.prompts:
            r = results[(prompts, strength)] = run(prompts, strength, args)
            few, div = r["fewshot"]["arms"], r["diversity"][str(strength)]
            key = f"{prompts}@{strength}"
            table[key] = {"preservation": r["img2img_preservation"][str(strength)],
                          "pixel_l1": div["pixel_l1"], "feature_between_variants": div["feature_between_variants"],
                          "fewshot_mean": few["img2img"]["mean"], "fewshot_std": few["img2img"]["std"],
                          "fewshot_runs": few["img2img"]["accuracies"], "baseline_mean": few["cropflip"]["mean"],
                          "baseline_std": few["cropflip"]["std"]}
            t = table[key]
            rows.append(f"| {PROMPTS[prompts]} | {strength} | {100 * t['preservation']:.1f}% | {t['pixel_l1']:.3f} | "
                        f"{t['feature_between_variants']:.3f} | {100 * t['fewshot_mean']:.1f} ± "
                        f"{100 * t['fewshot_std']:.1f}% | {100 * t['baseline_mean']:.1f} ± {100 * t['baseline_std']:.1f}% |")
    print("\n| prompt | strength | label preservation | pixel L1 to source | feature distance between variants "
          "| 10 shots + variants | 10 shots alone (crop+flip) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    gains = print_gains(results)
    print(json.dumps({**table, "paired_gains": gains}))


if __name__ == "__main__":
    main()
