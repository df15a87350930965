"""``sip report RUN_DIR``: one self-contained HTML page (plus the PNGs it shows) about a run folder.

What it looks for (a demo run folder: ``RUN/augmented/``, ``RUN/train/<name>/metrics.jsonl``,
``RUN/results.json``; any other arrangement within three levels works too):

- **sip datasets**: folders holding ``train/metadata.jsonl`` (``RUN`` itself, or up to two levels
  below it). For each, a grid of real source images beside their variants, with the caption under the
  source and the prompt under the variants. Sources are re-read the way sip read them, from what
  ``run.json`` records: Fashion-MNIST ids ``fmnist/<split>/<index>`` from the idx files (resized as
  ``config.source.size`` says), folder ids relative to ``config.source.path``, Hugging Face ids
  ``<split>/<row>`` from the saved dataset. A source whose content hash differs from the recorded
  ``source_hash`` is shown with a warning; a source that cannot be found is left blank with a note.
  txt2img images (no source) are shown per class.
- **training curves**: every ``metrics.jsonl`` (one JSON object per line) up to three levels down.
  Each numeric key becomes a panel with one line per run, against ``epoch`` when rows have it, else
  the line number; non-numeric values, nested objects beyond one level and torn lines are skipped.
- **accuracy table**: ``RUN/results.json`` (``{"runs": [{"name": ..., "top1": ..., ...}]}``, a list of
  such rows, or ``{name: {...}}``); without it, the ``final_metrics.json`` next to each metrics file.

Any missing piece is left out with a note saying what was looked for. Output: ``RUN/report/report.html``,
``grid-<dataset>.png``, ``curves.png``, ``accuracy.md`` (the table as Markdown, for a README) and
``images/`` (the tiles the HTML shows). Matplotlib runs on its Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from sip.data.bank import read_metadata
from sip.ids import image_hash, sanitize_label

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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn or foreign line
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _subdirs(root: Path, depth: int) -> list[Path]:
    """``root`` and its folders down to ``depth`` levels, in sorted order, skipping hidden ones, the
    report itself, checkpoints and the insides of datasets (their image folders)."""
    found, level = [root], [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            if (d / "train" / "metadata.jsonl").is_file() and d != root:
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
    return [d for d in _subdirs(run_dir, 2)
            if (d / "train" / "metadata.jsonl").is_file() or list((d / "train").glob("metadata.shard-*.jsonl"))]


def find_metrics(run_dir: Path) -> list[Path]:
    """``metrics.jsonl`` files in ``run_dir`` (itself or up to three levels below)."""
    return [d / "metrics.jsonl" for d in _subdirs(run_dir, 3) if (d / "metrics.jsonl").is_file()]


def _run_names(paths: list[Path], run_dir: Path) -> list[str]:
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
        candidates = [path] if path.is_absolute() else [path, *(p / path for p in
                                                                [self.dataset_dir, *self.dataset_dir.parents][:4])]
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
# the grid of sources and variants
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
    reader = SourceReader(_read_json(dataset_dir / "run.json") or {}, dataset_dir)
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


def _wrap(text: str | None, width: int, lines: int) -> str:
    if not text:
        return ""
    wrapped = textwrap.wrap(str(text), width)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def _square(image: Image.Image) -> Image.Image:
    """Letterbox onto a white square, so every tile of the grid has the same frame."""
    side = max(image.size)
    if image.width == image.height:
        return image
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def plot_grid(rows: list[GridRow], path: Path, title: str, max_rows_per_block: int = 5) -> Path:
    """Sources beside their variants (or, for txt2img, each class's images), in balanced blocks of at
    most ``max_rows_per_block`` rows side by side; caption under the source, prompt under the variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = math.ceil(len(rows) / max_rows_per_block)
    n_rows = math.ceil(len(rows) / blocks)
    n_var = max(len(r.variants) for r in rows)
    has_source = any(r.source for r in rows)
    cols = (1 if has_source else 0) + n_var
    tile, text_h, title_h = 1.25, 0.4, 0.75
    height = n_rows * (tile + text_h) + title_h
    fig = plt.figure(figsize=(blocks * cols * tile + (blocks - 1) * 0.4 + 0.5, height))
    grid = fig.add_gridspec(n_rows, blocks * cols + blocks - 1, hspace=0.4, wspace=0.08,
                            top=1 - title_h / height, bottom=text_h / height,
                            width_ratios=([1] * cols + [0.25]) * (blocks - 1) + [1] * cols)
    name = "variant" if has_source else "image"
    for i, row in enumerate(rows):
        b, r = divmod(i, n_rows)
        c0 = b * (cols + 1)
        tiles = ([(row.source_image, "source")] if has_source else []) + \
                [(im, f"{name} {k + 1}") for k, (im, _) in enumerate(row.variants)]
        for j, (image, column) in enumerate(tiles):
            ax = fig.add_subplot(grid[r, c0 + j])
            ax.set_xticks([])
            ax.set_yticks([])
            if image is not None:
                ax.imshow(_square(image), interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "not\nfound", ha="center", va="center", fontsize=8, color="0.4")
            if r == 0:
                ax.set_title(column, fontsize=9)
            if j == 0:
                ax.set_ylabel(row.label, fontsize=9)
                under = row.caption if has_source else (row.variants[0][1].get("prompt") if row.variants else "")
                ax.text(0.0, -0.04, _wrap(under, 19 if has_source else 24 * n_var, 2), transform=ax.transAxes,
                        ha="left", va="top", fontsize=6.5, color="0.25" if has_source else "0.1",
                        style="italic" if has_source else "normal")
            if has_source and j == 1 and row.variants:
                prompt = row.variants[0][1].get("prompt")
                ax.text(0.0, -0.04, _wrap(prompt, 24 * n_var, 2), transform=ax.transAxes, ha="left", va="top",
                        fontsize=6.5, color="0.1")
    fig.suptitle(title, fontsize=11, y=1 - 0.1 / height, va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------------

def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{key: [(x, y), ...]}`` of every numeric value (nested objects flattened one level as ``a.b``);
    x is ``epoch`` when the row has it, else the row's position (1-based)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows, 1):
        x = _numeric(row.get("epoch"))
        x = float(i) if x is None else x
        flat: dict[str, Any] = {}
        for k, v in row.items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        for k, v in flat.items():
            y = _numeric(v)
            if y is not None and k not in _AXIS_KEYS and k not in _BOOKKEEPING_KEYS:
                series.setdefault(k, []).append((x, y))
    return series


def _panel_order(key: str) -> tuple[int, int, str]:
    """Accuracy first (the headline), then losses, top-5, the rest; held-out before training series."""
    k = key.lower()
    rank = 0 if ("top1" in k or "acc" in k) else 1 if "loss" in k else 2 if "top5" in k else 3
    return rank, 1 if "train" in k else 0, k


def plot_curves(runs: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> list[str]:
    """One panel per metric key, one line per run; returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = sorted({k for s in runs.values() for k in s}, key=_panel_order)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for n, (name, series) in enumerate(runs.items()):
            points = sorted(series.get(key, []))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, linewidth=1.5,
                        color=colours[n % len(colours)], label=name)
        ax.set_title(key, fontsize=10)
        xs = [x for series in runs.values() for x, _ in series.get(key, [])]
        if xs and min(xs) == max(xs):  # one epoch so far: a single tick, not a zoomed-in float axis
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
            ax.set_xticks([xs[0]])
        elif all(float(x).is_integer() for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch" if any(series.get(key) for series in runs.values()) else "", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes.flat:  # runs missing from the first panel still get a legend entry
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen), loc="upper center", ncol=min(4, len(seen)), fontsize=9,
               bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if nrows == 1 else 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return keys


# --------------------------------------------------------------------------------------------------
# accuracy table
# --------------------------------------------------------------------------------------------------

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
    for path, name in zip(metrics_files, _run_names(metrics_files, run_dir)):
        final = _read_json(path.parent / "final_metrics.json")
        if isinstance(final, dict):
            rows.append({"name": name, **{k: v for k, v in final.items() if _numeric(v) is not None}})
    return rows, "final_metrics.json of each training run" if rows else ""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _table_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    return columns


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = _table_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1180px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta, .note { color: #666; } .note { background: #f6f6f0; border-left: 3px solid #cc9; padding: 0.4em 0.8em; }
img.figure { max-width: 100%; border: 1px solid #eee; }
table.acc { border-collapse: collapse; margin: 1em 0; }
table.acc th, table.acc td { border: 1px solid #ddd; padding: 0.3em 0.8em; text-align: right; }
table.acc td:first-child, table.acc th:first-child { text-align: left; }
table.acc td.best { font-weight: bold; background: #eef7ee; }
.row { display: flex; gap: 12px; align-items: flex-start; padding: 10px 0; border-bottom: 1px solid #eee; }
figure { margin: 0; width: 132px; } figure.source { border-right: 2px solid #ccc; padding-right: 12px; }
figure img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; background: #fafafa;
             border: 1px solid #ddd; }
figcaption { font-size: 11px; color: #444; word-wrap: break-word; } figcaption b { color: #222; }
.prompt { font-size: 11px; color: #333; align-self: center; max-width: 420px; }
"""


def _esc(text: Any) -> str:
    return html.escape("" if text is None else str(text))


def _save_tile(image: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path.relative_to(path.parents[2]).as_posix()  # relative to report/


def _dataset_summary(dataset_dir: Path, count: int) -> str:
    run = _read_json(dataset_dir / "run.json") or {}
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


def write_report(run_dir: str | Path, max_sources: int = 10, max_variants: int = 4) -> Path:
    """Write ``RUN_DIR/report/report.html`` and the PNGs it shows; returns the HTML's path.

    Args:
        run_dir (str | Path): the run folder (see the module docstring for what is looked for).
        max_sources (int, optional): source images per dataset grid (taken round-robin over the
            classes). Defaults to 10.
        max_variants (int, optional): variants shown per source. Defaults to 4.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, or holds none of: a sip dataset, a
            ``metrics.jsonl``, a ``results.json``.
    """
    # 1. check inputs and find the pieces
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if max_sources <= 0 or max_variants <= 0:
        raise ValueError(f"max_sources and max_variants must be positive, got {max_sources}, {max_variants}")
    datasets_found = find_datasets(run_dir)
    metrics_files = find_metrics(run_dir)
    results, results_from = read_results(run_dir, metrics_files)
    if not datasets_found and not metrics_files and not results:
        raise FileNotFoundError(
            f"nothing to report in {run_dir}: no sip dataset (…/train/metadata.jsonl), no metrics.jsonl and no "
            "results.json within three levels (run `sip demo`, `sip augment` or `sip train` into it first)")
    # 2. a fresh report folder (only what this function writes is removed)
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    shutil.rmtree(out / "images", ignore_errors=True)
    for old in [*out.glob("grid-*.png"), out / "curves.png", out / "accuracy.md"]:
        old.unlink(missing_ok=True)
    notes: list[str] = []
    body: list[str] = []

    # 3. sources beside their variants
    body.append("<h2>Source images and their sip variants</h2>")
    if not datasets_found:
        body.append(f"<p class='note'>No sip dataset found (looked for <code>train/metadata.jsonl</code> in "
                    f"{_esc(run_dir)} and two levels below).</p>")
        notes.append("no sip dataset")
    for dataset_dir in datasets_found:
        rel = dataset_dir.relative_to(run_dir).as_posix() if dataset_dir != run_dir else "."
        slug = sanitize_label(rel if rel != "." else "dataset")
        # the run folder may be the dataset itself (`sip report runs/fmnist-aug`): name it by its folder
        rel = rel if rel != "." else dataset_dir.resolve().name
        rows, count = grid_rows(dataset_dir, max_sources, max_variants)
        body.append(f"<h3>{_esc(rel)}</h3><p class='meta'>{_esc(_dataset_summary(dataset_dir, count))}</p>")
        if not rows:
            body.append("<p class='note'>This dataset lists no images yet.</p>")
            continue
        title = (f"{rel}: real images (left) and their sip variants" if any(r.source for r in rows)
                 else f"{rel}: txt2img images per class")
        grid_png = plot_grid(rows, out / f"grid-{slug}.png", title)
        body.append(f"<p><img class='figure' src='{grid_png.name}' alt='grid of sources and variants'></p>")
        body.append("<details open><summary>Each source with its caption, prompt and variants</summary>")
        for i, row in enumerate(rows):
            cells = []
            if row.source:
                if row.source_image is not None:
                    src = _save_tile(row.source_image, out / "images" / slug / f"{i:03d}-source.png")
                    cells.append(f"<figure class='source'><img src='{src}' alt='source'>")
                else:
                    cells.append("<figure class='source'><div class='note'>source not found</div>")
                cells.append(f"<figcaption><b>{_esc(row.label)}</b><br>{_esc(row.source)}<br>"
                             f"<i>caption:</i> {_esc(row.caption)}"
                             + (f"<br><span class='note'>{_esc(row.source_note)}</span>" if row.source_note else "")
                             + "</figcaption></figure>")
            for k, (image, meta) in enumerate(row.variants):
                tile = _save_tile(image, out / "images" / slug / f"{i:03d}-v{k}.png")
                caption = f"seed {meta.get('seed')}" + (f", strength {meta['strength']}" if meta.get("strength") else "")
                if not row.source:
                    caption = f"<b>{_esc(row.label)}</b><br>{_esc(meta.get('prompt'))}<br>{caption}"
                cells.append(f"<figure><img src='{tile}' alt='variant'><figcaption>{caption}</figcaption></figure>")
            prompts = list(dict.fromkeys(m.get("prompt") for _, m in row.variants if m.get("prompt")))
            if row.source and prompts:
                cells.append("<div class='prompt'><i>prompt:</i> " + "<br>".join(_esc(p) for p in prompts) + "</div>")
            body.append("<div class='row'>" + "".join(cells) + "</div>")
        body.append("</details>")
        missing = sum(1 for r in rows if r.source and r.source_image is None)
        if missing:
            notes.append(f"{missing} source images of {rel} not found on this machine")

    # 4. training curves
    body.append("<h2>Training curves</h2>")
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for path, name in zip(metrics_files, _run_names(metrics_files, run_dir)):
        series = metric_series(_read_jsonl(path))
        if series:
            runs[name] = series
    if runs:
        keys = plot_curves(runs, out / "curves.png")
        body.append("<p><img class='figure' src='curves.png' alt='training curves'></p>")
        body.append("<p class='meta'>Runs: " + ", ".join(
            f"<b>{_esc(n)}</b> (<code>{_esc(p.relative_to(run_dir))}</code>)"
            for p, n in zip(metrics_files, _run_names(metrics_files, run_dir)) if n in runs)
            + ". Series: " + ", ".join(_esc(k) for k in keys) + ".</p>")
    else:
        body.append(f"<p class='note'>No training metrics found (looked for <code>metrics.jsonl</code> with numeric "
                    f"values in {_esc(run_dir)} and three levels below).</p>")
        notes.append("no training metrics")

    # 5. accuracy table
    body.append("<h2>Accuracy of the compared runs</h2>")
    if results:
        columns = _table_columns(results)
        best = {}
        for c in columns:
            values = [_numeric(r.get(c)) for r in results]
            if re.search(r"top1|top5|acc", c, re.I) and len(results) > 1 and any(v is not None for v in values):
                best[c] = max(v for v in values if v is not None)
        head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
        lines = []
        for r in results:
            cells = "".join(
                ("<td class='best'>" if c in best and _numeric(r.get(c)) == best[c] else "<td>")
                + f"{_esc(_fmt(r.get(c)))}</td>" for c in columns)
            lines.append(f"<tr>{cells}</tr>")
        body.append(f"<table class='acc'><tr>{head}</tr>{''.join(lines)}</table>"
                    f"<p class='meta'>From {_esc(results_from)}; best per accuracy column in bold.</p>")
        (out / "accuracy.md").write_text(markdown_table(results), encoding="utf-8")
    else:
        body.append(f"<p class='note'>No results found (looked for <code>{_esc(run_dir / 'results.json')}</code> and "
                    "<code>final_metrics.json</code> next to the metrics files).</p>")
        notes.append("no accuracy table")

    # 6. the page (written to a temp name, then renamed)
    import sip

    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    head = (f"<h1>sip report: {_esc(run_dir.resolve().name)}</h1><p class='meta'>{_esc(run_dir.resolve())} · "
            f"written {created} by sip {sip.__version__}"
            + (f" · missing: {_esc('; '.join(notes))}" if notes else "") + "</p>")
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>sip report: "
            f"{_esc(run_dir.resolve().name)}</title><style>{_CSS}</style></head><body>\n{head}\n"
            + "\n".join(body) + "\n</body></html>\n")
    target = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
