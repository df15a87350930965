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
- **predicted boxes**: for each training run whose ``config.yaml`` says ``task: detection``, its detector's
  boxes (score at least ``min_score``, named by class) on its first validation scenes (test scenes when it has
  no validation set) beside the scenes' own boxes.
- **accuracy table**: ``RUN/results.json`` (``{"runs": [{"name": ..., "top1": ..., ...}]}``, a list of
  such rows, or ``{name: {...}}``); without it, the ``final_metrics.json`` next to each metrics file.

Any missing piece is left out with a note saying what was looked for. Output: ``RUN/report/report.html``,
``grid-<dataset>.png``, ``evaluation.png`` (each run's validation top-1 per evaluated epoch), ``curves.png``,
``detections-<run>.png`` (a detection run's held-out scenes: scene boxes beside predicted boxes, see
:mod:`sip.report.detections`), ``accuracy.md`` (the table as Markdown, for a README) and
``images/`` (the tiles the HTML shows). Matplotlib runs on its Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from sip.ids import sanitize_label
from sip.report.collect import (
    REPORT_DIR,
    as_number,
    dataset_summary,
    evaluation_curves,
    find_datasets,
    find_metrics,
    grid_rows,
    read_metric_runs,
    read_results,
    run_names,
)
from sip.report.detections import detection_runs, plot_detections, read_detection_grid
from sip.report.figures import plot_curves, plot_evaluation, plot_grid

# --------------------------------------------------------------------------------------------------
# accuracy table
# --------------------------------------------------------------------------------------------------

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


def _variant_row(i: int, row: Any, out: Path, slug: str) -> str:
    """One source's HTML row: the source with its caption, then its variants and their prompts."""
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
    return "<div class='row'>" + "".join(cells) + "</div>"


def _dataset_section(run_dir: Path, datasets_found: list[Path], out: Path, max_sources: int, max_variants: int,
                     body: list[str], notes: list[str]) -> None:
    """Append each sip dataset's grid of sources beside their variants to ``body``."""
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
        body.append(f"<h3>{_esc(rel)}</h3><p class='meta'>{_esc(dataset_summary(dataset_dir, count))}</p>")
        if not rows:
            body.append("<p class='note'>This dataset lists no images yet.</p>")
            continue
        title = (f"{rel}: real images (left) and their sip variants" if any(r.source for r in rows)
                 else f"{rel}: txt2img images per class")
        grid_png = plot_grid(rows, out / f"grid-{slug}.png", title)
        body.append(f"<p><img class='figure' src='{grid_png.name}' alt='grid of sources and variants'></p>")
        body.append("<details open><summary>Each source with its caption, prompt and variants</summary>")
        body.extend(_variant_row(i, row, out, slug) for i, row in enumerate(rows))
        body.append("</details>")
        missing = sum(1 for r in rows if r.source and r.source_image is None)
        if missing:
            notes.append(f"{missing} source images of {rel} not found on this machine")


def _curves_section(run_dir: Path, metrics_files: list[Path], out: Path, body: list[str], notes: list[str]) -> None:
    """Append the training curves (one panel per numeric key, one line per run) to ``body``."""
    body.append("<h2>Training curves</h2>")
    runs = read_metric_runs(metrics_files, run_dir)
    key, curves = evaluation_curves(runs)
    if curves:  # the headline: each student's evaluation, a point per evaluated epoch
        plot_evaluation(key, curves, out / "evaluation.png")
        body.append(f"<p><img class='figure' src='evaluation.png' alt='{_esc(key)} per epoch'></p>")
        once = [n for n, points in curves.items() if len(points) == 1]
        if once:
            body.append(f"<p class='note'>Evaluated once (no curve): {_esc(', '.join(once))}; set "
                        "<code>run.eval_every: 1</code> for a point per epoch.</p>")
    if runs:
        keys = plot_curves(runs, out / "curves.png")
        body.append("<p><img class='figure' src='curves.png' alt='training curves'></p>")
        body.append("<p class='meta'>Runs: " + ", ".join(
            f"<b>{_esc(n)}</b> (<code>{_esc(p.relative_to(run_dir))}</code>)"
            for p, n in zip(metrics_files, run_names(metrics_files, run_dir)) if n in runs)
            + ". Series: " + ", ".join(_esc(k) for k in keys) + ".</p>")
    else:
        body.append(f"<p class='note'>No training metrics found (looked for <code>metrics.jsonl</code> with numeric "
                    f"values in {_esc(run_dir)} and three levels below).</p>")
        notes.append("no training metrics")


def _detections_section(run_dir: Path, metrics_files: list[Path], out: Path, max_scenes: int, min_score: float,
                        body: list[str], notes: list[str]) -> None:
    """Append each detection run's grid of held-out scenes, scene boxes beside predicted boxes, to ``body``."""
    runs = detection_runs(metrics_files)
    if not runs:
        return
    body.append("<h2>Predicted boxes of the detection runs</h2>")
    for run in runs:
        rel = run.relative_to(run_dir).as_posix() if run != run_dir else run_dir.resolve().name
        try:
            grid = read_detection_grid(run, max_scenes, min_score)
        except (FileNotFoundError, ValueError) as e:
            body.append(f"<h3>{_esc(rel)}</h3><p class='note'>No predicted boxes: {_esc(e)}.</p>")
            notes.append(f"no predicted boxes of {rel}")
            continue
        png = plot_detections(grid, out / f"detections-{sanitize_label(rel)}.png",
                              f"{rel}: {grid.split} scenes, scene boxes (left) and predicted boxes (right)")
        shown = sum(len(s.predicted) for s in grid.scenes)
        body.append(f"<h3>{_esc(rel)}</h3><p><img class='figure' src='{png.name}' alt='predicted boxes'></p>"
                    f"<p class='meta'>The first {len(grid.scenes)} scenes of {_esc(grid.split)} "
                    f"(<code>{_esc(grid.scenes_dir)}</code>): {shown} predicted boxes with a score of at least "
                    f"{grid.min_score:g}, each named by its class.</p>")


def _accuracy_section(run_dir: Path, results: list[dict[str, Any]], results_from: Any, out: Path,
                      body: list[str], notes: list[str]) -> None:
    """Append the accuracy table (best per accuracy column in bold) and write ``accuracy.md``."""
    body.append("<h2>Accuracy of the compared runs</h2>")
    if not results:
        body.append(f"<p class='note'>No results found (looked for <code>{_esc(run_dir / 'results.json')}</code> and "
                    "<code>final_metrics.json</code> next to the metrics files).</p>")
        notes.append("no accuracy table")
        return
    columns = _table_columns(results)
    best = {}
    for c in columns:
        values = [as_number(r.get(c)) for r in results]
        if re.search(r"top1|top5|acc", c, re.IGNORECASE) and len(results) > 1 and any(v is not None for v in values):
            best[c] = max(v for v in values if v is not None)
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    lines = []
    for r in results:
        cells = "".join(
            ("<td class='best'>" if c in best and as_number(r.get(c)) == best[c] else "<td>")
            + f"{_esc(_fmt(r.get(c)))}</td>" for c in columns)
        lines.append(f"<tr>{cells}</tr>")
    body.append(f"<table class='acc'><tr>{head}</tr>{''.join(lines)}</table>"
                f"<p class='meta'>From {_esc(results_from)}; best per accuracy column in bold.</p>")
    (out / "accuracy.md").write_text(markdown_table(results), encoding="utf-8")


def write_report(run_dir: str | Path, max_sources: int = 10, max_variants: int = 4, max_scenes: int = 8,
                 min_score: float = 0.3) -> Path:
    """Write ``RUN_DIR/report/report.html`` and the PNGs it shows; returns the HTML's path.

    Args:
        run_dir (str | Path): the run folder (see the module docstring for what is looked for).
        max_sources (int, optional): source images per dataset grid (taken round-robin over the
            classes). Defaults to 10.
        max_variants (int, optional): variants shown per source. Defaults to 4.
        max_scenes (int, optional): scenes per detection run's grid of predicted boxes. Defaults to 8.
        min_score (float, optional): the smallest score of a predicted box drawn. Defaults to 0.3.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, or holds none of: a sip dataset, a
            ``metrics.jsonl``, a ``results.json``.
    """
    # 1. check inputs and find the pieces
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if max_sources <= 0 or max_variants <= 0 or max_scenes <= 0:
        raise ValueError(f"max_sources, max_variants and max_scenes must be positive, got {max_sources}, "
                         f"{max_variants}, {max_scenes}")
    if not 0 <= min_score <= 1:
        raise ValueError(f"min_score must be in [0, 1], got {min_score}")
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
    for old in [*out.glob("grid-*.png"), *out.glob("detections-*.png"), out / "curves.png", out / "evaluation.png",
                out / "accuracy.md"]:
        old.unlink(missing_ok=True)
    notes: list[str] = []
    body: list[str] = []

    # 3. sources beside their variants
    _dataset_section(run_dir, datasets_found, out, max_sources, max_variants, body, notes)
    # 4. training curves
    _curves_section(run_dir, metrics_files, out, body, notes)
    # 5. detection runs: predicted boxes beside the scene boxes
    _detections_section(run_dir, metrics_files, out, max_scenes, min_score, body, notes)
    # 6. accuracy table
    _accuracy_section(run_dir, results, results_from, out, body, notes)

    # 7. the page (written to a temp name, then renamed)
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
