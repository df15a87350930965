#!/usr/bin/env python
"""sip's captioner against transformers used well, side by side in one run, on a BLIP-base-sized model.

The model is ``BlipForConditionalGeneration`` built from ``BlipConfig()`` defaults with random weights
(≈ BLIP base, ``Salesforce/blip-image-captioning-base``: ViT-B/16 vision encoder at 384 px, BERT-base
text decoder with cross-attention, 30,524-token vocabulary); its cost does not depend on the weight
values. The processor is a ``BlipProcessor`` with an offline WordPiece tokenizer (a vocabulary file
written here, with BERT's special tokens at BERT's ids and BLIP's ``[DEC]``/``[ENC]`` at 30522/30523).

Baseline (``"transformers-batched"``): the processor on the whole batch, one ``model.generate`` per batch,
``processor.batch_decode``, at the same batch size and precision (bf16: bf16 weights) as sip's row. sip's row:
``TransformersCaptioner`` through ``caption_images`` at that batch size (no cache). One image per call is a
reference row only. Random weights may stop a caption early at ``[SEP]`` or run to the limit, so every caption is
forced to exactly ``--tokens`` new tokens: every way does the same work. Forward hooks time the vision encoder
and the text decoder.

Usage:
    python scripts/bench_caption.py            # 32 images, batches 16 and 32
    python scripts/bench_caption.py --quick    # 16 images, batch 16

Prints a table, then one JSON line: {"baseline": "transformers-batched", "speedup_same_precision": ...,
"speedup_equal_quality": ... (captions identical to the baseline's, else null), ...}.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

BASELINE = "transformers-batched"

BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def write_wordpiece_vocab(path: Path, size: int = 30522) -> Path:
    """A BERT-layout WordPiece vocabulary: ``size`` tokens (specials at BERT's ids, then words and ``##``
    pieces taken from the CLIP BPE vocabulary that ships with open_clip_torch), then BLIP's ``[DEC]`` and
    ``[ENC]`` (ids 30522 and 30523 for the default size, as in BLIP base)."""
    from open_clip.tokenizer import default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:]
    words, pieces = [], []
    for line in merges:
        token = "".join(line.split())
        if token.endswith("</w>"):
            word = token[: -len("</w>")]
            if word.isalpha() and word.isascii():
                words.append(word)
        elif token.isalpha() and token.isascii():
            pieces.append("##" + token)
    fill = list(dict.fromkeys([*"abcdefghijklmnopqrstuvwxyz", *words, *pieces]))
    vocab, it = [], iter(fill)
    for i in range(size):
        vocab.append(BERT_SPECIALS.get(i) or (f"[unused{i}]" if i < 100 else next(it)))
    path.write_text("\n".join([*vocab, "[DEC]", "[ENC]"]) + "\n", encoding="utf-8")
    return path


def build_blip_base(work: Path, seed: int = 0):
    """(model, processor): BLIP-base-sized captioner with random weights, tokenizer written offline."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )
    from transformers.models.bert.tokenization_bert import load_vocab

    vocab_file = write_wordpiece_vocab(work / "vocab.txt")
    # [DEC] starts the decoder (BLIP's bos); as a special token it is dropped when decoding
    tokenizer = BertTokenizer(vocab=load_vocab(str(vocab_file)), bos_token="[DEC]", model_max_length=512)
    # 384 px, CLIP mean/std: BLIP base's preprocessing
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)
    config = BlipConfig(text_config={"vocab_size": len(tokenizer),
                                     "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
                                     "pad_token_id": tokenizer.pad_token_id,
                                     "sep_token_id": tokenizer.sep_token_id,
                                     "eos_token_id": tokenizer.sep_token_id})
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    return model, processor


