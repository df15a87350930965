"""The report: the table printed to stdout and the JSON-safe result."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import CLASSES


def no_nan(value: Any) -> Any:
    """NaN → None everywhere (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [no_nan(v) for v in value]
    return value


def folder_mb(path: Path) -> float | None:
    if not path.is_dir():
        return None
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 2)


def pct(x: float | None) -> str:
    return "    - " if x is None else f"{100 * x:5.1f}%"


def num(x: float | None) -> str:
    return "     - " if x is None else f"{x:.4f}"


def format_table(r: dict[str, Any]) -> str:
    lines = [(f"model {r['model']} ({r['model_mb']} MB), {r['mode']} mode, device {r['device']}, "
              f"precision {r['precision']}, {r['config']['steps']} steps")]
    j = r["judge"]
    lines.append(f"judge: SmallCNN width {j['width']}, {j['epochs']} epochs on train[0:50000] "
                 f"({'trained now' if j['trained_now'] else 'loaded from ' + j['cache']}): "
                 f"test accuracy {pct(r['judge_accuracy'])} on {j['test_images']} test images")
    if r["vae"]:
        v = r["vae"]
        lines.append(f"VAE reconstruction ({v['images']} test images): judge {pct(v['recon_accuracy'])} on "
                     f"reconstructions vs {pct(v['original_accuracy'])} on originals; PSNR {v['psnr_db']:.1f} dB, "
                     f"pixel L1 {v['pixel_l1']:.4f}")
    if r["txt2img_fidelity"]:
        t = r["txt2img"]
        gs = list(r["txt2img_fidelity"])
        lines.append(f"txt2img class fidelity ({t['per_class']} per class, label prompts):")
        lines.append("  class         " + "".join(f"  g={g:<5s}" for g in gs) + "  (judge on real test images)")
        for c in CLASSES:
            lines.append(f"  {c:12s}  " + "".join(f"  {pct(r['txt2img_per_class'][g][c])}" for g in gs)
                         + f"  ({pct(j['per_class'][c])})")
        lines.append("  mean          " + "".join(f"  {pct(r['txt2img_fidelity'][g])}" for g in gs)
                     + f"  ({pct(r['judge_accuracy'])})")
    if r["img2img_preservation"]:
        i = r["img2img"]
        lines.append(f"img2img label preservation ({i['sources']} test sources × {i['variants']} variants, "
                     f"guidance {i['guidance']}, prompts: {r['prompts']}):")
        lines.append(f"  the judge is right on {pct(i['source_accuracy']).strip()} of the sources themselves; "
                     f"'if right': preservation among those sources")
        lines.append("  strength  preserved  if right  pixel L1   feat→source  feat between variants")
        for s, p in r["img2img_preservation"].items():
            d = r["diversity"][s]
            right = i["preservation_where_source_judged_right"][s]
            lines.append(f"  {s:8s}  {pct(p):>9s}  {pct(right):>8s}  {num(d['pixel_l1'])}     "
                         f"{num(d['feature_to_source'])}       {num(d['feature_between_variants'])}")
        ref = r["diversity"]["reference"]
        lines.append(f"  reference: two real test images of one class: pixel L1 {ref['pixel_l1_same_class']:.4f}, "
                     f"feature {ref['feature_same_class']:.4f}; of two classes: feature {ref['feature_other_class']:.4f}")
        st = r["steering"]
        lines.append(f"steering (wrong label at strength {st['strength']}): judged as the target label "
                     f"{pct(st['to_target'])}, still as the source label {pct(st['kept_source'])}")
    if r["fewshot"]:
        f = r["fewshot"]
        lines.append(f"few-shot: {f['shots']} real/class from train[{f['pool'][0]}:{f['pool'][1]}], seeds {f['seeds']}, "
                     f"test on {f['test_images']} test images; SmallCNN width {f['classifier']['width']}, "
                     f"{f['classifier']['steps']} steps")
        lines.append("  arm        train imgs  augment                       accuracy (mean ± std)  runs")
        for a, v in f["arms"].items():
            runs = " ".join(f"{100 * x:.1f}" for x in v["accuracies"])
            lines.append(f"  {a:9s}  {v['train_images']:10d}  {v['augment']:28s}  "
                         f"{100 * v['mean']:5.1f} ± {100 * v['std']:4.1f}%          {runs}")
    sec = dict(r["seconds"])
    inside = (f"generation {sec.pop('generation', 0):.0f} and captioning {sec.pop('captions', 0):.0f} "
              f"of them in the sections")
    rate = f", {r['images_per_second']:.1f} generated images/s" if r.get("images_per_second") else ""
    lines.append("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()) + f" ({inside}{rate})")
    return "\n".join(lines)

