"""Does `sip adapt` teach the shipped Fashion-MNIST generator a domain it never saw? scikit-learn's digits.

Issue 28 ("a second real domain"). The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` are written as
28x28 grey PNGs (bilinear, 0..16 -> 0..255) under ROOT/<split>/<label>/<i>.png with a fixed stratified split
(test 40 %, validation 10 %, the rest the pool). Then:

1. a judge (scikit-learn RBF SVM on 16x16 pixels) trained on the whole pool; its test accuracy is printed;
2. fidelity: ``sip synth`` draws N txt2img images per class ("a photo of the digit 3") from the shipped model,
   unadapted and through ``--adapter`` of ``sip adapt`` (10 pool shots per class, each method's recipe with
   the digits as ``--input``); the judge's accuracy on them (fraction judged their intended class), and how near
   they are to the shots against real digits the adapter never saw (a copy check: high fidelity by copying the 10
   shots would add little);
3. (``--downstream``) 10-shot accuracy on the test split: ``sip train`` of a small CNN on the real shots alone,
   + adapted synth, + unadapted synth, over ``--seeds`` draws of shots (adapted again per draw), paired gains
   with Student-t intervals (sip.report.stats).

A method may carry recipe overrides, ``METHOD+KEY=VALUE+...`` (each one ``sip adapt --set KEY=VALUE``; the whole
string names its folders, so a changed recipe never reuses another's finished run), e.g.
``finetune+finetune.text_encoder=true+finetune.text_encoder_lr=0.0005``. ``--synth-seed N`` draws the fidelity
stage's images with another seed (folders ``...-drawN``): a validation draw to choose variants on, so the reported
draw (seed 0) is not the one they were chosen on.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/adapt_digits.py -o runs/digits --methods finetune lora
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/adapt_digits.py -o runs/digits --methods lora --downstream \
        --downstream-method lora --seeds 0 1 2
Every step resumes from its output folder (sip adapt / synth / train resume; finished ones are read).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sip.data.readers import read_metadata  # noqa: E402
SIZE = 28  # exported digits, the Fashion-MNIST size
JUDGE_SIZE = 16  # the judge's input: each image resized to 16x16 grey
TEMPLATE = "a photo of the digit {label}"
CLASSES = [str(c) for c in range(10)]
METHODS = ("finetune", "lora", "textual_inversion")


def method_variant(spec: str) -> tuple[str, list[str]]:
    """``METHOD+KEY=VALUE+...`` -> (method, ["KEY=VALUE", ...]); the method must be one of :data:`METHODS`."""
    method, *sets = spec.split("+")
    if method not in METHODS or any("=" not in s for s in sets):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected METHOD[+KEY=VALUE...], METHOD one of {METHODS}")
    if re.search(r"[^A-Za-z0-9._=+\-\[\]{}:,]", spec):
        raise argparse.ArgumentTypeError(f"{spec!r}: it names folders; use letters, digits and . _ = - [ ] {{ }} : ,")
    return method, sets


def sip(*args: str) -> None:
    """Run one ``python -m sip`` verb in a child process (offline), failing loudly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sip", *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    result = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# 1. The digits as image folders
# --------------------------------------------------------------------------------------------------