def photos(n: int) -> list[Image.Image]:
    """``n`` distinct real images: the skimage / sklearn photos, then seeded crops of them."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    base = [Image.fromarray(getattr(skimage.data, k)()).convert("RGB")
            for k in ("chelsea", "coffee", "astronaut", "rocket")]
    base += [Image.fromarray(load_sample_image(k)).convert("RGB") for k in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = base[i % len(base)]
        if i >= len(base):
            w, h = im.size
            s = rng.uniform(0.5, 0.9)
            cw, ch = int(w * s), int(h * s)
            x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            im = im.crop((x, y, x + cw, y + ch))
        out.append(im)
    return out


def _timed(model, images: list, batch_size: int, label: str, caption_batch) -> dict:
    """``caption_batch(chunk) -> captions`` over ``images`` in batches, with the vision encoder and the text decoder
    timed by forward hooks."""
    from scripts.bench.machine import StageTimer

    timer = StageTimer({"vision": model.vision_model, "text_decoder": model.text_decoder})
    captions = []
    c0, t0 = time.process_time(), time.perf_counter()
    with tqdm(total=len(images), desc=label, unit="img", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            captions += caption_batch(chunk)
            bar.update(len(chunk))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    timer.remove()
    return {"way": label, "batch": batch_size, "images": len(images), "seconds": seconds,
            "rate": len(images) / seconds, "cpu": cpu / seconds, "vision": timer.seconds["vision"],
            "decoder": timer.seconds["text_decoder"], "decoder_calls": timer.calls["text_decoder"],
            "captions": captions}


def timed_sip(captioner, images: list, batch_size: int, label: str) -> dict:
    """sip's way: ``caption_images`` with :class:`TransformersCaptioner` (no cache: every image captioned)."""
    from sip.augment.caption import caption_images

    return _timed(captioner.model, images, batch_size, label,
                  lambda chunk: caption_images(chunk, captioner, None, batch_size))


def timed_transformers(model, processor, images: list, batch_size: int, tokens: int, label: str) -> dict:
    """The baseline, transformers used well: the processor on the whole batch, one ``model.generate`` per batch,
    ``processor.batch_decode``; the model in the dtype it is handed (bf16 weights for a bf16 comparison)."""
    dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def caption_batch(chunk):
        inputs = processor(images=chunk, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        ids = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
        return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]

    return _timed(model, images, batch_size, label, caption_batch)


