"""COCO-style evaluation through pycocotools, the reference implementation, so numbers match papers; or
through faster-coco-eval (``pip install detkit[eval]``), a C++ reimplementation that gives the same numbers
in a fraction of the time on large validation sets."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from detkit.data.loader import to_device
from detkit.data.transforms import unletterbox

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster_coco_eval")


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> list[dict]:
    """Run ``model`` in eval mode over a letterboxed loader; one dict per image with ``image_id`` and
    ``boxes`` (xyxy, original image pixels), ``scores``, ``labels`` as CPU tensors. A batch whose targets carry
    ``proposals`` (a dataset with ``data.proposals_file``) hands them over as ``model(images, proposals=...)``."""
    was_training = model.training
    model.eval()
    out = []
    for images, targets in loader:
        if all("proposals" in t for t in targets):
            detections = model(to_device(images, device), proposals=[t["proposals"].to(device) for t in targets])
        else:
            detections = model(to_device(images, device))
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


def _run_cocoeval(coco_gt: COCO, results: list[dict], backend: str):
    """An evaluated, accumulated and summarised COCOeval of ``backend``; its printout is discarded."""
    results = [dict(r) for r in results]  # loadRes adds keys (area, id, segmentation) to the dicts it gets
    if backend == "pycocotools":
        gt, cocoeval = coco_gt, COCOeval
    elif backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError as exc:
            raise ImportError("backend='faster_coco_eval' needs: pip install faster-coco-eval "
                              "(or detkit[eval])") from exc
        dataset = coco_gt.dataset
        gt = FasterCOCO({**dataset, "annotations": [dict(a) for a in dataset["annotations"]]})
        cocoeval = COCOeval_faster
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = cocoeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def evaluate_coco(coco_gt: COCO, results: list[dict], class_names: Sequence[str] | None = None,
                  backend: str = "pycocotools") -> dict:
    """Bounding-box mAP of ``results`` (COCO results format: xywh, dataset category ids) against ``coco_gt``.

    Returns the twelve COCO summary statistics under :data:`STAT_NAMES` (AP = mAP@[.5:.95]); ``per_class``
    AP@[.5:.95] and ``per_class_AP50`` keyed by class name (in category-id order, 0 for a class without
    ground truth); ``pr_curves``, class name → (recall (101,), precision (101,)) at IoU 0.5, all areas, 100
    detections, for the classes with ground truth; and ``summary``, the printed table.
    ``backend``: ``pycocotools`` or ``faster_coco_eval`` (same numbers). No detections at all scores zero
    everywhere instead of failing.
    """
    cat_ids = sorted(coco_gt.getCatIds())
    names = list(class_names) if class_names else [coco_gt.cats[c]["name"] for c in cat_ids]
    if not results:
        return {**dict.fromkeys(STAT_NAMES, 0.0), "per_class": dict.fromkeys(names, 0.0),
                "per_class_AP50": dict.fromkeys(names, 0.0), "pr_curves": {}, "summary": ""}
    evaluator = _run_cocoeval(coco_gt, results, backend)
    metrics: dict = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    precision = np.asarray(evaluator.eval["precision"])  # (T, R, K, A, M): IoU thr, recall, class, area, max dets
    recall_levels = np.asarray(evaluator.params.recThrs)
    per_class, per_class_50, curves = {}, {}, {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
        p50 = p[0]  # IoU 0.5 is the first threshold
        per_class_50[name] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else 0.0
        if (p50 > -1).all():
            curves[name] = (recall_levels.copy(), p50.copy())
    metrics.update(per_class=per_class, per_class_AP50=per_class_50, pr_curves=curves,
                   summary=_summary_text(evaluator))
    return metrics


def _summary_text(evaluator) -> str:
    """pycocotools' twelve-line table, rebuilt from the stats (faster-coco-eval prints through a logger)."""
    rows = [("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
            ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100), ("AP", "0.50:0.95", "large", 100),
            ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
            ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100), ("AR", "0.50:0.95", "large", 100)]
    lines = []
    for (kind, iou, area, dets), value in zip(rows, evaluator.stats):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = {value:0.3f}")
    return "\n".join(lines)


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

