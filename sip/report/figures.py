"""The figures of ``sip report``: the grid of sources beside their variants and the training curves
(matplotlib on its Agg backend, no display needed)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from PIL import Image

from sip.report.collect import GridRow


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

def _panel_order(key: str) -> tuple[int, int, str]:
    """Accuracy first (the headline), then losses, top-5, the rest; held-out before training series."""
    k = key.lower()
    rank = 0 if ("top1" in k or "acc" in k) else 1 if "loss" in k else 2 if "top5" in k else 3
    return rank, 1 if "train" in k else 0, k


def plot_evaluation(key: str, curves: dict[str, list[tuple[float, float]]],
                    path: Path) -> dict[str, list[tuple[float, float]]]:
    """One panel: each run's evaluation (``key``, e.g. val_top1) against the epoch, a marker per evaluated epoch
    (a run evaluated once is a lone marker, labelled so); returns the points each line of the figure holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, points in curves.items():
        xs, ys = zip(*points)
        label = name if len(points) > 1 else f"{name} (evaluated once)"
        ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.5, label=label)
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylabel(key, fontsize=9)
    ax.set_title(f"{key} per evaluated epoch", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    drawn = {line.get_label(): list(zip(map(float, line.get_xdata()), map(float, line.get_ydata())))
             for line in ax.get_lines()}
    plt.close(fig)
    return drawn


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