def print_table(rows: list[dict], baselines: dict, vision_flops: float) -> None:
    print(f"\n{'way':<30} {'batch':>5} {'images':>6} {'s':>8} {'img/s':>7} {'x base':>6} {'cpu':>5} "
          f"{'vision s/img':>12} {'decoder s/img':>13} {'vision GF/s':>11}")
    for r in rows:
        base = baselines.get(r["batch"])
        x = f"{r['rate'] / base['rate']:>6.2f}" if base else f"{'':>6}"
        print(f"{r['way']:<30} {r['batch']:>5} {r['images']:>6} {r['seconds']:>8.2f} {r['rate']:>7.3f} {x} "
              f"{r['cpu']:>5.2f} {r['vision'] / r['images']:>12.3f} {r['decoder'] / r['images']:>13.3f} "
              f"{vision_flops * r['images'] / r['vision'] / 1e9:>11.1f}")
    print("(x base = images/s over transformers' own batched call (processor + generate + batch_decode) at the same "
          "batch size and precision; cpu = process CPU s / wall s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 images, batch 16 (under a minute)")
    parser.add_argument("--images", type=int, default=None,
                        help="images captioned in batches (default 32, quick 16)")
    parser.add_argument("--singles", type=int, default=None,
                        help="images captioned one per call, a reference row (default 8, quick 3; 0: none)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 16 32 (quick 16)")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per caption (max = min)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="sip's captioner precision (auto: bf16 on AMX CPUs and CUDA, as sip picks); the "
                             "baseline runs at the same precision (bf16: bf16 weights)")
    args = parser.parse_args()
    q = args.quick
    n_images = args.images or (16 if q else 32)
    n_singles = args.singles if args.singles is not None else (3 if q else 8)
    batch_sizes = args.batch_sizes or ([16] if q else [16, 32])
    if args.threads:
        torch.set_num_threads(args.threads)

    from torch.utils.flop_counter import FlopCounterMode

    from sip.augment.caption import TransformersCaptioner

    work = Path(tempfile.mkdtemp(prefix="sip-bench-caption-"))
    t0 = time.time()
    model, processor = build_blip_base(work)
    build_s = time.time() - t0
    captioner = TransformersCaptioner(model, processor, "blip-base-random", max_new_tokens=args.tokens,
                                      generate_kwargs={"min_new_tokens": args.tokens}, precision=args.precision)
    base_model = model if captioner.precision == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
    images = photos(max(n_images, n_singles))
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6
              for k, m in (("vision", model.vision_model), ("text", model.text_decoder))}
    load0 = os.getloadavg()
    print(f"# bench_caption: sip's TransformersCaptioner vs {BASELINE} (processor + generate on the batch, same "
          f"batch size and precision)")
    print(f"model: BLIP-base-sized, random weights (built in {build_s:.0f}s): vision ViT-B/16 at "
          f"{model.config.vision_config.image_size}px {params['vision']:.0f} M params, text decoder "
          f"{params['text']:.0f} M params, vocabulary {model.config.text_config.vocab_size}; "
          f"{args.tokens} new tokens per caption (forced); "
          f"{torch.get_num_threads()} threads, precision {captioner.precision}, load average at start {load0[0]:.2f}")

    # FLOPs per image of the vision encoder (the part batching cannot shrink)
    pixel = processor(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model.vision_model(pixel_values=pixel)
    vision_flops = fc.get_total_flops()

    captioner(images[:1])  # warm-up (allocator, thread pool)
    rows, baselines, sips = [], {}, []
    for b in batch_sizes:  # baseline and sip in turn at each batch size
        baselines[b] = timed_transformers(base_model, processor, images[:n_images], b, args.tokens,
                                          f"{BASELINE} {captioner.precision}")
        sips.append(timed_sip(captioner, images[:n_images], b, f"sip {captioner.precision}"))
        rows += [baselines[b], sips[-1]]
    if n_singles:
        rows.append(timed_sip(captioner, images[:n_singles], 1, "sip, one per call (reference)"))
    print_table(rows, baselines, vision_flops)
    best = max(sips, key=lambda r: r["rate"])
    base_best = max(baselines.values(), key=lambda r: r["rate"])
    same_batch = best["rate"] / baselines[best["batch"]]["rate"]
    identical = all(s["captions"] == baselines[s["batch"]]["captions"] for s in sips)
    print(f"\nsame precision ({captioner.precision}): sip's best (batch {best['batch']}) {best['rate']:.3f} img/s vs "
          f"{BASELINE}'s best (batch {base_best['batch']}) {base_best['rate']:.3f} = "
          f"{best['rate'] / base_best['rate']:.2f}x; at the same batch {same_batch:.2f}x; captions identical to the "
          f"baseline's: {identical}")
    load1 = os.getloadavg()
    print(f"load average at end {load1[0]:.2f}")
    print(json.dumps({"baseline": BASELINE, "speedup_same_precision": round(best["rate"] / base_best["rate"], 3),
                      "speedup_same_precision_same_batch": round(same_batch, 3),
                      "speedup_equal_quality": round(best["rate"] / base_best["rate"], 3) if identical else None,
                      "images_per_s_sip": round(best["rate"], 4), "images_per_s_baseline": round(base_best["rate"], 4),
                      **{f"images_per_s_batch{r['batch']}_{'sip' if r in sips else 'baseline'}": round(r["rate"], 4)
                         for r in rows if r["batch"] in baselines},
                      "best_batch": best["batch"], "vision_gflop_per_image": round(vision_flops / 1e9, 1),
                      "captions_identical": identical, "new_tokens": args.tokens, "precision": captioner.precision,
                      "load_start": round(load0[0], 2), "load_end": round(load1[0], 2), "quick": q}))


if __name__ == "__main__":
    main()
