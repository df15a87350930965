"""Bad-input corpus for the image-folder source, run end to end through ``sip augment`` (issue 16).

Builds a folder of hostile and unusual inputs (zero-byte, truncated PNG/JPEG, text named .png, 1×1,
CMYK JPEG, RGBA, palette, animated GIF, WebP, 16-bit grey, a decompression bomb, a non-UTF-8 file name,
symlinks inside and outside the input, hidden and empty folders, unicode / space / dot labels), runs
``sip augment --input CORPUS --output OUT`` with the shipped model (1 image each, 2 steps, 1 thread) as a
subprocess and checks that every case was either written or named in the log with a reason, that
nothing was written outside OUT, and that ``datasets`` imagefolder and torchvision ImageFolder load
OUT. Prints a table, then as last line one JSON object.

The overrides corpus (issues 26 and 31) runs ``sip synth / augment / train / distill`` through the CLI with
hostile ``--set`` values (NaN, ±inf, empty strings, a text file or a model's weights as a LoRA, the shipped pipeline
as a tiny VAE, source keys the source kind does not read) and checks each exits with code 2 and one ``error:`` line
naming its key, before any model loads or training starts; it prints a JSON line with the count handled.

Usage: ``.venv/bin/python scripts/bad_inputs.py [--keep DIR] [--corpus files|overrides|all]``. :func:`build_corpus` is also used by
tests/test_sources.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# words of the reasons sip logs for a file it does not read (sip/data/images.py, sip/data/sources.py)
REASON_WORDS = ("cannot read", "outside the input", "hidden", "holds no images")


@dataclass
class Case:
    """One corpus entry: its path (bytes, relative to the corpus), what should happen, and the text the
    log must contain when it is not read (the file or folder name as sip displays it)."""

    name: str
    rel: bytes
    expect: str  # "read" (a sample with that id), "skip" (in source.skipped), "logged" (named in the log)
    shown: str


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG")
    return buf.getvalue()


def build_corpus(root: Path, outside: Path) -> list[Case]:
    """Write the corpus under ``root`` (and a decoy under ``outside``, which links point to)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cases: list[Case] = []

    def put(name: str, rel: str | bytes, data: bytes | None, expect: str) -> Path:
        rel_b = rel if isinstance(rel, bytes) else rel.encode()
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), rel_b)))
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        cases.append(Case(name, rel_b, expect, rel_b.decode("utf-8", "backslashreplace")))
        return path

    put("control RGB PNG", "good/rgb.png", _png(rgb), "read")
    put("zero-byte", "c/zero.png", b"", "skip")
    full = _png(rgb)
    put("truncated PNG", "c/truncated.png", full[: len(full) // 2], "skip")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    put("truncated JPEG", "c/truncated.jpg", buf.getvalue()[: len(buf.getvalue()) // 2], "skip")
    put("text as image", "c/text.png", b"hello, I am not a PNG\n" * 10, "skip")
    put("1x1", "c/one.png", _png(rgb[:1, :1]), "read")
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    put("CMYK JPEG", "c/cmyk.jpg", buf.getvalue(), "read")
    rgba = np.dstack([rgb, np.full((32, 32), 128, np.uint8)])
    put("RGBA PNG", "c/rgba.png", _png(rgba, "RGBA"), "read")
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(buf, "PNG")
    put("palette PNG", "c/palette.png", buf.getvalue(), "read")
    buf = io.BytesIO()
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (30, 200)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    put("animated GIF", "c/anim.gif", buf.getvalue(), "read")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "WEBP")
    put("WebP", "c/img.webp", buf.getvalue(), "read")
    put("16-bit grey", "c/deep16.png", _png(np.full((16, 16), 20000, np.uint16)), "read")
    bomb = put("decompression bomb", "c/bomb.png", None, "skip")
    Image.new("1", (20000, 20000), 1).save(bomb)
    put("non-UTF-8 name", b"c/caf\xe9.png", _png(rgb), "read")
    put("hidden file", "c/.hidden.png", _png(rgb), "logged")
    link = put("symlink inside", "c/link_inside.png", None, "read")
    link.symlink_to(Path("..") / "good" / "rgb.png")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(_png(rgb))
    link = put("symlink to a file outside", "c/link_outside.png", None, "skip")
    link.symlink_to(outside / "secret.png")
    link = put("symlinked class folder outside", "linked", None, "skip")
    link.symlink_to(outside, target_is_directory=True)
    put("empty class folder", "empty", None, "logged").mkdir()
    put("hidden folder .git", ".git/x.png", _png(rgb), "logged")
    cases[-1].shown = ".git"
    put("hidden-looking folder ..evil", "..evil/x.png", _png(rgb), "logged")
    cases[-1].shown = "..evil"
    put("unicode, spaces, dots label", "été 2.0 v.1/x.png", _png(rgb), "read")
    return cases


def _written_sources(out: Path) -> set[str]:
    sources = set()
    meta = out / "train" / "metadata.jsonl"
    if meta.is_file():
        for line in meta.read_text(encoding="utf-8").splitlines():
            if line.strip():
                sources.add(json.loads(line)["source"])
    return sources


def _snapshot(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*")}


# --------------------------------------------------------------------------------------------------
# The overrides corpus (issues 26 and 31): hostile recipe values, each must end in one clear line naming its key
# --------------------------------------------------------------------------------------------------

SYN, KD, VIT = "pipelines/fmnist_synth.yaml", "pipelines/fmnist_kd_10shot.yaml", "pipelines/fmnist_vit_scratch_10shot.yaml"
SHIPPED = "sip/models/fmnist-tiny-sd"


def override_cases(base: Path) -> list[tuple[str, list[str], str]]:
    """``(name, sip arguments, text the error line must contain)``; files the cases point at are written under
    ``base`` (a text file, a model's weights named like a LoRA, an image folder)."""
    import torch
    from safetensors.torch import save_file

    text = base / "notes.txt"
    text.write_text("not a model\n")
    weights = base / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(weights))
    folder = base / "photos"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / "0.png").write_bytes(_png(np.zeros((16, 16, 3), np.uint8)))
    synth = ["synth", SYN, "--per-class", "1", "--steps", "2", "-o", str(base / "out-synth")]
    augment = ["augment", "pipelines/fmnist_augment.yaml", "-i", str(folder), "-o", str(base / "out-aug"),
               "--per-image", "1", "--steps", "2"]
    train = ["train", VIT, "-o", str(base / "out-train"), "--set", "optim.epochs=1"]
    distill = ["distill", KD, "-o", str(base / "out-distill"), "--set", "optim.epochs=1"]
    cases = [(f"{verb[0]} {o}", [*verb, "--set", o], o.split("=", 1)[0]) for verb, o in [
        (synth, "generate.guidance_scale=.nan"), (synth, "generate.strength=.inf"), (synth, "ray.num_cpus=.nan"),
        (synth, "ray.num_gpus=.inf"), (synth, "generate.lora_scale=-.inf"), (synth, "generate.kdeformer.seed=.nan"),
        (train, "model.kdeformer.block_size=.nan"), (train, "model.kdeformer.min_tokens=.nan"),
        (train, "data.interpolation="), (train, "data.interpolation=bogus"), (train, "optim.lr=.nan"),
        (train, "model.kwargs.embed_dim=.inf"), (distill, "batch_mix.cutmix_alpha=.nan"),
        (distill, "batch_mix.mixup_alpha=.inf"), (distill, "loss.temperature=.nan"),
        (synth, "generate.device="), (synth, "generate.tiny_vae="), (synth, "ray.address="),
        (synth, f"generate.lora={text}"), (synth, f"generate.lora={weights}"), (synth, f"generate.lora={base}"),
        (synth, f"generate.tiny_vae={SHIPPED}"), (synth, f"generate.tiny_vae={text}"),
        (synth, f"generate.tiny_vae={SHIPPED}/vae"), (synth, f"generate.model={text}"),
        (synth, f"generate.model={SHIPPED}/vae"), (synth, f"generate.model={base / 'missing'}"),
        (augment, "source.split=test"), (augment, "source.size=64"), (augment, "source.image_column=img"),
        (augment, "source.start=99"), (synth, "source.path=/tmp"), (synth, "source.split=validation"),
        (train, "data.eval.start=-1"),
    ]]
    # refused when the folder is opened (its size is known only then): the message names start and stop
    return [(n, a, "start 99" if k == "source.start" else k) for n, a, k in cases]


