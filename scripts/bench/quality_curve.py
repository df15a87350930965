"""Quality against speed on the shipped model, side by side in one run, for scripts/bench_generate.py --quality.

Every way generates the same images through sip's path (``scripts.eval.generation.SipGeneration``: the prompt
builder, ``image_seed``, the batch grid, ``DiffusionGenerator``) and is judged as ``python -m scripts.eval``
judges: img2img label preservation at strength 0.5 (label + caption prompts, test sources balanced over
classes, 2 variants each) and txt2img class fidelity (label prompts, guidance 4), by the same cached judge.
Ways: today's sip (DDIM, 30 steps, guidance 4), the same at fewer steps, with DeepCache, DPM-Solver++, and
the few-step model distilled by scripts/train_tiny_lcm.py (LCMScheduler, guidance baked in) at 1-8 steps.
A way's UNet evaluations per image count every sample the UNet sees (classifier-free guidance: two).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Way:
    name: str
    model: str            # "ddim" (the shipped model) or "lcm" (the distilled one)
    steps: int
    guidance: float
    scheduler: str | None = None
    cache_interval: int = 1


def ways(steps_curve=(1, 2, 4, 8)) -> list[Way]:
    out = [Way("sip today: DDIM 30", "ddim", 30, 4.0)]
    out += [Way(f"DDIM {s}", "ddim", s, 4.0) for s in (8, 4)]
    out += [Way("DDIM 30 + DeepCache 3", "ddim", 30, 4.0, cache_interval=3)]
    out += [Way(f"DPM-Solver++ {s}", "ddim", s, 4.0, "DPMSolverMultistepScheduler") for s in (8, 4)]
    out += [Way(f"LCM {s}", "lcm", s, 1.0) for s in steps_curve]
    out += [Way("LCM 8 + DeepCache 2", "lcm", 8, 1.0, cache_interval=2)]
    return out


def bench_quality(ddim_model: str, lcm_model: str | None, sources: int = 200, per_class: int = 40,
                  batch_size: int = 128, progress: bool = False, only: list[str] | None = None) -> list[dict]:
    """Judge every way; returns one row per way (measures, images/s, UNet evaluations per image)."""
    from scripts.eval.classifier import classify
    from scripts.eval.config import CLASSES, EvalConfig
    from scripts.eval.data import balanced_sources, fashion_mnist_32, to_grey, to_pil
    from scripts.eval.generation import Captions, SipGeneration
    from scripts.eval.judge import load_or_train_judge
    from scripts.eval.measures import share
    from sip.ids import fashion_mnist_id
    from sip.models.diffusion import load_diffusion_pipeline

    from .machine import StageTimer

    cfg = EvalConfig(batch_size=batch_size, precision="fp32")
    train_grey, train_labels = fashion_mnist_32("train")
    test_grey, test_labels = fashion_mnist_32("test")
    judge, _ = load_or_train_judge(cfg, [cfg], REPO / ".cache" / "judge", train_grey, train_labels, progress)
    idx = balanced_sources(test_labels, sources, cfg.seed + 11)  # the eval's img2img sources
    images = [to_pil(im) for im in test_grey[idx]]
    labels = test_labels[idx]
    ids = [fashion_mnist_id("test", i) for i in idx]
    captions = Captions(cfg.caption_size, REPO / ".cache" / "eval_tiny_sd_captions.jsonl")(images)
    rows, pipes = [], {}
    for way in ways():
        if only and way.name not in only:
            continue
        model = ddim_model if way.model == "ddim" else lcm_model
        if model is None:
            continue
        # one pipeline per (model, scheduler), shared by its ways: speed-ups patch the UNet per call only
        key = (model, way.scheduler)
        if key not in pipes:
            pipes[key] = load_diffusion_pipeline(model, "img2img", "float32", "cpu", way.scheduler)
        pipe = pipes[key]
        gen = SipGeneration(pipe, model, EvalConfig(steps=way.steps, batch_size=batch_size, precision="fp32"),
                            progress, cache_interval=way.cache_interval, guidance_scale=way.guidance)
        count = StageTimer({"unet": pipe.unet})
        t0 = time.perf_counter()
        # img2img at strength 0.5 runs int(steps × 0.5) steps: a 1-step schedule is run as 2 (one evaluation)
        rgb = gen.img2img(images, labels.tolist(), captions, ids, 2, 0.5, way.guidance, cfg.seed, way.name,
                          steps=max(way.steps, 2))
        t_img, n_img, u_img = time.perf_counter() - t0, len(rgb), count.samples["unet"]
        pred, _ = classify(judge, to_grey(rgb))
        preservation = share(pred, np.repeat(labels, 2))
        t0 = time.perf_counter()
        rgb, y = gen.text2img(per_class, way.guidance, cfg.seed, way.name)
        t_txt, n_txt, u_txt = time.perf_counter() - t0, len(rgb), count.samples["unet"] - u_img
        count.remove()
        pred, _ = classify(judge, to_grey(rgb))
        rows.append({"way": way.name, "steps": way.steps, "guidance": way.guidance, "scheduler":
                     type(pipe.scheduler).__name__, "cache_interval": way.cache_interval,
                     "preservation_0.5": preservation, "txt2img_fidelity": share(pred, y),
                     "unet_evals_img2img": u_img / n_img, "unet_evals_txt2img": u_txt / n_txt,
                     "img2img_per_s": n_img / t_img, "txt2img_per_s": n_txt / t_txt,
                     "images_per_s": (n_img + n_txt) / (t_img + t_txt), "images": n_img + n_txt,
                     "prompt_example": gen.builder(CLASSES[int(labels[0])], captions[0])})
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict) -> str:
    return (f"{r['way']:<24} {r['unet_evals_img2img']:>6.1f} {r['unet_evals_txt2img']:>6.1f} "
            f"{r['preservation_0.5']:>8.1%} {r['txt2img_fidelity']:>8.1%} {r['img2img_per_s']:>8.1f} "
            f"{r['txt2img_per_s']:>8.1f} {r['images_per_s']:>8.1f}")


HEADER = (f"{'way':<24} {'UNet/img':>6} {'UNet/txt':>6} {'preserve':>8} {'fidelity':>8} {'img2img/s':>8} "
          f"{'txt2img/s':>8} {'all/s':>8}")


def equal_quality(rows: list[dict], tolerance: float = 0.01) -> dict:
    """The fastest way within ``tolerance`` of today's sip on both measures, and its speed-up."""
    ref = rows[0]
    ok = [r for r in rows if r["preservation_0.5"] >= ref["preservation_0.5"] - tolerance
          and r["txt2img_fidelity"] >= ref["txt2img_fidelity"] - tolerance]
    best = max(ok, key=lambda r: r["images_per_s"])
    return {"reference": ref["way"], "best_at_equal_quality": best["way"],
            "speedup_at_equal_quality": best["images_per_s"] / ref["images_per_s"],
            "speedup_img2img": best["img2img_per_s"] / ref["img2img_per_s"],
            "speedup_txt2img": best["txt2img_per_s"] / ref["txt2img_per_s"]}
