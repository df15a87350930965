"""What ``sip report`` reads from a run folder: the sip datasets in it (through :mod:`sip.data.bank`), the
real source behind each variant (re-read the way sip read it), the training metrics and the accuracy rows.
Nothing here draws or writes."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sip.data.bank import is_dataset, read_jsonl, read_metadata, read_run_info
from sip.ids import image_hash

REPORT_DIR = "report"
# Keys that are axes, not series.
_AXIS_KEYS = {"epoch", "step", "global_step", "iteration", "iter"}
# bookkeeping that sip's trainer writes into metrics.jsonl: machine speed and counters, not training curves
_BOOKKEEPING_KEYS = {"epoch_time_s", "train_images_per_s", "nonfinite_steps"}


# --------------------------------------------------------------------------------------------------
# reading the run folder
# --------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _subdirs(root: Path, depth: int) -> list[Path]:
    """``root`` and its folders down to ``depth`` levels, in sorted order, skipping hidden ones, the
    report itself, checkpoints and the insides of datasets (their image folders)."""
    found, level = [root], [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            if d != root and is_dataset(d):
                continue  # a dataset: do not walk its thousands of images
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir())
            except OSError:
                continue
            nxt += [c for c in children if not c.name.startswith(".") and c.name not in (REPORT_DIR, "checkpoint")
                    and not (c / "metadata.jsonl").is_file()]  # a dataset's image folder
        found += nxt
        level = nxt
    return found


def find_datasets(run_dir: Path) -> list[Path]:
    """sip datasets in ``run_dir`` (itself or up to two levels below)."""
    return [d for d in _subdirs(run_dir, 2) if is_dataset(d)]


def find_metrics(run_dir: Path) -> list[Path]:
    """``metrics.jsonl`` files in ``run_dir`` (itself or up to three levels below)."""
    return [d / "metrics.jsonl" for d in _subdirs(run_dir, 3) if (d / "metrics.jsonl").is_file()]


def run_names(paths: list[Path], run_dir: Path) -> list[str]:
    """Short distinct names of training runs: the folder name, or the relative path on a clash."""
    names = [p.parent.name if p.parent != run_dir else run_dir.name for p in paths]
    return [n if names.count(n) == 1 else p.parent.relative_to(run_dir).as_posix() or run_dir.name
            for n, p in zip(names, paths)]

# --------------------------------------------------------------------------------------------------
# source images, as sip read them
# --------------------------------------------------------------------------------------------------

class SourceReader:
    """Re-read the real image behind a ``source`` id, from the run's recorded source config.

    Args:
        run_info (dict): the dataset's ``run.json``.
        dataset_dir (Path): the dataset folder (relative source paths are also tried from here and its
            parents, for run folders that were moved together with their input).
    """

    def __init__(self, run_info: dict[str, Any], dataset_dir: Path):
        config = run_info.get("config", {}) if isinstance(run_info, dict) else {}
        self.source = config.get("source", {}) if isinstance(config, dict) else {}
        self.dataset_dir = dataset_dir
        self._arrays: dict[str, Any] = {}
        self._hf = None

    def _folder_root(self) -> Path | None:
        path = self.source.get("path")
        if not path:
            return None
        path = Path(path)
        # run.json stores the path resolved; a run folder moved together with its input finds it by name
        near = [self.dataset_dir, *self.dataset_dir.parents][:4]
        candidates = [path, *(p / (path.name if path.is_absolute() else path) for p in near)]
        return next((c for c in candidates if c.exists()), None)

    def __call__(self, source_id: str) -> Image.Image | None:
        """The source image (RGB) or None when it cannot be found here."""
        from sip.data.sources import load_image, to_rgb

        m = re.fullmatch(r"fmnist/(train|test)/(\d+)", source_id)
        try:
            if m:
                from sip.data.sources import load_fashion_mnist_arrays

                split = m.group(1)
                if split not in self._arrays:
                    self._arrays[split] = load_fashion_mnist_arrays(split, download=False)[0]
                image = Image.fromarray(self._arrays[split][int(m.group(2))], mode="L").convert("RGB")
                size = self.source.get("size")
                if size and size != 28:
                    image = image.resize((size, size), Image.BICUBIC)
                return image
            kind = self.source.get("kind")
            root = self._folder_root()
            if root is None:
                return None
            if kind == "folder":
                return load_image(root / source_id)
            if kind == "hf":
                import io

                import datasets

                if self._hf is None:
                    self._hf = datasets.load_from_disk(str(root))
                split, row = source_id.rsplit("/", 1)
                ds = self._hf[split] if isinstance(self._hf, datasets.DatasetDict) else self._hf
                column = self.source.get("image_column", "image")
                cell = ds.cast_column(column, datasets.Image(decode=False))[int(row)][column]
                if cell.get("bytes") is not None:
                    with Image.open(io.BytesIO(cell["bytes"])) as im:
                        im.load()
                        return to_rgb(im)
                return load_image(cell["path"])
        except (OSError, ValueError, IndexError, KeyError, ImportError):
            return None
        return None


# --------------------------------------------------------------------------------------------------
# the rows of a grid
# --------------------------------------------------------------------------------------------------

@dataclass
class GridRow:
    """One source (or, for txt2img, one class) and its variants."""

    label: str
    source: str | None
    source_image: Image.Image | None
    source_note: str  # "" when the source was re-read and matches the recorded hash
    caption: str | None
    variants: list[tuple[Image.Image, dict[str, Any]]] = field(default_factory=list)


def _choose_sources(rows: list[dict[str, Any]], classes: list[str], max_rows: int) -> list[list[dict[str, Any]]]:
    """Group rows by source, then take sources round-robin over the classes (in class order) so every
    class shows before any shows twice; txt2img rows (no source) are grouped by class instead."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        key = ("source", str(row["source"])) if row.get("source") else ("class", str(row.get("label")))
        groups.setdefault(key, []).append(row)
    by_label: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    for group in groups.values():
        by_label[str(group[0].get("label"))].append(group)
    order = [c for c in classes if c in by_label] + sorted(set(by_label) - set(classes))
    chosen: list[list[dict[str, Any]]] = []
    for turn in range(max(len(v) for v in by_label.values())):
        for label in order:
            if turn < len(by_label[label]) and len(chosen) < max_rows:
                chosen.append(by_label[label][turn])
    return chosen