def run_override_cases(base: Path) -> list[tuple[str, str, str]]:
    """Run each case through the CLI (typer's runner, in this process); a case is handled when sip exits with
    code 2 and one ``error:`` line that names its key, with no traceback."""
    from typer.testing import CliRunner

    from sip.cli import app

    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    os.chdir(ROOT)
    rows = []
    for name, args, key in override_cases(base):
        result = CliRunner().invoke(app, args, catch_exceptions=True)
        lines = [line for line in (result.output or "").splitlines() if line.startswith("error:")]
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            how = f"NOT HANDLED: {type(result.exception).__name__}: {str(result.exception)[:120]}"
        elif result.exit_code != 2 or len(lines) != 1:
            how = f"NOT HANDLED: exit {result.exit_code}, {len(lines)} error lines"
        elif key not in lines[0]:
            how = f"NOT HANDLED: the error does not name {key}: {lines[0][:160]}"
        else:
            how = "refused"
        rows.append((name, how, lines[0][:150] if lines else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="build in this folder instead of a temporary one")
    parser.add_argument("--corpus", choices=("files", "overrides", "all"), default="all",
                        help="the image-folder corpus, the recipe-override corpus, or both (default)")
    args = parser.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="sip-bad-inputs-"))
    if args.corpus in ("overrides", "all"):
        (base / "overrides").mkdir(parents=True, exist_ok=True)
        rows = run_override_cases(base / "overrides")
        width = max(len(r[0]) for r in rows)
        for name, how, line in rows:
            print(f"{name:<{width}}  {how:<10}  {line}")
        handled = sum(how == "refused" for _, how, _ in rows)
        print(json.dumps({"corpus": "overrides", "cases": len(rows), "handled": handled}))
        if args.corpus == "overrides":
            return
    corpus, outside, out = base / "corpus", base / "outside", base / "out"
    cases = build_corpus(corpus, outside)
    before = _snapshot(base) - _snapshot(out) if out.exists() else _snapshot(base)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sip", "augment", "--input", str(corpus), "--output", str(out),
           "--per-image", "1", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, errors="backslashreplace",
                          check=False)  # a failed run is reported in the table, not raised
    log = proc.stdout + proc.stderr
    written = _written_sources(out)
    after = _snapshot(base)
    outside_writes = sorted(p for p in after - before if not p.startswith(str(out)))
    rows, handled = [], 0
    for c in cases:
        sid = c.shown
        if c.expect == "read" and sid in written:
            how = "written"
        elif any(c.shown in line and any(w in line for w in REASON_WORDS) for line in log.splitlines()):
            how = "named in log"  # a log line naming the file and saying why
        else:
            how = "NOT HANDLED"
        handled += how != "NOT HANDLED"
        rows.append((c.name, sid, c.expect, how))
    loaders = {}
    try:
        import datasets

        loaders["datasets imagefolder"] = len(datasets.load_dataset("imagefolder", data_dir=str(out))["train"])
    except Exception as e:  # noqa: BLE001 - any loader failure is a result to report, not to hide
        loaders["datasets imagefolder"] = f"FAILED: {e.__class__.__name__}: {e}"
    try:
        from torchvision.datasets import ImageFolder

        loaders["torchvision ImageFolder"] = len(ImageFolder(str(out / "train")))
    except Exception as e:  # noqa: BLE001 - as above
        loaders["torchvision ImageFolder"] = f"FAILED: {e.__class__.__name__}: {e}"
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'expect':<6}  result         path")
    for name, sid, expect, how in rows:
        print(f"{name:<{width}}  {expect:<6}  {how:<13}  {sid}")
    print(f"sip augment exit code {proc.returncode}; written {len(written)} images")
    for k, v in loaders.items():
        print(f"{k}: {v}")
    if outside_writes:
        print("written outside OUT:", *outside_writes, sep="\n  ")
    if proc.returncode != 0:
        print(log[-3000:])
    print(json.dumps({"cases": len(cases), "handled": handled, "handled_pct": round(100 * handled / len(cases), 1),
                      "outside_writes": len(outside_writes), "exit_code": proc.returncode,
                      "images_written": len(written),
                      **{k.split()[0] + "_loaded": v if isinstance(v, int) else -1 for k, v in loaders.items()}}))


if __name__ == "__main__":
    main()