def split_indices(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed stratified split: test 40 %, val 10 %, pool the rest."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.4, stratify=labels, random_state=seed)
    pool, val = train_test_split(rest, test_size=1 / 6, stratify=labels[rest], random_state=seed)
    return {"test": np.sort(test), "val": np.sort(val), "pool": np.sort(pool)}


def export_digits(root: Path) -> dict[str, np.ndarray]:
    """Write ROOT/<split>/<label>/<i>.png (i = index in load_digits); returns the split indices."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = split_indices(digits.target)
    for split, idx in splits.items():
        for i in idx:
            path = root / split / str(digits.target[i]) / f"{i:04d}.png"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((SIZE, SIZE), Image.BILINEAR).save(path)
    return splits


def make_shots(root: Path, shots: int, seed: int) -> Path:
    """ROOT/shots-<seed>: ``shots`` pool images per class drawn by ``seed`` (hard links)."""
    out = root / f"shots-{seed}"
    rng = np.random.default_rng(1000 + seed)
    for label in CLASSES:
        files = sorted((root / "pool" / label).glob("*.png"))
        (out / label).mkdir(parents=True, exist_ok=True)
        for k in sorted(rng.choice(len(files), size=shots, replace=False)):
            dst = out / label / files[k].name
            if not dst.exists():
                os.link(files[k], dst)
    return out


# --------------------------------------------------------------------------------------------------
# 2. The judge
# --------------------------------------------------------------------------------------------------

def judge_input(image: Image.Image) -> np.ndarray:
    """An image as the judge sees it: grey, resized to 16x16, scaled to [0, 1]."""
    return np.asarray(image.convert("L").resize((JUDGE_SIZE, JUDGE_SIZE), Image.BILINEAR), np.float32).ravel() / 255


def features(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return judge_input(im)


def folder_xy(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    paths = [(p, int(label)) for label in CLASSES for p in sorted((folder / label).glob("*.png"))]
    return np.stack([features(p) for p, _ in paths]), np.array([y for _, y in paths])


def train_judge(root: Path) -> tuple[object, dict[str, float]]:
    """An RBF SVM on the pool; C chosen on the validation split; accuracies on val and test."""
    from sklearn.svm import SVC

    (xp, yp), (xv, yv), (xt, yt) = (folder_xy(root / s) for s in ("pool", "val", "test"))
    best = max((SVC(C=c, gamma="scale").fit(xp, yp) for c in (1.0, 10.0)), key=lambda m: m.score(xv, yv))
    return best, {"C": best.C, "val": best.score(xv, yv), "test": best.score(xt, yt), "n_pool": len(yp)}


def judge_synth(judge, out: Path) -> dict[str, object]:
    """The judge's accuracy on a sip synth dataset (intended class = its prompt label)."""
    rows = read_metadata(out)
    x = np.stack([features(out / "train" / r["file_name"]) for r in rows])
    y = np.array([int(r["label"]) for r in rows])  # the labels are the folder names "0".."9"
    pred = judge.predict(x)
    per_class = {c: float(np.mean(pred[y == int(c)] == int(c))) for c in CLASSES if np.any(y == int(c))}
    return {"acc": float(np.mean(pred == y)), "n": len(y), "per_class": per_class,
            "pred_hist": np.bincount(pred, minlength=10).tolist()}


def nearest_shot(x: np.ndarray, y: np.ndarray, shots: Path) -> np.ndarray:
    """Each image's distance (judge input, L2) to the nearest adapt shot of its own class."""
    xs, ys = folder_xy(shots)
    return np.array([np.min(np.linalg.norm(xs[ys == c] - v, axis=1)) for v, c in zip(x, y)])


def copy_check(out: Path, shots: Path, real: Path) -> dict[str, float]:
    """Do generated images copy the shots? Median nearest-shot distance of the generated images and of real digits
    the adapter never saw (``real``, the validation split); a ratio well below 1 means near-copies, and the fraction
    of generated images closer to a shot than the closest 5 % of real ones."""
    rows = read_metadata(out)
    x = np.stack([features(out / "train" / r["file_name"]) for r in rows])
    d_gen = nearest_shot(x, np.array([int(r["label"]) for r in rows]), shots)
    d_real = nearest_shot(*folder_xy(real), shots)
    return {"nn_gen": float(np.median(d_gen)), "nn_real": float(np.median(d_real)),
            "nn_ratio": float(np.median(d_gen) / np.median(d_real)),
            "near_copy": float(np.mean(d_gen < np.percentile(d_real, 5)))}


def vae_ceiling(root: Path, judge) -> float:
    """The judge's accuracy on the test digits after a round trip through the shipped model's VAE (at its
    32 px): what the generator's decoder can show at best, whatever the UNet learns."""
    import torch
    from diffusers import AutoencoderKL

    from sip.models.diffusion import DEFAULT_SD_MODEL

    vae = AutoencoderKL.from_pretrained(DEFAULT_SD_MODEL, subfolder="vae").eval()
    paths = [(p, int(label)) for label in CLASSES for p in sorted((root / "test" / label).glob("*.png"))]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC),
                                                 np.float32) / 127.5 - 1).permute(2, 0, 1) for p, _ in paths])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    grey = ((rec.mean(1) + 1) * 127.5).round().byte().numpy()
    feats = np.stack([judge_input(Image.fromarray(g)) for g in grey])
    return float(judge.score(feats, np.array([y for _, y in paths])))


