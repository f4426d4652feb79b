"""Pascal VOC detection AP: per-class average precision and its mean at one IoU threshold.

Two ways to summarise a precision–recall curve, as the VOC devkit defines them:

* ``voc07``: the 11-point interpolated AP of VOC2007 — the mean, over recall levels 0, 0.1, ..., 1, of the
  highest precision reached at that recall or beyond.
* ``voc12`` (VOC2010 and later): the area under the monotone (non-increasing) envelope of the curve.

Matching follows the devkit: per class, detections are taken in descending score order (ties keep input
order); each is compared with the ground truths of its class in its image and assigned to the one of highest
IoU. If that IoU reaches the threshold, the detection is a true positive when the ground truth is unmatched,
a false positive when it was matched already (duplicates), and ignored — neither — when the ground truth is
``difficult``. Anything else is a false positive. Difficult ground truths do not count towards recall.

All boxes are xyxy in absolute pixels. ``plus_one=True`` uses the devkit's legacy inclusive-pixel convention
(width = x2 - x1 + 1) for areas and intersections. It is for boxes still in VOC's inclusive pixel indices;
detkit's readers turn those into continuous edges at the boundary (x1 = xmin - 1, x2 = xmax), on which the
default ``plus_one=False`` already gives the devkit's IoU — using both would count the extra pixel twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

VOC_METRICS = ("voc07", "voc12")


def to_numpy(x, dtype) -> np.ndarray:
    """``x`` (tensor, array or list) as a numpy array of ``dtype``."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def box_iou_numpy(a: np.ndarray, b: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """IoU matrix (N, M) of boxes ``a`` (N, 4) and ``b`` (M, 4), both xyxy; ``plus_one`` counts pixels
    inclusively (the VOC devkit's convention)."""
    off = 1.0 if plus_one else 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    area_a = (a[:, 2] - a[:, 0] + off) * (a[:, 3] - a[:, 1] + off)
    area_b = (b[:, 2] - b[:, 0] + off) * (b[:, 3] - b[:, 1] + off)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + off
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + off
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray, metric: str = "voc12") -> float:
    """AP of one precision–recall curve (points in descending-score order).

    ``voc07``: 11-point interpolation; ``voc12``: area under the monotone envelope. An empty curve is 0.
    """
    if metric not in VOC_METRICS:
        raise ValueError(f"metric must be one of {VOC_METRICS}, got {metric!r}")
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if recall.size == 0:
        return 0.0
    if metric == "voc07":
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # envelope: best precision at this recall or beyond
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def match_class(gt_boxes: Sequence, gt_difficult: Sequence, det_boxes: Sequence, det_scores: Sequence,
                iou_threshold: float = 0.5, plus_one: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy VOC matching of one class over all images.

    Args:
        gt_boxes, gt_difficult: per image, (G_i, 4) xyxy boxes and (G_i,) bool flags of this class.
        det_boxes, det_scores: per image, (D_i, 4) xyxy boxes and (D_i,) scores of this class.

    Returns:
        ``tp`` and ``fp``, (K,) bool in descending-score order over the K detections not ignored (a detection
        matched to a difficult ground truth is dropped), and the number of non-difficult ground truths.
    """
    image_of, scores, boxes = [], [], []
    for i, (b, s) in enumerate(zip(det_boxes, det_scores)):
        image_of.append(np.full(len(s), i))
        scores.append(to_numpy(s, np.float64).reshape(-1))
        boxes.append(to_numpy(b, np.float64).reshape(-1, 4))
    gts = [to_numpy(b, np.float64).reshape(-1, 4) for b in gt_boxes]
    difficult = [to_numpy(d, bool).reshape(-1) for d in gt_difficult]
    num_positives = int(sum((~d).sum() for d in difficult))
    if not scores:
        return np.zeros(0, bool), np.zeros(0, bool), num_positives
    image_of, scores, boxes = np.concatenate(image_of), np.concatenate(scores), np.concatenate(boxes)
    order = np.argsort(-scores, kind="stable")
    matched = [np.zeros(len(g), bool) for g in gts]
    tp, fp = np.zeros(len(order), bool), np.zeros(len(order), bool)
    keep = np.ones(len(order), bool)
    for k, d in enumerate(order):
        i = image_of[d]
        if len(gts[i]):
            iou = box_iou_numpy(boxes[d:d + 1], gts[i], plus_one)[0]
            j = int(iou.argmax())
            if iou[j] >= iou_threshold:
                if difficult[i][j]:
                    keep[k] = False
                elif not matched[i][j]:
                    tp[k] = matched[i][j] = True
                else:
                    fp[k] = True
                continue
        fp[k] = True
    return tp[keep], fp[keep], num_positives


def precision_recall(tp: np.ndarray, fp: np.ndarray, num_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (precision, recall), each (K,), from descending-score TP/FP flags."""
    ctp, cfp = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    recall = ctp / num_positives if num_positives else np.zeros_like(ctp)
    return precision, recall


@dataclass
class ImageGroundTruth:
    """Ground truth of one image: ``boxes`` (G, 4) xyxy pixels, ``labels`` (G,) 0-based, ``difficult`` (G,)
    bool."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def evaluate_voc(ground_truth: Sequence[ImageGroundTruth], detections: Sequence[dict], num_classes: int,
                 metric: str = "voc12", iou_threshold: float = 0.5, plus_one: bool = False,
                 class_names: Sequence[str] | None = None) -> dict:
    """VOC AP per class and mAP.

    Args:
        ground_truth: one :class:`ImageGroundTruth` per image.
        detections: one dict per image, same order, with ``boxes`` (D, 4) xyxy pixels, ``scores`` (D,),
            ``labels`` (D,) 0-based — numpy arrays or tensors.
        metric: ``voc07`` (11-point) or ``voc12`` (area).
        plus_one: the devkit's inclusive-pixel areas (``use_07_plus_one``).

    Returns:
        ``mAP`` (mean over the classes with at least one non-difficult ground truth), ``AP50`` (the same number
        when ``iou_threshold`` is 0.5), ``per_class`` AP by class name (those classes only), and
        ``pr_curves``: class name → (recall, precision) arrays, for plots.
    """
    if metric not in VOC_METRICS:
        raise ValueError(f"metric must be one of {VOC_METRICS}, got {metric!r}")
    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} detection images")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    gt = [(to_numpy(g.boxes, np.float64).reshape(-1, 4), to_numpy(g.labels, np.int64).reshape(-1),
           to_numpy(g.difficult, bool).reshape(-1)) for g in ground_truth]
    dets = [(to_numpy(d["boxes"], np.float64).reshape(-1, 4), to_numpy(d["scores"], np.float64).reshape(-1),
             to_numpy(d["labels"], np.int64).reshape(-1)) for d in detections]
    per_class, curves = {}, {}
    for c in range(num_classes):
        tp, fp, positives = match_class([b[lab == c] for b, lab, _ in gt], [d[lab == c] for _, lab, d in gt],
                                        [b[lab == c] for b, _, lab in dets], [s[lab == c] for _, s, lab in dets],
                                        iou_threshold, plus_one)
        if positives == 0:  # AP is undefined without positives; the devkit leaves such classes out
            continue
        precision, recall = precision_recall(tp, fp, positives)
        per_class[names[c]] = average_precision(recall, precision, metric)
        curves[names[c]] = (recall, precision)
    mean_ap = float(np.mean(list(per_class.values()))) if per_class else 0.0
    metrics: dict = {"mAP": mean_ap}
    if abs(iou_threshold - 0.5) < 1e-9:
        metrics["AP50"] = mean_ap
    metrics.update(metric=metric, iou_threshold=iou_threshold, per_class=per_class, pr_curves=curves)
    return metrics


def format_voc_table(metrics: dict) -> str:
    """mAP and per-class AP of :func:`evaluate_voc` as a fixed-width text table."""
    title = {"voc07": "VOC2007 11-point", "voc12": "VOC2010+ area"}.get(metrics.get("metric"), "VOC")
    lines = [f"{title} mAP@{metrics.get('iou_threshold', 0.5):g}: {metrics['mAP']:.4f}"]
    per_class = metrics.get("per_class", {})
    if per_class:
        width = max(len(n) for n in per_class)
        lines += ["", f"{'class':<{width}}  AP"] + [f"{n:<{width}}  {ap:.4f}" for n, ap in per_class.items()]
    return "\n".join(lines)
