"""Scoring a model's predictions against an evaluation dataset, with any of the supported metrics.

What a dataset must offer for the per-image metrics (VOC AP, confusion matrix) is a small protocol:

A dataset is evaluable when it has

* ``image_ids``: one id per index, the ``image_id`` its samples carry (to line predictions up with indices);
* ``annotations(index) -> (boxes, labels)``: (G, 4) float xyxy absolute pixels and (G,) int 0-based labels;
* ``class_names`` and ``num_classes``;
* optionally ``difficult(index) -> (G,) bool``, aligned with ``annotations(index)``, for datasets that mark
  objects to be ignored (Pascal VOC's ``<difficult>``). Without it every object counts.

:class:`detkit.data.coco.CocoDetection` satisfies it (no ``difficult``); a VOC reader adds ``difficult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from detkit.errors import ConfigError
from detkit.evaluation.coco import evaluate_coco, format_table, to_coco_results
from detkit.evaluation.confusion import confusion_matrix
from detkit.evaluation.voc import VOC_METRICS, ImageGroundTruth, evaluate_voc, format_voc_table

METRICS = ("coco", *VOC_METRICS)
NOT_JSON = ("summary", "pr_curves", "confusion_matrix")  # text and arrays for reports and plots


@runtime_checkable
class EvaluableDataset(Protocol):
    image_ids: Sequence
    class_names: Sequence[str]
    num_classes: int

    def __len__(self) -> int: ...
    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...


def dataset_ground_truth(dataset: EvaluableDataset) -> list[ImageGroundTruth]:
    """One :class:`ImageGroundTruth` per dataset index; ``difficult`` from ``dataset.difficult(index)`` when the
    dataset has it, else all False."""
    has_difficult = callable(getattr(dataset, "difficult", None))
    out = []
    for i in range(len(dataset)):
        boxes, labels = dataset.annotations(i)
        boxes, labels = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels, np.int64).reshape(-1)
        difficult = np.asarray(dataset.difficult(i), bool).reshape(-1) if has_difficult else np.zeros(len(labels), bool)
        if len(difficult) != len(labels):
            raise ValueError(f"image index {i}: {len(difficult)} difficult flags for {len(labels)} annotations")
        out.append(ImageGroundTruth(boxes, labels, difficult))
    return out


def align_predictions(dataset: EvaluableDataset, predictions: Sequence[dict]) -> list[dict]:
    """``predictions`` (dicts with ``image_id``, any order) reordered to dataset index order; an image without
    a prediction gets an empty one."""
    by_id = {p["image_id"]: p for p in predictions}
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    return [by_id.get(image_id, {"image_id": image_id, **empty}) for image_id in dataset.image_ids]


def check_metric(metric: str) -> None:
    """A :class:`ConfigError` unless ``metric`` is one of :data:`METRICS`."""
    if metric not in METRICS:
        raise ConfigError(f"eval metric must be one of {', '.join(METRICS)}, got {metric!r}")


def evaluate_dataset(dataset, predictions: Sequence[dict], metric: str = "coco", backend: str = "pycocotools",
                     confusion_score: float = 0.25) -> dict:
    """Score ``predictions`` (dicts with ``image_id`` and xyxy-pixel ``boxes``, ``scores``, ``labels``) on
    ``dataset``.

    ``metric``: ``coco`` (:func:`~detkit.evaluation.coco.evaluate_coco` with ``backend``; the dataset needs
    ``coco`` and ``label_to_category_id`` as well), ``voc07`` or ``voc12``
    (:func:`~detkit.evaluation.voc.evaluate_voc` at IoU 0.5). Either way the metrics also hold
    ``confusion_matrix`` ((C + 1, C + 1) counts of detections scoring at least ``confusion_score``).
    """
    check_metric(metric)
    ground_truth = dataset_ground_truth(dataset)
    aligned = align_predictions(dataset, predictions)
    if metric == "coco":
        results = to_coco_results(predictions, dataset.label_to_category_id)
        metrics = evaluate_coco(dataset.coco, results, dataset.class_names, backend)
    else:
        metrics = evaluate_voc(ground_truth, aligned, dataset.num_classes, metric, class_names=dataset.class_names)
    metrics["confusion_matrix"] = confusion_matrix(ground_truth, aligned, dataset.num_classes, confusion_score)
    return metrics


def main_metric(metric: str) -> str:
    """The key of :func:`evaluate_dataset`'s result that ranks checkpoints for ``metric``."""
    return "AP" if metric == "coco" else "mAP"


def json_metrics(metrics: dict) -> dict:
    """The JSON-ready part of ``metrics`` (what ``metrics.json`` holds)."""
    return {k: v for k, v in metrics.items() if k not in NOT_JSON}


def format_metrics(metrics: dict) -> str:
    """Text table of either result: COCO's statistics and per-class AP, or VOC's mAP and per-class AP."""
    return format_voc_table(metrics) if "mAP" in metrics else format_table(metrics)


def headline(metrics: dict) -> str:
    """One line with the numbers people quote."""
    if "mAP" in metrics:
        return f"{metrics.get('metric', 'VOC')} mAP@{metrics.get('iou_threshold', 0.5):g} {metrics['mAP']:.4f}"
    return f"mAP@[.5:.95] {metrics['AP']:.4f}  mAP@0.5 {metrics['AP50']:.4f}"