# --------------------------------------------------------------------------------------------------
# 3. Adapt and synthesise
# --------------------------------------------------------------------------------------------------

def adapt(spec: str, shots: Path, out: Path, steps: int | None) -> Path:
    """``sip adapt`` with the method's shipped recipe on the digit shots (digit prompts, no F-MNIST names) and the
    variant's overrides (``METHOD+KEY=VALUE+...``)."""
    method, sets = method_variant(spec)
    recipe = yaml.safe_load((REPO / "pipelines" / f"adapt_{method}.yaml").read_text())
    recipe.pop("label_names", None)
    recipe.pop("source", None)
    recipe["template"] = TEMPLATE
    recipe["output"] = str(out)
    path = write_yaml(out.parent / f"recipe-adapt-{method}-{out.name}.yaml", recipe)
    args = ["adapt", path, "--input", shots, "-o", out, "--set", "progress=false"]
    for s in sets:
        args += ["--set", s]
    if steps:
        args += ["--steps", str(steps)]
    run = out / "run.json"
    if not (run.exists() and json.loads(run.read_text()).get("finished")):  # else sip adapt resumes it
        sip(*args)
    return out


def synth(pool: Path, out: Path, per_class: int, adapter: Path | None, seed: int) -> Path:
    """``sip synth`` of ``per_class`` digit prompts per class (class names read from the pool folder)."""
    recipe = {"source": {"kind": "folder", "path": str(pool)},
              "prompt": {"template_no_caption": TEMPLATE},
              "generate": {"guidance_scale": 4.0, "steps": 30, "per_class": per_class, "batch_size": 100},
              "output": str(out)}
    path = write_yaml(out.parent / f"recipe-synth-{out.name}.yaml", recipe)
    args = ["synth", path, "-o", out, "--seed", str(seed)]
    if adapter is not None:
        args += ["--adapter", adapter]
    if not (out / "train" / "metadata.jsonl").exists() or len(read_metadata(out)) < 10 * per_class:
        sip(*args)  # sip synth resumes a partial folder
    return out


def variant_name(spec: str, steps: int | None) -> str:
    """The folder name of a method variant (``--steps`` is part of it: another length is another run)."""
    return spec + (f"+steps={steps}" if steps else "")


def fidelity(args, root: Path, judge) -> dict[str, dict]:
    """Judge accuracy on synth images (drawn with ``--synth-seed``): the unadapted model, then each method variant
    adapted on shots-0."""
    shots, seed = make_shots(root, args.shots, 0), args.synth_seed
    draw = f"-draw{seed}" if seed else ""
    base = synth(root / "pool", args.output / f"synth-base{draw}", args.per_class, None, seed)
    results = {"unadapted": {**judge_synth(judge, base), **copy_check(base, shots, root / "val")}}
    for spec in args.methods:
        name = variant_name(spec, args.steps)
        t0 = time.time()
        run = adapt(spec, shots, args.output / f"adapt-{name}-0", args.steps)
        adapt_s = time.time() - t0
        out = synth(root / "pool", args.output / f"synth-{name}-0{draw}", args.per_class, run, seed)
        results[name] = {**judge_synth(judge, out), **copy_check(out, shots, root / "val"),
                         "adapt_seconds": round(adapt_s, 1)}
    return results


