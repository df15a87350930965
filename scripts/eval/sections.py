"""The generator sections: VAE reconstruction, txt2img class fidelity, img2img label preservation with
diversity and steering. Each returns the keys it fills in the result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sip.ids import fashion_mnist_id

from .classifier import SmallCNN, classify
from .config import CLASSES, EvalConfig
from .data import balanced_sources, subset, to_grey, to_pil, to_rgb_array
from .generation import Captions, SipGeneration
from .measures import per_class_share, reference_distances, share, vae_reconstruct, variant_diversity


@dataclass(frozen=True)
class TestSet:
    """The official test split at 32 px grey, and the judge's view of the images it is scored on."""

    grey: np.ndarray
    labels: np.ndarray
    judge_idx: np.ndarray     # the test images the judge is scored on
    judge_feats: np.ndarray   # its penultimate features of those images


def vae_section(cfg: EvalConfig, pipe: Any, judge: SmallCNN, test: TestSet, progress: bool) -> dict[str, Any]:
    """Judge accuracy on VAE reconstructions (posterior mean) of test images vs on the images themselves."""
    idx = subset(test.labels, cfg.vae_images, cfg.seed + 5)
    rec = vae_reconstruct(pipe, test.grey[idx], progress=progress)
    rec_pred, _ = classify(judge, to_grey(rec))
    orig_pred, _ = classify(judge, test.grey[idx])
    diff = rec.astype(np.float32) / 255.0 - np.repeat(test.grey[idx, ..., None], 3, axis=-1) / 255.0
    mse = float((diff ** 2).mean())
    accuracy = share(rec_pred, test.labels[idx])
    return {"vae_recon_accuracy": accuracy,
            "vae": {"images": len(idx), "recon_accuracy": accuracy,
                    "original_accuracy": share(orig_pred, test.labels[idx]),
                    "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)), "pixel_l1": float(np.abs(diff).mean()),
                    "latent": "posterior mean"}}


def txt2img_section(cfg: EvalConfig, gen: SipGeneration, judge: SmallCNN) -> dict[str, Any]:
    """Share of label-prompted images the judge assigns to the prompted class, per guidance scale."""
    fidelity, per_class = {}, {}
    for g in cfg.txt2img_guidance:
        rgb, labels = gen.text2img(cfg.txt2img_per_class, g, cfg.seed, f"txt2img g={g:g}")
        pred, _ = classify(judge, to_grey(rgb))
        fidelity[f"{g:g}"] = share(pred, labels)
        per_class[f"{g:g}"] = per_class_share(pred, labels)
    return {"txt2img_fidelity": fidelity, "txt2img_per_class": per_class,
            "txt2img": {"per_class": cfg.txt2img_per_class, "guidance": list(cfg.txt2img_guidance),
                        "prompt_example": gen.builder(CLASSES[4])}}


def img2img_section(cfg: EvalConfig, gen: SipGeneration, captions: Captions, judge: SmallCNN,
                    test: TestSet) -> dict[str, Any]:
    """Label preservation and diversity of img2img variants of test images per strength; steering."""
    idx = balanced_sources(test.labels, cfg.img2img_sources, cfg.seed + 11)
    sources = [to_pil(im) for im in test.grey[idx]]
    src_labels = test.labels[idx]
    source_ids = [fashion_mnist_id("test", i) for i in idx]
    caps = captions(sources) if cfg.prompts != "label" else None
    src_rgb = to_rgb_array(sources)
    src_pred, src_feats = classify(judge, test.grey[idx])
    # the judge errs on some real sources too: preservation among the sources it gets right separates
    # the generator's label loss from the judge's own errors
    src_right = np.repeat(src_pred == src_labels, cfg.img2img_variants)
    v = cfg.img2img_variants
    preservation, preserved_right, per_class, diversity = {}, {}, {}, {}
    for s in cfg.img2img_strengths:
        rgb = gen.img2img(sources, src_labels.tolist(), caps, source_ids, v, s, cfg.img2img_guidance, cfg.seed,
                          f"img2img s={s:g}")
        pred, feats = classify(judge, to_grey(rgb))
        target = np.repeat(src_labels, v)
        preservation[f"{s:g}"] = share(pred, target)
        preserved_right[f"{s:g}"] = share(pred[src_right], target[src_right])
        per_class[f"{s:g}"] = per_class_share(pred, target)
        diversity[f"{s:g}"] = variant_diversity(src_rgb, src_feats, rgb, feats, v)
    diversity["reference"] = reference_distances(test.grey[test.judge_idx], test.labels[test.judge_idx],
                                                 test.judge_feats, cfg.seed)
    # steering: every source gets a wrong label (seeded), one variant, the 0.9 run's seeds
    rng = np.random.default_rng(cfg.seed + 13)
    wrong = (src_labels + rng.integers(1, len(CLASSES), len(src_labels))) % len(CLASSES)
    rgb = gen.img2img(sources, wrong.tolist(), caps, source_ids, 1, cfg.steer_strength, cfg.img2img_guidance,
                      cfg.seed, f"steer s={cfg.steer_strength:g}")
    pred, _ = classify(judge, to_grey(rgb))
    return {"img2img_preservation": preservation, "diversity": diversity,
            "img2img": {"sources": len(idx), "variants": v, "guidance": cfg.img2img_guidance,
                        "prompts": cfg.prompts, "source_accuracy": share(src_pred, src_labels),
                        "preservation_where_source_judged_right": preserved_right, "per_class": per_class,
                        "prompt_example": gen.builder(CLASSES[int(src_labels[0])], caps[0] if caps else None)},
            "steering": {"strength": cfg.steer_strength, "to_target": share(pred, wrong),
                         "kept_source": share(pred, src_labels), "images": len(idx)}}
