"""Detection confusion matrix with a background class.

Rows are the true class, columns the predicted class; index ``C`` (the last) is background. A ground truth
that no kept detection matches lands in column ``C`` ("missed"); a kept detection that matches no ground truth
lands in row ``C`` ("false positive"). Cell (C, C) stays 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detkit.evaluation.voc import ImageGroundTruth, box_iou_numpy, to_numpy


def confusion_matrix(ground_truth: Sequence[ImageGroundTruth], detections: Sequence[dict], num_classes: int,
                     score_threshold: float = 0.25, iou_threshold: float = 0.5) -> np.ndarray:
    """(C + 1, C + 1) int64 counts over all images.

    Detections with score >= ``score_threshold`` are matched class-agnostically, in descending score order,
    each to the unmatched ground truth of highest IoU if that IoU is >= ``iou_threshold`` — so a box on the
    right object with the wrong class shows up off the diagonal instead of as a miss plus a false positive.
    A detection whose match is a ``difficult`` ground truth is not counted, nor is an unmatched difficult one.

    Args:
        ground_truth: per image, boxes (G, 4) xyxy pixels, labels (G,), difficult (G,).
        detections: per image, same order, ``boxes`` (D, 4) xyxy pixels, ``scores`` (D,), ``labels`` (D,).
    """
    bg = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for gt, det in zip(ground_truth, detections):
        gt_boxes = to_numpy(gt.boxes, np.float64).reshape(-1, 4)
        gt_labels = to_numpy(gt.labels, np.int64).reshape(-1)
        difficult = to_numpy(gt.difficult, bool).reshape(-1)
        scores = to_numpy(det["scores"], np.float64).reshape(-1)
        keep = scores >= score_threshold
        order = np.argsort(-scores[keep], kind="stable")
        boxes = to_numpy(det["boxes"], np.float64).reshape(-1, 4)[keep][order]
        labels = to_numpy(det["labels"], np.int64).reshape(-1)[keep][order]
        iou = box_iou_numpy(boxes, gt_boxes) if len(gt_boxes) else np.zeros((len(boxes), 0))
        matched = np.zeros(len(gt_boxes), bool)
        for d in range(len(boxes)):
            candidates = np.where(matched, -1.0, iou[d])
            j = int(candidates.argmax()) if len(candidates) else -1
            if j >= 0 and candidates[j] >= iou_threshold:
                matched[j] = True
                if not difficult[j]:
                    matrix[gt_labels[j], labels[d]] += 1
            else:
                matrix[bg, labels[d]] += 1
        for j in np.nonzero(~matched & ~difficult)[0]:
            matrix[gt_labels[j], bg] += 1
    return matrix
