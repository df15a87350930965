"""How much SIPAugment's bank lookup costs next to decoding an image.

A lookup is what SIPAugment does before it knows whether an image has variants: hash the image's
pixels and look the hash up in the in-memory index. The reference is decoding one PNG of the bank
(what a hit costs anyway, and what any file-backed dataset pays per image). Columns:

- ``lookup``: what SIPAugment does. For a Fashion-MNIST bank whose idx files are on this machine, a
  grey 28×28 image is found by the hash of its 784 grey bytes (an alias built when the index loads);
  otherwise it is the normalised lookup.
- ``normalised``: the general path: ``to_rgb`` + resize as sip read the source, SHA-256 of the RGB
  pixels (:func:`sip.transforms.source_key`), then the index.
- ``dict.get``: the index alone, for a key already computed.

Two cases:

- ``fmnist``: grey 28×28 Fashion-MNIST images as torchvision yields them, against a 32 px bank (the
  shipped setting).
- ``photo``: 256×256 RGB photos (scikit-image / scikit-learn sample images, cropped at several offsets).

Times are CPU time of this process, best of 7 passes (the machine may be busy with other work).

With ``--bank DIR`` the fmnist case uses that ``sip augment`` output (a Fashion-MNIST run); otherwise a
stand-in bank is written with :class:`sip.data.bank.DatasetWriter` in the real layout, holding the sources
themselves as their "variants" (the content of a variant does not change what a lookup costs).

    .venv/bin/python scripts/bench_transform.py [--bank runs/demo/augmented] [--sources 1000]

The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from sip.data.bank import DatasetWriter, read_metadata
from sip.data.sources import FashionMNISTSource
from sip.ids import image_hash
from sip.transforms import SIPAugment, source_key


def per_call_us(fn, items, repeats: int = 7) -> float:
    """Best of ``repeats`` passes of the mean CPU time per item, in microseconds. CPU time of this
    process (not wall time), and the best pass: on a shared machine both keep other load out."""
    passes = []
    for _ in range(repeats):
        t0 = time.process_time()
        for item in items:
            fn(item)
        passes.append((time.process_time() - t0) / len(items) * 1e6)
    return min(passes)


def write_bank(root: Path, sources: list[tuple[Image.Image, str, str]], config: dict) -> Path:
    """Write ``(image as sip read it, label, source id)`` as a one-variant-per-source sip dataset."""
    labels = sorted({label for _, label, _ in sources})
    writer = DatasetWriter(root, {"sip_version": "bench", "config": config}, labels)
    for i, (image, label, sid) in enumerate(sources):
        writer.write(f"bench-{i:06d}", image, label, {"source": sid, "source_hash": image_hash(image), "variant": 0})
    return root


def fmnist_case(bank: Path | None, n: int, tmp: Path) -> tuple[list[Image.Image], Path]:
    """Inputs as torchvision's FashionMNIST yields them (grey 28×28) and a 32 px bank that holds them."""
    source = FashionMNISTSource("train", start=50000, stop=50000 + n, size=32)
    if bank is None:
        bank = write_bank(tmp / "fmnist", [(s.image, s.label_name, s.source_id) for s in source],
                          {"source": {"kind": "fashion-mnist", "size": 32}})
    wanted = {r["source"] for r in read_metadata(bank) if r.get("source", "").startswith("fmnist/train/")}
    inputs = [Image.fromarray(source.images[int(sid.rsplit("/", 1)[1])], mode="L") for sid in sorted(wanted)]
    if not inputs:
        sys.exit(f"{bank} holds no Fashion-MNIST train images (source ids fmnist/train/N)")
    return inputs[:n], bank


def photo_case(n: int, tmp: Path, side: int = 256) -> tuple[list[Image.Image], Path] | None:
    try:
        import skimage.data
        from sklearn.datasets import load_sample_image
    except ImportError:
        return None
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
              for name in ("astronaut", "chelsea", "coffee", "rocket")]
    photos += [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    crops = []
    for k in range(n):
        photo = photos[k % len(photos)]
        x = (k * 37) % max(1, photo.width - side)
        y = (k * 53) % max(1, photo.height - side)
        crops.append(photo.crop((x, y, x + side, y + side)))
    bank = write_bank(tmp / "photo", [(c, f"photo{k % len(photos)}", f"photo/{k}") for k, c in enumerate(crops)],
                      {"source": {"kind": "folder"}})
    return crops, bank


def measure(name: str, inputs: list[Image.Image], bank: Path) -> dict:
    aug = SIPAugment(bank, p=1.0)
    files = [aug.variants(im) for im in inputs]  # loads the index
    found = sum(1 for f in files if f)
    paths = [f[0] for f in files if f]

    def decode(path: str) -> None:
        with Image.open(path) as im:
            im.load()

    index = aug._load_index()
    keys = [aug.key_of(im) for im in inputs]
    lookup = per_call_us(aug.variants, inputs)
    normalised = per_call_us(lambda im: index.get(source_key(im, aug.resize_to)), inputs)
    dict_only = per_call_us(index.get, keys)
    decode_us = per_call_us(decode, paths)
    call = per_call_us(aug, inputs)
    return {"case": name, "bank_images": len(read_metadata(bank)), "inputs": len(inputs), "found": found,
            "input": f"{inputs[0].mode} {inputs[0].width}x{inputs[0].height}", "resize_to": aug.resize_to,
            "fast_alias": aug._aliases, "lookup_us": round(lookup, 2),
            "normalised_hash_lookup_us": round(normalised, 2), "index_get_us": round(dict_only, 3),
            "png_decode_us": round(decode_us, 1), "decode_over_lookup": round(decode_us / lookup, 1),
            "decode_over_normalised_lookup": round(decode_us / normalised, 1),
            "transform_call_us": round(call, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=Path, help="a sip augment output of Fashion-MNIST (default: a stand-in)")
    parser.add_argument("--sources", type=int, default=1000, help="Fashion-MNIST sources in the stand-in bank")
    parser.add_argument("--photos", type=int, default=120, help="256 px photo crops in the photo bank")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="sip-bench-") as tmp:
        inputs, bank = fmnist_case(args.bank, args.sources, Path(tmp))
        results.append(measure("fmnist", inputs, bank))
        photo = photo_case(args.photos, Path(tmp))
        if photo is not None:
            results.append(measure("photo", *photo))
    print(f"{'case':7} {'input':>11} {'bank':>5} {'found':>5} {'lookup µs':>10} {'(normalised)':>12} "
          f"{'dict.get µs':>11} {'PNG decode µs':>13} {'decode/lookup':>13} {'transform µs':>12}")
    for r in results:
        print(f"{r['case']:7} {r['input']:>11} {r['bank_images']:>5} {r['found']:>5} {r['lookup_us']:>10} "
              f"{r['normalised_hash_lookup_us']:>12} {r['index_get_us']:>11} {r['png_decode_us']:>13} "
              f"{r['decode_over_lookup']:>13} {r['transform_call_us']:>12}")
    print(json.dumps({"benchmark": "sip.transforms lookup vs PNG decode", "results": results}))


if __name__ == "__main__":
    main()
