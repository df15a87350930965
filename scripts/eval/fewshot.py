"""The data-scarce experiment: a small CNN trained on a few real images per class, per arm (no / standard
augmentation, sip img2img variants, data-free txt2img images, both, or extra real images as the bound)."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from sip.data.fashion_mnist import select_shots
from sip.ids import fashion_mnist_id

from .classifier import ARCH, classify, crop_flip, crop_flip_randaugment, train_classifier
from .config import FEWSHOT_POOL, EvalConfig
from .data import subset, to_grey, to_pil
from .generation import Captions, SipGeneration
from .measures import mean_std, share

PARTS = {"none": [], "cropflip": [], "randaug": [], "img2img": ["img2img"], "txt2img": ["txt2img"],
         "both": ["img2img", "txt2img"], "real": ["real"]}  # the extra images each arm trains on
AUGMENT_NAMES = {"none": "none", "randaug": "crop+flip+RandAugment(2, 9)"}  # others: crop(pad 4)+flip


def run_fewshot(cfg: EvalConfig, gen: SipGeneration, captions: Captions, train_grey: np.ndarray,
                train_labels: np.ndarray, test_grey: np.ndarray, test_labels: np.ndarray,
                progress: bool) -> dict[str, Any]:
    """The data-scarce experiment (see the package docstring), ``cfg.fewshot_seeds`` 10-shot draws."""
    arms = list(cfg.fewshot_arms)
    pool = np.arange(*FEWSHOT_POOL)
    test_idx = subset(test_labels, cfg.fewshot_test_images, cfg.seed + 7)
    extra_real_per_class = cfg.shots * cfg.fewshot_variants  # as many extra real images as img2img adds
    accuracies: dict[str, list[float]] = {a: [] for a in arms}
    sizes: dict[str, int] = {}
    t_train = 0.0
    for s in range(cfg.fewshot_seeds):
        seed = cfg.seed + s
        # the same draw as FashionMNISTSource("train", shots=10, seed=seed, start=50000)
        shots = select_shots(train_labels, cfg.shots, seed, pool)
        real_x, real_y = train_grey[shots], train_labels[shots]
        extra: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if {"img2img", "both"} & set(arms):
            sources = [to_pil(im) for im in real_x]
            caps = captions(sources) if cfg.prompts != "label" else None
            rgb = gen.img2img(sources, real_y.tolist(), caps, [fashion_mnist_id("train", i) for i in shots],
                              cfg.fewshot_variants, cfg.fewshot_strength, cfg.fewshot_guidance, seed,
                              f"fewshot {s}: img2img")
            extra["img2img"] = to_grey(rgb), np.repeat(real_y, cfg.fewshot_variants)
        if {"txt2img", "both"} & set(arms):
            rgb, labels = gen.text2img(cfg.fewshot_txt2img_per_class, cfg.fewshot_guidance, seed,
                                       f"fewshot {s}: txt2img")
            extra["txt2img"] = to_grey(rgb), labels
        if "real" in arms:
            rest = np.setdiff1d(pool, shots)
            idx = select_shots(train_labels, extra_real_per_class, seed + 10_000, rest)
            extra["real"] = train_grey[idx], train_labels[idx]
        for arm in arms:
            x = np.concatenate([real_x] + [extra[p][0] for p in PARTS[arm]])
            y = np.concatenate([real_y] + [extra[p][1] for p in PARTS[arm]])
            augment = {"none": None, "randaug": crop_flip_randaugment}.get(arm, crop_flip)
            t0 = time.time()
            model = train_classifier(torch.from_numpy(x)[:, None], torch.from_numpy(y), cfg.fewshot_width,
                                     cfg.fewshot_steps, cfg.fewshot_batch, cfg.fewshot_lr, augment, seed,
                                     f"fewshot {s}: {arm}", progress)
            pred, _ = classify(model, test_grey[test_idx])
            t_train += time.time() - t0
            accuracies[arm].append(share(pred, test_labels[test_idx]))
            sizes[arm] = len(x)
            print(f"  few-shot seed {seed} {arm:9s} train images {len(x):5d}  test accuracy "
                  f"{accuracies[arm][-1]:.2%}", file=sys.stderr)
    return {
        "arms": {a: {"mean": mean_std(accuracies[a])[0], "std": mean_std(accuracies[a])[1],
                     "accuracies": accuracies[a], "train_images": sizes[a],
                     "augment": AUGMENT_NAMES.get(a, "crop(pad 4)+flip")} for a in arms},
        "seeds": [cfg.seed + s for s in range(cfg.fewshot_seeds)],
        "shots": cfg.shots, "pool": list(FEWSHOT_POOL), "test_images": len(test_idx),
        "img2img": {"variants": cfg.fewshot_variants, "strength": cfg.fewshot_strength,
                    "guidance": cfg.fewshot_guidance, "prompts": cfg.prompts},
        "txt2img": {"per_class": cfg.fewshot_txt2img_per_class, "guidance": cfg.fewshot_guidance},
        "real_extra_per_class": extra_real_per_class,
        "classifier": {"arch": ARCH, "width": cfg.fewshot_width, "steps": cfg.fewshot_steps,
                       "batch": cfg.fewshot_batch, "lr": cfg.fewshot_lr},
        "train_seconds": round(t_train, 1),
    }