def grid_rows(dataset_dir: Path, max_rows: int = 10, max_variants: int = 4) -> tuple[list[GridRow], int]:
    """The rows of a dataset's grid and how many images the dataset holds."""
    from sip.data.sources import load_image
    from sip.export import dataset_classes

    rows = [r for r in read_metadata(dataset_dir) if r.get("file_name") and r.get("label") is not None]
    rows = list({r["file_name"]: r for r in rows}.values())
    if not rows:
        return [], 0
    reader = SourceReader(read_run_info(dataset_dir), dataset_dir)
    out = []
    for group in _choose_sources(rows, dataset_classes(dataset_dir, rows), max_rows):
        group = sorted(group, key=lambda r: (r.get("variant") if isinstance(r.get("variant"), int) else 0,
                                             r["file_name"]))[:max_variants]
        first = group[0]
        source, note, image = first.get("source"), "", None
        if source:
            image = reader(str(source))
            if image is None:
                note = "source image not found on this machine"
            elif first.get("source_hash") and image_hash(image) != first["source_hash"]:
                note = "warning: this file differs from the image sip read (content hash mismatch)"
        variants = []
        for r in group:
            try:
                variants.append((load_image(dataset_dir / "train" / r["file_name"]), r))
            except ValueError:
                continue
        out.append(GridRow(str(first["label"]), source, image, note, first.get("caption"), variants))
    return out, len(rows)


# --------------------------------------------------------------------------------------------------
# training curves and results
# --------------------------------------------------------------------------------------------------

