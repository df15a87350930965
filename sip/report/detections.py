"""What ``sip report`` shows of a detection run (``sip train`` with ``task: detection``): a grid of held-out
scenes, the scene boxes (ground truth) beside the boxes the run's detector predicts with a score of at least
``min_score``, each box named by its class.

The detector is rebuilt from the run folder by :func:`sip.detect.models.load_detector` and run by
:func:`sip.detect.evaluate.detect_all`, the function that scores it in training; the scenes are the run's
validation set (``data.val`` of its ``config.yaml``), or its test set when it has none. Nothing in ``sip.detect``
imports ``sip.report``, so this adds no import loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class SceneBoxes:
    """One scene: its image, the scene's boxes and the detector's (xyxy px, class name, score or None)."""

    image: Any  # H×W×3 float array in [0, 1]
    truth: list[tuple[list[float], str, None]] = field(default_factory=list)
    predicted: list[tuple[list[float], str, float]] = field(default_factory=list)


@dataclass
class DetectionGrid:
    """A detection run's scenes with their boxes, and where they came from."""

    run_dir: Path
    split: str  # the recipe key the scenes came from: data.val or data.test
    scenes_dir: Path
    classes: list[str]  # the detector's classes (COCO ids 1..C), each drawn in its own colour
    scenes: list[SceneBoxes]
    min_score: float


def detection_runs(metrics_files: list[Path]) -> list[Path]:
    """The run folders among ``metrics_files``' folders whose ``config.yaml`` says ``task: detection``."""
    runs = []
    for path in metrics_files:
        try:
            config = yaml.safe_load((path.parent / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and config.get("task") == "detection":
            runs.append(path.parent)
    return runs


def _find_folder(recorded: str, run_dir: Path) -> Path | None:
    """A scene folder recorded in a run's config: as written (absolute, or relative to the working directory),
    else relative to the run folder and its parents (a run folder moved together with its scenes)."""
    path = Path(recorded)
    near = [run_dir, *run_dir.resolve().parents][:4]
    candidates = [path, *(p / (path.name if path.is_absolute() else path) for p in near)]
    return next((c for c in candidates if (c / "annotations.json").is_file() or c.is_file()), None)


def read_detection_grid(run_dir: Path, max_scenes: int = 8, min_score: float = 0.3) -> DetectionGrid:
    """The first ``max_scenes`` validation (else test) scenes of a detection run with their boxes and the run's
    detector's boxes scoring at least ``min_score``.

    Raises:
        FileNotFoundError: the run has no finished model, or its scene folders are not on this machine.
        ValueError: the model or the scenes cannot be read.
    """
    from sip.detect.data import SceneImages
    from sip.detect.evaluate import detect_all
    from sip.detect.models import load_detector
    from sip.models.checkpoints import MODEL_FILE

    if not (run_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {run_dir} (the run has not finished)")
    data = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("data") or {}
    found = [(key, _find_folder(str(data[key.split(".")[1]]), run_dir)) for key in ("data.val", "data.test")
             if data.get(key.split(".")[1])]
    split, folder = next(((k, f) for k, f in found if f is not None), (None, None))
    if folder is None:
        raise FileNotFoundError("its scene folders (" + ", ".join(f"{k}: {data.get(k.split('.')[1])}"
                                                                  for k in ("data.val", "data.test"))
                                + ") are not on this machine")
    model, meta = load_detector(str(run_dir))
    scenes = SceneImages(folder, meta["classes"], split)
    indices = list(range(min(max_scenes, len(scenes))))
    results = detect_all(model, scenes, indices, batch_size=8, device="cpu")
    names = {i + 1: name for i, name in enumerate(meta["classes"])}
    out = []
    for i in indices:
        item = scenes.item(i)
        truth = [(b, names[int(c)], None) for b, c in zip(item["boxes"].tolist(), item["labels"].tolist())]
        predicted = [(_xyxy(r["bbox"]), names[r["category_id"]], r["score"])
                     for r in results if r["image_id"] == item["image_id"] and r["score"] >= min_score]
        out.append(SceneBoxes(item["image"].permute(1, 2, 0).numpy(), truth, predicted))
    return DetectionGrid(run_dir, split, folder, list(meta["classes"]), out, min_score)


def _xyxy(bbox: list[float]) -> list[float]:
    """A COCO box (x, y, width, height) as corners (x1, y1, x2, y2)."""
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _draw_boxes(ax, scene: SceneBoxes, boxes: list, colours: dict[str, Any]) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(scene.image, interpolation="nearest")
    for (x1, y1, x2, y2), name, score in boxes:
        colour = colours[name]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.4))
        text = name if score is None else f"{name} {score:.2f}"
        ax.text(x1, y1, text, color="white", fontsize=5.5, va="top", ha="left", clip_on=True,  # inside the box
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.6, "alpha": 0.85})
    ax.set_xticks([])
    ax.set_yticks([])


def plot_detections(grid: DetectionGrid, path: Path, title: str, per_row: int = 2) -> Path:
    """The scenes in rows of ``per_row``, each as two tiles: its boxes (ground truth), the detector's boxes."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10").colors
    colours = {name: palette[k % len(palette)] for k, name in enumerate(grid.classes)}
    n_rows = math.ceil(len(grid.scenes) / per_row)
    fig, axes = plt.subplots(n_rows, 2 * per_row, figsize=(2.4 * 2 * per_row, 2.5 * n_rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, scene in enumerate(grid.scenes):
        r, c = divmod(k, per_row)
        for j, (boxes, name) in enumerate(((scene.truth, "ground truth"),
                                           (scene.predicted, f"predicted (score ≥ {grid.min_score:g})"))):
            ax = axes[r, 2 * c + j]
            ax.axis("on")
            _draw_boxes(ax, scene, boxes, colours)
            ax.set_title(f"scene {k + 1}: {name}", fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.5 * n_rows + 0.5)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["DetectionGrid", "SceneBoxes", "detection_runs", "plot_detections", "read_detection_grid"]
