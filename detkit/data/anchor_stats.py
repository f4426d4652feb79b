"""Anchor shapes fitted to a dataset: its box sizes as the network sees them (after the letterbox to the input
size), clustered with YOLOv2's dimension clusters. What ``tools/anchors.py`` prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from detkit.anchors import kmeans_anchors
from detkit.data.transforms import letterbox_geometry


def _boxes_and_sizes(dataset) -> Iterator[tuple[np.ndarray, int, int]]:
    """(boxes (N, 4) xyxy original pixels, height, width) per image; from the annotation index when the
    dataset has one (:class:`~detkit.data.coco.CocoDetection`), decoding every image otherwise."""
    indexed = hasattr(dataset, "annotations") and hasattr(dataset, "images")
    for i in range(len(dataset)):
        if indexed:
            record = dataset.images[i]
            yield dataset.annotations(i)[0], int(record["height"]), int(record["width"])
        else:
            sample = dataset.get_sample(i)
            yield sample.boxes, int(sample.orig_size[0]), int(sample.orig_size[1])


def letterboxed_box_sizes(dataset, img_size: int, min_size: float = 2.0) -> Tensor:
    """(N, 2) widths and heights of every box of ``dataset`` in pixels of the ``img_size``² letterboxed input
    (the evaluation letterbox, without training jitter); boxes under ``min_size`` pixels on a side there are
    left out, as no anchor should be fitted to them."""
    sizes = []
    for boxes, height, width in _boxes_and_sizes(dataset):
        ratio, _, _ = letterbox_geometry(height, width, img_size)
        scaled = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * ratio
        sizes.append(scaled[:, 2:] - scaled[:, :2])
    wh = torch.from_numpy(np.concatenate(sizes) if sizes else np.zeros((0, 2)))
    return wh[(wh >= min_size).all(dim=1)]


@dataclass
class AnchorFit:
    """Fitted anchors (k, 2) (w, h) input pixels sorted by area, the mean over boxes of the best shape IoU,
    and how many boxes they were fitted to."""

    anchors: Tensor
    mean_iou: float
    num_boxes: int

    def per_scale(self, num_scales: int) -> list[Tensor]:
        """Anchors split into ``num_scales`` groups of consecutive areas, smallest first (the highest-resolution
        level first, as YOLOv3 orders them)."""
        if len(self.anchors) % num_scales:
            raise ValueError(f"{len(self.anchors)} anchors do not split into {num_scales} equal scales")
        return list(self.anchors.split(len(self.anchors) // num_scales))

    def format(self, num_scales: int) -> str:
        lines = [f"{len(self.anchors)} anchors (w, h) in input pixels from {self.num_boxes} boxes; "
                 f"mean best IoU {self.mean_iou:.3f}"]
        for level, group in enumerate(self.per_scale(num_scales)):
            shapes = ", ".join(f"({w:.0f}, {h:.0f})" for w, h in group.tolist())
            lines.append(f"  scale {level}: {shapes}")
        return "\n".join(lines)


def fit_anchors(dataset, img_size: int, k: int = 9, iters: int = 300, seed: int = 0,
                min_size: float = 2.0) -> AnchorFit:
    """k anchors for ``dataset`` letterboxed to ``img_size``: :func:`detkit.anchors.kmeans_anchors` on
    :func:`letterboxed_box_sizes`."""
    wh = letterboxed_box_sizes(dataset, img_size, min_size)
    if len(wh) < k:
        raise ValueError(f"only {len(wh)} boxes of at least {min_size} px; cannot fit {k} anchors")
    anchors, mean_iou = kmeans_anchors(wh, k, iters=iters, seed=seed)
    return AnchorFit(anchors, mean_iou, len(wh))


@dataclass
class SizeStats:
    """Image and box sizes of a dataset in original pixels: ``image_hw`` (I, 2) heights and widths,
    ``box_wh`` (N, 2) box widths and heights, ``box_image`` (N,) the index into ``image_hw`` of each box's image."""

    image_hw: np.ndarray
    box_wh: np.ndarray
    box_image: np.ndarray

    def median_long_side(self) -> float:
        """The median over images of the longer side, in pixels."""
        return float(np.median(self.image_hw.max(axis=1))) if len(self.image_hw) else 0.0

    def letterboxed(self, img_size: int, min_size: float = 2.0) -> Tensor:
        """(M, 2) box widths and heights in pixels of the ``img_size``² letterboxed input (the same geometry as
        :func:`letterboxed_box_sizes`), boxes under ``min_size`` on a side there left out."""
        ratio = img_size / self.image_hw.max(axis=1).clip(min=1)
        wh = torch.from_numpy(self.box_wh * ratio[self.box_image, None])
        return wh[(wh >= min_size).all(dim=1)]


def size_stats(dataset) -> SizeStats:
    """:class:`SizeStats` of ``dataset`` (read from the annotation index where the dataset has one)."""
    image_hw, box_wh, box_image = [], [], []
    for index, (boxes, height, width) in enumerate(_boxes_and_sizes(dataset)):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        image_hw.append((height, width))
        box_wh.append(boxes[:, 2:] - boxes[:, :2])
        box_image.append(np.full(len(boxes), index))
    return SizeStats(np.asarray(image_hw, dtype=np.float64).reshape(-1, 2),
                     np.concatenate(box_wh) if box_wh else np.zeros((0, 2)),
                     np.concatenate(box_image).astype(np.int64) if box_image else np.zeros(0, np.int64))