def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{key: [(x, y), ...]}`` of every numeric value (nested objects flattened one level as ``a.b``);
    x is ``epoch`` when the row has it, else the row's position (1-based)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows, 1):
        x = as_number(row.get("epoch"))
        x = float(i) if x is None else x
        flat: dict[str, Any] = {}
        for k, v in row.items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        for k, v in flat.items():
            y = as_number(v)
            if y is not None and k not in _AXIS_KEYS and k not in _BOOKKEEPING_KEYS:
                series.setdefault(k, []).append((x, y))
    return series


# the per-epoch evaluation a student curve shows, first found wins: the validation split's top-1 (sip train /
# distill), then the older per-epoch keys, then a detection run's validation COCO mAP
EVAL_KEYS = ("val_top1", "eval_top1", "top1", "val_map")


def evaluation_curves(runs: dict[str, dict[str, list[tuple[float, float]]]]) -> tuple[str | None, dict[str, list]]:
    """Each run's evaluation per epoch, ``(key, {run: [(epoch, value), ...]})``: one point per evaluated epoch
    (a line written twice for an epoch, by a resumed run, counts once: its last value), in epoch order; runs
    without the key are left out. ``(None, {})`` when no run has any of :data:`EVAL_KEYS`."""
    key = next((k for k in EVAL_KEYS if any(series.get(k) for series in runs.values())), None)
    if key is None:
        return None, {}
    curves = {}
    for name, series in runs.items():
        if series.get(key):
            curves[name] = sorted(dict(series[key]).items())  # x -> its last y
    return key, curves


def read_metric_runs(metrics_files: list[Path], run_dir: Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{run name: metric_series(...)}`` of every metrics file with numeric values (torn lines skipped)."""
    runs = {}
    for path, name in zip(metrics_files, run_names(metrics_files, run_dir)):
        series = metric_series(read_jsonl(path))
        if series:
            runs[name] = series
    return runs


def read_results(run_dir: Path, metrics_files: list[Path]) -> tuple[list[dict[str, Any]], str]:
    """Rows of the accuracy table and where they came from ("" when there are none)."""
    data = _read_json(run_dir / "results.json")
    rows: list[dict[str, Any]] = []
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        rows = [r for r in data["runs"] if isinstance(r, dict)]
    elif isinstance(data, list):
        rows = [r for r in data if isinstance(r, dict)]
    elif isinstance(data, dict):
        rows = [{"name": k, **v} for k, v in data.items() if isinstance(v, dict)]
    if rows:
        return [{"name": r.get("name", f"run {i + 1}"), **{k: v for k, v in r.items() if k != "name"}}
                for i, r in enumerate(rows)], "results.json"
    for path, name in zip(metrics_files, run_names(metrics_files, run_dir)):
        final = _read_json(path.parent / "final_metrics.json")
        if isinstance(final, dict):
            rows.append({"name": name, **{k: v for k, v in final.items() if as_number(v) is not None}})
    return rows, "final_metrics.json of each training run" if rows else ""

def dataset_summary(dataset_dir: Path, count: int) -> str:
    """One line about a dataset: image and class counts, source, model, sampling settings, captioner."""
    run = read_run_info(dataset_dir)
    config = run.get("config", {}) if isinstance(run, dict) else {}
    gen = config.get("generate", {}) if isinstance(config, dict) else {}
    src = config.get("source", {}) if isinstance(config, dict) else {}
    parts = [f"{count} images", f"{len(run.get('label_folders', {}))} classes" if run.get("label_folders") else ""]
    if isinstance(src, dict) and src.get("kind"):
        parts.append(f"source: {src.get('kind')}" + (f" {src['path']}" if src.get("path") else "")
                     + (f", {src['shots']}-shot" if src.get("shots") else ""))
    if run.get("model"):
        parts.append(f"model: {run['model']}")
    if isinstance(gen, dict):
        parts += [f"{k}: {gen[k]}" for k in ("strength", "guidance_scale", "steps", "per_image") if k in gen]
    if run.get("captioner") or (isinstance(config, dict) and config.get("captioner")):
        parts.append(f"captioner: {run.get('captioner') or config.get('captioner')}")
    return " · ".join(p for p in parts if p)
