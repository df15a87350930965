"""COCO mAP of a detector on a scene set, through pycocotools (never computed by hand), and the held-out
evaluator that :func:`sip.train.loop.fit` calls per epoch (validation) and once at the end (test)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torch import nn

from sip.detect.data import SceneImages, collate_scenes

# COCOeval.stats positions → metric names (AP over IoU .50:.95, at .50, at .75, by area, and AR@100)
_STATS = {"map": 0, "map50": 1, "map75": 2, "map_small": 3, "map_medium": 4, "map_large": 5, "mar100": 8}


def coco_eval(gt: dict[str, Any], detections: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float]:
    """COCO bbox metrics (in %, as COCO reports them ×100) of ``detections`` against the ground truth ``gt`` on
    ``image_ids``, computed by pycocotools' ``COCOeval``. No detection at all scores 0."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("detection mAP needs pycocotools: pip install 'sip[detect]'") from e
    if not detections:
        return {name: 0.0 for name in _STATS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: max(float(ev.stats[i]), 0.0) * 100.0 for name, i in _STATS.items()}  # -1 = no such box: 0


@torch.no_grad()
def detect_all(model: nn.Module, scenes: SceneImages, indices: list[int], batch_size: int, device,
               progress: bool = False, desc: str = "eval") -> list[dict[str, Any]]:
    """The detector's boxes on ``scenes[indices]`` as COCO results (``image_id``, ``category_id``, xywh
    ``bbox``, ``score``)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, leave=False, disable=not progress):
        batch = collate_scenes([scenes.item(i) for i in indices[start:start + batch_size]])
        outputs = model(list(batch["image"].to(device)))
        for image_id, out in zip(batch["image_id"], outputs):
            boxes = out["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]
            results += [{"image_id": int(image_id), "category_id": int(c), "bbox": [round(v, 2) for v in b],
                         "score": round(float(s), 4)}
                        for b, c, s in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].tolist())]
    model.train(was_training)
    return results


class DetectionHeldOut:
    """A detection run's validation and test scene sets (the counterpart of :class:`sip.train.evaluate.HeldOut`):
    the validation set every ``run.eval_every`` epochs on its first ``max_samples`` scenes (all after the last
    epoch), the test set once at the end. ``score_key`` (mAP@[.5:.95]) picks the best epoch.

    Args:
        val (SceneImages | None): validation scenes (None: no per-epoch evaluation).
        test (SceneImages): test scenes.
        batch_size (int): evaluation batch size.
        max_samples (int | None): scenes of the per-epoch subset (null = all).
        accelerator: from :func:`sip.train.loop.make_accelerator` (one process: detection results are not
            gathered across processes).
    """

    score_key = "map"

    def __init__(self, val: SceneImages | None, test: SceneImages, *, batch_size: int, max_samples: int | None,
                 accelerator):
        if accelerator.num_processes > 1:
            raise ValueError("task: detection evaluates in one process; run sip train without accelerate launch "
                             "(multi-process detection evaluation is not implemented)")
        self.val, self.test_set, self.batch_size, self.max_samples = val, test, batch_size, max_samples
        self.accelerator = accelerator

    def _score(self, model: nn.Module, scenes: SceneImages, limit: int | None, progress: bool, desc: str) -> dict:
        indices = list(range(len(scenes) if limit is None else min(limit, len(scenes))))
        dets = detect_all(model, scenes, indices, self.batch_size, self.accelerator.device, progress, desc)
        out = coco_eval(scenes.coco, dets, [scenes.image_ids[i] for i in indices])
        return {**out, "samples": len(indices)}

    def validate(self, model: nn.Module, progress: bool, whole: bool = False) -> dict[str, float] | None:
        if self.val is None:
            return None
        return self._score(model, self.val, None if whole else self.max_samples, progress, "val")

    def test(self, model: nn.Module, progress: bool) -> dict[str, float]:
        return self._score(model, self.test_set, None, progress, "test")


__all__ = ["DetectionHeldOut", "coco_eval", "detect_all"]
