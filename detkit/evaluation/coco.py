"""COCO-style evaluation through pycocotools: the reference implementation, so numbers match papers."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from detkit.data.transforms import unletterbox

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> list[dict]:
    """Run ``model`` in eval mode over a letterboxed loader; one dict per image with ``image_id`` and
    ``boxes`` (xyxy, original image pixels), ``scores``, ``labels`` as CPU tensors."""
    was_training = model.training
    model.eval()
    out = []
    for images, targets in loader:
        detections = model(images.to(device))
        for det, target in zip(detections, targets):
            boxes = unletterbox(det["boxes"].cpu(), target["ratio"], target["pad"], target["orig_size"])
            out.append(
                {"image_id": target["image_id"], "boxes": boxes, "scores": det["scores"].cpu(),
                 "labels": det["labels"].cpu()}
            )
    model.train(was_training)
    return out


def to_coco_results(predictions: Sequence[dict], label_to_category_id: Sequence[int]) -> list[dict]:
    """COCO results format: ``bbox`` as [x, y, w, h] and the dataset's own category ids."""
    results = []
    for p in predictions:
        boxes = p["boxes"].tolist()
        for (x1, y1, x2, y2), score, label in zip(boxes, p["scores"].tolist(), p["labels"].tolist()):
            results.append(
                {"image_id": int(p["image_id"]), "category_id": int(label_to_category_id[label]),
                 "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                 "score": round(score, 5)}
            )
    return results


def evaluate_coco(coco_gt: COCO, results: list[dict], class_names: Sequence[str] | None = None) -> dict:
    """Bounding-box mAP of ``results`` against ``coco_gt``.

    Returns the twelve COCO summary statistics under :data:`STAT_NAMES` (AP = mAP@[.5:.95]), ``per_class``
    AP@[.5:.95] keyed by class name (in category-id order), and ``summary``, pycocotools' printed table.
    No detections at all scores zero everywhere instead of failing.
    """
    cat_ids = sorted(coco_gt.getCatIds())
    names = list(class_names) if class_names else [coco_gt.cats[c]["name"] for c in cat_ids]
    if not results:
        return {**dict.fromkeys(STAT_NAMES, 0.0), "per_class": dict.fromkeys(names, 0.0), "summary": ""}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics: dict = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    precision = evaluator.eval["precision"]  # (T, R, K, A, M): IoU thr, recall, class, area, max dets
    per_class = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[name] = float(p.mean()) if p.size else 0.0
    metrics["per_class"] = per_class
    metrics["summary"] = buffer.getvalue().split("Accumulating")[-1].split("DONE")[-1].strip()
    return metrics


def format_table(metrics: dict) -> str:
    """Summary and per-class AP as a fixed-width text table."""
    lines = ["  ".join(f"{n:>6}" for n in STAT_NAMES[:6]), "  ".join(f"{metrics[n]:6.4f}" for n in STAT_NAMES[:6])]
    per_class = metrics.get("per_class", {})
    if per_class:
        width = max(len(n) for n in per_class)
        lines.append("")
        lines.append(f"{'class':<{width}}  AP@[.5:.95]")
        lines += [f"{name:<{width}}  {ap:.4f}" for name, ap in per_class.items()]
    return "\n".join(lines)