# --------------------------------------------------------------------------------------------------
# 4. Downstream: a student from the shots alone or with synth images
# --------------------------------------------------------------------------------------------------

def train_student(root: Path, shots: Path, synthetic: Path | None, out: Path, seed: int, epochs: int) -> float:
    """``sip train`` of a small CNN (timm resnet10t, 28 px, no flips) on the shots (+ synth); test top-1."""
    recipe = {
        "data": {"real": {"kind": "folder", "path": str(shots), "size": None},
                 "synthetic": str(synthetic) if synthetic else None,
                 "mix": {"mode": "concat", "epoch_size": 2000},
                 "eval": {"kind": "folder", "path": str(root / "test"), "size": None},
                 "val": {"size": None, "source": {"kind": "folder", "path": str(root / "val"), "size": None}},
                 "img_size": SIZE, "scale": [0.6, 1.0], "hflip": 0.0, "batch_size": 64},
        "model": {"name": "resnet10t"},
        "optim": {"epochs": epochs, "lr": 0.003, "weight_decay": 0.05, "warmup_epochs": 0.5},
        "run": {"seed": seed, "eval_every": 1, "eval_max_samples": None},
    }
    path = write_yaml(out.parent / f"recipe-{out.name}.yaml", recipe)
    final = out / "final_metrics.json"
    if not final.exists():
        sip("train", path, "-o", out)
    return json.loads(final.read_text())["test_top1"] / 100.0  # sip train's test top-1, in percent


def downstream(args, root: Path, judge) -> dict[str, object]:
    """Per seed: new shots, adapt on them, synth (judged), three students; paired gains over the seeds."""
    from sip.report.stats import paired_comparison

    method = variant_name(args.downstream_method, args.steps)
    arms = {"real": [], "real+adapted": [], "real+unadapted": []}
    fidelity_per_seed = []
    base = synth(root / "pool", args.output / "synth-base", args.per_class, None, 0)
    for seed in args.seeds:
        shots = make_shots(root, args.shots, seed)
        run = adapt(args.downstream_method, shots, args.output / f"adapt-{method}-{seed}", args.steps)
        adapted = synth(root / "pool", args.output / f"synth-{method}-{seed}", args.per_class, run, seed)
        fidelity_per_seed.append(judge_synth(judge, adapted)["acc"])
        for arm, synthetic in (("real", None), ("real+adapted", adapted), ("real+unadapted", base)):
            name = f"student-{'real-' + method if arm == 'real+adapted' else arm.replace('+', '-')}-{seed}"
            arms[arm].append(train_student(root, shots, synthetic, args.output / name, seed, args.epochs))
            print(f"  seed {seed} {arm}: test top-1 {arms[arm][-1]:.4f}", flush=True)
    pct = {arm: [100 * v for v in values] for arm, values in arms.items()}  # gains in points of top-1
    gains = {f"{a} - real": paired_comparison(pct[a], pct["real"]) for a in ("real+adapted", "real+unadapted")}
    gains["adapted - unadapted"] = paired_comparison(pct["real+adapted"], pct["real+unadapted"])
    return {"method": method, "seeds": list(args.seeds), "arms": arms, "gains": gains,
            "adapted_fidelity": fidelity_per_seed}


# --------------------------------------------------------------------------------------------------
# 5. Report
# --------------------------------------------------------------------------------------------------

