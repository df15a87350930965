#!/usr/bin/env python
"""The SIP ablation (the paper's central table) on the shipped model: img2img prompts from the label alone, the
caption alone, and label + caption (SIP), at two strengths, on the same 10-shot draws; each measured by
label preservation and diversity of the variants (``scripts/eval``'s img2img section, independent judge) and by
downstream accuracy (``scripts/eval``'s few-shot classifier on the 10 real shots + their variants, full test
set, 3 draws). Prints a Markdown table and, last, one JSON line.

    python scripts/sip_ablation.py                       # 3 prompts × strengths 0.5 0.7, 3 draws
    python scripts/sip_ablation.py --strengths 0.5 --set fewshot_variants=5

Every configuration is one ``python -m scripts.eval --sections img2img,fewshot`` run, its JSON kept under
``--out`` (a finished configuration is not rerun); the judge is trained once and cached.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {"label": "label only", "caption_only": "caption only", "caption": "label + caption (SIP)"}


def run(prompts: str, strength: float, args) -> dict:
    out = args.out / f"{prompts}_s{strength}.json"
    if not out.is_file():
        cmd = [sys.executable, "-m", "scripts.eval", "--sections", "img2img,fewshot", "--prompts", prompts,
               "--out-json", str(out), "--threads", str(args.threads), "--no-progress",
               "--set", f"img2img_strengths={strength}", "--set", f"fewshot_strength={strength}",
               "--set", "fewshot_arms=cropflip,img2img", "--set", f"steer_strength={strength}"]
        for s in args.set:
            cmd += ["--set", s]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--prompts", nargs="+", choices=list(PROMPTS), default=list(PROMPTS))
    p.add_argument("--out", type=Path, default=Path("runs/sip_ablation"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="an eval setting for every run (key=value)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows, table = [], {}
    for strength in args.strengths:
        for prompts in args.prompts:
            r = run(prompts, strength, args)
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
    print(json.dumps(table))


if __name__ == "__main__":
    main()
