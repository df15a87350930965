"""Measurements: shares the judge assigns, distances between images and between judge features, the VAE
round trip, mean ± std."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .config import CLASSES


def share(pred: np.ndarray, target: np.ndarray) -> float:
    return float((pred == target).mean()) if len(pred) else float("nan")


def per_class_share(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {CLASSES[c]: share(pred[target == c], target[target == c]) for c in range(len(CLASSES))}


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return 1.0 - (a * b).sum(-1)


def variant_diversity(source_rgb: np.ndarray, source_feats: np.ndarray, variants_rgb: np.ndarray,
                      variant_feats: np.ndarray, per_source: int) -> dict[str, float]:
    """Pixel L1 (RGB in [0, 1]) of each variant to its source; judge-feature cosine distance of each
    variant to its source and between the variants of one source (every pair)."""
    n = len(source_rgb)
    src = np.repeat(source_rgb, per_source, axis=0).astype(np.float32) / 255.0
    l1 = np.abs(variants_rgb.astype(np.float32) / 255.0 - src).mean(axis=(1, 2, 3))
    to_source = cosine_distance(variant_feats, np.repeat(source_feats, per_source, axis=0))
    f = variant_feats.reshape(n, per_source, -1)
    pairs = [cosine_distance(f[:, i], f[:, j]) for i in range(per_source) for j in range(i + 1, per_source)]
    between = float(np.mean(pairs)) if pairs else float("nan")
    return {"pixel_l1": float(l1.mean()), "feature_to_source": float(to_source.mean()),
            "feature_between_variants": between}


def reference_distances(grey: np.ndarray, labels: np.ndarray, feats: np.ndarray, seed: int,
                        pairs: int = 2000) -> dict[str, float]:
    """The scale of the distances: random pairs of distinct real test images of one class / of two classes."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(grey), pairs * 4)
    b = rng.integers(0, len(grey), pairs * 4)
    keep = a != b
    a, b = a[keep], b[keep]
    same = labels[a] == labels[b]
    l1 = np.abs(grey[a].astype(np.float32) - grey[b].astype(np.float32)).mean(axis=(1, 2)) / 255.0
    d = cosine_distance(feats[a], feats[b])
    return {"pixel_l1_same_class": float(l1[same][:pairs].mean()),
            "feature_same_class": float(d[same][:pairs].mean()),
            "feature_other_class": float(d[~same][:pairs].mean())}


@torch.inference_mode()
def vae_reconstruct(pipe: Any, grey: np.ndarray, batch: int = 256, progress: bool = True) -> np.ndarray:
    """Encode (posterior mean) → decode each image with the pipeline's VAE; RGB uint8 like the pipeline's
    own post-processing ((x / 2 + 0.5).clamp(0, 1) · 255, rounded)."""
    vae = pipe.vae
    out = []
    for start in tqdm(range(0, len(grey), batch), desc="vae", disable=not progress, leave=False, dynamic_ncols=True):
        rgb = np.repeat(grey[start : start + batch, None], 3, axis=1)
        x = torch.from_numpy(rgb).float().div(127.5).sub(1.0).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
        out.append((rec / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