def print_table(judge_stats: dict, fid: dict, down: dict | None) -> None:
    print("\n== judge (RBF SVM on 16x16, trained on the pool) ==")
    print(f"pool {judge_stats['n_pool']} images, C {judge_stats['C']}: val {judge_stats['val']:.4f}, "
          f"test {judge_stats['test']:.4f}; test digits through the shipped VAE (32 px round trip) "
          f"{judge_stats['vae_roundtrip_test']:.4f}")
    print("\n== fidelity: judge accuracy on txt2img 'a photo of the digit K' ==")
    width = max(18, *map(len, fid))
    print("(nn: median distance to the nearest shot of the class, generated / real unseen digits; copy: fraction "
          "closer than the nearest 5 % of real ones)")
    print(f"{'generator':<{width}} {'n':>5} {'acc':>7} {'nn':>5} {'copy':>5}  per class 0..9"
          "                              predicted histogram")
    for name, r in fid.items():
        per = " ".join(f"{r['per_class'].get(c, float('nan')):.2f}" for c in CLASSES)
        print(f"{name:<{width}} {r['n']:>5} {r['acc']:>7.4f} {r['nn_ratio']:>5.2f} {r['near_copy']:>5.2f}  {per}  "
              f"{r['pred_hist']}")
    if down:
        print(f"\n== downstream: 10-shot test top-1, resnet10t, adapter {down['method']}, seeds {down['seeds']} ==")
        print("judge accuracy on each seed's adapted synth: " + " ".join(f"{v:.4f}" for v in down["adapted_fidelity"]))
        for arm, values in down["arms"].items():
            print(f"{arm:<16} " + " ".join(f"{v:.4f}" for v in values) + f"   mean {np.mean(values):.4f}")
        for name, comp in down["gains"].items():
            print(f"{name:<28} {comp.describe(unit=' pt')}")


def _variant(spec: str) -> str:
    method_variant(spec)
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/digits"))
    parser.add_argument("--methods", nargs="+", default=["finetune", "lora"], type=_variant,
                        help="METHOD[+KEY=VALUE...], METHOD one of " + ", ".join(METHODS))
    parser.add_argument("--per-class", type=int, default=30, help="synth images per class")
    parser.add_argument("--shots", type=int, default=10, help="adapt shots per class")
    parser.add_argument("--steps", type=int, default=None, help="adapt steps (default: each recipe's)")
    parser.add_argument("--downstream", action="store_true", help="also the 10-shot student table")
    parser.add_argument("--downstream-method", default="lora", type=_variant, help="METHOD[+KEY=VALUE...]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="student epochs (2,000 views each)")
    parser.add_argument("--synth-seed", type=int, default=0,
                        help="the fidelity stage's draw (another seed: a validation draw to choose variants on)")
    args = parser.parse_args()
    args.output = args.output.resolve()
    t0 = time.time()
    root = args.output / "digits"
    splits = export_digits(root)
    print("split sizes: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), flush=True)
    judge, judge_stats = train_judge(root)
    judge_stats["vae_roundtrip_test"] = vae_ceiling(root, judge)
    print(f"judge: val {judge_stats['val']:.4f}, test {judge_stats['test']:.4f}, test through the shipped VAE "
          f"{judge_stats['vae_roundtrip_test']:.4f}", flush=True)
    fid = fidelity(args, root, judge)
    down = downstream(args, root, judge) if args.downstream else None
    print_table(judge_stats, fid, down)
    summary = {"judge": judge_stats, "fidelity": {k: {"acc": v["acc"], "n": v["n"], "nn_ratio": v["nn_ratio"],
                                                      "near_copy": v["near_copy"]} for k, v in fid.items()},
               "wall_seconds": round(time.time() - t0, 1)}
    if down:
        summary["downstream"] = {"method": down["method"], "arms": down["arms"],
                                 "adapted_fidelity": down["adapted_fidelity"],
                                 "gains": {k: {"mean": c.mean, "ci": [c.ci_low, c.ci_high], "p": c.p_value}
                                           for k, c in down["gains"].items()}}
    print(f"wall time {summary['wall_seconds']} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
